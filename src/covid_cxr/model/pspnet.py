"""torchxrayvision's ChestX-Det PSPNet, rebuilt here so that its published state dict loads without torchxrayvision:
14 anatomical targets at 512 px, of which covid-cxr uses the two lungs.

torchxrayvision (``xrv.baseline_models.chestx_det.PSPNet``) wraps a PSPNet (Zhao et al., CVPR 2017) in the layout of
the ptsemseg library: a dilated ResNet-101-like encoder (output stride 8), a pyramid pooling module and a 1x1
classifier, trained on ChestX-Det (Lian et al., IEEE TMI 2021). Its weights file
(``pspnet_chestxray_best_model_4.pth``) is a state dict saved from ``nn.DataParallel`` (every key starts with
``module.``). :class:`PSPNet` has exactly that file's parameter names, so the file loads with ``strict=True`` once the
prefix is stripped, and computes what torchxrayvision's network computes in eval mode (the auxiliary training head
is kept for its weights but not run). ``tests/test_pspnet.py`` checks both against torchxrayvision's own code.

:class:`ChestXDetLungs` is the lung segmenter covid-cxr builds on it: it reads what :func:`chestx_det_input` makes of
a decoded 8-bit image (torchxrayvision's input convention) and returns one logit per pixel, the larger of the
'Left Lung' and 'Right Lung' logits (so its sigmoid is the union of the two lungs' probabilities).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from covid_cxr.errors import CheckpointError
from covid_cxr.imaging.pixels import IMAGENET_MEAN, IMAGENET_STD, PIXEL_RANGE

CHESTX_DET_TARGETS = ("Left Clavicle", "Right Clavicle", "Left Scapula", "Right Scapula", "Left Lung", "Right Lung",
                      "Left Hilus Pulmonis", "Right Hilus Pulmonis", "Heart", "Aorta", "Facies Diaphragmatica",
                      "Mediastinum", "Weasand", "Spine")
"""The network's output channels, in order (``xrv.baseline_models.chestx_det.PSPNet.targets``)."""
LUNG_TARGETS = ("Left Lung", "Right Lung")
"""The targets whose union is the lung fields."""
PSPNET_SIZE = 512
"""The side of the square the network was trained on; torchxrayvision resizes every input to it."""
PSPNET_BLOCKS = (3, 4, 23, 3)
"""Bottleneck blocks in the four residual stages (ResNet-101's depth)."""
PSPNET_POOLS = (6, 3, 2, 1)
"""Pyramid pooling: each path pools the feature map into roughly this many cells per side."""
PSPNET_BATCH = 4
"""Images per forward pass at most: at 512 px each adds about 0.2 GB of activations (batching saves no time on a
CPU; it does on a GPU)."""
PSPNET_SOURCE = "torchxrayvision ChestX-Det PSPNet state dict"
"""How a segmenter built from such a file describes where it came from."""
PSPNET_ARCH = "chestx-det-pspnet"
"""The ``arch`` a segmenter built from such a file records in its meta."""
SIGNATURE_KEYS = ("convbnrelu1_1.cbr_unit.0.weight", "res_block4.layers.0.cbr1.cbr_unit.0.weight",
                  "pyramid_pooling.path_module_list.0.cbr_unit.0.weight", "cbr_final.cbr_unit.0.weight",
                  "classification.weight")
"""Keys that only a ptsemseg PSPNet state dict has all of (after ``module.`` is stripped)."""


# ----------------------------------------------------------------------------- the network (ptsemseg's names)

class ConvBN(nn.Module):
    """Convolution (no bias) and batch norm; parameters under ``cb_unit``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1) -> None:
        super().__init__()
        self.cb_unit = nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, bias=False),
                                     nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cb_unit(x)


class ConvBNReLU(nn.Module):
    """Convolution (no bias), batch norm and ReLU; parameters under ``cbr_unit``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1) -> None:
        super().__init__()
        self.cbr_unit = nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, bias=False),
                                      nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbr_unit(x)


class Bottleneck(nn.Module):
    """A residual bottleneck (1x1, 3x3 possibly strided or dilated, 1x1); the first block of a stage also projects
    its input (``cb4``) to the stage's width and stride."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int, dilation: int, project: bool) -> None:
        super().__init__()
        self.cbr1 = ConvBNReLU(c_in, c_mid, 1)
        self.cbr2 = ConvBNReLU(c_mid, c_mid, 3, stride=stride, padding=dilation, dilation=dilation)
        self.cb3 = ConvBN(c_mid, c_out, 1)
        self.cb4 = ConvBN(c_in, c_out, 1, stride=stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.cb4 is None else self.cb4(x)
        return F.relu(self.cb3(self.cbr2(self.cbr1(x))) + shortcut)


class ResidualStage(nn.Module):
    """``blocks`` bottlenecks under ``layers``; a dilated stage keeps its input's resolution."""

    def __init__(self, blocks: int, c_in: int, c_mid: int, c_out: int, stride: int, dilation: int) -> None:
        super().__init__()
        stride = 1 if dilation > 1 else stride
        first = Bottleneck(c_in, c_mid, c_out, stride, dilation, project=True)
        # only the first block strides: the others see the stage's resolution already
        rest = [Bottleneck(c_out, c_mid, c_out, 1, dilation, project=False) for _ in range(blocks - 1)]
        self.layers = nn.Sequential(first, *rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PyramidPooling(nn.Module):
    """The feature map, concatenated with itself average-pooled into about 6, 3, 2 and 1 cells per side, each pooled
    map reduced to a quarter of the channels and upsampled back."""

    def __init__(self, channels: int, pools: tuple[int, ...] = PSPNET_POOLS) -> None:
        super().__init__()
        self.pools = tuple(pools)
        self.path_module_list = nn.ModuleList([ConvBNReLU(channels, channels // len(pools), 1) for _ in pools])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        out = [x]
        for pool, path in zip(self.pools, self.path_module_list):
            # ptsemseg pools with a fixed window (size // cells), not adaptively: at 64 x 64 features the 6-cell
            # path averages 10 x 10 windows. The weights were trained so, hence kept.
            k = (int(h / pool), int(w / pool))
            y = path(F.avg_pool2d(x, k, stride=k))
            out.append(F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(out, dim=1)


class PSPNet(nn.Module):
    """PSPNet with ptsemseg's parameter names (torchxrayvision's ChestX-Det layout): ``n_classes`` logits per pixel
    at the input's resolution, for a 3-channel input standardised with ImageNet's mean and std.

    Runs in eval mode only: the auxiliary head (``convbnrelu4_aux``, ``aux_cls``) exists for the state dict and is
    not computed, and dropout is the identity.
    """

    def __init__(self, n_classes: int = len(CHESTX_DET_TARGETS), blocks: tuple[int, int, int, int] = PSPNET_BLOCKS
                 ) -> None:
        super().__init__()
        self.convbnrelu1_1 = ConvBNReLU(3, 64, 3, stride=2, padding=1)
        self.convbnrelu1_2 = ConvBNReLU(64, 64, 3, padding=1)
        self.convbnrelu1_3 = ConvBNReLU(64, 128, 3, padding=1)
        self.res_block2 = ResidualStage(blocks[0], 128, 64, 256, stride=1, dilation=1)
        self.res_block3 = ResidualStage(blocks[1], 256, 128, 512, stride=2, dilation=1)
        self.res_block4 = ResidualStage(blocks[2], 512, 256, 1024, stride=1, dilation=2)
        self.res_block5 = ResidualStage(blocks[3], 1024, 512, 2048, stride=1, dilation=4)
        self.pyramid_pooling = PyramidPooling(2048)
        self.cbr_final = ConvBNReLU(4096, 512, 3, padding=1)
        self.dropout = nn.Dropout2d(p=0.1)
        self.classification = nn.Conv2d(512, n_classes, 1)
        self.convbnrelu4_aux = ConvBNReLU(1024, 256, 3, padding=1)
        self.aux_cls = nn.Conv2d(256, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = self.convbnrelu1_3(self.convbnrelu1_2(self.convbnrelu1_1(x)))
        x = F.max_pool2d(x, 3, 2, 1)
        x = self.res_block4(self.res_block3(self.res_block2(x)))
        x = self.pyramid_pooling(self.res_block5(x))
        x = self.classification(self.dropout(self.cbr_final(x)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- the lung segmenter on it

class ChestXDetLungs(nn.Module):
    """The lung segmenter on a ChestX-Det :class:`PSPNet`: (N, 1, S, S) pixels in [0, 1] from
    :func:`chestx_det_input` in, (N, S, S) lung logits out (the larger of the Left Lung and Right Lung logits)."""

    def __init__(self, net: PSPNet | None = None) -> None:
        super().__init__()
        self.net = PSPNet() if net is None else net
        self.input_size = PSPNET_SIZE
        """The side of the square it reads (what :func:`chestx_det_input` resizes to)."""
        self.lung_channels = tuple(CHESTX_DET_TARGETS.index(t) for t in LUNG_TARGETS)
        # buffers, not parameters: they follow .to(device) but stay out of the state dict
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchxrayvision's forward: the channel repeated 3 times, [0, 1] standardised with ImageNet's mean and std
        logits = self.net((x.expand(-1, 3, -1, -1) - self.mean) / self.std)
        return logits[:, list(self.lung_channels)].amax(dim=1)


def chestx_det_input(gray: np.ndarray, size: int = PSPNET_SIZE) -> np.ndarray:
    """What :class:`ChestXDetLungs` reads for one decoded 8-bit image: float32 ``(size, size)`` in [0, 1].

    torchxrayvision maps 8-bit pixels ``p`` to ``p / 255 * 2048 - 1024``, resizes to 512 px (bilinear, antialiased)
    and maps back with ``(x + 1024) / 2048``: the same as ``p / 255`` resized, which is what this returns. Like the
    U-Net's input, the whole image is resized to the square without keeping its aspect (torchxrayvision asks for a
    square, centre-cropped input; the lungs reach the image's sides, so covid-cxr does not crop).

    ``gray``: a (H, W) uint8 array, or (H, W, C) uint8 (channels averaged).

    Raises:
        ValueError: not 8-bit pixels (the network reads absolute brightness, so the range must be known).
    """
    a = np.asarray(gray)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or min(a.shape[:2]) < 1:
        raise ValueError(f"expected 8-bit grayscale pixels in {PIXEL_RANGE}: a (H, W) uint8 array, got {a.dtype} "
                         f"{a.shape}; decode files with covid_cxr.imaging.images.load_image")
    x = torch.from_numpy(a.astype(np.float32) / PIXEL_RANGE[1])
    if a.ndim == 3:
        x = x.mean(dim=2)
    if x.shape != (size, size):
        x = F.interpolate(x[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    return x.numpy()


# ----------------------------------------------------------------------------- reading the state dict

def pspnet_state(raw: object) -> dict[str, torch.Tensor] | None:
    """The PSPNet state dict inside what ``torch.load`` returned for a file, ``module.`` stripped, or None when the
    file is not in this layout at all (so that the caller can try its own formats).

    Accepted: a state dict (keys with or without ``module.``), or a ptsemseg training checkpoint that holds one under
    ``model_state``.
    """
    if isinstance(raw, dict) and isinstance(raw.get("model_state"), dict):
        raw = raw["model_state"]
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        return None
    state = {k.removeprefix("module."): v for k, v in raw.items()}
    if not all(k in state for k in SIGNATURE_KEYS):
        return None
    return state


def chestx_det_lungs(state: dict[str, torch.Tensor], where: str) -> ChestXDetLungs:
    """The lung segmenter with ``state`` (from :func:`pspnet_state`) loaded ``strict=True``, in eval mode.

    Raises:
        CheckpointError: ``state`` holds something besides tensors, has another number of targets than ChestX-Det's
            14, or does not match the layout key for key and shape for shape (``where`` names the file).
    """
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{where}: {bad!r} is not a tensor; expected a {PSPNET_SOURCE} (tensors only)")
    head = state.get("classification.weight")
    n = head.shape[0] if head is not None and head.ndim == 4 else len(CHESTX_DET_TARGETS)  # else: the strict load says
    if n != len(CHESTX_DET_TARGETS):
        raise CheckpointError(f"{where}: a PSPNet with {n} output classes, not ChestX-Det's {len(CHESTX_DET_TARGETS)} "
                              f"({', '.join(CHESTX_DET_TARGETS)}): covid-cxr cannot tell which are the lungs")
    with torch.device("meta"):  # no random initialisation of 260 MB that the file's tensors replace at once
        net = PSPNet()
    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True,
                            assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: not the {PSPNET_SOURCE} layout (ResNet-101 depth {PSPNET_BLOCKS}, 14 "
                              f"targets): {str(exc)[:300]}") from None
    return ChestXDetLungs(net).eval()
