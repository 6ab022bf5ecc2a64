"""Options of ``covid-cxr serve``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from covid_cxr.config import ConfigError

BACKENDS = ("torch", "onnx")
CHECKPOINTS = ("best", "last")


@dataclass(frozen=True)
class ServeConfig:
    """Options of ``covid-cxr serve`` (see :func:`covid_cxr.serve.app.create_app`)."""

    run: str
    """Run folder (or a checkpoint file)."""
    host: str = "127.0.0.1"
    """Address to bind. The app has no authentication: bind other addresses only behind a proxy that adds it."""
    port: int = 8000
    """TCP port (0: any free port)."""
    backend: str = "torch"
    """'torch' (the checkpoint) or 'onnx' (RUN/model.onnx, exported from the checkpoint if missing)."""
    max_upload_mb: float = 20.0
    """Largest accepted upload in MB (2**20 bytes); larger ones get HTTP 413 before they are read in full."""
    workers: int = 2
    """Images decoded and predicted at the same time; further requests wait their turn."""
    checkpoint: str = "best"
    """'best' or 'last'."""
    onnx_path: str | None = None
    """ONNX file for backend 'onnx' (default RUN/model.onnx)."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'."""

    def __post_init__(self) -> None:
        if not str(self.run):
            raise ConfigError("serve needs --run (a run folder or checkpoint file)")
        if not self.host:
            raise ConfigError("--host must not be empty (e.g. 127.0.0.1)")
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.max_upload_mb > 0:
            raise ConfigError(f"--max-upload-mb must be positive, got {self.max_upload_mb}")
        if int(self.workers) < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.checkpoint not in CHECKPOINTS:
            raise ConfigError(f"--checkpoint must be best or last, got {self.checkpoint!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
