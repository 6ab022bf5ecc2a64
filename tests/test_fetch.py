"""covid_cxr.data.fetch: downloads from a local HTTP server on 127.0.0.1 (never the internet), resume, checks,
safe unpacking, and the Kaggle path with and without credentials (a fake ``kaggle`` module)."""

from __future__ import annotations

import hashlib
import importlib.machinery
import io
import re
import stat
import sys
import threading
import types
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_gray
from covid_cxr.config import ConfigError, make_config
from covid_cxr.data.fetch import FETCHABLE, download, manual_steps, run
from covid_cxr.data.options import FetchConfig
from covid_cxr.data.sources import read_cohen, read_mooney
from covid_cxr.data.unzip import unpack_zip
from covid_cxr.errors import CovidCxrError, FetchError

TOP = "covid-chestxray-dataset-master"
TIMEOUT = 5.0  # socket timeout against a local server that answers in milliseconds: > 1000x, only bounds a hang


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_gray(seed)).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def repo_zip(finding_b: str = "No Finding", extra: list[tuple[str, bytes]] = ()) -> bytes:
    """A fake GitHub archive of covid-chestxray-dataset: one top folder, metadata.csv, two PNGs."""
    meta = ("patientid,finding,view,modality,folder,filename\n"
            "1,Pneumonia/Viral/COVID-19,PA,X-ray,images,a.png\n"
            f"2,{finding_b},AP,X-ray,images,b.png\n")
    return make_zip([(f"{TOP}/", b""), (f"{TOP}/README.md", b"# fake\n"), (f"{TOP}/metadata.csv", meta.encode()),
                     (f"{TOP}/images/", b""), (f"{TOP}/images/a.png", png_bytes(1)),
                     (f"{TOP}/images/b.png", png_bytes(2)), *extra])


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.body`` at /archive.zip with Range and If-Range; can cut a response short."""

    timeout = TIMEOUT  # a stuck client cannot hold a server thread

    def do_GET(self):  # noqa: N802 - BaseHTTPRequestHandler's name
        srv = self.server
        entry = {"path": self.path, "range": self.headers.get("Range"), "if_range": self.headers.get("If-Range")}
        srv.requests.append(entry)
        if self.path != "/archive.zip":
            entry["status"] = 404
            self.send_error(404)
            return
        body, start, status = srv.body, 0, 200
        rng, if_range = entry["range"], entry["if_range"]
        if rng and not srv.ignore_range and (if_range is None or if_range == srv.etag):
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(body):
                entry["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        entry["status"] = status
        self.send_response(status)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", srv.etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        payload = body[start:]
        if srv.cut_after is not None:  # one interrupted response, then normal service
            payload, srv.cut_after = payload[:srv.cut_after], None
            self.close_connection = True
        self.wfile.write(payload)
        self.wfile.flush()

    def log_message(self, format, *args):  # keep test output clean
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Requests to 127.0.0.1 must not go through a proxy configured in the environment."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.body, httpd.etag, httpd.cut_after, httpd.ignore_range = repo_zip(), '"v1"', None, False
    httpd.requests = []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/archive.zip"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(TIMEOUT)


def cfg(out: Path, url: str, **kw) -> FetchConfig:
    kw.setdefault("progress", False)
    return FetchConfig(source="cohen", out=str(out), url=url, timeout=TIMEOUT, **kw)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_fetch_makes_the_layout_read_cohen_reads(server, tmp_path):
    out = tmp_path / "cohen"
    summary = run(cfg(out, server.url, sha256=sha(server.body).upper(), progress=True))
    assert (out / "metadata.csv").is_file()
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["a.png", "b.png"]
    assert (out / "images" / "a.png").read_bytes() == png_bytes(1)
    assert summary["bytes"] == len(server.body) and summary["sha256"] == sha(server.body)
    assert summary["files"] == 4 and summary["resumed_from"] == 0 and summary["skipped"] == []
    assert summary["next"] == f"--source cohen={out}" and summary["seconds"] >= 0
    read = read_cohen(out)
    assert sorted(read.images["label"]) == ["covid", "normal"] and read.dropped == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohen"]  # no .part, sidecar or temp folder left
    assert [r["range"] for r in server.requests] == [None]


def test_interrupted_download_resumes_with_range(server, tmp_path):
    out = tmp_path / "cohen"
    server.cut_after = 1000
    with pytest.raises(FetchError, match=r"interrupted.*1000 of \d+ bytes.*again to resume"):
        run(cfg(out, server.url))
    part = tmp_path / "cohen.zip.part"
    assert part.read_bytes() == server.body[:1000]
    assert not out.exists()

    summary = run(cfg(out, server.url, sha256=sha(server.body)))
    assert [(r["range"], r["if_range"], r["status"]) for r in server.requests] == [
        (None, None, 200), ("bytes=1000-", '"v1"', 206)]
    assert summary["resumed_from"] == 1000 and summary["sha256"] == sha(server.body)
    assert len(read_cohen(out).images) == 2
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    out = tmp_path / "cohen"
    server.cut_after = 1000
    with pytest.raises(FetchError, match="interrupted"):
        run(cfg(out, server.url))
    server.ignore_range = True
    summary = run(cfg(out, server.url))
    assert server.requests[1]["range"] == "bytes=1000-" and server.requests[1]["status"] == 200
    assert summary["resumed_from"] == 0 and summary["bytes"] == len(server.body)
    assert summary["sha256"] == sha(server.body)
    assert len(read_cohen(out).images) == 2


def test_changed_file_is_not_spliced_onto_a_stale_part(server, tmp_path):
    """If-Range carries the old ETag: a server whose file changed sends the new file whole."""
    out = tmp_path / "cohen"
    server.cut_after = 1000
    with pytest.raises(FetchError):
        run(cfg(out, server.url))
    server.body, server.etag = repo_zip(finding_b="Pneumonia/Bacterial"), '"v2"'
    summary = run(cfg(out, server.url))
    assert server.requests[1]["if_range"] == '"v1"' and server.requests[1]["status"] == 200
    assert summary["sha256"] == sha(server.body)
    assert sorted(read_cohen(out).images["label"]) == ["covid", "pneumonia"]


def test_complete_part_is_not_downloaded_again(server, tmp_path):
    part = tmp_path / "x.zip.part"
    assert download(server.url, part, timeout=TIMEOUT, progress=False) == {"bytes": len(server.body),
                                                                            "resumed_from": 0}
    again = download(server.url, part, timeout=TIMEOUT, progress=False)
    assert again == {"bytes": len(server.body), "resumed_from": len(server.body)}
    assert server.requests[1]["status"] == 416 and part.read_bytes() == server.body


def test_wrong_sha256_is_an_error_and_keeps_the_download_aside(server, tmp_path):
    out = tmp_path / "cohen"
    with pytest.raises(FetchError, match=rf"SHA-256 is {sha(server.body)}, not the expected 0{{64}}.*cohen\.zip"):
        run(cfg(out, server.url, sha256="0" * 64))
    assert not out.exists()
    assert (tmp_path / "cohen.zip.sha256-mismatch").read_bytes() == server.body
    assert not (tmp_path / "cohen.zip.part").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohen.zip.sha256-mismatch"]


def test_path_traversal_member_is_rejected(server, tmp_path):
    server.body = repo_zip(extra=[("../evil", b"pwned")])
    assert "../evil" in zipfile.ZipFile(io.BytesIO(server.body)).namelist()
    work = tmp_path / "work"
    with pytest.raises(FetchError, match=r"'\.\./evil' points outside"):
        run(cfg(work / "cohen", server.url))
    assert not (work / "cohen").exists()
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))
    assert sorted(p.name for p in work.iterdir()) == ["cohen.zip.rejected"]


def test_zip_bomb_is_rejected_by_total_size(server, tmp_path):
    server.body = repo_zip(extra=[(f"{TOP}/big.bin", bytes(200_000))])
    assert len(server.body) < 20_000  # compresses well: the declared size is what counts
    with pytest.raises(FetchError, match="zip bomb"):
        run(cfg(tmp_path / "cohen", server.url, max_unpacked_bytes=100_000))
    assert not (tmp_path / "cohen").exists()


def test_existing_non_empty_out_is_refused_without_overwrite(server, tmp_path):
    out = tmp_path / "cohen"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FetchError, match="not empty.*--overwrite"):
        run(cfg(out, server.url))
    assert server.requests == [] and (out / "keep.txt").read_text() == "mine"

    run(cfg(out, server.url, overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "metadata.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohen"]


def test_empty_out_folder_is_used(server, tmp_path):
    (tmp_path / "cohen").mkdir()
    run(cfg(tmp_path / "cohen", server.url))
    assert (tmp_path / "cohen" / "images" / "b.png").is_file()


def test_archive_without_cohen_layout_is_rejected(server, tmp_path):
    server.body = make_zip([("other-master/README.md", b"hi")])
    with pytest.raises(FetchError, match="no metadata.csv and images/"):
        run(cfg(tmp_path / "cohen", server.url))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohen.zip.rejected"]  # no half-unpacked folder


def test_http_error_and_unreachable_server(server, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404"):
        run(cfg(tmp_path / "a", server.url.replace("archive.zip", "missing.zip")))
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(FetchError, match=f"cannot download http://127.0.0.1:{port}/"):
        run(cfg(tmp_path / "b", server.url))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _unpack(tmp_path: Path, entries, **kw):
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip(entries))
    dest = tmp_path / "dest"
    dest.mkdir()
    return unpack_zip(archive, dest, **kw), dest


@pytest.mark.parametrize("name", ["/etc/evil", "C:/evil", "top/../../evil", "top\\..\\..\\evil"])
def test_unsafe_member_names_are_refused(tmp_path, name):
    with pytest.raises(FetchError, match="absolute path|points outside"):
        _unpack(tmp_path, [("top/ok.txt", b"ok"), (name, b"x")])
    assert list((tmp_path / "dest").iterdir()) == []


def test_symlinks_are_not_created(tmp_path):
    link = zipfile.ZipInfo("top/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    (files, skipped), dest = _unpack(tmp_path, [("top/ok.txt", b"ok"), (link, b"/etc/passwd")], strip_top=True)
    assert files == 1 and skipped == ["top/link"]
    assert sorted(p.name for p in dest.iterdir()) == ["ok.txt"]


def test_duplicate_entries_are_refused(tmp_path):
    with pytest.warns(UserWarning, match="Duplicate name"):
        entries = make_zip([("top/a.txt", b"1"), ("top/a.txt", b"2")])
    archive = tmp_path / "a.zip"
    archive.write_bytes(entries)
    (tmp_path / "dest").mkdir()
    with pytest.raises(FetchError, match="appears twice"):
        unpack_zip(archive, tmp_path / "dest")


def test_strip_top_only_when_there_is_one_top_folder(tmp_path):
    (files, _), dest = _unpack(tmp_path, [("a/x.txt", b"1"), ("b/y.txt", b"2")], strip_top=True)
    assert files == 2 and sorted(p.name for p in dest.iterdir()) == ["a", "b"]


def test_not_a_zip(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(FetchError, match="not a readable zip"):
        unpack_zip(tmp_path / "a.zip", tmp_path)


# --- Kaggle sources -------------------------------------------------------------------------------

@pytest.fixture
def no_kaggle_credentials(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    return home


def fake_kaggle(monkeypatch, zip_bytes: bytes | None = None) -> list:
    """Install a fake ``kaggle`` package whose API writes ``zip_bytes``; returns its call log."""
    calls: list = []

    class KaggleApi:
        def authenticate(self):
            calls.append("authenticate")

        def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False):
            calls.append((dataset, unzip))
            Path(path, dataset.split("/")[1] + ".zip").write_bytes(zip_bytes)

    for name in ("kaggle", "kaggle.api", "kaggle.api.kaggle_api_extended"):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules["kaggle.api.kaggle_api_extended"].KaggleApi = KaggleApi
    return calls


@pytest.mark.parametrize("installed", [False, True], ids=["kaggle-missing", "no-credentials"])
@pytest.mark.parametrize("name", ["mooney", "radiography"])
def test_kaggle_source_without_credentials_lists_manual_steps(no_kaggle_credentials, monkeypatch, tmp_path,
                                                              name, installed):
    calls = fake_kaggle(monkeypatch) if installed else monkeypatch.setitem(sys.modules, "kaggle", None) or []
    out = tmp_path / "data" / name
    slug = FETCHABLE[name].kaggle
    with pytest.raises(FetchError) as info:
        run(FetchConfig(source=name, out=str(out), progress=False))
    msg = str(info.value)
    assert isinstance(info.value, CovidCxrError)
    assert ("no Kaggle credentials" if installed else "kaggle package is not installed") in msg
    assert f"kaggle datasets download -d {slug} -p {out} --unzip" in msg
    assert f"https://www.kaggle.com/datasets/{slug}" in msg and "pip install kaggle" in msg
    assert "~/.kaggle/kaggle.json" in msg and f"covid-cxr data build --source {name}={out}" in msg
    assert calls == [] and not out.exists()


def test_kaggle_config_dir_counts_as_credentials(no_kaggle_credentials, monkeypatch, tmp_path):
    from covid_cxr.data.fetch import kaggle_credentials

    assert kaggle_credentials() is None
    (no_kaggle_credentials / ".kaggle").mkdir()
    (no_kaggle_credentials / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert kaggle_credentials().endswith("kaggle.json")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "elsewhere"))  # kaggle then looks only there
    assert kaggle_credentials() is None
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "kaggle.json").write_text("{}")
    assert kaggle_credentials() == str(tmp_path / "elsewhere" / "kaggle.json")


def test_kaggle_source_with_credentials_downloads_and_unpacks(no_kaggle_credentials, monkeypatch, tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray(make_gray(3)).save(jpeg, format="JPEG")
    data = make_zip([("chest_xray/train/NORMAL/IM-0001-0001.jpeg", jpeg.getvalue()),
                     ("chest_xray/test/PNEUMONIA/person1_virus_6.jpeg", jpeg.getvalue())])
    calls = fake_kaggle(monkeypatch, data)
    monkeypatch.setenv("KAGGLE_USERNAME", "u")
    monkeypatch.setenv("KAGGLE_KEY", "k")
    out = tmp_path / "mooney"
    summary = run(FetchConfig(source="mooney", out=str(out), sha256=sha(data), progress=False))
    assert calls == ["authenticate", ("paultimothymooney/chest-xray-pneumonia", False)]
    assert summary["files"] == 2 and summary["sha256"] == sha(data)
    assert summary["origin"] == "kaggle:paultimothymooney/chest-xray-pneumonia"
    assert sorted(read_mooney(out).images["label"]) == ["normal", "pneumonia"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "mooney"]  # staging folder removed


def test_manual_steps():
    assert "kaggle datasets download -d tawsifurrahman/covid19-radiography-database -p PATH --unzip" in \
        manual_steps("radiography")
    cohen = manual_steps("cohen", "/data/my cohen")
    assert "git clone --depth 1 https://github.com/ieee8023/covid-chestxray-dataset '/data/my cohen'" in cohen
    assert "--source cohen='/data/my cohen'" in cohen
    with pytest.raises(FetchError, match="unknown source"):
        manual_steps("nope")


@pytest.mark.parametrize("kw, match", [
    ({"source": "nope"}, r"--source must be one of cohen, mooney, radiography, montgomery, shenzhen, jsrt, got 'nope'"),
    ({"sha256": "abc"}, "64 hexadecimal"),
    ({"url": "ftp://x/y.zip"}, "http"),
    ({"source": "mooney", "url": "https://x/y.zip"}, "cohen only"),
    ({"timeout": 0}, "--timeout must be > 0"),
    ({"max_unpacked_bytes": 0}, "--max-unpacked-bytes must be > 0"),
    ({"out": " "}, "empty"),
])
def test_config_checks(kw, match):
    """Options are checked as the CLI and YAML files give them (make_config: choices, then the class's checks)."""
    args = {"source": "cohen", "out": "x", **kw}
    with pytest.raises(ConfigError, match=match):
        make_config(FetchConfig, args)
    if "source" not in kw or kw["source"] in FETCHABLE:  # the class's own checks hold without make_config too
        with pytest.raises(ConfigError, match=match):
            FetchConfig(**args)


def test_fetchable_sources_are_the_config_choices():
    import typing

    from covid_cxr.data.fetch import MASK_SETS

    choices = set(typing.get_args(typing.get_type_hints(FetchConfig)["source"]))
    assert choices == set(FETCHABLE) | set(MASK_SETS) and not set(FETCHABLE) & set(MASK_SETS)


@pytest.mark.parametrize("name", ["montgomery", "shenzhen", "jsrt"])
def test_lung_mask_sets_print_their_steps_and_create_nothing(name: str, tmp_path, capsys) -> None:
    """The lung-mask sets need a person (registration, terms): data fetch prints numbered steps with the folder
    filled in, ending with the build and lungs train commands, and writes nothing."""
    import shlex

    from covid_cxr.cli import main

    out = tmp_path / "masks set"
    assert main(["data", "fetch", "--source", name, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "  1. " in text and "  4. covid-cxr data build --source folder=" in text and "lungs train" in text
    assert shlex.quote(str(out)) + "/normal/masks/" in text  # the folder, quoted as a shell needs it
    assert not out.exists() and list(tmp_path.iterdir()) == []
