"""The one writer and the one reader of checkpoints.

:func:`save_checkpoint` / :func:`read_checkpoint` / :func:`load_model`:
``{"format", "meta": ModelMeta, "state_dict", "training"?, "checksum"}``, loaded with ``weights_only=True`` and
``strict=True``, never pickled modules. The checksum covers every tensor and the meta, so a damaged file is refused
instead of silently loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from covid_cxr import __version__
from covid_cxr.errors import CheckpointError, OutputError
from covid_cxr.files import atomic_write
from covid_cxr.imaging.pixels import PreprocessSpec
from covid_cxr.model.gate import ScopeGateModule
from covid_cxr.model.meta import Calibration, ModelMeta, TrainingData
from covid_cxr.model.networks import CxrNet, LungNet, _torch_load, build_model, unwrap

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2


def versions() -> dict[str, str]:
    return {"covid_cxr": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


# ----------------------------------------------------------------------------- checkpoints

def _feed(h, obj: Any) -> None:
    """Feed a nested structure of tensors and plain values into a hash, in a canonical order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        h.update(repr(obj).encode())


def checksum(payload: dict) -> str:
    """sha256 over everything in a checkpoint payload except its ``checksum`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "checksum"})
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, meta: ModelMeta, training: dict | None = None) -> None:
    """Write a self-describing checkpoint atomically: the weights of the unwrapped model, the meta and,
    for ``last.pt``, the training state (optimizer, scheduler, RNG) that ``--resume`` needs.

    Raises:
        OutputError: the disk is full or not writable (the previous file, if any, is untouched; no temporary file
            is left behind).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    payload: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "meta": meta.to_dict(), "state_dict": state}
    if training is not None:
        payload["training"] = training
    payload["checksum"] = checksum(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)  # in memory first: torch writing to a full disk fails with an internal error
    try:
        atomic_write(path, buf.getbuffer(), durable=True)
    except OutputError as exc:
        raise OutputError(exc.errno, exc.strerror, exc.filename,
                          f"{exc} (the previous {Path(path).name}, if any, is untouched)") from None


@dataclass
class Checkpoint:
    """A checkpoint as read from disk."""

    path: Path
    meta: ModelMeta
    state_dict: dict[str, torch.Tensor]
    training: dict | None
    checksum: str


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint (``weights_only`` load, checksum checked).

    Raises:
        CheckpointError: missing, not a covid-cxr checkpoint, damaged (checksum mismatch), or newer.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; train a model with `covid-cxr train` first")
    raw = _torch_load(path)
    if not isinstance(raw, dict) or "state_dict" not in raw:
        raise CheckpointError(f"{path} is not a covid-cxr checkpoint")
    fmt = raw.get("format", 0)
    if fmt > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by a newer covid-cxr (format {fmt}); upgrade covid-cxr")
    if fmt < 2:
        return _read_v1(path, raw)
    stored = raw.get("checksum")
    actual = checksum(raw)
    if stored != actual:
        raise CheckpointError(f"{path} is damaged: its contents do not match the checksum written with it (the "
                              "file was changed or corrupted on disk); use another copy, or for last.pt start the "
                              "run again")
    meta = ModelMeta.from_dict(raw["meta"], where=str(path))
    return Checkpoint(path, meta, raw["state_dict"], raw.get("training"), actual)


def _read_v1(path: Path, raw: dict) -> Checkpoint:
    """A covid-cxr 0.1 checkpoint: DenseNet keys at the top level, metadata in loose keys."""
    required = ("labels", "preprocess", "threshold", "arch")
    if any(k not in raw for k in required):
        raise CheckpointError(f"{path} is not a covid-cxr checkpoint (needs keys {required})")
    state = {}
    for k, v in raw["state_dict"].items():
        state["head." + k[len("classifier."):] if k.startswith("classifier.") else "net." + k] = v
    p = raw["preprocess"]
    spec = PreprocessSpec(size=int(p["size"]), base_short_side=int(p.get("base_short_side", max(256, int(p["size"])))))
    labels = tuple(raw["labels"])
    from covid_cxr.model.meta import logit

    cal = raw.get("calibration") or {}
    meta = ModelMeta(arch=raw["arch"], labels=labels, positive="covid" if "covid" in labels else None, preprocess=spec,
                     threshold_log_odds=logit(float(raw["threshold"])), temperature=float(raw.get("temperature", 1.0)),
                     calibration=Calibration(temperature=float(raw.get("temperature", 1.0)),
                                             status="fitted" if cal else "not fitted",
                                             threshold_rule=str((cal.get("operating_point") or {}).get("rule", "default 0.5"))),
                     training=dict(raw.get("config") or {}), epoch=raw.get("epoch"),
                     val_metrics=dict(raw.get("val_metrics") or {}), versions=dict(raw.get("version") or {}))
    training = {k: raw[k] for k in ("optimizer", "scheduler", "scaler", "train_state", "rng") if k in raw} or None
    return Checkpoint(path, meta, state, training, "")


def model_from_checkpoint(ckpt: Checkpoint, device: str | torch.device = "cpu") -> CxrNet:
    """Rebuild the network of a checkpoint (gate included), ``strict=True``, in eval mode."""
    meta = ckpt.meta
    model = build_model(meta.labels, arch=meta.arch, weights=None)
    if meta.gate is not None:
        model.gate = ScopeGateModule(meta.gate.feature_dim, meta.gate.n_means)
    if meta.lungs is not None:
        model.lungs = LungNet(meta.lungs.width, meta.lungs.size)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt.path}: weights do not match {meta.arch}: {str(exc)[:300]}") from None
    return model.to(device).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[CxrNet, ModelMeta]:
    """(model in eval mode, its meta) from a checkpoint file.

    Raises:
        CheckpointError: missing, corrupt, or not matching the architecture.
    """
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, device), ckpt.meta


def new_meta(arch: str, labels: tuple[str, ...], positive: str | None, spec: PreprocessSpec, training: dict,
             data: TrainingData | None) -> ModelMeta:
    """The meta of a model about to be trained (uncalibrated, no gate)."""
    from covid_cxr.model.meta import now

    return ModelMeta(arch=arch, labels=tuple(labels), positive=positive, preprocess=spec, training=training,
                     data=data, versions=versions(), created=now())


def meta_json(meta: ModelMeta) -> str:
    return json.dumps(meta.to_dict(), indent=2)
