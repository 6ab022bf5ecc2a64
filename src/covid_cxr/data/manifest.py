"""``covid-cxr data build``: sources -> one manifest with patient-level splits.

The manifest (``DATASET_DIR/manifest.csv``) is the contract between stages: one row per
image with :data:`MANIFEST_COLUMNS`. Training, evaluation and reports read only the
manifest and ``dataset.json``, never a source-specific file.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.config import PEDIATRIC_SOURCES, TASKS, Task
from covid_cxr.data.card import write_card
from covid_cxr.data.dataset import MANIFEST_COLUMNS, source_root_record
from covid_cxr.data.dedup import FingerprintTable, cluster, find_near_duplicates
from covid_cxr.data.ingest import Job, inspect_all, inspect_file, sweep_temp_files
from covid_cxr.data.options import DataConfig
from covid_cxr.data.publish import Staging
from covid_cxr.data.dicom_source import describe, read_dicom_source
from covid_cxr.data.sources import DICOM_SOURCES, PATIENT_METADATA_PRIORITY, read_source
from covid_cxr.data.splits import (SPLITS, UNUSED, assign_groups, cap_source_share,  # noqa: F401
                                   check_patient_disjoint, split_by_patient, split_leave_source_out)
from covid_cxr.errors import DatasetError
from covid_cxr.files import atomic_write, write_json, write_yaml
from covid_cxr.imaging.pixels import BASE_SHORT_SIDE
from covid_cxr.paths import DatasetDir

log = logging.getLogger(__name__)



def inspect_image(path: str, cache_root: str | None = None, fingerprints: bool = False) -> dict:
    """Decode an image fully (proving it is readable) and return its sha256, width, height and (with
    ``fingerprints``) near-duplicate fingerprint; with ``cache_root`` its stage 1 is cached in the same pass
    (see :func:`covid_cxr.data.ingest.inspect_file`, which skips the decode when a finished record exists)."""
    return inspect_file(path, Job(cache_root, fingerprints))


def _source_rank(source: str) -> int:
    return PATIENT_METADATA_PRIORITY.index(source) if source in PATIENT_METADATA_PRIORITY else len(
        PATIENT_METADATA_PRIORITY)


def _name(row: pd.Series) -> str:
    """How reports name an image: its path relative to its source root (``rel``) where known."""
    return str(row.get("rel", row["path"]))


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
        kept_name, row_name = _name(keep), _name(row)
        dropped.append({"source": row["source"], "item": row["path"],
                        "reason": f"byte-identical copy of {kept_name} ({keep['source']})"})
        if keep["label"] != row["label"]:
            notes.append(f"label conflict: {row_name} ({row['source']}: {row['label']}) is byte-identical to "
                         f"{kept_name} ({keep['source']}: {keep['label']}); kept {keep['label']!r}")
    return first.drop(columns="_rank").sort_index(), dropped, notes


DUPLICATE_COLUMNS = ["cluster", "path_a", "source_a", "label_a", "path_b", "source_b", "label_b", "hash_distance",
                     "similarity", "method", "kept"]


def remove_near_duplicates(df: pd.DataFrame, fingerprints: FingerprintTable, workers: int = 1
                           ) -> tuple[pd.DataFrame, list[dict], pd.DataFrame, list[str]]:
    """Keep one image per near-duplicate cluster (sources with patient metadata first, then the
    larger image); if a cluster's copies carry conflicting labels, leave all of them out.

    ``df`` needs a ``fp_row`` column: each row's row in ``fingerprints``. Returns (kept rows, dropped
    records, one row per duplicate pair for duplicates.csv, notes).
    """
    pairs = find_near_duplicates(fingerprints.take(df["fp_row"].to_numpy()), workers=workers)
    clusters = cluster(len(df), pairs)
    pos = df.reset_index(drop=True)
    if "rel" not in pos:
        pos["rel"] = pos["path"]
    pos["_cluster"] = clusters
    pos["_rank"] = pos["source"].map(_source_rank)
    pos["_area"] = -(pos["width"].astype(int) * pos["height"].astype(int))
    drop_idx: dict[int, str] = {}
    kept_of: dict[int, str] = {}
    notes = []
    sizes = pos["_cluster"].value_counts()
    for cid in sizes[sizes > 1].index:
        members = pos[pos["_cluster"] == cid].sort_values(["_rank", "_area", "path"])
        if members["label"].nunique() > 1:
            desc = ", ".join(f"{p} ({s}: {lab})" for p, s, lab in zip(members["rel"], members["source"],
                                                                     members["label"]))
            notes.append(f"near-duplicate copies with conflicting labels, all left out: {desc}")
            for i in members.index:
                drop_idx[i] = "near-duplicate copies carry conflicting labels (all copies left out)"
            kept_of[cid] = ""
            continue
        keep = members.index[0]
        kept_of[cid] = members.at[keep, "rel"]
        for i in members.index[1:]:
            drop_idx[i] = f"near-duplicate of {members.at[keep, 'rel']} ({members.at[keep, 'source']})"
    rows = [{"cluster": int(clusters[p.i]), "path_a": pos.at[p.i, "rel"], "source_a": pos.at[p.i, "source"],
             "label_a": pos.at[p.i, "label"], "path_b": pos.at[p.j, "rel"], "source_b": pos.at[p.j, "source"],
             "label_b": pos.at[p.j, "label"], "hash_distance": p.hash_distance, "similarity": p.similarity,
             "method": p.method, "kept": kept_of.get(int(clusters[p.i]), "")} for p in pairs]
    dropped = [{"source": pos.at[i, "source"], "item": pos.at[i, "path"], "reason": r} for i, r in drop_idx.items()]
    kept = pos.drop(index=list(drop_idx)).drop(columns=["_cluster", "_rank", "_area"])
    return kept, dropped, pd.DataFrame(rows, columns=DUPLICATE_COLUMNS), notes


def _label_source_table(df: pd.DataFrame) -> dict:
    used = df[df["split"] != UNUSED]
    table = used.groupby(["split", "target", "source"]).size()
    out: dict = {}
    for (split, target, source), n in table.items():
        out.setdefault(split, {}).setdefault(target, {})[source] = int(n)
    return out


def confounder_warnings(df: pd.DataFrame, classes: list[str], margin: float = 0.3) -> list[str]:
    """Plain-language warnings when a source is much more common in one class than in the others:
    a model can then learn to recognise the source (scanner, hospital, age group) instead of the disease."""
    used = df[(df["split"] != UNUSED) & (df["target"] != "")]
    out = []
    for c in classes:
        inside, outside = used[used["target"] == c], used[used["target"] != c]
        if inside.empty:
            continue
        for src, share_in in inside["source"].value_counts(normalize=True).items():
            share_out = float((outside["source"] == src).mean()) if len(outside) else 0.0
            if share_in - share_out >= margin:
                out.append(f"{share_in:.0%} of {c!r} images come from {src!r} but only {share_out:.0%} of the "
                           f"other classes: a model can learn to recognise that source instead of the disease")
    for src in sorted(PEDIATRIC_SOURCES & set(used["source"])):
        ped = used[used["source"] == src]["target"].value_counts()
        out.append(f"{', '.join(f'{n} {c!r}' for c, n in ped.items())} images come from {src}, whose patients are "
                   "pediatric (children aged 1-5) while covid images are adults: age is a confounder")
    return out


def _read_sources(cfg: DataConfig) -> list:
    reads = [read_dicom_source(name, path, cfg) if name in DICOM_SOURCES else read_source(name, path, cfg.allow_links_to)
             for name, path in cfg.sources]
    names = [r.source for r in reads]
    if len(set(names)) != len(names):
        raise DatasetError(f"two sources would both be called {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                           "folder sources are named after their folder, so give them different folder names")
    if all(r.images.empty for r in reads):
        raise DatasetError("the sources hold no usable images; check the --source paths")
    empty = [empty_source_text(r) for r in reads if r.images.empty]
    if empty and not cfg.allow_empty_source:
        raise DatasetError("; ".join(empty) + ". Nothing was written: fix the source folder, leave the source out, or "
                           "pass --allow-empty-source to build without its images")
    for text in empty:
        log.warning("%s (--allow-empty-source: building without it)", text)
    return reads


def empty_source_text(r) -> str:
    """``source X yields no usable image: its 12 items were refused (12 link pointing outside ...)``."""
    reasons = Counter(d["reason"] for d in r.dropped)
    top = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common(3))
    hint = (" (a link to shared storage outside the source folder is refused: pass --allow-links-to with the folder "
            "the links lead to, copy the images in, or point --source at that folder)"
            if any("outside the source folder" in k for k in reasons) else "")
    return (f"source {r.source} yields no usable image: {len(r.dropped)} item(s) were not used"
            + (f" ({top})" if top else " (it holds no image files)") + hint)


def _read_and_check(cfg: DataConfig, reads: list, cache_root: Path | None, reuse: list[Path]
                    ) -> tuple[pd.DataFrame, list[dict], FingerprintTable | None, dict]:
    """Run the one pass over every file of the sources (:func:`covid_cxr.data.ingest.inspect_all`).

    Returns (rows of readable images with sha256/width/height/rel/fp_row, dropped records, fingerprints or
    None, pass statistics).
    """
    df = pd.concat([r.images for r in reads if not r.images.empty], ignore_index=True)
    df["rel"] = _relative_paths(df, reads)
    df["mask_path"] = _relative_paths(df, reads, "mask_path")  # a mask is carried, never decoded here
    dropped = [d for r in reads for d in r.dropped]
    swept = sweep_temp_files(cache_root) if cache_root and cache_root.is_dir() else 0
    seen = inspect_all(df["path"].tolist(), cache_root, cfg.dedup, cfg.workers, reuse=reuse, progress=cfg.progress)
    df["sha256"], df["width"], df["height"], df["error"] = seen.sha256, seen.width, seen.height, seen.error
    df["fp_row"] = np.arange(len(df))
    bad = df[df["error"] != ""]
    dropped += [{"source": s, "item": p, "reason": f"unreadable image: {e}"}
                for s, p, e in zip(bad["source"], bad["path"], bad["error"])]
    stats = {"files": len(df), "decoded": seen.decoded, "reused_from_cache": len(df) - seen.decoded,
             "seconds": round(seen.seconds, 2), "workers": cfg.workers, "stale_temp_files_removed": swept}
    return df[df["error"] == ""].drop(columns="error"), dropped, seen.fingerprints, stats


def _assign_splits(df: pd.DataFrame, cfg: DataConfig, task: Task) -> tuple[pd.DataFrame, list[str]]:
    classes = list(task.classes)
    df = df.reset_index(drop=True)
    df["target"] = df["label"].map(lambda lab: task.mapping.get(lab, ""))
    notes: list[str] = []
    if cfg.max_source_share < 1.0:
        df["target"], notes = cap_source_share(df, classes, cfg.max_source_share, cfg.seed)
    df["group"] = assign_groups(df)
    if cfg.protocol == "leave-source-out":
        if cfg.test_source not in set(df["source"]):
            raise DatasetError(f"--test-source {cfg.test_source!r} is not among the sources read: "
                               f"{sorted(df['source'].unique())}")
        df["split"] = split_leave_source_out(df, classes, cfg)
    else:
        df["split"] = split_by_patient(df, classes, cfg)
    return df[MANIFEST_COLUMNS], notes


def build(cfg: DataConfig) -> dict:
    """Read the sources, check every image, remove duplicates, split by the protocol, write the dataset.

    Writes ``manifest.csv``, ``ingest_report.json``, ``dropped.csv``, ``dataset.json`` and
    ``build_config.yaml`` (plus duplicates.csv, the dataset card and the image cache) into a staging
    folder beside ``cfg.out`` and swaps it in at the end (:mod:`covid_cxr.data.publish`): until then an
    existing dataset at ``cfg.out`` is untouched, and a build that fails or is killed changes nothing
    there. Its finished cache entries stay in the staging folder, so the next build decodes only the
    images it had not reached.

    Returns:
        The ingest report (also written as JSON).
    """
    import time

    t0 = time.perf_counter()
    task = TASKS[cfg.task]
    reads = _read_sources(cfg)
    with Staging(cfg.out) as staging:
        cache_root = staging.cache if cfg.cache else None
        df, dropped, fps, stats = _read_and_check(cfg, reads, cache_root, [DatasetDir(staging.out).cache])
        df, dup_dropped, conflict_notes = remove_byte_duplicates(df)
        dropped += dup_dropped
        duplicates = pd.DataFrame(columns=DUPLICATE_COLUMNS)
        if cfg.dedup:
            t1 = time.perf_counter()
            df, near_dropped, duplicates, near_notes = remove_near_duplicates(df, fps, cfg.workers)
            stats["duplicate_search_seconds"] = round(time.perf_counter() - t1, 2)
            dropped += near_dropped
            conflict_notes += near_notes
        del fps
        df, cap_notes = _assign_splits(df, cfg, task)
        check_patient_disjoint(df)
        report = _report(cfg, list(task.classes), reads, df, dropped, conflict_notes, cap_notes)
        report["warnings"] += [empty_source_text(r) for r in reads if r.images.empty]
        report["near_duplicates"] = _duplicate_summary(duplicates, cfg.dedup)
        report["build"] = stats
        _write(cfg, staging, df, dropped, report, list(task.classes), duplicates, reads)
        staging.publish()
    log.info("data build finished in %.1f s", time.perf_counter() - t0)
    return report


def _duplicate_summary(duplicates: pd.DataFrame, enabled: bool) -> dict:
    if not enabled:
        return {"enabled": False}
    pairs = Counter(" <-> ".join(sorted((a, b))) for a, b in zip(duplicates["source_a"], duplicates["source_b"]))
    return {"enabled": True, "method": "pHash candidates (<= 8 of 64 bits) confirmed by high-pass correlation of "
            "equalised 32x32 thumbnails (>= 0.75), also on centre crops", "pairs": int(len(duplicates)),
            "clusters": int(duplicates["cluster"].nunique()) if len(duplicates) else 0,
            "pairs_by_source_pair": dict(pairs.most_common())}


def _protocol(cfg: DataConfig) -> dict:
    if cfg.protocol == "leave-source-out":
        text = (f"leave-source-out: every image of {cfg.test_source!r} is the test split (external validation); "
                "validation and training come from the other sources, split by patient group")
    else:
        text = ("random split by patient group (patient ids within a source, joined where one image carries "
                "several ids), stratified by class")
    text += "; byte-identical images removed; " + (
        "near-duplicates removed (one image kept per cluster)" if cfg.dedup else "near-duplicates NOT removed (--no-dedup)")
    return {"name": cfg.protocol, "test_source": cfg.test_source, "description": text, "seed": cfg.seed,
            "max_source_share": cfg.max_source_share}


def _report(cfg: DataConfig, classes: list[str], reads, df: pd.DataFrame, dropped: list[dict],
            conflict_notes: list[str], cap_notes: list[str]) -> dict:
    by_source = {}
    for (kind, path), r in zip(cfg.sources, reads):
        reasons = Counter(d["reason"] for d in dropped if d["source"] == r.source)
        kept = df[df["source"] == r.source]
        by_source[r.source] = {
            "path": describe(path) if kind in DICOM_SOURCES else str(Path(path).resolve()),
            "found": int(len(r.images) + len(r.dropped)),
            "images_read": int(len(r.images)),
            "not_used_total": int(sum(reasons.values())),
            "in_manifest": int(len(kept)),
            "labels_in_manifest": {k: int(v) for k, v in kept["label"].value_counts().items()},
            "views_in_manifest": {k: int(v) for k, v in kept["view"].value_counts().items()},
            "masks_in_manifest": int((kept["mask_path"] != "").sum()),
            "not_used": dict(sorted(((k, int(v)) for k, v in reasons.items()), key=lambda kv: -kv[1])),
            "notes": r.notes,
        }
    split_counts = {s: {c: int(((df["split"] == s) & (df["target"] == c)).sum()) for c in classes}
                    for s in SPLITS}
    in_mapping = df["label"].isin(list(TASKS[cfg.task].mapping))
    got_train = int((df["split"] == "train").sum())
    warnings_ = confounder_warnings(df, classes)
    if got_train < cfg.train_size:
        warnings_.append(f"--train-size {cfg.train_size} requested but only {got_train} images remain for "
                         "training after the test and validation splits")
    if cfg.protocol == "leave-source-out":
        missing = [c for c in classes if split_counts["test"][c] == 0]
        if missing:
            warnings_.append(f"the held-out source {cfg.test_source!r} has no {', '.join(map(repr, missing))} "
                             "images: ROC AUC and the metrics of those classes cannot be computed on it")
    return {
        "disclaimer": DISCLAIMER,
        "covid_cxr_version": __version__,
        "task": cfg.task,
        "task_description": TASKS[cfg.task].description,
        "labels": classes,
        "label_mapping": dict(TASKS[cfg.task].mapping),
        "protocol": _protocol(cfg),
        "sources": by_source,
        "links_followed_into": [str(Path(p).expanduser().resolve()) for p in cfg.allow_links_to],
        "images_in_manifest": int(len(df)),
        "not_used_total": len(dropped),
        "not_used_by_reason": dict(Counter(_reason_kind(d["reason"]) for d in dropped).most_common()),
        "unused_in_manifest": {
            "label not in task": int((~in_mapping).sum()),
            "left out by --max-source-share": int((in_mapping & (df["target"] == "")).sum()),
            "beyond --train-size or not fitting a split": int(((df["split"] == UNUSED) & (df["target"] != "")).sum()),
        },
        "splits": split_counts,
        "patients_per_split": {s: int(df.loc[df["split"] == s, "group"].nunique()) for s in SPLITS},
        "label_source_split": _label_source_table(df),
        "label_conflicts": conflict_notes,
        "notes": cap_notes,
        "warnings": warnings_,
    }


def _reason_kind(reason: str) -> str:
    """Group reasons that name a file ('byte-identical copy of X') under one heading."""
    for prefix in ("byte-identical copy", "near-duplicate of"):
        if reason.startswith(prefix):
            return prefix
    return reason


def _relative_paths(df: pd.DataFrame, reads, column: str = "path") -> pd.Series:
    """Image (or mask: ``column`` mask_path, '' for none) paths relative to their source's root (what manifest.csv
    stores)."""
    roots = {r.source: Path(r.root) for r in reads}
    return pd.Series([str(Path(p).relative_to(roots[s])) if p else "" for s, p in zip(df["source"], df[column])],
                     index=df.index)


def _relative_item(item: str, root: Path | None) -> str:
    """A dropped item (a file or ``FILE:row N``) relative to its source root, as manifest.csv names images."""
    prefix = f"{root}{os.sep}" if root is not None else None
    return item[len(prefix):] if prefix and item.startswith(prefix) else item


def _write(cfg: DataConfig, staging: Staging, df: pd.DataFrame, dropped: list[dict], report: dict,
           classes: list[str], duplicates: pd.DataFrame, reads) -> None:
    """Write every dataset file into the staging folder (the manifest last); paths recorded in them name
    the final folder ``staging.out``."""
    d, final = DatasetDir(staging.dir), DatasetDir(staging.out)
    d.root.mkdir(parents=True, exist_ok=True)
    task = TASKS[cfg.task]
    roots = {r.source: r.root for r in reads}
    dataset_meta = {"task": cfg.task, "labels": classes, "positive_class": task.positive,
                    "protocol": report["protocol"],
                    "source_roots": {r.source: source_root_record(r.root, final.root, r.synthetic) for r in reads},
                    "covid_cxr_version": __version__, "splits": report["splits"],
                    "cache": {"path": "cache", "absolute": str(final.cache), "short_side": BASE_SHORT_SIDE}
                    if cfg.cache else None}
    options = cfg.to_dict()
    options["sources"] = [[n, describe(p) if n in DICOM_SOURCES else p] for n, p in cfg.sources]  # no credentials
    write_yaml(d.build_config, options)
    atomic_write(d.duplicates, duplicates.to_csv(index=False))
    rows = [{**r, "item": _relative_item(r["item"], roots.get(r["source"]))} for r in dropped]
    atomic_write(d.dropped, pd.DataFrame(rows, columns=["source", "item", "reason"]).to_csv(index=False))
    write_json(d.ingest_report, report)
    write_json(d.info, dataset_meta)
    write_card(d.root, df, report)
    # The manifest goes last: its presence means the rest is complete.
    manifest = df.assign(path=_relative_paths(df, reads))
    atomic_write(d.manifest, manifest.to_csv(index=False))


def format_report(report: dict, out: str | Path) -> str:
    """A terminal summary of an ingest report."""
    lines = [f"dataset written to {out} (task {report['task']}: " +
             ", ".join(f"{i}={lab}" for i, lab in enumerate(report["labels"])) + ")"]
    # found = not used + in manifest: 'found' counts every file and metadata row the source offered (images and
    # what was skipped while reading it); 'not used' counts them all, whichever step left them out
    lines.append(f"{'source':<22}{'found':>7}{'not used':>10}{'in manifest':>13}  labels in manifest")
    for name, s in report["sources"].items():
        labels = ", ".join(f"{k} {v}" for k, v in s["labels_in_manifest"].items())
        lines.append(f"{name:<22}{s['found']:>7}{s['not_used_total']:>10}{s['in_manifest']:>13}  {labels}")
    lines.append("split      " + "  ".join(f"{lab:>8}" for lab in report["labels"]) + "  patients")
    for split, counts in report["splits"].items():
        lines.append(f"{split:<10} " + "  ".join(f"{counts[lab]:>8}" for lab in report["labels"]) +
                     f"  {report['patients_per_split'][split]:>8}")
    lines.append(f"not used: {report['not_used_total']} files/rows (reasons in ingest_report.json, each item in "
                 "dropped.csv)")
    b = report.get("build")
    if b:
        lines.append(f"images checked: {b['files']} with {b['workers']} worker(s) in {b['seconds']:.1f} s: "
                     f"{b['decoded']} decoded, {b['reused_from_cache']} from finished cache entries")
    for name, s in report["sources"].items():
        lines += [f"note ({name}): {n}" for n in s["notes"]]
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    lines += report["label_conflicts"]
    lines.append(report["disclaimer"])
    return "\n".join(lines)
