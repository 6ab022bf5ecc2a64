"""Tasks, split protocols, source caps and the dataset card: synthetic sources, then the real collection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REAL_SOURCES, write_image
from covid_cxr.config import ConfigError
from covid_cxr.data.dataset import read_dataset
from covid_cxr.data.manifest import build
from covid_cxr.data.options import DataConfig
from covid_cxr.deploy import predict
from covid_cxr.deploy.options import PredictConfig
from covid_cxr.errors import DatasetError
from covid_cxr.evaluation import evaluate
from covid_cxr.evaluation.options import EvalConfig
from covid_cxr.imaging.phantoms import generate_phantoms
from covid_cxr.training import train
from covid_cxr.training.options import TrainConfig


def _site(root: Path, counts: dict[str, int], seed: int) -> Path:
    """A generic folder source with distinct random-structure images per label."""
    for j, (label, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / label / f"{label}-{i:03d}.png", seed * 10_000 + j * 1000 + i, size=(40, 36))
    return root


def _cfg(sources: dict[str, Path], out: Path, **kw) -> DataConfig:
    base = dict(sources=tuple(("folder", str(p)) for p in sources.values()), out=str(out), test_per_class=4,
                val_fraction=0.2, train_size=500, workers=1, progress=False, dedup=False)
    base.update(kw)
    return DataConfig(**base)


def _manifest(out: Path) -> pd.DataFrame:
    """The manifest as the stages read it (absolute image paths)."""
    return read_dataset(out).df


@pytest.mark.parametrize("task, classes", [
    ("covid-vs-normal", ["normal", "covid"]),
    ("covid-vs-rest", ["rest", "covid"]),
    ("covid-pneumonia-normal", ["normal", "covid", "pneumonia"]),
])
def test_tasks_map_labels_to_classes(tmp_path, task, classes):
    site = _site(tmp_path / "siteA", {"covid": 15, "normal": 12, "pneumonia": 9, "other": 5}, seed=1)
    out = tmp_path / "ds"
    report = build(_cfg({"a": site}, out, task=task))
    df = _manifest(out)
    assert report["labels"] == classes
    assert json.loads((out / "dataset.json").read_text())["labels"] == classes
    mapping = report["label_mapping"]
    for label, target in zip(df["label"], df["target"]):
        assert target == mapping.get(label, "")
    used = df[df["split"] != "unused"]
    assert set(used["target"]) == set(classes)
    assert (df.loc[df["target"] == "", "split"] == "unused").all()
    if task == "covid-vs-rest":  # everything that is not covid is 'rest'
        assert (df.loc[df["label"] != "covid", "target"] == "rest").all()
    for c in classes:
        assert report["splits"]["test"][c] == 4


def test_leave_source_out_holds_out_a_whole_source(tmp_path):
    a = _site(tmp_path / "hospitalA", {"covid": 14, "normal": 14}, seed=1)
    b = _site(tmp_path / "hospitalB", {"covid": 6, "normal": 5}, seed=2)
    out = tmp_path / "ds"
    report = build(_cfg({"a": a, "b": b}, out, protocol="leave-source-out", test_source="hospitalB"))
    df = _manifest(out)
    assert set(df.loc[df["split"] == "test", "source"]) == {"hospitalB"}
    assert (df.loc[df["source"] == "hospitalB", "split"] == "test").all()
    assert set(df.loc[df["split"].isin(["train", "val"]), "source"]) == {"hospitalA"}
    assert report["splits"]["test"] == {"normal": 5, "covid": 6}
    assert "leave-source-out" in report["protocol"]["description"]
    with pytest.raises(DatasetError, match="hospitalC"):
        build(_cfg({"a": a, "b": b}, tmp_path / "ds2", protocol="leave-source-out", test_source="hospitalC"))
    with pytest.raises(ConfigError, match="test-source"):
        _cfg({"a": a}, tmp_path / "x", protocol="leave-source-out")


def test_max_source_share_caps_a_dominant_source(tmp_path):
    big = _site(tmp_path / "big", {"covid": 10, "normal": 40}, seed=3)
    small = _site(tmp_path / "small", {"covid": 20, "normal": 10}, seed=4)
    out = tmp_path / "ds"
    report = build(_cfg({"big": big, "small": small}, out, max_source_share=0.6))
    df = _manifest(out)
    normal = df[df["target"] == "normal"]
    share = (normal["source"] == "big").mean()
    # a ratio of counts, <= 0.6 exactly in rationals; float division is correctly rounded, so at most 1 ulp
    # (1e-16) over - 1e-9 is far below one image's share (1/50)
    assert share <= 0.6 + 1e-9 and share > 0.5  # capped, not emptied
    covid = df[df["target"] == "covid"]
    assert (covid["source"] == "small").mean() <= 0.6 + 1e-9  # 20 of 30 covid from 'small' is capped too
    capped = report["unused_in_manifest"]["left out by --max-source-share"]
    assert capped == (40 - int((normal["source"] == "big").sum())) + (20 - int((covid["source"] == "small").sum()))
    assert any("max-source-share" in n for n in report["notes"])
    # the left-out images stay in the manifest as unused, with their label
    assert (df["target"] == "").sum() == capped


def test_confounder_warning_and_card(tmp_path):
    a = _site(tmp_path / "adult", {"covid": 20, "normal": 2}, seed=5)
    b = _site(tmp_path / "kids", {"normal": 20}, seed=6)
    out = tmp_path / "ds"
    report = build(_cfg({"a": a, "b": b}, out))
    assert any("'normal'" in w and "'kids'" in w for w in report["warnings"])
    card = (out / "dataset_card.md").read_text()
    assert "research use only" in card and "## Warnings" in card and "kids" in card
    assert "| normal | kids |" in card  # class x source x split table
    for png in ("class_distribution.png", "source_mix.png", "samples.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_near_duplicates_never_span_splits(tmp_path):
    """Re-encoded and rescaled copies of images in another source are removed before splitting."""
    from PIL import Image

    a = tmp_path / "orig"
    generate_phantoms(a, 12, size=96, seed=3)
    b = tmp_path / "copies"
    for label in ("covid", "normal"):
        for i, f in enumerate(sorted((a / label).glob("*.png"))[:4]):
            (b / label).mkdir(parents=True, exist_ok=True)
            Image.open(f).convert("RGB").resize((80, 80)).save(b / label / f"copy-{i}.jpg", quality=85)
    out = tmp_path / "ds"
    report = build(_cfg({"a": a, "b": b}, out, dedup=True, test_per_class=3))
    dups = pd.read_csv(out / "duplicates.csv")
    assert len(dups) >= 8
    df = _manifest(out)
    assert not df["path"].str.contains("copy-").any()
    assert report["near_duplicates"]["pairs_by_source_pair"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["covid-vs-rest", "covid-pneumonia-normal"])
def test_each_task_end_to_end(tmp_path, task):
    src = tmp_path / "synthetic"
    generate_phantoms(src, 16, size=64, seed=7)
    pneu = tmp_path / "synthetic" / "pneumonia"
    generate_phantoms(tmp_path / "more", 16, size=64, seed=8)
    (tmp_path / "more" / "covid").rename(pneu)
    out, run = tmp_path / "ds", tmp_path / "run"
    build(DataConfig(sources=(("folder", str(src)),), out=str(out), task=task, test_per_class=4,
                     workers=1, progress=False, dedup=False))
    train.run(TrainConfig(data=str(out), out=str(run), epochs=1, image_size=32, batch_size=8, weights="none",
                          progress=False))
    result = evaluate.run(EvalConfig(run=str(run), bootstrap=20))
    k = 3 if task == "covid-pneumonia-normal" else 2
    assert len(result["labels"]) == k and np.asarray(result["confusion_matrix"]).shape == (k, k)
    assert set(result["per_class"]) == set(result["labels"])
    assert "sensitivity" in result["metrics"] and "roc_auc" in result["metrics"]
    res = predict.run(PredictConfig(run=str(run), inputs=(str(pneu),), format="json"))
    preds = json.loads(res["text"])["predictions"]
    assert all(abs(sum(p[f"prob_{c}"] for c in result["labels"]) - 1) < 1e-5 for p in preds)  # float64: ~3e-16
    assert {p["predicted_label"] for p in preds} <= set(result["labels"])


@pytest.mark.integration
@pytest.mark.parametrize("task", ["covid-vs-normal", "covid-vs-rest", "covid-pneumonia-normal"])
@pytest.mark.parametrize("protocol", ["patient", "leave-source-out"])
def test_real_tasks_and_protocols(real_data, tmp_path, task, protocol):
    sources = tuple((n, str(real_data / "sources" / f)) for n, f in REAL_SOURCES.items())
    kw = dict(protocol=protocol, test_source="actualmed" if protocol == "leave-source-out" else None)
    test_per_class = 40 if task == "covid-pneumonia-normal" else 150
    report = build(DataConfig(sources=sources, out=str(tmp_path / "ds"), task=task, test_per_class=test_per_class,
                              workers=2, progress=False, **kw))
    df = _manifest(tmp_path / "ds")
    used = df[df["split"] != "unused"]
    assert used.groupby("group")["split"].nunique().max() == 1  # patient-disjoint
    assert not df["sha256"].duplicated().any()
    dup = pd.read_csv(tmp_path / "ds" / "duplicates.csv")
    kept = set(df["path"])
    assert all(Path(p).is_absolute() for p in kept) and len(dup) > 0
    # duplicates.csv names images relative to their source root, with the source beside.
    roots = {n: (real_data / "sources" / f).resolve() for n, f in REAL_SOURCES.items()}
    for _, pair in dup.iterrows():  # never both copies of a duplicate pair in the manifest
        a, b = str(roots[pair["source_a"]] / pair["path_a"]), str(roots[pair["source_b"]] / pair["path_b"])
        assert Path(a).is_file() and Path(b).is_file()
        assert not (a in kept and b in kept)
    if protocol == "leave-source-out":
        assert set(used.loc[used["split"] == "test", "source"]) == {"actualmed"}
    assert any("radiography" in w or "cohen" in w for w in report["warnings"])
    assert (tmp_path / "ds" / "dataset_card.md").is_file()
