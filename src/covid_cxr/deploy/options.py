"""The options of ``covid-cxr predict``, ``explain``, ``export`` and ``serve`` (see :mod:`covid_cxr.config`)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from covid_cxr.config import Backend, Checkpoint, CommandOptions, check_device_option, check_positive
from covid_cxr.dicomweb import split_credentials
from covid_cxr.errors import ConfigError

_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
"""A DICOM Application Entity title: 1-16 printable ASCII characters, no backslash, not only spaces."""
_AE_ADDRESS = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")


def check_ae_title(flag: str, title: str) -> None:
    """Refuse a value that is no AE title (:data:`_AE_TITLE`)."""
    if not _AE_TITLE.fullmatch(title or "") or not title.strip():
        raise ConfigError(f"{flag} {str(title)[:40]!r} is not an AE title: give 1 to 16 printable ASCII characters "
                          "without a backslash, e.g. COVIDCXR")


def ae_address(flag: str, text: str) -> tuple[str, str, int]:
    """(AE title, host, port) of ``AET@HOST:PORT``.

    Raises:
        ConfigError: another form, or an invalid title or port.
    """
    m = _AE_ADDRESS.fullmatch(text or "")
    if not m:
        raise ConfigError(f"{flag} {str(text)[:80]!r}: give the destination as AET@HOST:PORT, e.g. "
                          "PACS@pacs.example.org:104")
    check_ae_title(flag, m["aet"])
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(f"{flag} {text!r}: the port must be between 1 and 65535")
    return m["aet"], m["host"].strip("[]"), port


def check_dicomweb_url(flag: str, url: str) -> None:
    """Refuse a value that is no http(s) DICOMweb root (the message never shows credentials in it)."""
    try:
        shown, _ = split_credentials(str(url).strip())
    except ValueError:
        shown = "the URL"
    if not re.match(r"^https?://[^/]", shown):
        raise ConfigError(f"{flag} {shown[:80]!r}: give a DICOMweb root starting with http:// or https://, e.g. "
                          "http://pacs.example.org:8042/dicom-web")


@dataclass(frozen=True, kw_only=True)
class PredictConfig(CommandOptions):
    """``covid-cxr predict``: class probabilities, the decision at the model's threshold and the out-of-scope flag
    for image files and folders (PNG, JPEG and DICOM, also DICOM files without an ending)."""

    inputs: tuple[str, ...]
    """Image files and/or folders (searched recursively)."""
    run: str
    """Run folder, checkpoint file, or (with --backend onnx) an .onnx file."""
    out: str | None = None
    """Output file; default: print to standard output."""
    format: Literal["auto", "table", "csv", "json"] = "auto"
    """Output format; auto: a readable table on a terminal, CSV in a pipe or file (JSON for an --out ending in
    .json)."""
    skip_unreadable: bool = False
    """Write a row with the reason for an unreadable file instead of stopping."""
    checkpoint: Checkpoint = "best"
    """Which checkpoint of the run."""
    batch_size: int = 16
    """Images per forward pass."""
    device: str = "auto"
    """Where to run: auto (CUDA if available), cpu, cuda or cuda:N."""
    backend: Backend = "torch"
    """torch (the checkpoint) or onnx (RUN/model.onnx from `covid-cxr export`; pass --run RUN/model.int8.onnx for the
    int8 model of `export --quantize int8`)."""
    heatmaps: str | None = None
    """Folder for Grad-CAM overlays of every readable image (computed with the PyTorch checkpoint)."""
    progress: bool = True
    """Show a progress bar for many files."""
    dicom_out: str | None = None
    """Folder for DICOM results to file in a PACS: per DICOM input, a Comprehensive SR (probabilities, decision,
    threshold, in-scope flag, model identity) and a Secondary Capture of the Grad-CAM overlay with "RESEARCH USE
    ONLY" burned in, both in the input's study, identifying the patient only by name and ID (docs/pacs-results.md).
    Other inputs are counted as having no DICOM result."""
    stow: str | None = field(default=None, repr=False)
    """With --dicom-out: send the DICOM results with STOW-RS to this DICOMweb root (e.g.
    http://pacs:8042/dicom-web); credentials from COVID_CXR_DICOMWEB_AUTH (user:password or 'Bearer TOKEN')."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("predict needs at least one image file or folder")
        if self.stow is not None and self.dicom_out is None:
            raise ConfigError("--stow sends the DICOM results: give --dicom-out DIR too (they are written there "
                              "first)")
        if self.dicom_out is not None and Path(self.dicom_out).exists() and not Path(self.dicom_out).is_dir():
            raise ConfigError(f"--dicom-out {self.dicom_out} is a file; give a folder for the DICOM results")
        if self.stow is not None:
            check_dicomweb_url("--stow", self.stow)
        check_positive("batch_size", self.batch_size)
        check_device_option(self.device)
        if self.out is not None and Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is a folder; give a file name, e.g. {Path(self.out) / 'predictions.csv'}")
        if self.heatmaps is not None and Path(self.heatmaps).exists() and not Path(self.heatmaps).is_dir():
            raise ConfigError(f"--heatmaps {self.heatmaps} is a file; give a folder for the overlay images")


@dataclass(frozen=True, kw_only=True)
class ExplainConfig(CommandOptions):
    """``covid-cxr explain``: a Grad-CAM overlay PNG per image and explanations.json (research use only: shows where
    evidence was found, not why)."""

    inputs: tuple[str, ...]
    """Image files and/or folders (searched recursively)."""
    run: str
    """Run folder or checkpoint file."""
    out: str
    """Folder for the heatmap PNGs and explanations.json."""
    target: str | None = None
    """Class to explain; default: the positive class (covid)."""
    checkpoint: Checkpoint = "best"
    """Which checkpoint of the run."""
    device: str = "auto"
    """Where to run: auto (CUDA if available), cpu, cuda or cuda:N."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("explain needs at least one image file or folder")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is a file; give a folder for the overlay images")
        check_device_option(self.device)


@dataclass(frozen=True, kw_only=True)
class ExportConfig(CommandOptions):
    """``covid-cxr export``: the model in a deployable format, with its metadata; the ONNX graph is checked against
    PyTorch before anything is written."""

    run: str
    """Run folder or checkpoint file."""
    format: Literal["onnx", "safetensors", "hf"] = "onnx"
    """Export format: onnx (model.onnx + model.json, dynamic batch), safetensors (the weights, with the model's
    metadata inside and beside them as JSON) or hf (a Hugging Face-style folder: model.safetensors, config.json and
    a README.md model card; also model.onnx unless --no-hf-onnx)."""
    out: str | None = None
    """Output: the .onnx or .safetensors file (default RUN_DIR/model.onnx, RUN_DIR/model.safetensors), or for hf
    the folder (default RUN_DIR/hf)."""
    checkpoint: Checkpoint = "best"
    """Which checkpoint of the run."""
    opset: int = 18
    """ONNX opset (18 or newer: the torch.export-based exporter writes no older one)."""
    hf_onnx: bool = True
    """With --format hf: also put model.onnx + model.json in the folder, for installs without PyTorch."""
    overwrite: bool = False
    """With --format hf: replace the files of an existing export folder."""
    quantize: Literal["none", "int8"] = "none"
    """With --format onnx: int8 also writes model.int8.onnx (+ model.int8.json) beside model.onnx, by ONNX Runtime
    static quantisation calibrated on the run's validation images; it is kept only if its test-split ROC AUC is at
    most --max-auc-drop below fp32 (both numbers go into model.json's "quantization" block)."""
    calibration_images: int = 256
    """With --quantize int8: validation images (spread evenly over the split) used to calibrate activation ranges."""
    max_auc_drop: float = 0.01
    """With --quantize int8: largest accepted fall of test ROC AUC from fp32 to int8; a larger one refuses the int8
    model."""
    data: str | None = None
    """With --quantize int8: dataset folder for calibration and the check; default: the one the run was trained on."""
    source_roots: tuple[tuple[str, str], ...] = ()
    """With --quantize int8: where a source's images are now, as NAME=PATH, when the dataset's recorded folder
    moved."""

    def __post_init__(self) -> None:
        if self.quantize != "none" and self.format != "onnx":
            raise ConfigError(f"--quantize {self.quantize} needs --format onnx (it quantises the ONNX graph)")
        if self.calibration_images < 1:
            raise ConfigError(f"--calibration-images {self.calibration_images}: give at least 1")
        if not 0 <= self.max_auc_drop <= 1:
            raise ConfigError(f"--max-auc-drop {self.max_auc_drop}: give a number from 0 to 1")
        if self.opset < 18:
            raise ConfigError(f"--opset {self.opset} is not supported: the torch.export-based ONNX exporter writes "
                              "opset 18 or newer (ONNX Runtime >= 1.14 reads it); pass --opset 18")
        suffix = {"onnx": ".onnx", "safetensors": ".safetensors"}.get(self.format)
        if self.out is not None and suffix and not str(self.out).endswith(suffix):
            raise ConfigError(f"--out {self.out}: the {self.format} file name must end in {suffix} (its metadata goes "
                              "beside it as .json)")
        if self.out is not None and self.format == "hf" and Path(self.out).is_file():
            raise ConfigError(f"--out {self.out} is a file; --format hf writes a folder")


@dataclass(frozen=True, kw_only=True)
class ServeConfig(CommandOptions):
    """``covid-cxr serve``: POST /v1/predict, GET /healthz, OpenAPI docs at /docs and a web page at / (research use
    only)."""

    run: str
    """Run folder (or a checkpoint file)."""
    host: str = "127.0.0.1"
    """Address to bind. The app has no TLS: bind other addresses only behind a proxy that adds it."""
    port: int = 8000
    """TCP port (0: any free port)."""
    backend: Backend = "torch"
    """torch (the checkpoint) or onnx (RUN/model.onnx, exported from the checkpoint if missing)."""
    max_upload_mb: float = 20.0
    """Largest accepted upload in MB (2**20 bytes); larger ones get HTTP 413 before they are read in full."""
    concurrency: int = 2
    """Predictions running at once (threads); further admitted requests wait their turn."""
    max_uploads: int = 32
    """Prediction requests admitted at once (receiving, waiting or predicting; each holds one temporary folder);
    more get HTTP 503 with Retry-After."""
    max_heatmaps: int = 2
    """Requests with ?heatmap=true admitted at once. Grad-CAM runs one at a time in a thread of its own, so heatmaps
    never hold up plain predictions; more get HTTP 503 with Retry-After."""
    idle_timeout: float = 10.0
    """Seconds an upload may send nothing before it is cut off with HTTP 408."""
    upload_timeout: float = 60.0
    """Seconds a whole upload may take; a client trickling bytes is cut off with HTTP 408."""
    api_key: str | None = field(default=None, repr=False)
    """Require this key on POST /v1/predict (header Authorization: Bearer KEY or X-API-Key: KEY; otherwise HTTP 401).
    Prefer the COVID_CXR_API_KEY environment variable: a flag shows in the process list."""
    rate_limit: int = 0
    """Requests per minute per client address on POST /v1/predict (token bucket; over it HTTP 429 with
    Retry-After); 0: no limit. The address is the connection's peer: X-Forwarded-For is ignored (any client could
    send one) unless --trust-proxy names the proxy."""
    trust_proxy: str | None = None
    """Address or network (CIDR) of your reverse proxy, comma-separated for several: only connections from there may
    set the client address with X-Forwarded-For (the rate limit then counts per real client). Default: no proxy
    header is trusted."""
    insecure_public: bool = False
    """Serve on an address beyond this machine without an API key (refused otherwise)."""
    checkpoint: Checkpoint = "best"
    """Which checkpoint of the run."""
    onnx_path: str | None = None
    """ONNX file for backend onnx (default RUN/model.onnx; RUN/model.int8.onnx is the int8 model of `export --quantize
    int8`)."""
    device: str = "auto"
    """Where to run: auto (CUDA if available), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        if not str(self.run):
            raise ConfigError("serve needs --run (a run folder or checkpoint file)")
        if not self.host:
            raise ConfigError("--host must not be empty (e.g. 127.0.0.1)")
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        for name in ("max_upload_mb", "concurrency", "max_uploads", "max_heatmaps", "idle_timeout", "upload_timeout"):
            check_positive(name, getattr(self, name))
        check_positive("rate_limit", self.rate_limit, strict=False)
        check_device_option(self.device)
        if self.trust_proxy is not None:
            for item in str(self.trust_proxy).split(","):
                try:
                    ipaddress.ip_network(item.strip(), strict=False)
                except ValueError:
                    raise ConfigError(f"--trust-proxy {str(self.trust_proxy)[:80]!r}: {item.strip()[:40]!r} is not an "
                                      "address or network (e.g. 10.0.0.5 or 10.0.0.0/24)") from None
        if self.api_key is not None and not re.fullmatch(r"[\x21-\x7e]{16,}", self.api_key):
            # never echo the key itself
            raise ConfigError("--api-key must be at least 16 printable ASCII characters without spaces (it travels "
                              "in an HTTP header); make one with: python -c \"import secrets; "
                              "print(secrets.token_urlsafe(32))\"")


@dataclass(frozen=True, kw_only=True)
class LungsPredictConfig(CommandOptions):
    """``covid-cxr lungs predict``: the lung fields of each image as a mask PNG and an overlay PNG, and lungs.csv
    saying whether each mask shows two plausible lung fields (research use only)."""

    inputs: tuple[str, ...]
    """Image files and/or folders (searched recursively)."""
    lungs: str
    """The segmenter: lungs.pt from `covid-cxr lungs train`, or its folder, or a torchxrayvision ChestX-Det PSPNet
    state dict (docs/lungs.md)."""
    out: str
    """Folder for <name>_mask.png, <name>_overlay.png and lungs.csv."""
    device: str = "auto"
    """Where to run: auto (CUDA if available), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        check_device_option(self.device)


@dataclass(frozen=True, kw_only=True)
class ListenConfig(CommandOptions):
    """``covid-cxr dicom listen``: a DICOM C-STORE receiver (storage SCP) for CR and DX chest radiographs. Each
    received frontal radiograph is predicted and its Comprehensive SR and Grad-CAM Secondary Capture (as written by
    predict --dicom-out) are sent back to the PACS and/or written to a folder (research use only)."""

    run: str
    """Run folder, checkpoint file, or (with --backend onnx) an .onnx file."""
    port: int = 11112
    """TCP port to receive on (0: any free port, logged)."""
    ae_title: str = "COVIDCXR"
    """This receiver's AE title (the PACS sends to it; it calls the destination with it)."""
    host: str = "127.0.0.1"
    """Address to bind. DIMSE here has no TLS: bind other addresses only on a trusted hospital network."""
    send_to: str | None = None
    """Send the results with C-STORE to this storage SCP, as AET@HOST:PORT (e.g. PACS@pacs.example.org:104)."""
    stow: str | None = field(default=None, repr=False)
    """Send the results with STOW-RS to this DICOMweb root (e.g. http://pacs:8042/dicom-web); credentials from
    COVID_CXR_DICOMWEB_AUTH."""
    dicom_out: str | None = None
    """Also keep the results in this folder (without it they are deleted once sent)."""
    callers: tuple[str, ...] = ()
    """Accept associations only from this calling AE title (repeat for several); default: from any."""
    queue_size: int = 4
    """Received instances waiting for the prediction worker (spooled to disk); when it is full, a C-STORE is
    answered 0xA700 (out of resources) and the sender retries later."""
    max_instances: int = 0
    """Stop after this many received instances have been processed (0: run until SIGINT or SIGTERM)."""
    checkpoint: Checkpoint = "best"
    """Which checkpoint of the run."""
    device: str = "auto"
    """Where to run: auto (CUDA if available), cpu, cuda or cuda:N."""
    backend: Backend = "torch"
    """torch (the checkpoint; the SC shows Grad-CAM) or onnx (RUN/model.onnx; the SC has no heatmap)."""

    def __post_init__(self) -> None:
        if not str(self.run):
            raise ConfigError("dicom listen needs --run (a run folder, checkpoint or .onnx file)")
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        if not self.host:
            raise ConfigError("--host must not be empty (e.g. 127.0.0.1)")
        check_ae_title("--ae-title", self.ae_title)
        for caller in self.callers:
            check_ae_title("--caller", caller)
        if self.send_to is not None:
            ae_address("--send-to", self.send_to)
        if self.stow is not None:
            check_dicomweb_url("--stow", self.stow)
        if self.send_to is None and self.stow is None and self.dicom_out is None:
            raise ConfigError("dicom listen needs somewhere to put the results: --send-to AET@HOST:PORT (C-STORE), "
                              "--stow URL (STOW-RS) and/or --dicom-out DIR")
        if self.dicom_out is not None and Path(self.dicom_out).exists() and not Path(self.dicom_out).is_dir():
            raise ConfigError(f"--dicom-out {self.dicom_out} is a file; give a folder for the DICOM results")
        check_positive("queue_size", self.queue_size)
        check_positive("max_instances", self.max_instances, strict=False)
        check_device_option(self.device)

    @property
    def destination(self) -> tuple[str, str, int] | None:
        """(AE title, host, port) of --send-to, or None."""
        return None if self.send_to is None else ae_address("--send-to", self.send_to)
