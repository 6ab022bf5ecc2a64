"""Tests for covid_cxr.data.manifest and covid_cxr.data.dataset: byte-duplicate removal, patient groups,
patient-level splits, the files a build writes (and does not write when it fails), manifest paths
relative to each source root (a dataset folder that is copied, or whose sources moved, still
resolves its images), and a build of the real collection."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import REAL_SOURCES, real_inventory, write_image
from covid_cxr.config import TASKS
from covid_cxr.data import manifest as manifest_mod
from covid_cxr.data.dataset import MANIFEST_COLUMNS, read_dataset
from covid_cxr.data.manifest import SPLITS, UNUSED, assign_groups, build, check_patient_disjoint, remove_byte_duplicates
from covid_cxr.data.options import DataConfig
from covid_cxr.errors import DatasetError
from covid_cxr.imaging.pixels import PreprocessSpec, model_pixels

REQUIRED = ["path", "label", "source", "patient_id", "view", "sha256", "width", "height", "split"]
LABELS = list(TASKS["covid-vs-normal"].classes)
OUTPUT_FILES = {"manifest.csv", "ingest_report.json", "dropped.csv", "dataset.json", "build_config.yaml",
                "duplicates.csv", "dataset_card.md", "class_distribution.png", "source_mix.png", "samples.png", "cache"}

_seed = iter(range(10_000, 10**9))


def _size(seed: int) -> tuple[int, int]:
    """Varied small image sizes (height, width) so width/height columns are checked for real."""
    return 32 + seed % 17, 30 + (seed * 7) % 23


def folder_source(root: Path, counts: dict[str, int]) -> Path:
    """Generic ROOT/<label>/*.png source with distinct images (distinct seeds -> distinct bytes)."""
    for label, n in counts.items():
        for i in range(n):
            s = next(_seed)
            write_image(root / label / f"{label}-{i:03d}.png", seed=s, size=_size(s))
    return root


def cohen_source(root: Path, patients: dict[str, tuple[str, int] | list[tuple[str, int]]],
                 shared: dict[str, tuple[str, list[str]]] = {}) -> Path:
    """A Cohen-style source: metadata.csv + images/. ``patients``: id -> (finding, number of images), or a
    list of those for a patient with several findings; ``shared``: file name -> (finding, [patient ids])
    for an image listed once per id. Images are named p<id>-<k>.png."""
    rows = []
    for pid, spec in patients.items():
        k = 0
        for finding, n in (spec if isinstance(spec, list) else [spec]):
            for _ in range(n):
                name = f"p{pid}-{k}.png"
                k += 1
                s = next(_seed)
                write_image(root / "images" / name, seed=s, size=_size(s))
                rows.append({"patientid": pid, "finding": finding, "view": "PA", "modality": "X-ray",
                             "folder": "images", "filename": name})
    for name, (finding, pids) in shared.items():
        s = next(_seed)
        write_image(root / "images" / name, seed=s, size=_size(s))
        for pid in pids:
            rows.append({"patientid": pid, "finding": finding, "view": "AP", "modality": "X-ray",
                         "folder": "images", "filename": name})
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["patientid", "finding", "view", "modality", "folder", "filename"])
        w.writeheader()
        w.writerows(rows)
    return root


def cfg(sources: dict[str, Path], out: Path, **kw) -> DataConfig:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return DataConfig(sources=tuple((n, str(p)) for n, p in sources.items()), out=str(out), **kw)


def load(out: Path) -> pd.DataFrame:
    """The manifest with absolute image paths (as every stage reads it)."""
    return read_dataset(out).df


def assert_patient_disjoint(df: pd.DataFrame) -> None:
    """Independent check: no group, no (source, patient id) and no single id of a multi-id row in two splits."""
    used = df[df["split"].isin(SPLITS)]
    assert (used.groupby("group")["split"].nunique() <= 1).all()
    assert (used.groupby(["source", "patient_id"])["split"].nunique() <= 1).all()
    splits_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for source, pids, split in zip(used["source"], used["patient_id"], used["split"]):
        for pid in str(pids).split(";"):
            splits_of[(source, pid)].add(split)
    shared = {k: v for k, v in splits_of.items() if len(v) > 1}
    assert not shared, shared


# --------------------------------------------------------------------------- byte duplicates


def _dup_frame() -> pd.DataFrame:
    return pd.DataFrame([
        # Radiography paths sort before Cohen's: the source priority, not the path, must decide.
        {"path": "/a/COVID-1.png", "label": "covid", "source": "radiography", "sha256": "X", "patient_id": "a"},
        {"path": "/c/img1.png", "label": "covid", "source": "cohen", "sha256": "X", "patient_id": "1"},
        {"path": "/a/Normal-5.png", "label": "normal", "source": "radiography", "sha256": "Y", "patient_id": "b"},
        {"path": "/m/IM-1.jpeg", "label": "normal", "source": "mooney", "sha256": "Z", "patient_id": "IM-1"},
        {"path": "/c/img2.png", "label": "covid", "source": "cohen", "sha256": "Y", "patient_id": "2"},
        {"path": "/x/unique.png", "label": "normal", "source": "hospital", "sha256": "W", "patient_id": "u"},
        {"path": "/x/copy.png", "label": "normal", "source": "hospital", "sha256": "W", "patient_id": "v"},
    ])


def test_remove_byte_duplicates_prefers_higher_priority_source() -> None:
    df = _dup_frame()
    kept, dropped, notes = remove_byte_duplicates(df)
    assert kept["sha256"].is_unique and set(kept["sha256"]) == set(df["sha256"])
    assert set(kept["path"]) == {"/c/img1.png", "/c/img2.png", "/m/IM-1.jpeg", "/x/copy.png"}
    assert list(kept.columns) == list(df.columns)
    # Original row order is kept among the survivors.
    assert list(kept.index) == sorted(kept.index)
    by_item = {d["item"]: d for d in dropped}
    assert set(by_item) == {"/a/COVID-1.png", "/a/Normal-5.png", "/x/unique.png"}
    assert by_item["/a/COVID-1.png"]["source"] == "radiography"
    assert "/c/img1.png" in by_item["/a/COVID-1.png"]["reason"]
    assert "cohen" in by_item["/a/COVID-1.png"]["reason"]
    assert "byte-identical" in by_item["/a/COVID-1.png"]["reason"]
    assert "/c/img2.png" in by_item["/a/Normal-5.png"]["reason"]
    # Same source: the first path (sorted) wins.
    assert "/x/copy.png" in by_item["/x/unique.png"]["reason"]
    # Exactly one label conflict (Y: radiography normal vs cohen covid), naming both files.
    assert len(notes) == 1
    assert "/a/Normal-5.png" in notes[0] and "/c/img2.png" in notes[0] and "'covid'" in notes[0]


def test_remove_byte_duplicates_no_duplicates_is_identity() -> None:
    df = _dup_frame().drop_duplicates("sha256")
    kept, dropped, notes = remove_byte_duplicates(df)
    pd.testing.assert_frame_equal(kept, df)
    assert dropped == [] and notes == []


# --------------------------------------------------------------------------- groups


def test_assign_groups_joins_multi_id_rows() -> None:
    df = pd.DataFrame([
        ("cohen", "285", "s1"), ("cohen", "339", "s2"), ("cohen", "285;339", "s3"), ("cohen", "340", "s4"),
        ("radiography", "285", "s5"), ("cohen", "400;401", "s6"), ("cohen", "401;402", "s7"), ("cohen", "402", "s8"),
        ("cohen", "", "s9"), ("cohen", "", "s10"), ("cohen", " 339 ", "s11"), ("cohen", "285", "s12"),
    ], columns=["source", "patient_id", "sha256"], index=range(100, 112))
    g = assign_groups(df)
    assert list(g.index) == list(df.index)
    by_sha = dict(zip(df["sha256"], g))
    assert by_sha["s1"] == by_sha["s2"] == by_sha["s3"] == by_sha["s11"] == by_sha["s12"]
    assert by_sha["s4"] != by_sha["s1"]
    assert by_sha["s5"] != by_sha["s1"]  # patient ids are per source
    assert by_sha["s6"] == by_sha["s7"] == by_sha["s8"] != by_sha["s1"]
    assert by_sha["s9"] != by_sha["s10"]  # no id: each image alone
    assert len({by_sha[s] for s in ("s1", "s4", "s5", "s6", "s9", "s10")}) == 6


def test_assign_groups_order_of_rows_does_not_matter_for_membership() -> None:
    df = pd.DataFrame([("cohen", "285;339", "a"), ("cohen", "339", "b"), ("cohen", "285", "c"),
                       ("cohen", "7", "d")], columns=["source", "patient_id", "sha256"])
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        sub = df.iloc[order]
        g = dict(zip(sub["sha256"], assign_groups(sub)))
        assert g["a"] == g["b"] == g["c"] != g["d"]


# --------------------------------------------------------------------------- check_patient_disjoint


def _crafted() -> pd.DataFrame:
    return pd.DataFrame({
        "path": [f"/d/{i}.png" for i in range(6)],
        "label": ["covid", "covid", "normal", "normal", "covid", "normal"],
        "source": ["cohen"] * 6,
        "patient_id": ["1", "2", "3", "4", "5", "6"],
        "sha256": [f"h{i}" for i in range(6)],
        "group": [0, 1, 2, 3, 4, 5],
        "split": ["train", "train", "val", "test", "test", UNUSED],
    })


def test_check_patient_disjoint_accepts_clean_manifest() -> None:
    check_patient_disjoint(_crafted())


def test_check_patient_disjoint_same_patient_in_train_and_test() -> None:
    df = _crafted()
    df.loc[4, "patient_id"] = "1"  # patient 1 now in train (row 0) and test (row 4), different groups
    with pytest.raises(DatasetError) as err:
        check_patient_disjoint(df)
    assert "cohen:1" in str(err.value)


def test_check_patient_disjoint_same_group_in_two_splits() -> None:
    df = _crafted()
    df.loc[3, "group"] = 2  # rows 2 (val) and 3 (test) now share a group
    with pytest.raises(DatasetError, match="more than one split"):
        check_patient_disjoint(df)


def test_check_patient_disjoint_ignores_unused_rows() -> None:
    df = _crafted()
    df.loc[5, ["patient_id", "group"]] = ["1", 0]  # patient 1 in train and unused: allowed
    check_patient_disjoint(df)


def test_check_patient_disjoint_rejects_repeated_sha() -> None:
    df = _crafted()
    df.loc[1, "sha256"] = "h0"
    with pytest.raises(DatasetError, match="byte-identical"):
        check_patient_disjoint(df)


# --------------------------------------------------------------------------- build on synthetic sources


@pytest.fixture(scope="module")
def mixed_sources(tmp_path_factory) -> dict:
    """A generic folder source (singletons) and a Cohen-style source with multi-image patients."""
    base = tmp_path_factory.mktemp("sources")
    hospital = folder_source(base / "hospital", {"covid": 20, "normal": 30, "pneumonia": 5})
    patients = {f"{i}": ("COVID-19", 1 + i % 3) for i in range(1, 13)}
    patients.update({f"{i}": ("No Finding", 2) for i in range(50, 58)})
    patients.update({"285": ("COVID-19", 2), "339": ("COVID-19, ARDS", 1), "90": ("Pneumonia", 2)})
    # A patient with in-task and out-of-task images: the pneumonia image must stay unused
    # although its patient group is assigned to a split.
    patients["77"] = [("COVID-19", 2), ("Pneumonia", 1)]
    cohen = cohen_source(base / "cohen", patients, shared={"000001-24.png": ("COVID-19", ["285", "339"])})
    counts = {"covid": 20 + sum(n for spec in patients.values() for f, n in (spec if isinstance(spec, list)
                                                                             else [spec]) if f.startswith("COVID"))
              + 1, "normal": 30 + 16, "pneumonia": 5 + 2 + 1}
    return {"sources": {"cohen": cohen, "folder": hospital}, "counts": counts}


@pytest.fixture(scope="module")
def mixed_build(mixed_sources, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ds") / "dataset"
    c = cfg(mixed_sources["sources"], out, test_per_class=10, val_fraction=0.2, train_size=1000, seed=3)
    report = build(c)
    return {"out": out, "report": report, "cfg": c, "df": load(out)}


def test_build_writes_all_files(mixed_build) -> None:
    out = mixed_build["out"]
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    df = mixed_build["df"]
    assert list(df.columns) == MANIFEST_COLUMNS and set(REQUIRED) <= set(df.columns)
    report = json.loads((out / "ingest_report.json").read_text())
    assert report == json.loads(json.dumps(mixed_build["report"]))
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == LABELS and meta["task"] == "covid-vs-normal"
    for split in SPLITS:
        for lab in LABELS:
            n = int(((df["split"] == split) & (df["label"] == lab)).sum())
            assert meta["splits"][split][lab] == report["splits"][split][lab] == n
    assert yaml.safe_load((out / "build_config.yaml").read_text()) == mixed_build["cfg"].to_dict()
    dropped = pd.read_csv(out / "dropped.csv", keep_default_na=False)
    assert list(dropped.columns) == ["source", "item", "reason"]
    assert report["not_used_total"] == len(dropped)
    # the per-source columns add up: everything a source offered is either in the manifest or listed as not used
    from covid_cxr.data.manifest import format_report

    for name, s in report["sources"].items():
        assert s["found"] == s["not_used_total"] + s["in_manifest"], name
        assert s["not_used_total"] == int((dropped["source"] == name).sum()) == sum(s["not_used"].values())
        assert s["in_manifest"] == int((df["source"] == name).sum())
    assert sum(s["not_used_total"] for s in report["sources"].values()) == report["not_used_total"]
    table = format_report(report, out).splitlines()
    assert table[1].split()[:5] == ["source", "found", "not", "used", "in"]
    for line in table[2:2 + len(report["sources"])]:
        found, not_used, kept = map(int, line.split()[1:4])
        assert found == not_used + kept, line


def test_build_manifest_content(mixed_build, mixed_sources) -> None:
    df = mixed_build["df"]
    counts = mixed_sources["counts"]
    assert df["sha256"].is_unique
    assert df["path"].is_unique
    assert df["label"].value_counts().to_dict() == counts
    for row in df.sample(12, random_state=0).itertuples():
        data = Path(row.path).read_bytes()
        assert row.sha256 == hashlib.sha256(data).hexdigest()
        with Image.open(row.path) as img:
            assert (row.width, row.height) == img.size
    assert set(df["source"]) == {"cohen", "hospital"}
    assert set(df["split"]) <= set(SPLITS) | {UNUSED}
    # The shared Cohen image is one row carrying both ids.
    shared = df[df["path"].str.endswith("000001-24.png")]
    assert len(shared) == 1 and shared["patient_id"].iloc[0] == "285;339"


def test_build_exact_test_size_and_patient_disjoint(mixed_build) -> None:
    df = mixed_build["df"]
    test = df[df["split"] == "test"]
    for lab in LABELS:
        assert int((test["label"] == lab).sum()) == 10
    assert_patient_disjoint(df)
    # All images of patients 285 and 339 (joined by the shared image) fall in one split.
    cohen = df[df["source"] == "cohen"]
    joined = cohen[cohen["patient_id"].isin(["285", "339", "285;339"])]
    assert len(joined) == 4 and joined["split"].nunique() == 1 and joined["group"].nunique() == 1
    # Multi-image patients exist in the used splits, so the check above is not vacuous.
    used = df[df["split"].isin(SPLITS)]
    assert (used.groupby("group").size() > 1).any()


def test_build_labels_outside_task_are_unused(mixed_build, mixed_sources) -> None:
    df = mixed_build["df"]
    other = df[~df["label"].isin(LABELS)]
    assert len(other) == mixed_sources["counts"]["pneumonia"]
    assert (other["split"] == UNUSED).all()
    report = mixed_build["report"]
    assert report["unused_in_manifest"]["label not in task"] == len(other)
    p77 = df[(df["source"] == "cohen") & (df["patient_id"] == "77")]
    assert sorted(p77["label"]) == ["covid", "covid", "pneumonia"] and p77["group"].nunique() == 1
    assert p77.loc[p77["label"] == "covid", "split"].iloc[0] in SPLITS


def test_build_val_fraction_with_uncapped_train(mixed_build) -> None:
    df = mixed_build["df"]
    in_task = df[df["label"].isin(LABELS)]
    max_group = int(in_task.groupby("group").size().max())
    for lab in LABELS:
        rows = in_task[in_task["label"] == lab]
        n_train, n_val = int((rows["split"] == "train").sum()), int((rows["split"] == "val").sum())
        dev = n_train + n_val
        assert abs(n_val - 0.2 * dev) <= max_group, (lab, n_train, n_val)
        # train_size is not binding: every in-task image is used unless a whole group could not fit.
        assert int((rows["split"] == UNUSED).sum()) < max_group


@pytest.mark.parametrize("train_size,val_fraction", [(10, 0.2), (19, 0.1), (21, 0.0), (23, 0.1), (31, 0.3)])
def test_build_train_size_cap(tmp_path: Path, train_size: int, val_fraction: float) -> None:
    src = folder_source(tmp_path / "site", {"covid": 30, "normal": 30})
    out = tmp_path / "ds"
    report = build(cfg({"folder": src}, out, test_per_class=5, val_fraction=val_fraction, train_size=train_size))
    df = load(out)
    n_train = int((df["split"] == "train").sum())
    n_val = int((df["split"] == "val").sum())
    assert train_size - len(LABELS) <= n_train <= train_size
    if val_fraction == 0:
        assert n_val == 0
    else:
        assert abs(n_val - val_fraction * (n_train + n_val)) <= len(LABELS)
    # The cap leaves in-task images unused, and the report counts them.
    n_unused = int((df["split"] == UNUSED).sum())
    assert n_unused == 60 - 10 - n_train - n_val > 0
    assert report["unused_in_manifest"]["beyond --train-size or not fitting a split"] == n_unused
    assert report["splits"]["train"] == {lab: int(((df["split"] == "train") & (df["label"] == lab)).sum())
                                         for lab in LABELS}


def test_build_only_multi_image_patients_stays_disjoint(tmp_path: Path) -> None:
    patients = {f"c{i}": ("COVID-19", 1 + i % 4) for i in range(20)}
    patients.update({f"n{i}": ("No Finding", 1 + (i + 1) % 3) for i in range(20)})
    src = cohen_source(tmp_path / "cohen", patients)
    for seed in range(3):
        out = tmp_path / f"ds{seed}"
        build(cfg({"cohen": src}, out, test_per_class=6, val_fraction=0.2, seed=seed))
        df = load(out)
        assert_patient_disjoint(df)
        test = df[df["split"] == "test"]
        for lab in LABELS:
            assert 0 < int((test["label"] == lab).sum()) <= 6


def test_build_deterministic_per_seed(mixed_sources, tmp_path: Path) -> None:
    kw = dict(test_per_class=10, val_fraction=0.2, train_size=1000)
    build(cfg(mixed_sources["sources"], tmp_path / "a", seed=7, **kw))
    build(cfg(mixed_sources["sources"], tmp_path / "b", seed=7, workers=2, **kw))
    build(cfg(mixed_sources["sources"], tmp_path / "c", seed=8, **kw))
    a = (tmp_path / "a" / "manifest.csv").read_bytes()
    assert a == (tmp_path / "b" / "manifest.csv").read_bytes()
    assert a != (tmp_path / "c" / "manifest.csv").read_bytes()
    da, dc = load(tmp_path / "a"), load(tmp_path / "c")
    assert list(da["path"]) == list(dc["path"])
    test_a = set(da.loc[da["split"] == "test", "path"])
    test_c = set(dc.loc[dc["split"] == "test", "path"])
    assert test_a != test_c


def test_build_too_few_images(tmp_path: Path) -> None:
    src = folder_source(tmp_path / "site", {"covid": 13, "normal": 40})
    out = tmp_path / "ds"
    with pytest.raises(DatasetError) as err:
        build(cfg({"folder": src}, out, test_per_class=12))
    msg = str(err.value)
    assert "only 13 'covid'" in msg and "12" in msg
    # Only the image cache may exist (so a retry need not decode again); no dataset file is written.
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"cache"}
    # 11 test images + 2 for training fit the 13 available.
    build(cfg({"folder": src}, out, test_per_class=11))
    assert (out / "manifest.csv").is_file()


def test_build_unreadable_image_is_reported(tmp_path: Path) -> None:
    src = folder_source(tmp_path / "site", {"covid": 12, "normal": 12})
    bad = src / "covid" / "corrupt.png"
    good = (src / "covid" / "covid-000.png").read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    out = tmp_path / "ds"
    report = build(cfg({"folder": src}, out, test_per_class=4))
    df = load(out)
    assert str(bad.resolve()) not in set(df["path"])
    assert len(df) == 24
    dropped = pd.read_csv(out / "dropped.csv", keep_default_na=False)
    # dropped.csv names files relative to their source root, as manifest.csv does.
    rows = dropped[dropped["item"] == "covid/corrupt.png"]
    assert len(rows) == 1 and rows["reason"].iloc[0].startswith("unreadable image")
    assert rows["source"].iloc[0] == "site"
    on_disk = json.loads((out / "ingest_report.json").read_text())
    assert any(k.startswith("unreadable image") for k in on_disk["not_used_by_reason"])
    assert sum(v for k, v in on_disk["sources"]["site"]["not_used"].items() if k.startswith("unreadable")) == 1
    assert on_disk == json.loads(json.dumps(report))


def test_build_byte_duplicate_across_sources(tmp_path: Path) -> None:
    patients = {f"{i}": ("COVID-19", 1) for i in range(8)}
    patients.update({f"{i}": ("No Finding", 1) for i in range(20, 28)})
    cohen = cohen_source(tmp_path / "zz-cohen", patients)  # its paths sort after radiography's
    radio = tmp_path / "radiography" / "COVID-19_Radiography_Dataset"
    for i in range(6):
        s = next(_seed)
        write_image(radio / "COVID" / f"COVID-{i + 10}.png", seed=s)
        write_image(radio / "Normal" / f"Normal-{i + 10}.png", seed=s + 1_000_000)
    shutil.copy(cohen / "images" / "p0-0.png", radio / "COVID" / "COVID-1.png")     # same label
    shutil.copy(cohen / "images" / "p1-0.png", radio / "Normal" / "Normal-1.png")   # label conflict
    out = tmp_path / "ds"
    # radiography listed first: priority, not order, decides which copy stays.
    report = build(cfg({"radiography": tmp_path / "radiography", "cohen": cohen}, out, test_per_class=4))
    df = load(out)
    paths = set(df["path"])
    for name in ("p0-0.png", "p1-0.png"):
        assert str((cohen / "images" / name).resolve()) in paths
    assert str((radio / "COVID" / "COVID-1.png").resolve()) not in paths
    assert str((radio / "Normal" / "Normal-1.png").resolve()) not in paths
    assert df["sha256"].is_unique
    dropped = pd.read_csv(out / "dropped.csv", keep_default_na=False)
    dup = dropped[dropped["reason"].str.startswith("byte-identical")]
    assert len(dup) == 2 and set(dup["source"]) == {"radiography"}
    reason = dup.loc[dup["item"].str.endswith("COVID-1.png"), "reason"].iloc[0]
    assert set(dup["item"]) == {"COVID-19_Radiography_Dataset/COVID/COVID-1.png",
                                "COVID-19_Radiography_Dataset/Normal/Normal-1.png"}
    assert reason == "byte-identical copy of images/p0-0.png (cohen)"
    assert len(report["label_conflicts"]) == 1 and "Normal-1.png" in report["label_conflicts"][0]
    kept = df[df["path"] == str((cohen / "images" / "p1-0.png").resolve())]
    assert kept["label"].iloc[0] == "covid"


# --------------------------------------------------------------------------- relocatable dataset folders


def test_manifest_paths_are_relative_to_source_roots(mixed_build, mixed_sources) -> None:
    out = mixed_build["out"]
    raw = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(raw.columns) == MANIFEST_COLUMNS
    assert not any(Path(p).is_absolute() or ".." in Path(p).parts for p in raw["path"])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["positive_class"] == "covid"
    roots = {"cohen": mixed_sources["sources"]["cohen"], "hospital": mixed_sources["sources"]["folder"]}
    assert set(meta["source_roots"]) == set(roots)
    for name, root in roots.items():
        rec = meta["source_roots"][name]
        assert not Path(rec["path"]).is_absolute()
        assert (out / rec["path"]).resolve() == root.resolve()
        assert rec["absolute"] == str(root.resolve()) and rec["synthetic"] is False
    # read_dataset joins each relative path to its source's root.
    df = mixed_build["df"]
    assert list(df["sha256"]) == list(raw["sha256"])
    for src, rel, full in zip(raw["source"], raw["path"], df["path"]):
        assert full == str(roots[src].resolve() / rel)
        assert Path(full).is_absolute()
    assert all(Path(p).is_file() for p in df["path"])


def _small_build(base: Path, **kw) -> tuple[Path, Path]:
    """<base>/site (a folder source) and <base>/ds (its dataset)."""
    src = folder_source(base / "site", {"covid": 8, "normal": 8})
    out = base / "ds"
    build(cfg({"folder": src}, out, test_per_class=3, dedup=False, **kw))
    return src, out


def _same_files(df: pd.DataFrame, root: Path) -> None:
    assert all(Path(p).is_file() and root.resolve() in Path(p).resolve().parents for p in df["path"])
    assert all(hashlib.sha256(Path(p).read_bytes()).hexdigest() == s for p, s in zip(df["path"], df["sha256"]))


def test_synthetic_source_is_recorded(tmp_path: Path) -> None:
    src = folder_source(tmp_path / "phantoms", {"covid": 8, "normal": 8})
    (src / "README.txt").write_text("SYNTHETIC phantom images, not patients\n")
    build(cfg({"folder": src}, tmp_path / "ds", test_per_class=3, dedup=False, cache=False))
    ds = read_dataset(tmp_path / "ds")
    assert ds.info.sources["phantoms"]["synthetic"] is True
    assert ds.info.synthetic_sources == ("phantoms",)


def test_dataset_copied_with_its_sources_resolves_paths(tmp_path: Path) -> None:
    _small_build(tmp_path / "a", cache=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")  # the absolute paths recorded in dataset.json are gone
    ds = read_dataset(tmp_path / "b" / "ds")
    assert ds.missing_roots == {}
    assert ds.roots == {"site": tmp_path / "b" / "site"}
    _same_files(ds.df, tmp_path / "b" / "site")
    rows = ds.rows("test")
    assert len(rows) == 6
    spec = PreprocessSpec.for_size(32)
    np.testing.assert_array_equal(ds.pixels(rows, spec, workers=1), model_pixels(rows["path"].tolist(), spec))


def test_dataset_copied_alone_falls_back_to_absolute_roots(tmp_path: Path) -> None:
    src, out = _small_build(tmp_path / "a", cache=False)
    shutil.copytree(out, tmp_path / "elsewhere" / "deeper" / "ds")
    ds = read_dataset(tmp_path / "elsewhere" / "deeper" / "ds")
    assert ds.missing_roots == {} and ds.roots["site"] == src.resolve()
    _same_files(ds.df, src)


def test_moved_source_is_re_pointed_with_source_roots(tmp_path: Path) -> None:
    src, out = _small_build(tmp_path / "a", cache=False)
    moved = tmp_path / "archive" / "site-2021"
    moved.parent.mkdir()
    src.rename(moved)
    lost = read_dataset(out)
    assert set(lost.missing_roots) == {"site"}
    spec = PreprocessSpec.for_size(32)
    with pytest.raises(DatasetError, match=r"'site'.*--source-root site=PATH"):
        lost.pixels(lost.rows("test"), spec, workers=1)
    for override in ({"site": str(moved)}, (("site", str(moved)),)):
        ds = read_dataset(out, source_roots=override)
        assert ds.missing_roots == {} and ds.roots["site"] == moved.resolve()
        _same_files(ds.df, moved)
        assert ds.pixels(ds.rows("test"), spec, workers=1).shape == (6, 32, 32)
    with pytest.raises(DatasetError, match="unknown source.*cohen"):
        read_dataset(out, source_roots={"cohen": str(moved)})
    with pytest.raises(DatasetError, match="no such folder"):
        read_dataset(out, source_roots={"site": str(tmp_path / "nowhere")})


def test_cache_serves_pixels_when_sources_are_gone(tmp_path: Path) -> None:
    """With the cache a dataset folder works without its sources, and gives the pixels of the files."""
    src, out = _small_build(tmp_path / "a")
    ds = read_dataset(out)
    cache = ds.cache()
    assert cache is not None and cache.dir == out / "cache" / "s256"
    assert len(list(cache.dir.rglob("*.npy"))) == len(ds.df)
    spec = PreprocessSpec.for_size(32)
    rows = ds.rows(("train", "val", "test"))
    expected = model_pixels(rows["path"].tolist(), spec)
    shutil.copytree(out, tmp_path / "copy")
    shutil.rmtree(src)
    moved = read_dataset(tmp_path / "copy")
    assert set(moved.missing_roots) == {"site"}
    assert moved.cache().dir == tmp_path / "copy" / "cache" / "s256"
    np.testing.assert_array_equal(moved.pixels(moved.rows(("train", "val", "test")), spec, workers=1), expected)


def test_build_without_cache(tmp_path: Path) -> None:
    _, out = _small_build(tmp_path, cache=False)
    assert not (out / "cache").exists()
    assert json.loads((out / "dataset.json").read_text())["cache"] is None
    assert read_dataset(out).cache() is None


# --------------------------------------------------------------------------- atomicity


# --------------------------------------------------------------------------- lung masks (mask_path)


def _masked_site(base: Path) -> tuple[Path, set[str]]:
    """A folder source with lung masks <label>/masks/<stem>.png for some images; returns (source, the masked images'
    paths relative to it)."""
    src = folder_source(base / "site", {"covid": 8, "normal": 8})
    masked = {"covid/covid-000.png", "covid/covid-003.png", "normal/normal-001.png"}
    for rel in masked:
        label, name = rel.split("/")
        write_image(src / label / "masks" / name, seed=next(_seed))
    return src, masked


def _masked_build(base: Path) -> tuple[Path, Path, set[str]]:
    """:func:`_masked_site`, built; returns (source, dataset, the masked images' paths)."""
    src, masked = _masked_site(base)
    out = base / "ds"
    report = build(cfg({"folder": src}, out, test_per_class=3))
    assert report["sources"]["site"]["masks_in_manifest"] == 3
    return src, out, masked


def test_mask_paths_travel_in_the_manifest_and_are_never_images(tmp_path: Path) -> None:
    src, out, masked = _masked_build(tmp_path)
    raw = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(raw.columns) == MANIFEST_COLUMNS
    assert len(raw) == 16 and not raw["path"].str.contains("masks").any()  # a mask is never an image row
    # Relative to the source's root, like path; '' where the image has none.
    assert {p: m for p, m in zip(raw["path"], raw["mask_path"]) if m} == {
        rel: rel.replace("/", "/masks/") for rel in masked}
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["build"]["files"] == 16  # masks are not decoded, hashed or cached
    assert report["sources"]["site"]["found"] == 16 and report["not_used_total"] == 0
    assert "| lung masks |" in (out / "dataset_card.md").read_text()
    ds = read_dataset(out)
    assert (ds.df["mask_path"] == raw["mask_path"]).all()  # kept as written
    masks = ds.mask_paths(ds.df)
    assert sorted(Path(m).relative_to(src.resolve()).as_posix() for m in masks if m) == sorted(
        rel.replace("/", "/masks/") for rel in masked)
    assert all(Path(m).is_file() for m in masks if m)
    assert not set(masks) & set(ds.df["path"])


def test_a_crossval_fold_keeps_the_masks(tmp_path: Path) -> None:
    from covid_cxr.training.crossval import write_fold_dataset

    src, _ = _masked_site(tmp_path)
    other = folder_source(tmp_path / "other", {"covid": 6, "normal": 6})
    out = tmp_path / "ds"
    build(DataConfig(sources=(("folder", str(src)), ("folder", str(other))), out=str(out), test_per_class=3, workers=1,
                     progress=False))
    ds = read_dataset(out)
    fold = read_dataset(write_fold_dataset(ds, "other", tmp_path / "fold", 0.2, 0).root)
    assert sum(1 for m in fold.mask_paths(fold.df) if m) == 3
    assert fold.mask_paths(fold.df) == ds.mask_paths(ds.df)


def test_a_manifest_written_before_mask_path_still_loads(tmp_path: Path) -> None:
    _, out = _small_build(tmp_path, cache=False)
    raw = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    raw.drop(columns="mask_path").to_csv(out / "manifest.csv", index=False)
    ds = read_dataset(out)
    assert (ds.df["mask_path"] == "").all() and ds.mask_paths(ds.rows("test")) == [""] * 6


@pytest.mark.parametrize("mask", ["/etc/passwd", "../../../../../../etc/passwd", "covid/../../../outside.png"])
def test_a_mask_path_outside_its_source_is_refused(tmp_path: Path, mask: str) -> None:
    """A received manifest's mask path passes the same inside-the-source check as an image path."""
    _, out = _small_build(tmp_path, cache=False)
    raw = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    raw.loc[4, "mask_path"] = mask
    raw.to_csv(out / "manifest.csv", index=False)
    with pytest.raises(DatasetError, match=r"manifest.csv row 6: mask path .*(not relative to|leads outside)"):
        read_dataset(out)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(d.iterdir())}


def test_failed_build_leaves_previous_dataset(tmp_path: Path, monkeypatch) -> None:
    src = folder_source(tmp_path / "site", {"covid": 14, "normal": 14})
    out = tmp_path / "ds"
    build(cfg({"folder": src}, out, test_per_class=4, seed=0))
    before = _snapshot(out)
    assert set(before) == OUTPUT_FILES

    def boom(*args, **kwargs):
        raise DatasetError("split failed on purpose")

    monkeypatch.setattr(manifest_mod, "split_by_patient", boom)
    with pytest.raises(DatasetError, match="on purpose"):
        build(cfg({"folder": src}, out, test_per_class=4, seed=1))
    monkeypatch.undo()
    assert _snapshot(out) == before

    # Too few images: also refused before anything is written.
    with pytest.raises(DatasetError):
        build(cfg({"folder": src}, out, test_per_class=13, seed=2))
    assert _snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".") or ".tmp" in p.name]

    # A successful rebuild replaces the files and leaves no temporary file either.
    build(cfg({"folder": src}, out, test_per_class=5, seed=0))
    after = _snapshot(out)
    assert set(after) == OUTPUT_FILES
    assert after["manifest.csv"] != before["manifest.csv"]


# --------------------------------------------------------------------------- real collection


@pytest.fixture(scope="module")
def real_build(real_data: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("real") / "dataset"
    sources = {name: real_data / "sources" / folder for name, folder in REAL_SOURCES.items()}
    c = DataConfig(sources=tuple((n, str(p)) for n, p in sources.items()), out=str(out), workers=2,
                   progress=False)
    t0 = time.perf_counter()
    report = build(c)
    elapsed = time.perf_counter() - t0
    return {"out": out, "report": report, "cfg": c, "elapsed": elapsed, "df": load(out)}


@pytest.mark.integration
def test_real_build(real_build, real_data: Path) -> None:
    df, report, c = real_build["df"], real_build["report"], real_build["cfg"]
    assert real_build["elapsed"] < 600  # ~12 s here; only a pathological slow path (not load) gets near this
    assert c.test_per_class == 200
    test = df[df["split"] == "test"]
    for lab in LABELS:
        assert int((test["label"] == lab).sum()) == c.test_per_class
        assert report["splits"]["test"][lab] == c.test_per_class
    assert_patient_disjoint(df)
    assert df["sha256"].is_unique
    root = real_data.resolve()
    for p in df["path"]:
        path = Path(p)
        assert path.is_file(), p
        assert root in path.resolve().parents
    inventory = real_inventory(real_data)
    inv_sha = dict(zip((root / inventory["relative_path"]).map(str), inventory["sha256"]))
    assert all(inv_sha[p] == s for p, s in zip(df["path"], df["sha256"]))
    # Train and val exist for both classes and stay within the requested training size.
    for split in ("train", "val"):
        assert all(report["splits"][split][lab] > 0 for lab in LABELS)
    assert int((df["split"] == "train").sum()) <= c.train_size
    warnings_ = report["warnings"]
    assert any("mooney" in w and "pediatric" in w for w in warnings_)
    assert any("'normal'" in w and "'radiography'" in w for w in warnings_)
    assert set(report["sources"]) == set(REAL_SOURCES)
    # The near-duplicate result before the multi-index search (all pairs compared) was 64 pairs in 43 clusters on
    # the five first sources; COVID-CXNet adds 6 pairs with Cohen and 3 within itself, OpenIST none.
    nd = report["near_duplicates"]
    assert (nd["pairs"], nd["clusters"]) == (73, 52)
    assert nd["pairs_by_source_pair"]["cohen <-> cxnet"] == 6 and nd["pairs_by_source_pair"]["cxnet <-> cxnet"] == 3
    # OpenIST's images carry their lung masks into the manifest; no other real source has masks.
    masks = df[df["mask_path"] != ""]
    assert set(masks["source"]) == {"openist"} and len(masks) == report["sources"]["openist"]["in_manifest"] == 214
    assert all(Path(m).is_file() for m in read_dataset(real_build["out"]).mask_paths(masks))
    assert not df["path"].str.endswith("@.png").any()
    assert report["build"]["files"] == report["build"]["decoded"] + report["build"]["reused_from_cache"]
    # Every real source contributes rows to the manifest.
    assert set(df["source"]) == set(REAL_SOURCES)


@pytest.mark.integration
def test_real_build_accounts_for_every_image(real_build, real_data: Path) -> None:
    df, out = real_build["df"], real_build["out"]
    inventory = real_inventory(real_data)
    root = real_data.resolve()
    all_images = {str(root / p) for p in inventory["relative_path"]}
    dropped = pd.read_csv(out / "dropped.csv", keep_default_na=False)
    # dropped.csv names files relative to their source's root (as manifest.csv does).
    roots = {name: (real_data / "sources" / folder).resolve() for name, folder in REAL_SOURCES.items()}
    dropped_files = {str(roots[s] / i) for s, i in zip(dropped["source"], dropped["item"]) if (roots[s] / i).is_file()}
    assert set(df["path"]) | dropped_files == all_images
    assert not set(df["path"]) & dropped_files
    # The images Cohen lists under two patient ids are one row and one group.
    for ids in ("285;339", "287;340"):
        rows = df[(df["source"] == "cohen") & (df["patient_id"] == ids)]
        assert len(rows) == 1
        members = df[(df["source"] == "cohen") & df["patient_id"].isin(ids.split(";") + [ids])]
        assert members["group"].nunique() == 1


def test_a_source_that_loses_every_image_stops_the_build_unless_allowed(tmp_path: Path) -> None:
    """N3: a folder source whose images are links to shared storage outside it loses every image (links out of a
    source are refused). That used to be a silent exit 0; now it stops the build naming the source, the reason and
    the way out, writing nothing, and --allow-empty-source builds without it, with the warning in the report."""
    from covid_cxr.errors import DatasetError

    good = folder_source(tmp_path / "good", {"covid": 10, "normal": 10})
    shared = folder_source(tmp_path / "shared-storage", {"covid": 4, "normal": 4})
    linked = tmp_path / "linked"
    for f in shared.rglob("*.png"):
        (linked / f.parent.name).mkdir(parents=True, exist_ok=True)
        (linked / f.parent.name / f.name).symlink_to(f)
    out = tmp_path / "ds"
    sources = (("folder", str(good)), ("folder", str(linked)))
    with pytest.raises(DatasetError, match=r"source linked yields no usable image: 8 item\(s\) were not used "
                                           r"\(8 link pointing outside the source folder.*--allow-links-to.*"
                                           r"--allow-empty-source"):
        build(DataConfig(sources=sources, out=str(out), test_per_class=3, workers=1, progress=False))
    assert not out.exists()
    report = build(DataConfig(sources=sources, out=str(out), test_per_class=3, workers=1, progress=False,
                              allow_empty_source=True))
    assert any("source linked yields no usable image" in w for w in report["warnings"])
    assert set(load(out)["source"]) == {"good"}


def test_links_into_a_folder_the_user_names_are_followed_and_others_still_refused(tmp_path: Path) -> None:
    """N3, the way out: shared storage is common (a source's images are links to it, or its whole images/ folder is
    one link). --allow-links-to STORAGE follows links that lead into STORAGE, for a folder source (each image a link)
    and a Cohen source (images/ a link); a link that leads anywhere else is still refused and counted."""
    storage = tmp_path / "storage"
    shared = folder_source(storage / "folder-images", {"covid": 4, "normal": 4})
    linked = tmp_path / "linked"
    for f in sorted(shared.rglob("*.png")):
        (linked / f.parent.name).mkdir(parents=True, exist_ok=True)
        (linked / f.parent.name / f.name).symlink_to(f)
    elsewhere = write_image(tmp_path / "elsewhere" / "secret.png", seed=77)
    (linked / "normal" / "stray.png").symlink_to(elsewhere)
    real_cohen = cohen_source(storage / "cohen-real", {"1": ("COVID-19", 3), "2": ("COVID-19", 2)})
    cohen = tmp_path / "cohen"
    cohen.mkdir()
    shutil.copy(real_cohen / "metadata.csv", cohen / "metadata.csv")
    (cohen / "images").symlink_to(real_cohen / "images", target_is_directory=True)
    good = folder_source(tmp_path / "good", {"covid": 10, "normal": 10})
    sources = {"folder": good, "cohen": cohen}
    out = tmp_path / "ds"
    config = DataConfig(sources=(("folder", str(good)), ("folder", str(linked)), ("cohen", str(cohen))), out=str(out),
                        test_per_class=3, workers=1, progress=False, allow_links_to=(str(storage),))
    report = build(config)
    df = load(out)
    counts = df.groupby("source").size().to_dict()
    assert counts == {"good": 20, "linked": 8, "cohen": 5}, counts
    stray = [d for d in report_dropped(out) if d["item"].endswith("stray.png")]
    assert len(stray) == 1 and "outside the source folder" in stray[0]["reason"], stray
    assert not any("secret" in str(p) for p in df["path"]), "a link out of every allowed folder was read"
    assert report["build"]["files"] == 33
    assert report["links_followed_into"] == [str(storage.resolve())]  # the provenance says where links led
    # Without the flag the same sources lose the linked images (and the whole Cohen source): the build stops.
    with pytest.raises(DatasetError, match="--allow-links-to"):
        build(DataConfig(sources=config.sources, out=str(tmp_path / "ds2"), test_per_class=3, workers=1,
                         progress=False))
    del sources


def test_allow_links_to_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    from covid_cxr.errors import SourceError

    good = folder_source(tmp_path / "good", {"covid": 4, "normal": 4})
    with pytest.raises(SourceError, match=r"--allow-links-to .*nowhere: no such folder"):
        build(DataConfig(sources=(("folder", str(good)),), out=str(tmp_path / "ds"), test_per_class=1, workers=1,
                         progress=False, allow_links_to=(str(tmp_path / "nowhere"),)))
    assert not (tmp_path / "ds").exists()


def report_dropped(out: Path) -> list[dict]:
    return pd.read_csv(out / "dropped.csv", dtype=str).fillna("").to_dict("records")
