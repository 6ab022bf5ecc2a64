"""report.html: one self-contained file with every section, images embedded."""

from __future__ import annotations

import re

import pytest

from covid_cxr import report


@pytest.mark.slow
def test_report_is_self_contained_and_complete(learned_phantom_run):
    path = report.run(learned_phantom_run, split="test", audit=True)
    text = path.read_text()
    assert path == learned_phantom_run / "report.html"
    for needle in ("Research use only", "Original study", "0.66", "95% CI", "Operating point", "Calibration",
                   "by source", "Shortcut audit", "Grad-CAM examples", "Model card", "Out of scope",
                   "not a diagnostic device"):
        assert needle in text, needle
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= 8  # roc, confusion, calibration x2, audit triptych, Grad-CAM examples, data pictures
    assert not re.search(r'src="(?!data:)', text)  # nothing fetched from elsewhere
    assert "true positive" in text
