"""``covid-cxr data build``: sources -> one manifest with patient-level splits.

The manifest (``DATASET_DIR/manifest.csv``) is the contract between stages: one row per
image with :data:`MANIFEST_COLUMNS`. Training, evaluation and reports read only the
manifest and ``dataset.json``, never a source-specific file.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.config import DataConfig, TASKS, write_yaml
from covid_cxr.errors import DatasetError, ImageReadError
from covid_cxr.images import load_image, sha256_file
from covid_cxr.sources import PATIENT_METADATA_PRIORITY, read_source

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "label", "source", "patient_id", "view", "sha256", "width", "height", "split",
                    "group", "finding", "source_split"]
SPLITS = ("train", "val", "test")
UNUSED = "unused"


def inspect_image(path: str) -> dict:
    """sha256, width and height of an image file, decoding it fully to prove it is readable."""
    try:
        arr = load_image(path)
        return {"sha256": sha256_file(Path(path)), "width": arr.shape[1], "height": arr.shape[0], "error": ""}
    except ImageReadError as exc:
        return {"sha256": "", "width": 0, "height": 0, "error": exc.reason}


def _inspect_all(paths: list[str], workers: int, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    if workers <= 1 or len(paths) < 16:
        return [inspect_image(p) for p in tqdm(paths, desc="checking images", disable=not progress)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(inspect_image, paths, chunksize=8), total=len(paths),
                         desc="checking images", disable=not progress))


def _source_rank(source: str) -> int:
    return PATIENT_METADATA_PRIORITY.index(source) if source in PATIENT_METADATA_PRIORITY else len(
        PATIENT_METADATA_PRIORITY)


def remove_byte_duplicates(df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict], list[str]]:
    """Keep one row per sha256, preferring sources with patient metadata.

    Returns (kept rows, one dropped record per removed copy, notes about label conflicts).
    """
    ranked = df.assign(_rank=df["source"].map(_source_rank)).sort_values(["_rank", "path"], kind="stable")
    first = ranked.drop_duplicates("sha256", keep="first")
    kept_by_sha = first.set_index("sha256")
    dropped, notes = [], []
    for _, row in ranked[ranked.duplicated("sha256", keep="first")].iterrows():
        keep = kept_by_sha.loc[row["sha256"]]
        dropped.append({"source": row["source"], "item": row["path"],
                        "reason": f"byte-identical copy of {keep['path']} ({keep['source']})"})
        if keep["label"] != row["label"]:
            notes.append(f"label conflict: {row['path']} ({row['source']}: {row['label']}) is byte-identical to "
                         f"{keep['path']} ({keep['source']}: {keep['label']}); kept {keep['label']!r}")
    return first.drop(columns="_rank").sort_index(), dropped, notes


def assign_groups(df: pd.DataFrame) -> pd.Series:
    """Split groups: images that share a patient id (within a source) are one group.

    A row may carry several ids (``"285;339"``, the same person listed twice), which joins
    their groups. Returns one integer group id per row.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    keys = []
    for source, pid, sha in zip(df["source"], df["patient_id"], df["sha256"]):
        ids = [f"{source}:{p.strip()}" for p in str(pid).split(";") if p.strip()] or [f"sha:{sha}"]
        for other in ids[1:]:
            parent[find(other)] = find(ids[0])
        keys.append(ids[0])
    roots = [find(k) for k in keys]
    codes = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    return pd.Series([codes[r] for r in roots], index=df.index, name="group")


def _fill(order: list[int], counts: dict[int, Counter], taken: set[int], targets: dict[str, int]) -> list[int]:
    """Greedily take whole groups (in ``order``) without exceeding any class target."""
    got: Counter = Counter()
    chosen = []
    for g in order:
        if g in taken:
            continue
        c = counts[g]
        if all(got[k] + v <= targets.get(k, 0) for k, v in c.items()) and any(
                got[k] < targets.get(k, 0) for k in c):
            chosen.append(g)
            got.update(c)
            taken.add(g)
            if all(got[k] >= t for k, t in targets.items()):
                break
    return chosen


def split_by_patient(df: pd.DataFrame, labels: list[str], cfg: DataConfig) -> pd.Series:
    """Assign train/val/test/unused per group, stratified by label and deterministic for ``cfg.seed``.

    Raises:
        DatasetError: too few images of a class for the requested test size.
    """
    in_task = df["label"].isin(labels)
    avail = df.loc[in_task, "label"].value_counts()
    for lab in labels:
        n = int(avail.get(lab, 0))
        if n < cfg.test_per_class + 2:
            raise DatasetError(
                f"only {n} {lab!r} images are available (after duplicates, unreadable files and non-frontal views "
                f"were removed; see ingest_report.json) but --test-per-class {cfg.test_per_class} needs "
                f"{cfg.test_per_class} for the test split and at least 2 more for training; lower --test-per-class "
                f"or add sources")
    task_df = df[in_task]
    counts: dict[int, Counter] = defaultdict(Counter)
    for g, lab in zip(task_df["group"], task_df["label"]):
        counts[int(g)][lab] += 1
    rng = np.random.default_rng(cfg.seed)
    order = [int(g) for g in rng.permutation(sorted(counts))]
    taken: set[int] = set()
    assignment: dict[int, str] = {}
    for g in _fill(order, counts, taken, {lab: cfg.test_per_class for lab in labels}):
        assignment[g] = "test"
    pool = Counter()
    for g, c in counts.items():
        if g not in taken:
            pool.update(c)
    total = sum(pool.values())
    dev_total = min(total, cfg.train_size / (1 - cfg.val_fraction))
    val_t, train_t = {}, {}
    for lab in labels:
        dev = pool[lab] * dev_total / total
        val_t[lab] = int(round(cfg.val_fraction * dev)) if cfg.val_fraction > 0 else 0
        if cfg.val_fraction > 0:
            val_t[lab] = max(1, val_t[lab])
        train_t[lab] = int(round(dev)) - val_t[lab]
    while sum(train_t.values()) > cfg.train_size:
        # Per-class rounding can overshoot --train-size (e.g. 19 over two equal classes -> 10 + 10).
        train_t[max(train_t, key=train_t.get)] -= 1
    for g in _fill(order, counts, taken, val_t):
        assignment[g] = "val"
    for g in _fill(order, counts, taken, train_t):
        assignment[g] = "train"
    split = df["group"].map(lambda g: assignment.get(int(g), UNUSED))
    split[~in_task] = UNUSED
    return split


def check_patient_disjoint(df: pd.DataFrame) -> None:
    """Refuse a manifest in which a patient (or split group) appears in two splits.

    Raises:
        DatasetError: naming the shared patients.
    """
    used = df[df["split"].isin(SPLITS)]
    problems = []
    for key in ("group", "patient_key"):
        if key == "patient_key":
            values = used.assign(patient_key=used["source"] + ":" + used["patient_id"].astype(str))
        else:
            values = used
        n_splits = values.groupby(key)["split"].nunique()
        problems += [str(k) for k in n_splits[n_splits > 1].index]
    if problems:
        raise DatasetError(f"patients in more than one split: {', '.join(problems[:10])}"
                           f"{' ...' if len(problems) > 10 else ''}; the manifest was not written")
    dup = df["sha256"].duplicated()
    if dup.any():
        raise DatasetError(f"byte-identical images listed twice: {', '.join(df.loc[dup, 'path'][:5])}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(dataset_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """Load ``manifest.csv`` and ``dataset.json`` from a dataset folder.

    Raises:
        DatasetError: files missing or columns missing.
    """
    d = Path(dataset_dir)
    mpath, jpath = d / "manifest.csv", d / "dataset.json"
    for p in (mpath, jpath):
        if not p.is_file():
            raise DatasetError(f"{p} not found; build the dataset first with `covid-cxr data build --out {d}`")
    df = pd.read_csv(mpath, dtype={"patient_id": str, "sha256": str, "view": str, "finding": str,
                                   "source_split": str}, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"{mpath} lacks columns {missing}; rebuild it with `covid-cxr data build`")
    meta = json.loads(jpath.read_text())
    return df, meta


def _label_source_table(df: pd.DataFrame) -> dict:
    used = df[df["split"] != UNUSED]
    table = used.groupby(["split", "label", "source"]).size()
    out: dict = {}
    for (split, label, source), n in table.items():
        out.setdefault(split, {}).setdefault(label, {})[source] = int(n)
    return out


def confounder_warnings(df: pd.DataFrame, labels: list[str], margin: float = 0.3) -> list[str]:
    """Plain-language warnings when a source is much more common in one class than in the others:
    a model can then learn to recognise the source (scanner, hospital, age group) instead of the disease."""
    used = df[df["split"] != UNUSED]
    used = used[used["label"].isin(labels)]
    out = []
    for lab in labels:
        inside, outside = used[used["label"] == lab], used[used["label"] != lab]
        if inside.empty:
            continue
        for src, share_in in inside["source"].value_counts(normalize=True).items():
            share_out = float((outside["source"] == src).mean()) if len(outside) else 0.0
            if share_in - share_out >= margin:
                out.append(f"{share_in:.0%} of {lab!r} images come from {src!r} but only {share_out:.0%} of the "
                           f"other classes: a model can learn to recognise that source instead of the disease")
    if "mooney" in set(used["source"]):
        out.append("the mooney images are pediatric (ages 1-5) while covid images are adults: age is a confounder")
    return out


def build(cfg: DataConfig) -> dict:
    """Read the sources, check every image, remove byte duplicates, split by patient, write the dataset.

    Writes ``manifest.csv``, ``ingest_report.json``, ``dropped.csv``, ``dataset.json`` and
    ``build_config.yaml`` into ``cfg.out``. Nothing is written if a check fails.

    Returns:
        The ingest report (also written as JSON).
    """
    labels = list(TASKS[cfg.task])
    reads = [read_source(name, path) for name, path in cfg.sources]
    frames = [r.images for r in reads if not r.images.empty]
    if not frames:
        raise DatasetError("the sources hold no usable images; check the --source paths")
    df = pd.concat(frames, ignore_index=True)
    dropped = [d for r in reads for d in r.dropped]
    info = _inspect_all(df["path"].tolist(), cfg.workers, cfg.progress)
    df = pd.concat([df, pd.DataFrame(info, index=df.index)], axis=1)
    bad = df[df["error"] != ""]
    dropped += [{"source": s, "item": p, "reason": f"unreadable image: {e}"}
                for s, p, e in zip(bad["source"], bad["path"], bad["error"])]
    df = df[df["error"] == ""].drop(columns="error")
    df, dup_dropped, conflict_notes = remove_byte_duplicates(df)
    dropped += dup_dropped
    df = df.reset_index(drop=True)
    df["group"] = assign_groups(df)
    df["split"] = split_by_patient(df, labels, cfg)
    df = df[MANIFEST_COLUMNS]
    check_patient_disjoint(df)
    report = _report(cfg, labels, reads, df, dropped, conflict_notes)
    _write(cfg, df, dropped, report, labels)
    return report


def _report(cfg: DataConfig, labels: list[str], reads, df: pd.DataFrame, dropped: list[dict],
            conflict_notes: list[str]) -> dict:
    by_source = {}
    for (_, path), r in zip(cfg.sources, reads):
        reasons = Counter(d["reason"] for d in dropped if d["source"] == r.source)
        kept = df[df["source"] == r.source]
        by_source[r.source] = {
            "path": str(Path(path).resolve()),
            "images_read": int(len(r.images)),
            "in_manifest": int(len(kept)),
            "labels_in_manifest": {k: int(v) for k, v in kept["label"].value_counts().items()},
            "not_used": dict(sorted(((k, int(v)) for k, v in reasons.items()), key=lambda kv: -kv[1])),
            "notes": r.notes,
        }
    split_counts = {s: {lab: int(((df["split"] == s) & (df["label"] == lab)).sum()) for lab in labels}
                    for s in SPLITS}
    unused = df[df["split"] == UNUSED]
    requested_train = cfg.train_size
    got_train = int((df["split"] == "train").sum())
    warnings_ = confounder_warnings(df, labels)
    if got_train < requested_train:
        warnings_.append(f"--train-size {requested_train} requested but only {got_train} images remain for "
                         "training after the test and validation splits")
    return {
        "disclaimer": DISCLAIMER,
        "covid_cxr_version": __version__,
        "task": cfg.task,
        "labels": labels,
        "protocol": {"name": "patient", "description": "random split by patient group (patient ids within a "
                     "source, joined where one image carries several ids), stratified by label; byte-identical "
                     "images removed; near-duplicates are NOT yet removed", "seed": cfg.seed},
        "sources": by_source,
        "images_in_manifest": int(len(df)),
        "not_used_total": len(dropped),
        "not_used_by_reason": dict(Counter(d["reason"].split(" of ")[0] if d["reason"].startswith("byte-identical")
                                           else d["reason"] for d in dropped).most_common()),
        "unused_in_manifest": {"label not in task": int((~unused["label"].isin(labels)).sum()),
                               "beyond --train-size or not fitting a split": int(unused["label"].isin(labels).sum())},
        "splits": split_counts,
        "patients_per_split": {s: int(df.loc[df["split"] == s, "group"].nunique()) for s in SPLITS},
        "label_source_split": _label_source_table(df),
        "label_conflicts": conflict_notes,
        "warnings": warnings_,
    }


def _write(cfg: DataConfig, df: pd.DataFrame, dropped: list[dict], report: dict, labels: list[str]) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset_meta = {"task": cfg.task, "labels": labels, "protocol": report["protocol"],
                    "sources": {n: str(Path(p).resolve()) for n, p in cfg.sources},
                    "covid_cxr_version": __version__, "splits": report["splits"]}
    write_yaml(out / "build_config.yaml", cfg.to_dict())
    atomic_write_text(out / "dropped.csv", pd.DataFrame(dropped, columns=["source", "item", "reason"]).to_csv(
        index=False))
    atomic_write_text(out / "ingest_report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "dataset.json", json.dumps(dataset_meta, indent=2))
    # The manifest goes last: its presence means the rest is complete.
    atomic_write_text(out / "manifest.csv", df.to_csv(index=False))


def format_report(report: dict, out: str | Path) -> str:
    """A terminal summary of an ingest report."""
    lines = [f"dataset written to {out} (task {report['task']}: " +
             ", ".join(f"{i}={lab}" for i, lab in enumerate(report["labels"])) + ")"]
    lines.append(f"{'source':<22}{'read':>7}{'in manifest':>13}{'not used':>10}  labels")
    for name, s in report["sources"].items():
        labels = ", ".join(f"{k} {v}" for k, v in s["labels_in_manifest"].items())
        lines.append(f"{name:<22}{s['images_read']:>7}{s['in_manifest']:>13}{sum(s['not_used'].values()):>10}  {labels}")
    lines.append("split      " + "  ".join(f"{lab:>8}" for lab in report["labels"]) + "  patients")
    for split, counts in report["splits"].items():
        lines.append(f"{split:<10} " + "  ".join(f"{counts[lab]:>8}" for lab in report["labels"]) +
                     f"  {report['patients_per_split'][split]:>8}")
    lines.append(f"not used: {report['not_used_total']} files/rows (reasons in ingest_report.json, each item in "
                 "dropped.csv)")
    for name, s in report["sources"].items():
        lines += [f"note ({name}): {n}" for n in s["notes"]]
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    lines += report["label_conflicts"]
    lines.append(report["disclaimer"])
    return "\n".join(lines)
