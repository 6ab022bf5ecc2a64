"""The web page in headless Chromium: pick an X-ray, see the prediction, the heatmap and the research-use banner.

Runs the app with uvicorn on 127.0.0.1 (a free port) in a background thread; Playwright drives Debian's
Chromium (no browser download). Skipped with the reason when Chromium or Playwright is missing.
"""

from __future__ import annotations

import contextlib
import csv
import shutil
from pathlib import Path

import pytest
from liveserver import serve_in_thread

from conftest import real_data_root, write_image
from covid_cxr.deploy.serve import create_app
from covid_cxr.model.checkpoint import read_checkpoint

DISCLAIMER_TEXT = "Research use only — not a diagnostic device"

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT_COPY = Path("/tmp/serve_screenshot.png")
"""A copy of the screenshot outside pytest's temporary folders, to look at after a run."""
OUT_OF_SCOPE_SCREENSHOT = Path("/tmp/serve_out_of_scope_screenshot.png")
IN_SCOPE_SCREENSHOT = Path("/tmp/serve_in_scope_screenshot.png")


def keep_copy(shot: Path, copy: Path) -> None:
    """Best effort: a copy someone else owns, or a concurrent run, must not fail the test."""
    with contextlib.suppress(OSError):
        shutil.copyfile(shot, copy)


def real_xray() -> Path | None:
    """A COVID-19 radiograph from the real collection (PNG/JPEG under 2 MB), or None when it is absent."""
    root = real_data_root()
    if root is None:
        return None
    with open(root / "inventory.csv", newline="") as f:
        for row in csv.DictReader(f):
            path = root / row["relative_path"]
            if ("covid" in row["label_as_in_source"].lower() and path.suffix.lower() in (".png", ".jpg", ".jpeg")
                    and int(row["bytes"]) < 2_000_000 and path.is_file()):
                return path
    return None


@pytest.fixture(scope="module")
def live_url(tiny_run):
    """The app served by uvicorn on 127.0.0.1 at a free port, in a daemon thread."""
    pytest.importorskip("uvicorn")
    with serve_in_thread(create_app(str(tiny_run), device="cpu")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def test_page_predicts_and_shows_heatmap(live_url, browser, tiny_run, tmp_path):
    xray = real_xray() or write_image(tmp_path / "phantom.png", seed=7, size=(320, 288))
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    requests = []
    page.on("request", lambda req: requests.append(req.url))
    page.goto(live_url + "/")
    banner = page.locator("#banner")
    assert "Research use only — not a diagnostic device" in banner.inner_text()
    from playwright.sync_api import expect  # the page's CSP forbids eval: wait with locators, not wait_for_function

    # (wait_for_function evaluates its string in the page: it passed only when the model card had already loaded at
    # the first check, and failed on a loaded machine)
    expect(page.locator("#model-info")).to_contain_text("best.pt", timeout=30_000)
    info = page.locator("#model-info").inner_text()
    # provenance: what the model was trained on, and that it is synthetic
    assert "32 px input" in info and "synthetic-phantoms" in info and "SYNTHETIC training data" in info
    page.set_input_files("#file", str(xray))
    page.wait_for_selector("#heatmap[src^='data:image/png;base64,']", state="visible", timeout=60_000)
    label = page.locator("#result-label").inner_text()
    prob = page.locator("#result-prob").inner_text()
    assert label in ("normal", "covid", "out of scope")  # a real X-ray is out of scope for the phantom model
    assert "P(covid) =" in prob and "%" in prob
    assert "(decision rule: P(covid) >= " in prob and "1.00" not in prob.split("decision rule")[1]
    why = page.locator("#result-why").inner_text()
    decided = why.removeprefix("out of scope: ").split("had it been in scope: ")[-1]
    assert decided.startswith(("normal: P(covid) ", "covid: P(covid) ")) and "the decision threshold" in decided
    assert why.startswith("out of scope: ") == (label == "out of scope")
    tick = page.locator("#probs .tick")  # one threshold mark, on the covid bar, where the threshold is
    assert tick.count() == 1 and "decision threshold" in tick.get_attribute("title")
    left = float(tick.get_attribute("style").split("left:")[1].split("%")[0])
    # toFixed(2): rounded to <= 0.005, plus slack for parsing floats
    assert left == pytest.approx(100 * read_checkpoint(tiny_run / "best.pt").meta.threshold, abs=0.006)
    assert page.locator("#error").is_hidden()
    assert page.locator("#preview").is_visible()
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 100  # the PNG decoded
    assert "Research use only — not a diagnostic device" in banner.inner_text()
    assert all(url.startswith((live_url, "blob:", "data:")) for url in requests), requests
    shot = tmp_path / "serve_screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    keep_copy(shot, SCREENSHOT_COPY)
    assert shot.stat().st_size > 10_000
    page.close()


def test_page_shows_a_refusal(live_url, browser, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image\n" * 20)
    page = browser.new_page()
    page.goto(live_url + "/")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error", state="visible", timeout=30_000)
    assert "HTTP 415" in page.locator("#error").inner_text()
    assert page.locator("#result").is_hidden()
    page.close()


def _phantom(tiny_run: Path) -> Path:
    import yaml

    data = Path(yaml.safe_load((tiny_run / "config.yaml").read_text())["data_absolute"])
    return sorted((data.parent / "synthetic-phantoms" / "normal").glob("*.png"))[0]


def test_page_warns_about_out_of_scope_images(live_url, browser, tiny_run, tmp_path):
    """The out-of-scope gate's verdict is shown: no warning for an image like the training phantoms, a visible
    warning (and still a prediction) for a random texture."""
    from playwright.sync_api import expect  # the page's CSP forbids eval: wait with locators, not wait_for_function

    page = browser.new_page()
    page.goto(live_url + "/")
    page.uncheck("#want-heatmap")
    phantom = _phantom(tiny_run)
    page.set_input_files("#file", str(phantom))
    expect(page.locator("#status")).to_have_text(f"Done: {phantom.name}", timeout=30_000)
    assert page.locator("#result").is_visible() and page.locator("#scope-warning").is_hidden()
    assert page.locator("#result-label").inner_text() in ("normal", "covid")
    assert "out-of-scope" not in (page.locator("#result").get_attribute("class") or "")
    shot = tmp_path / "in_scope.png"
    page.screenshot(path=str(shot), full_page=True)
    keep_copy(shot, IN_SCOPE_SCREENSHOT)
    texture = write_image(tmp_path / "texture.png", seed=4, size=(72, 64))
    page.set_input_files("#file", str(texture))
    expect(page.locator("#status")).to_have_text("Done: texture.png", timeout=30_000)
    warning = page.locator("#scope-warning")
    assert warning.is_visible() and warning.inner_text().startswith("Out of scope: ")
    assert "not meaningful" in warning.inner_text()
    # no bold class label for it: 'out of scope', the probabilities greyed but still there
    assert page.locator("#result-label").inner_text() == "out of scope"
    assert "out-of-scope" in page.locator("#result").get_attribute("class")
    assert page.locator("#result-why").inner_text().startswith("out of scope: ")
    assert "P(covid) = " in page.locator("#result-prob").inner_text() and page.locator("#probs tr").count() == 2
    assert DISCLAIMER_TEXT in page.locator("#banner").inner_text()
    shot = tmp_path / "out_of_scope.png"
    page.screenshot(path=str(shot), full_page=True)
    keep_copy(shot, OUT_OF_SCOPE_SCREENSHOT)
    page.close()


DOCS_SCREENSHOT = Path("/tmp/serve_docs_screenshot.png")
"""A copy of the /docs screenshot outside pytest's temporary folders."""


def _local(url: str, base: str) -> bool:
    return url.startswith((base, "blob:", "data:"))


def test_docs_render_offline(live_url, browser, tmp_path):
    """/docs shows the operation list with every request answered by this server: anything else is blocked and
    recorded, as on a machine without a network."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests, external = [], []
    page.on("request", lambda req: requests.append(req.url))

    def block_external(route):
        if _local(route.request.url, live_url):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    page.route("**/*", block_external)
    page.goto(live_url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/v1/predict" in p for p in paths) and any("/healthz" in p for p in paths)
    assert "covid-cxr" in page.locator(".info .title").inner_text()
    assert external == [] and all(_local(u, live_url) for u in requests), requests
    assert any(u.endswith("/docs/assets/swagger-ui-bundle.js") for u in requests)
    assert page.locator(".validator-badge, .errors-wrapper").count() == 0
    shot = tmp_path / "docs.png"
    page.screenshot(path=str(shot), full_page=True)
    keep_copy(shot, DOCS_SCREENSHOT)
    assert shot.stat().st_size > 10_000
    page.close()


@pytest.fixture(scope="module")
def keyed_run(tiny_run, tmp_path_factory) -> Path:
    """tiny_run's model with an out-of-source estimate recorded and a report.html beside it."""
    from covid_cxr.model.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint

    run = tmp_path_factory.mktemp("browser-keyed") / "run"
    run.mkdir()
    ckpt = read_checkpoint(tiny_run / "best.pt")
    meta = ckpt.meta.replace(estimate={"source": "crossval", "crossval": "../cv", "pooled_auc": 0.713,
                                       "ci95": [0.641, 0.782], "protocol": "leave-source-out", "per_source": {}})
    save_checkpoint(run / "best.pt", model_from_checkpoint(ckpt), meta)
    (run / "report.html").write_text("<!doctype html><meta charset=utf-8><title>report</title>"
                                     "<h1>covid-cxr model report</h1>", encoding="utf-8")
    return run


KEY = "browser-key-0123456789abcdef"
PROVENANCE_SCREENSHOT = Path("/tmp/serve_provenance_screenshot.png")


@pytest.fixture(scope="module")
def keyed_url(keyed_run):
    with serve_in_thread(create_app(str(keyed_run), device="cpu", api_key=KEY)) as url:
        yield url


def test_page_shows_provenance_and_takes_an_api_key(keyed_url, browser, tiny_run, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(keyed_url + "/")
    info = page.locator("#model-info")
    expect(info).to_contain_text("Expected on a hospital it has not seen", timeout=30_000)
    text = info.inner_text()
    assert "AUC about 0.71 (95% CI 0.64–0.78)" in text and "out-of-source" in text
    assert "synthetic-phantoms" in text and "32 px input" in text and "trained 20" in text
    assert "decision rule P(covid) >= " in text
    link = page.locator("#report-link")
    assert link.get_attribute("href") == "/report"
    assert page.locator("#key-row").is_visible()
    page.uncheck("#want-heatmap")
    phantom = _phantom(tiny_run)
    page.set_input_files("#file", str(phantom))  # no key yet
    expect(page.locator("#error")).to_contain_text("needs an API key (HTTP 401)", timeout=30_000)
    page.fill("#api-key", "wrong-key-0123456789")
    page.locator("#api-key").dispatch_event("change")  # analyses the file again
    expect(page.locator("#error")).to_contain_text("the key entered is wrong", timeout=30_000)
    page.fill("#api-key", KEY)
    page.locator("#api-key").dispatch_event("change")
    expect(page.locator("#status")).to_have_text(f"Done: {phantom.name}", timeout=30_000)
    assert page.locator("#error").is_hidden() and page.locator("#result-label").inner_text() in ("normal", "covid")
    shot = tmp_path / "provenance.png"
    page.screenshot(path=str(shot), full_page=True)
    keep_copy(shot, PROVENANCE_SCREENSHOT)
    with page.context.expect_page() as report_page:  # the report is behind the key: fetched with it (W1)
        link.click()
    report = report_page.value
    report.wait_for_load_state()
    assert "covid-cxr model report" in report.locator("h1").inner_text() and report.url.startswith("blob:")
    report.close()
    page.fill("#api-key", "")
    page.locator("#api-key").blur()  # the browser's own change event: the file is analysed again, without a key
    # (a dispatched event would leave the field focused, and the click below would blur it into a second analysis)
    expect(page.locator("#error")).to_contain_text("needs an API key (HTTP 401)", timeout=30_000)
    link.click()  # without the key: said on the page, nothing opened
    expect(page.locator("#error")).to_contain_text("The report needs this server's API key (HTTP 401)",
                                                   timeout=30_000)
    page.close()


def test_page_says_when_there_is_no_estimate(live_url, browser):
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(live_url + "/")
    expect(page.locator("#model-info")).to_contain_text("No out-of-source estimate recorded", timeout=30_000)
    assert page.locator("#report-link").count() == 0 and page.locator("#key-row").is_hidden()
    page.close()
