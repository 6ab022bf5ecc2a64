"""audit: mask geometry, the source probe, and a full audit of a model that learned the phantoms' lesions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from covid_cxr import audit
from covid_cxr.config import ConfigError
from covid_cxr.phantoms import make_phantom_with_masks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_lung_field_mask_covers_phantom_lungs():
    covered, lesions = [], []
    for i in range(12):
        d = make_phantom_with_masks("covid", 128, np.random.default_rng([4242, i]))
        m = audit.lung_field_mask(128)
        covered.append(d["lung_mask"][m].sum() / d["lung_mask"].sum())
        lesions.append(d["lesion_mask"][m].sum() / d["lesion_mask"].sum())
    assert np.mean(covered) >= 0.8 and np.mean(lesions) >= 0.8
    m = audit.lung_field_mask(64)
    assert m.shape == (64, 64) and m.dtype == bool
    np.testing.assert_array_equal(m, m[:, ::-1])  # left-right symmetric
    assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()  # a frame stays
    assert 0.5 < m.mean() < 0.75


def test_border_mask_and_black_out():
    keep = audit.border_mask(50, 0.12)
    assert keep[:6].all() and keep[-6:].all() and keep[:, :6].all() and keep[:, -6:].all()
    assert not keep[6:-6, 6:-6].any()
    images = np.full((3, 50, 50), 200, np.uint8)
    out = audit.black_out(images, ~keep)
    assert (out[:, ~keep] == 0).all() and (out[:, keep] == 200).all() and (images == 200).all()
    with pytest.raises(ValueError):
        audit.black_out(images, keep[:10])


def test_source_probe_separable_vs_random():
    rng = np.random.default_rng(0)
    n = 240
    sources = np.array(["a", "b"])[rng.integers(0, 2, n)]
    groups = np.arange(n) // 2  # two images per patient
    sources = sources[groups * 2]  # a patient's images share a source
    noise = rng.normal(size=(n, 16))
    separable = noise.copy()
    separable[:, 3] += np.where(sources == "b", 4.0, 0.0)
    good = audit.source_probe(separable, sources, groups)
    bad = audit.source_probe(noise, sources, groups)
    assert not good["skipped"] and good["folds"] == 5 and good["n"] == n
    assert good["accuracy"] >= 0.95 and good["chance"] < 0.6
    assert abs(bad["accuracy"] - bad["chance"]) < 0.12
    # when the label alone predicts the source, the baseline reports it
    with_label = audit.source_probe(noise, sources, groups, targets=(sources == "b").astype(int))
    assert with_label["label_only"] == pytest.approx(1.0)
    one = audit.source_probe(noise, np.array(["a"] * n), groups)
    assert one["skipped"] and "one source" in one["reason"]


def test_verdicts_flag_a_shortcut():
    m = lambda auc, ci: {"auc": auc, "ci95": ci}  # noqa: E731
    result = {
        "split": "test", "images": 100, "patients": 90, "threshold": 0.5,
        "masking": {"original": m(0.95, [0.9, 0.98]), "lungs_masked": {**m(0.81, [0.74, 0.87]), "auc_retained": 0.69},
                    "border_only": {**m(0.52, [0.41, 0.63]), "auc_retained": 0.04}},
        "masks": {"border_fraction": 0.12},
        "source_probe": {"skipped": False, "accuracy": 0.93, "chance": 0.55, "label_only": 0.7},
        "source_label_counts": {"cohen": {"normal": 0, "covid": 50}, "mooney": {"normal": 50, "covid": 10}},
        "per_source": [{"source": "cohen", "n": 40, "roc_auc": float("nan"), "sensitivity": 0.9,
                        "specificity": float("nan")},
                       {"source": "mooney", "n": 60, "roc_auc": 0.8, "sensitivity": 0.5, "specificity": 0.9}],
    }
    text = audit.verdicts(result)
    lungs = next(v for v in text if "lung field masked" in v)
    assert "0.81" in lungs and "above chance" in lungs and "outside the lung fields" in lungs and "69%" in lungs
    border = next(v for v in text if "border band" in v)
    assert "near chance" in border
    assert any("0.93 accuracy" in v and "0.55 chance" in v and "encode" in v for v in text)
    assert any("cohen contributes only 'covid'" in v for v in text)
    assert any(v.startswith("On mooney") and "sensitivity 0.50" in v for v in text)


def test_audit_of_a_model_that_reads_the_lungs(learned_phantom_run):
    """The phantoms' only class signal is inside the lungs: hiding the lungs (or keeping only the
    border) must drop the AUC to chance, while the original images are classified well."""
    result = audit.run(audit.AuditConfig(run=str(learned_phantom_run), bootstrap=200, device="cpu", workers=1))
    m = result["masking"]
    print("audit AUCs: " + ", ".join(f"{k} {v['auc']:.3f} CI {v['ci95']}" for k, v in m.items()))
    assert m["original"]["auc"] >= 0.9
    assert m["lungs_masked"]["auc"] <= 0.7 and m["border_only"]["auc"] <= 0.7
    assert m["lungs_masked"]["auc_retained"] <= 0.5
    lo, hi = m["original"]["ci95"]
    assert lo <= m["original"]["auc"] <= hi
    assert result["source_probe"]["skipped"] and "one source" in result["source_probe"]["reason"]
    assert [r["source"] for r in result["per_source"]] == ["synthetic-phantoms"]
    assert result["per_source"][0]["n"] == result["images"] == 80
    out = learned_phantom_run / "audit-test"
    saved = json.loads((out / "audit.json").read_text())
    assert saved["verdicts"] == result["verdicts"] and "research use only" in saved["disclaimer"]
    assert (out / "masked_examples.png").read_bytes()[:8] == PNG_MAGIC
    assert not any("above chance (0.5)" in v for v in result["verdicts"])
    assert any("Source probe skipped" in v for v in result["verdicts"])
    summary = audit.format_summary(result)
    assert result["verdicts"][1] in summary and "research use only" in summary
    with pytest.raises(ConfigError):
        audit.AuditConfig(run="r", split="holdout")


def test_audit_with_two_sources_runs_the_probe(learned_phantom_run, tmp_path):
    """Relabel the phantoms' sources so that source B holds only covid images: the probe runs,
    the label-only baseline is reported and the confounding is named."""
    import pandas as pd

    data = learned_phantom_run.parent / "dataset"
    df = pd.read_csv(data / "manifest.csv", keep_default_na=False, dtype=str)
    covid = df["target"] == "covid"
    test_covid = np.flatnonzero(covid & (df["split"] == "test"))
    df["source"] = np.where(covid, "B", "A")
    df.loc[test_covid[::2], "source"] = "A"
    copy = tmp_path / "dataset"
    copy.mkdir()
    df.to_csv(copy / "manifest.csv", index=False)
    (copy / "dataset.json").write_text((data / "dataset.json").read_text())
    result = audit.run(audit.AuditConfig(run=str(learned_phantom_run), data=str(copy), bootstrap=0, device="cpu",
                                         workers=1))
    probe = result["source_probe"]
    assert not probe["skipped"] and probe["sources"] == {"A": 60, "B": 20}
    assert probe["chance"] == pytest.approx(0.75) and probe["label_only"] == pytest.approx(0.75)
    assert 0.0 <= probe["accuracy"] <= 1.0 and probe["folds"] == 5
    assert [r["source"] for r in result["per_source"]] == ["A", "B"]
    assert result["per_source"][1]["per_class"] == {"normal": 0, "covid": 20}
    assert result["masking"]["original"]["ci95"] is None
    text = result["verdicts"]
    assert any(v.startswith("Source can be predicted") for v in text)
    assert any("Source B contributes only 'covid'" in v for v in text)
    assert any(v.startswith("On A (60 images)") for v in text)
