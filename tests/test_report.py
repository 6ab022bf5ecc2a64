"""report.html: one self-contained file with every section, images embedded, and honest about what it shows:
a SYNTHETIC banner for phantom data, the audit's pictures, the training sources in the model card, and the
decision rule with the digits that matter (never "threshold 1.00")."""

from __future__ import annotations

import base64
import html
import re
import shutil

import pytest
import torch

from covid_cxr.evaluation import report
from covid_cxr.evaluation.options import ReportConfig
from covid_cxr.model.checkpoint import load_model, save_checkpoint

FRESH = shutil.ignore_patterns("eval-*", "audit-*", "report.html", "model.onnx", "model.json", ".lock")
"""A run folder as training leaves it."""


def embedded_images(text: str) -> list[tuple[str, bytes]]:
    """(alt text, PNG bytes) of every <img> in the page."""
    return [(html.unescape(alt), base64.b64decode(data))
            for alt, data in re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', text)]


def section(text: str, title: str) -> str:
    start = text.index(f"<h2>{title}</h2>")
    end = text.find("<h2>", start + 1)
    return text[start:end if end >= 0 else None]


@pytest.fixture(scope="module")
def tiny_copy(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_run, run, ignore=FRESH)
    return run


@pytest.fixture(scope="module")
def without_audit(tiny_copy):
    """The report of a fresh copy of tiny_run with --no-audit: evaluate runs first, the audit does not."""
    path = report.run(ReportConfig(run=str(tiny_copy), audit=False, device="cpu"))
    return path, path.read_text()


@pytest.fixture(scope="module")
def with_audit(tiny_copy, without_audit):
    """The same run reported again, now running the audit."""
    path = report.run(ReportConfig(run=str(tiny_copy), device="cpu"))
    return path, path.read_text()


def test_report_runs_evaluate_and_is_self_contained(tiny_copy, without_audit):
    path, text = without_audit
    assert path == tiny_copy / "report.html" and (tiny_copy / "eval-test" / "metrics.json").is_file()
    assert not (tiny_copy / "audit-test").exists()
    assert "The shortcut audit was not run" in text
    assert not re.search(r'src="(?!data:)', text) and "http://" not in text  # nothing fetched from elsewhere
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for _, png in embedded_images(text))


def test_report_of_synthetic_data_says_so(tiny_run, without_audit):
    _, text = without_audit
    assert "SYNTHETIC DATA (synthetic-phantoms)" in text
    assert "are SYNTHETIC phantoms, not patients" in section(text, "Warnings")
    assert "cannot be compared" in section(text, "The study and this model")


def test_model_card_names_the_training_sources_and_the_decision_rule(tiny_run, without_audit):
    _, text = without_audit
    meta = load_model(tiny_run / "best.pt")[1]
    card = section(text, "Model card")
    assert f"validation images from {meta.data.sources[0]}" in card and meta.data.sources == ("synthetic-phantoms",)
    assert f"{meta.data.n_train} training and {meta.data.n_val} validation images" in card
    assert "Synthetic (not patients): synthetic-phantoms" in card
    assert html.escape(meta.threshold_text()) in card and html.escape(meta.threshold_text()) in text
    assert "out-of-scope gate" in card and "Out of scope" in card and "not a diagnostic device" in card
    assert "threshold 1.00" not in text


def test_report_includes_the_audit_pictures(tiny_copy, with_audit):
    _, text = with_audit
    audit_html = section(text, "Shortcut audit")
    assert "not run" not in audit_html and "<li>AUC on the original test images" in audit_html
    alt = "original, lungs masked, border only"
    [(found_alt, png)] = [(a, p) for a, p in embedded_images(audit_html)]
    assert found_alt == alt and png == (tiny_copy / "audit-test" / "masked_examples.png").read_bytes()
    alts = [a for a, _ in embedded_images(text)]
    assert {"roc.png", "confusion_matrix.png", "learning curves", alt} <= set(alts)
    assert any(a in ("true positive", "false positive", "false negative", "true negative") for a in alts)


def test_report_never_rounds_a_high_threshold_to_one(tiny_run, tmp_path):
    """A threshold of P(covid) >= 0.999994 (log-odds 12) is printed as such, not as 1.00."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=FRESH)
    model, meta = load_model(tiny_run / "best.pt")
    strict = meta.replace(threshold_log_odds=12.0)
    save_checkpoint(run / "best.pt", model, strict)
    text = report.run(ReportConfig(run=str(run), audit=False, device="cpu")).read_text()
    assert strict.threshold_text() == "P(covid) >= 1 - 6.1e-06"
    assert html.escape(strict.threshold_text()) in section(text, "Measures with 95% confidence intervals")
    assert html.escape(strict.threshold_text()) in section(text, "Model card")
    assert "threshold 1.00" not in text and "&gt;= 1.00" not in text and "≥ 1.00" not in text
    torch.testing.assert_close(load_model(run / "best.pt")[0].head.weight, model.head.weight)  # saved as is: exact


@pytest.mark.slow
def test_report_is_self_contained_and_complete(learned_phantom_run):
    path = report.run(ReportConfig(run=str(learned_phantom_run), split="test", audit=True, device="cpu"))
    text = path.read_text()
    assert path == learned_phantom_run / "report.html"
    for needle in ("Research use only", "Original study", "0.66", "95% CI", "Decision rule", "Calibration",
                   "by source", "Shortcut audit", "Grad-CAM examples", "Model card", "Out of scope",
                   "not a diagnostic device", "SYNTHETIC DATA"):
        assert needle in text, needle
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= 8  # roc, confusion, calibration x2, audit triptych, Grad-CAM examples, data pictures
    assert not re.search(r'src="(?!data:)', text)  # nothing fetched from elsewhere
    assert "true positive" in text
    assert "threshold 1.00" not in text


def test_report_puts_the_out_of_source_estimate_beside_the_internal_number(tiny_copy, without_audit, tmp_path):
    """Without crossval the report says the internal number is optimistic; with a crossval folder it says what to
    expect on a hospital the model has not seen, with the pooled AUC and its CI, and a per-source table."""
    from covid_cxr.files import write_json

    _, text = without_audit
    assert "No out-of-source estimate" in section(text, "How it should do on a new hospital")
    cv = tmp_path / "cv"
    write_json(cv / "crossval.json", {
        "protocol": {"description": "leave-one-source-out"},
        "pooled": {"auc": 0.6123, "ci95": [0.5801, 0.6452]},
        "per_source": {"hospital-a": {"n": 40, "per_class": {"normal": 20, "covid": 20}, "auc": 0.7, "sensitivity": 0.9,
                                      "specificity": 0.4, "in_scope": 0.95}}})
    page = report.run(ReportConfig(run=str(tiny_copy), audit=False, crossval=str(cv), device="cpu")).read_text()
    part = section(page, "How it should do on a new hospital")
    assert "Expect about this on a hospital the model has not seen" in part
    assert "0.612" in part and "0.580" in part and "0.645" in part and "hospital-a" in part
    assert "own test split" in part  # the internal number stays beside it
    with pytest.raises(Exception, match="crossval"):
        report.run(ReportConfig(run=str(tiny_copy), audit=False, crossval=str(tmp_path / "none"), device="cpu"))


def test_the_crossval_is_compared_with_the_run_option_by_option():
    """'The gap is how much the internal number flatters the model' only when both were trained alike; otherwise
    every option that differs is named (options that do not change what is learned, like --workers, aside)."""
    run = {"epochs": 3, "image_size": 64, "sources": ("a", "b"), "workers": 2, "data": "d"}
    assert report.option_differences({"epochs": 3, "image_size": 64, "sources": ["a", "b"], "workers": 8}, run) == []
    assert report.option_differences({"epochs": 2, "image_size": 64, "workers": 8}, run) == ["epochs: crossval 2, this run 3"]
    assert report.option_differences(None, run) is None and report.option_differences({}, run) is None
    assert "flatters" in report._comparison([])
    differ = report._comparison(["epochs: crossval 2, this run 3"])
    assert "flatters" not in differ and "epochs: crossval 2, this run 3" in differ
    assert "flatters" not in report._comparison(None) and "unknown" in report._comparison(None)


def test_per_source_rows_show_intervals_and_the_too_few_caveat():
    rows = {"cohen": {"n": 13, "n_positive": 12, "accuracy": 0.77, "accuracy_ci95": [0.5, 0.92], "roc_auc": 0.162,
                      "roc_auc_ci95": [0.0, 0.5], "sensitivity": 0.83, "sensitivity_ci95": [0.55, 0.95],
                      "specificity": 0.0, "specificity_ci95": [0.0, 0.79],
                      "caveat": "too few to judge: 1 normal image (fewer than 10)"}}
    page = report._breakdown("by source", rows, "covid")
    assert "0.162 (0.00-0.50)" in page and "0.000 (0.00-0.79)" in page
    assert "too few to judge: 1 normal image (fewer than 10)" in page


def test_grad_cam_examples_are_shown_at_their_own_width(without_audit):
    """The overlays (captions and the caveat in 7-9 pt text) are drawn 660 px wide and shown one per row at up to
    that width, not shrunk into 340 px thumbnails."""
    import io

    from PIL import Image

    _, text = without_audit
    cams = section(text, "Grad-CAM examples")
    assert 'class="grid cams"' in cams and ".cams figure{width:100%;max-width:660px}" in text
    widths = [Image.open(io.BytesIO(png)).size[0] for _, png in embedded_images(cams)]
    assert widths and all(w >= 600 for w in widths), widths
