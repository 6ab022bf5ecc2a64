"""Building, saving and loading the classifier: one way each.

* :func:`build_model` - torchvision's DenseNet-121 with a new classifier, optionally
  initialised from ImageNet weights (torchvision's weights API and cache) or a file.
* :func:`save_checkpoint` / :func:`load_checkpoint` - self-describing state dicts
  (labels, preprocessing, threshold, config, versions); never pickled modules.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from covid_cxr import __version__
from covid_cxr.errors import CheckpointError, WeightsNotFound
from covid_cxr.transforms import PreprocessSpec

log = logging.getLogger(__name__)

ARCHS = ("densenet121",)
CHECKPOINT_FORMAT = 1
OFFLINE_ENV = "COVID_CXR_OFFLINE"
"""Set to 1 to never try downloading weights (tests set it; no test may reach the internet)."""

_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _imagenet_weights(arch: str):
    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1


def imagenet_weights_path(arch: str = "densenet121") -> Path:
    """Where torchvision caches ``arch``'s ImageNet weights (honours ``$TORCH_HOME``)."""
    url = _imagenet_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fix_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old DenseNet keys (``norm.1.weight`` -> ``norm1.weight``), as torchvision does."""
    out = {}
    for key, value in state_dict.items():
        m = _LEGACY_DENSENET_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found") from exc
    except Exception as exc:  # torch raises many types for corrupt or pickled-module files
        raise CheckpointError(f"cannot load {path} as a state dict ({type(exc).__name__}: {exc}); it must be a "
                              "tensor state dict saved with torch.save(model.state_dict(), path)") from exc


def load_imagenet_state_dict(arch: str = "densenet121") -> dict[str, torch.Tensor]:
    """ImageNet weights for ``arch`` from torchvision's cache, downloading them if allowed.

    Raises:
        WeightsNotFound: not cached and the download failed (or ``COVID_CXR_OFFLINE=1``).
    """
    weights = _imagenet_weights(arch)
    path = imagenet_weights_path(arch)
    if not path.is_file():
        if os.environ.get(OFFLINE_ENV) == "1":
            reason = f"{OFFLINE_ENV}=1 forbids downloading"
        else:
            try:
                log.info("downloading ImageNet weights for %s to %s", arch, path)
                return fix_legacy_keys(weights.get_state_dict(progress=True, check_hash=True))
            except Exception as exc:  # URLError, HTTPError, hash mismatch, disk errors
                reason = f"download failed: {type(exc).__name__}: {exc}"
        raise WeightsNotFound(
            f"no cached ImageNet weights at {path} ({reason}); download {weights.url} on a connected machine and "
            f"place it at that path (or set TORCH_HOME), or pass --weights FILE with a torchvision-format "
            f"state dict, or --weights none to train from scratch")
    expected = re.search(r"-([0-9a-f]{8,})\.", path.name)
    if expected:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(expected.group(1)):
            log.warning("%s does not match torchvision's published hash prefix %s; loading it anyway",
                        path, expected.group(1))
    return fix_legacy_keys(_torch_load(path))


def _state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    obj = _torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a covid-cxr checkpoint: reuse its backbone
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    obj = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    return fix_legacy_keys(obj)


def build_model(labels: list[str] | tuple[str, ...], arch: str = "densenet121",
                weights: str | Path | None = "imagenet") -> nn.Module:
    """DenseNet-121 (torchvision) with a ``len(labels)``-way classifier.

    Args:
        labels: class names in index order.
        arch: torchvision architecture name (only ``densenet121`` is supported).
        weights: ``"imagenet"`` (torchvision's cached ImageNet-1k weights), ``None``/``"none"``
            (random init) or a path to a torchvision-format state dict (legacy ``norm.1`` keys
            and covid-cxr checkpoints accepted). The backbone must load exactly; only the
            classifier is replaced (its keys are logged).

    Raises:
        WeightsNotFound, CheckpointError: weights missing or not matching the architecture.
    """
    if arch not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; supported: {ARCHS}")
    model = torchvision.models.get_model(arch, weights=None)
    if weights is not None and str(weights) != "none":
        if str(weights) == "imagenet":
            state, origin = load_imagenet_state_dict(arch), f"ImageNet ({imagenet_weights_path(arch)})"
        else:
            state, origin = _state_dict_from_file(Path(weights)), str(weights)
        backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        # Files older than BatchNorm's num_batches_tracked buffer lack it; it is not a weight.
        missing = [k for k in missing if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise CheckpointError(f"weights {origin} do not fit {arch}: missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}")
        dropped = sorted(k for k in state if k.startswith("classifier."))
        log.info("loaded %s backbone weights from %s; replaced classifier (dropped %s)", arch, origin,
                 ", ".join(dropped) or "nothing")
    model.classifier = nn.Linear(model.classifier.in_features, len(labels))
    return model


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter except the classifier's."""
    return [p for n, p in model.named_parameters() if not n.startswith("classifier.")]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def versions() -> dict[str, str]:
    return {"covid_cxr": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


def save_checkpoint(path: Path, model: nn.Module, labels: list[str], preprocess: PreprocessSpec,
                    config: dict, threshold: float = 0.5, extra: dict | None = None) -> None:
    """Write a self-describing checkpoint atomically (temp file, then rename).

    ``extra`` may hold training state (optimizer, scheduler, RNG) for ``--resume``.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": "densenet121",
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "labels": list(labels),
        "preprocess": preprocess.to_dict(),
        "threshold": float(threshold),
        "config": config,
        "version": versions(),
    }
    if extra:
        payload.update(extra)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict (``weights_only`` load), checked for the required keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; train a model with `covid-cxr train` first")
    ckpt = _torch_load(path)
    required = ("state_dict", "labels", "preprocess", "threshold", "arch")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise CheckpointError(f"{path} is not a covid-cxr checkpoint (needs keys {required})")
    if ckpt.get("format", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by a newer covid-cxr (format {ckpt['format']}); upgrade")
    return ckpt


def resolve_checkpoint(run_or_file: str | Path, which: str = "best") -> Path:
    """A run folder -> its ``best.pt``/``last.pt``; a file -> itself."""
    p = Path(run_or_file)
    if p.is_dir():
        p = p / f"{which}.pt"
    return p


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint, in eval mode. Returns (model, metadata).

    The state dict is loaded with ``strict=True``; metadata holds everything but the weights.

    Raises:
        CheckpointError: missing, corrupt, or not matching the architecture.
    """
    ckpt = read_checkpoint(path)
    model = build_model(ckpt["labels"], arch=ckpt["arch"], weights=None)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match {ckpt['arch']}: {exc}") from exc
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler", "scaler", "rng")}
    meta["preprocess_spec"] = PreprocessSpec.from_dict(ckpt["preprocess"])
    meta["path"] = str(path)
    return model, meta
