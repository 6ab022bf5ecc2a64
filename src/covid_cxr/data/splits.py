"""Split groups and split protocols: which image goes to train, val, test or unused.

Every function works on the manifest frame, whose ``target`` column holds the task's class
for each image ('' for images outside the task). Splits are assigned per group, so images
of one patient (and copies of one image) never straddle two splits.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pandas as pd

from covid_cxr.data.options import DataConfig
from covid_cxr.errors import DatasetError

SPLITS = ("train", "val", "test")
UNUSED = "unused"


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


def _group_counts(df: pd.DataFrame) -> dict[int, Counter]:
    counts: dict[int, Counter] = defaultdict(Counter)
    task = df[df["target"] != ""]
    for g, c in zip(task["group"], task["target"]):
        counts[int(g)][c] += 1
    return counts


def _assign_dev(order: list[int], counts: dict[int, Counter], taken: set[int], classes: list[str],
                cfg: DataConfig, assignment: dict[int, str]) -> None:
    """Validation and training splits from the groups not yet taken."""
    pool: Counter = Counter()
    for g, c in counts.items():
        if g not in taken:
            pool.update(c)
    total = sum(pool.values())
    if total == 0:
        raise DatasetError("no images are left for training after the test split")
    dev_total = min(total, cfg.train_size / (1 - cfg.val_fraction))
    val_t, train_t = {}, {}
    for c in classes:
        dev = pool[c] * dev_total / total
        val_t[c] = max(1, int(round(cfg.val_fraction * dev))) if cfg.val_fraction > 0 and pool[c] > 1 else 0
        train_t[c] = int(round(dev)) - val_t[c]
    while sum(train_t.values()) > cfg.train_size:
        # Per-class rounding can overshoot --train-size (e.g. 19 over two equal classes -> 10 + 10).
        train_t[max(train_t, key=train_t.get)] -= 1
    for g in _fill(order, counts, taken, val_t):
        assignment[g] = "val"
    for g in _fill(order, counts, taken, train_t):
        assignment[g] = "train"


def _to_series(df: pd.DataFrame, assignment: dict[int, str]) -> pd.Series:
    split = df["group"].map(lambda g: assignment.get(int(g), UNUSED))
    split[df["target"] == ""] = UNUSED
    return split.rename("split")


def split_by_patient(df: pd.DataFrame, classes: list[str], cfg: DataConfig) -> pd.Series:
    """Protocol ``patient``: random groups, stratified by class, deterministic for ``cfg.seed``.

    Raises:
        DatasetError: too few images of a class for the requested test size.
    """
    avail = df.loc[df["target"] != "", "target"].value_counts()
    for c in classes:
        n = int(avail.get(c, 0))
        if n < cfg.test_per_class + 2:
            per_source = df.loc[df["target"] == c, "source"].value_counts()
            where = ", ".join(f"{s} {k}" for s, k in per_source.items()) or "none from any source"
            raise DatasetError(
                f"only {n} {c!r} images are available ({where}; after duplicates, unreadable files and non-frontal "
                f"views were removed; no dataset was written) but --test-per-class {cfg.test_per_class} needs "
                f"{cfg.test_per_class} for the test split and at least 2 more for training; lower --test-per-class "
                f"or add sources")
    counts = _group_counts(df)
    order = [int(g) for g in np.random.default_rng(cfg.seed).permutation(sorted(counts))]
    taken: set[int] = set()
    assignment = {g: "test" for g in _fill(order, counts, taken, {c: cfg.test_per_class for c in classes})}
    _assign_dev(order, counts, taken, classes, cfg, assignment)
    return _to_series(df, assignment)


def split_leave_source_out(df: pd.DataFrame, classes: list[str], cfg: DataConfig) -> pd.Series:
    """Protocol ``leave-source-out``: every task image of ``cfg.test_source`` is the test split
    (external validation); validation and training come from the other sources only.

    Raises:
        DatasetError: the test source has no task images, or nothing is left to train on.
    """
    from_test = (df["source"] == cfg.test_source) & (df["target"] != "")
    if not from_test.any():
        raise DatasetError(f"--test-source {cfg.test_source!r} has no images of the task's classes {classes}; "
                           f"sources present: {sorted(df['source'].unique())}")
    test_groups = set(df.loc[from_test, "group"].astype(int))
    mixed = df[df["group"].isin(test_groups) & (df["source"] != cfg.test_source) & (df["target"] != "")]
    if len(mixed):
        raise DatasetError(f"{len(mixed)} images of other sources share a split group with {cfg.test_source!r}; "
                           "remove near-duplicates first (they are removed by default)")
    counts = _group_counts(df)
    order = [int(g) for g in np.random.default_rng(cfg.seed).permutation(sorted(counts))]
    assignment = {g: "test" for g in test_groups}
    taken = set(test_groups)
    _assign_dev(order, counts, taken, classes, cfg, assignment)
    return _to_series(df, assignment)


def cap_source_share(df: pd.DataFrame, classes: list[str], max_share: float, seed: int) -> tuple[pd.Series, list[str]]:
    """Limit any one source to ``max_share`` of a class by leaving random surplus images out of the task.

    Returns (the new ``target`` column, notes saying how many images of which source were capped).
    """
    target = df["target"].copy()
    rng = np.random.default_rng(seed)
    notes = []
    for c in classes:
        while True:
            in_class = target == c
            shares = df.loc[in_class, "source"].value_counts()
            if shares.empty or shares.iloc[0] / shares.sum() <= max_share + 1e-9 or len(shares) == 1:
                if len(shares) == 1 and max_share < 1:
                    notes.append(f"class {c!r} comes from one source ({shares.index[0]}); "
                                 "--max-source-share cannot balance it")
                break
            src, n_src = shares.index[0], int(shares.iloc[0])
            n_other = int(shares.sum()) - n_src
            keep = int(np.floor(max_share * n_other / (1 - max_share))) if max_share < 1 else n_src
            idx = df.index[in_class & (df["source"] == src)]
            drop = rng.choice(idx, size=n_src - keep, replace=False)
            target.loc[drop] = ""
            notes.append(f"--max-source-share {max_share}: {len(drop)} {c!r} images of {src!r} left out of the task")
    return target, notes


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
