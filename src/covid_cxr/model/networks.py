"""Building the classifier, one way: :func:`build_model` - a torchvision classification network whose last
linear layer is replaced by our ``head``, wrapped in :class:`CxrNet` (which also carries the out-of-scope gate),
optionally initialised from ImageNet weights (torchvision's weights API and cache), a file, or torchxrayvision's
DenseNet-121. Saving and loading a trained model is :mod:`covid_cxr.model.checkpoint`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from covid_cxr.errors import CheckpointError, CovidCxrError, WeightsNotFound
from covid_cxr.imaging.lung_masks import LUNG_INPUT_SIZE
from covid_cxr.model.gate import ScopeGateModule

log = logging.getLogger(__name__)

OFFLINE_ENV = "COVID_CXR_OFFLINE"
"""Set to 1 to never try downloading weights (tests set it; no test may reach the internet)."""


@dataclass(frozen=True)
class Arch:
    """A supported torchvision architecture."""

    name: str
    head: str
    """Dotted path of the network's last linear layer (replaced by our ``head``)."""
    cam_layers: tuple[str, ...]
    """Grad-CAM candidate layers (dotted paths inside the torchvision network), deepest first."""


ARCHS: dict[str, Arch] = {
    "densenet121": Arch("densenet121", "classifier",
                        ("features", "features.denseblock3", "features.denseblock2", "features.denseblock1")),
    "resnet18": Arch("resnet18", "fc", ("layer4", "layer3", "layer2", "layer1")),
    "resnet50": Arch("resnet50", "fc", ("layer4", "layer3", "layer2", "layer1")),
    "efficientnet_b0": Arch("efficientnet_b0", "classifier.1", ("features", "features.5", "features.3",
                                                                "features.2")),
    "convnext_tiny": Arch("convnext_tiny", "classifier.2", ("features", "features.5", "features.3",
                                                            "features.1")),
}
"""``--arch`` names. DenseNet-121 is the study's network and the default."""

_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise CovidCxrError(f"unsupported architecture {name!r}; choose one of {', '.join(ARCHS)}") from None


def _get_sub(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _set_sub(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, last = dotted.rpartition(".")
    owner = _get_sub(module, parent) if parent else module
    if last.isdigit():
        owner[int(last)] = value
    else:
        setattr(owner, last, value)


class CxrNet(nn.Module):
    """A torchvision network without its last layer (``net``: images -> pooled features), our ``head``
    (features -> logits) and, once fitted, the out-of-scope ``gate`` (features -> distance)."""

    def __init__(self, arch: str, net: nn.Module, in_features: int, num_classes: int):
        super().__init__()
        self.arch = arch
        self.net = net
        self.head = nn.Linear(in_features, num_classes)
        self.gate: ScopeGateModule | None = None
        self.lungs: nn.Module | None = None
        """The lung segmenter (:class:`covid_cxr.model.lungs.LungNet`) when the model carries one; it reads the
        model pixels beside the network (:func:`covid_cxr.model.inference.forward_pixels`), never the forward."""

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, C): what the head and the gate read."""
        return self.net(x)

    def forward(self, x: torch.Tensor, with_features: bool = False):
        f = self.net(x)
        logits = self.head(f)
        return (logits, f) if with_features else logits

    def cam_module(self, name: str) -> nn.Module:
        return _get_sub(self.net, name)


def imagenet_weights_path(arch: str = "densenet121") -> Path:
    """Where torchvision caches ``arch``'s ImageNet weights (honours ``$TORCH_HOME``)."""
    url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fix_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old DenseNet keys (``norm.1.weight`` -> ``norm1.weight``), as torchvision does."""
    out = {}
    for key, value in state_dict.items():
        m = _LEGACY_DENSENET_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


ZIP_SLACK = 16 * 2**20
"""Bytes the entries of a torch zip checkpoint may inflate to beyond the file's own size: torch.save stores its
entries uncompressed, so their sizes add up to the file's (plus a few KB of directory)."""


def check_torch_zip(path: Path) -> None:
    """Refuse a zip checkpoint whose entries would inflate far beyond its size (a zip bomb: 3 MB that torch would
    inflate to 3 GiB), from the zip directory alone, before torch opens it.

    Raises:
        CheckpointError: the directory promises more than the file holds plus :data:`ZIP_SLACK`.
    """
    import zipfile

    try:
        size = path.stat().st_size
        if not zipfile.is_zipfile(path):
            return  # the legacy format: a pickle stream, read no further than the file's bytes
        with zipfile.ZipFile(path) as z:
            inflated = sum(i.file_size for i in z.infolist())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc}); it is damaged: use another copy") from None
    if inflated > size + ZIP_SLACK:
        raise CheckpointError(f"{path}: its entries would inflate to {inflated:,} bytes from a {size:,}-byte file; "
                              "torch.save never compresses, so this is not a checkpoint (a zip bomb?): use another "
                              "copy")


def _torch_load(path: Path) -> Any:
    check_torch_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found") from exc
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run the file's code: never say that
        raise CheckpointError(f"{path} holds pickled Python objects besides tensors, and covid-cxr never runs them "
                              "(unpickling can execute any code); use a covid-cxr checkpoint or a state dict saved "
                              "with torch.save(model.state_dict(), path)") from None
    except Exception as exc:  # torch raises many types for corrupt or pickled-module files
        raise CheckpointError(f"cannot load {path} ({type(exc).__name__}: {str(exc)[:200]}); it must be a covid-cxr "
                              "checkpoint or a tensor state dict saved with torch.save(model.state_dict(), path)") from None


def load_imagenet_state_dict(arch: str = "densenet121") -> dict[str, torch.Tensor]:
    """ImageNet weights for ``arch`` from torchvision's cache, downloading them if allowed.

    Raises:
        WeightsNotFound: not cached and the download failed (or ``COVID_CXR_OFFLINE=1``).
    """
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
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
    try:
        obj = _torch_load(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. torchxrayvision's downloaded .pt files are pickled models: save a state dict "
                              "once with torch.save(xrv.models.DenseNet(weights=NAME).state_dict(), FILE)") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a covid-cxr checkpoint (or a Lightning one): reuse its backbone
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    obj = {k.removeprefix("module.").removeprefix("_orig_mod.").removeprefix("net."): v for k, v in obj.items()}
    return fix_legacy_keys(obj)


# ----------------------------------------------------------------------------- torchxrayvision weights

XRV_DROPPED = ("classifier.weight", "classifier.bias", "op_threshs")
"""torchxrayvision DenseNet-121 entries without a counterpart here: its 18-pathology head and the per-pathology
operating thresholds it rescales its outputs with."""


def is_xrv_densenet(state: dict[str, torch.Tensor]) -> bool:
    """True for a torchxrayvision ``xrv.models.DenseNet`` state dict: torchvision's DenseNet-121 key layout
    (``features.*``, ``classifier``) with a 1-channel first convolution (and usually ``op_threshs``)."""
    w = state.get("features.conv0.weight")
    return isinstance(w, torch.Tensor) and w.ndim == 4 and w.shape[1] == 1 and "features.norm5.weight" in state


def adapt_xrv_densenet(state: dict[str, torch.Tensor], channels: int = 3) -> tuple[dict[str, torch.Tensor],
                                                                                     list[str]]:
    """A torchxrayvision DenseNet-121 state dict in torchvision's layout: (state dict, dropped keys).

    The 18-output head and ``op_threshs`` are dropped. The 1-channel stem becomes a ``channels``-channel one whose
    kernels are the original divided by ``channels``: covid-cxr repeats the grey image on every channel, so the
    convolution's output (and everything after it) equals torchxrayvision's for the same grey input.
    """
    out = {k: v for k, v in state.items() if k not in XRV_DROPPED}
    w = state["features.conv0.weight"]
    out["features.conv0.weight"] = (w / channels).repeat(1, channels, 1, 1).contiguous()
    return out, sorted(k for k in state if k in XRV_DROPPED)


def weights_are_xrv(weights: str | Path | None) -> bool:
    """True when ``--weights`` names a torchxrayvision DenseNet-121 state-dict file."""
    if weights is None or str(weights) in ("imagenet", "none"):
        return False
    return is_xrv_densenet(_state_dict_from_file(Path(weights)))


def build_model(labels: list[str] | tuple[str, ...], arch: str = "densenet121",
                weights: str | Path | None = "imagenet") -> CxrNet:
    """A :class:`CxrNet` of ``arch`` with a ``len(labels)``-way head.

    Args:
        labels: class names in index order.
        arch: one of :data:`ARCHS`.
        weights: ``"imagenet"`` (torchvision's cached ImageNet-1k weights), ``None``/``"none"``
            (random init) or a path to a state dict of the torchvision network (legacy DenseNet
            ``norm.1`` keys and covid-cxr checkpoints accepted). The backbone must load exactly;
            the original last layer is dropped (logged).

    Raises:
        WeightsNotFound, CheckpointError: weights missing or not matching the architecture.
    """
    spec = get_arch(arch)
    net = torchvision.models.get_model(arch, weights=None)
    dropped_xrv: list[str] = []
    if weights is not None and str(weights) != "none":
        if str(weights) == "imagenet":
            state, origin = load_imagenet_state_dict(arch), f"ImageNet ({imagenet_weights_path(arch)})"
        else:
            state, origin = _state_dict_from_file(Path(weights)), str(weights)
            if is_xrv_densenet(state):
                if arch != "densenet121":
                    raise CheckpointError(f"{weights} holds torchxrayvision DenseNet-121 weights; train with --arch "
                                          f"densenet121 (not {arch})")
                outputs = state["classifier.weight"].shape[0] if "classifier.weight" in state else 0
                state, dropped_xrv = adapt_xrv_densenet(state)
                origin = f"torchxrayvision DenseNet-121 ({weights})"
                log.info("%s: its %d-output pathology head and operating thresholds are not used; its 1-channel "
                         "stem (features.conv0) now reads our 3 identical channels with kernel/3, the same response "
                         "to a grey image",
                         origin, outputs)
        head_prefix = spec.head + "."
        extra_heads = ("head.", "gate.")  # a covid-cxr checkpoint's own head and gate
        backbone = {k: v for k, v in state.items() if not k.startswith(head_prefix) and not k.startswith(extra_heads)}
        wanted = net.state_dict()
        wrong = [f"{k} is {tuple(v.shape)}, {arch} needs {tuple(wanted[k].shape)}" for k, v in backbone.items()
                 if k in wanted and tuple(v.shape) != tuple(wanted[k].shape)]
        if wrong:  # load_state_dict would raise a bare RuntimeError for these
            raise CheckpointError(f"weights {origin} do not fit {arch}: {'; '.join(wrong[:3])}"
                                  + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else "")
                                  + "; pass weights saved from the same --arch")
        missing, unexpected = net.load_state_dict(backbone, strict=False)
        # Files older than BatchNorm's num_batches_tracked buffer lack it; it is not a weight.
        missing = [k for k in missing if not k.startswith(head_prefix) and not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise CheckpointError(f"weights {origin} do not fit {arch}: missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}")
        dropped = sorted([k for k in state if k.startswith(head_prefix) or k.startswith(extra_heads)] + dropped_xrv)
        log.info("loaded %s backbone weights from %s; replaced the last layer (dropped %s)", arch, origin,
                 ", ".join(dropped) or "nothing")
    last = _get_sub(net, spec.head)
    if not isinstance(last, nn.Linear):  # pragma: no cover - a wrong entry in ARCHS
        raise TypeError(f"{arch}.{spec.head} is {type(last).__name__}, not a Linear layer")
    _set_sub(net, spec.head, nn.Identity())
    return CxrNet(arch, net, last.in_features, len(labels))


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter except the head's."""
    return list(unwrap(model).net.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------- the lung segmenter's network

def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class LungNet(nn.Module):
    """U-Net with ``width``, 2x, 4x, 8x channels on four levels; one logit per pixel (lung vs not)."""

    def __init__(self, width: int = 16, input_size: int = LUNG_INPUT_SIZE) -> None:
        super().__init__()
        self.input_size = input_size
        """The side of the square it was trained on (its input: :func:`~covid_cxr.imaging.lung_masks.lung_input`)."""
        w = [width, 2 * width, 4 * width, 8 * width]
        self.down = nn.ModuleList([_block(1, w[0]), _block(w[0], w[1]), _block(w[1], w[2])])
        self.bottom = _block(w[2], w[3])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[3], w[2], 2, stride=2), nn.ConvTranspose2d(w[2], w[1], 2, stride=2),
                                 nn.ConvTranspose2d(w[1], w[0], 2, stride=2)])
        self.merge = nn.ModuleList([_block(2 * w[2], w[2]), _block(2 * w[1], w[1]), _block(2 * w[0], w[0])])
        self.head = nn.Conv2d(w[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)[:, 0]
