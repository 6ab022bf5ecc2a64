"""The out-of-scope gate: is an image like the frontal chest X-rays the model was trained on?

A classifier answers "covid" or "normal" for any input, a photograph or a hand X-ray included.
The gate scores each image by two Mahalanobis distances (Lee et al., 2018, "A simple unified
framework for detecting out-of-distribution samples"), each with a covariance shrunk by Ledoit-Wolf:
its penultimate features (the pooled vector the classifier reads) to the nearest class mean of the
training split, and its network input averaged down to 8 x 8 to the training mean. Each distance is
divided by its median on validation images and the larger one is the score; the flag threshold is
the ``quantile`` of the validation images' scores (e.g. 0.99: 99% of validation X-rays are in scope).
A third distance checks left-right symmetry (see :data:`VIEWS`).

The statistics are buffers of :class:`ScopeGateModule`, a submodule of the model, so the score is
computed inside the network: the PyTorch checkpoint and the ONNX graph give the same score.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covid_cxr.model.meta import ScopeGate

log = logging.getLogger(__name__)

THUMB_SIDE = 8
"""Side of the two image views the gate checks besides the features (see :func:`image_views`)."""
VIEWS = ("features", "layout", "asymmetry", "histogram")
"""What the gate measures: the penultimate features; the layout (the network input averaged down to 8 x 8: two dark
lung fields beside a bright mediastinum, the diaphragm below); the left-right asymmetry (|input - its mirror image|
averaged down to 8 x 4: a frontal chest X-ray is roughly mirror-symmetric, a lateral view, a hand or a photograph is
not); the intensity histogram (the share of input values below 16 levels: a CT slice's black surround, a document's
white page). Penultimate features of a network trained from scratch on a thousand X-rays can miss what a CT slice or a
lateral view is; layout and symmetry cannot."""

METHOD = ("the largest of four Mahalanobis distances, each divided by its median on validation images: penultimate "
          "features to the nearest training class mean; 8x8 layout, 8x4 left-right asymmetry and 16-level cumulative "
          "histogram of the network input to their training means (Ledoit-Wolf covariances); threshold at a quantile "
          "of the validation images' scores")

HISTOGRAM_LEVELS = (-2.0, 2.6, 16)
"""The histogram view's levels: 16 evenly spaced values of the normalised input from -2.0 to 2.6 (its range is
about -2.1 to 2.6 with ImageNet statistics)."""


def image_views(x: torch.Tensor) -> torch.Tensor:
    """(N, C, S, S) network input -> (N, 112): its 8x8 layout, 8x4 left-right asymmetry and 16-level cumulative
    histogram (first channel)."""
    x0 = x[:, :1].float()
    layout = F.adaptive_avg_pool2d(x0, THUMB_SIDE).flatten(1)
    asym = F.adaptive_avg_pool2d((x0 - x0.flip(-1)).abs(), THUMB_SIDE)[..., : THUMB_SIDE // 2].flatten(1)
    levels = torch.linspace(*HISTOGRAM_LEVELS, device=x.device)
    hist = (x0.flatten(1)[:, :, None] <= levels).float().mean(dim=1)
    return torch.cat([layout, asym, hist], dim=1)


VIEW_DIMS = (THUMB_SIDE * THUMB_SIDE, THUMB_SIDE * THUMB_SIDE // 2, HISTOGRAM_LEVELS[2])


def split_views(views):
    """(layout, asymmetry, histogram) columns of :func:`image_views`' output (a tensor or an array)."""
    a, b = VIEW_DIMS[0], VIEW_DIMS[0] + VIEW_DIMS[1]
    return views[:, :a], views[:, a:b], views[:, b:]


class ScopeGateModule(nn.Module):
    """Scores (features (N, C), network input (N, C', S, S)) -> (N,) out-of-scope scores; larger is less like the
    training images. Each distance is scaled so that 1.0 is the median validation image; the score is the largest."""

    def __init__(self, feature_dim: int, n_means: int):
        super().__init__()
        self.register_buffer("means", torch.zeros(n_means, feature_dim))
        self.register_buffer("precision", torch.zeros(feature_dim, feature_dim))
        self.register_buffer("layout_mean", torch.zeros(1, VIEW_DIMS[0]))
        self.register_buffer("layout_precision", torch.zeros(VIEW_DIMS[0], VIEW_DIMS[0]))
        self.register_buffer("asym_mean", torch.zeros(1, VIEW_DIMS[1]))
        self.register_buffer("asym_precision", torch.zeros(VIEW_DIMS[1], VIEW_DIMS[1]))
        self.register_buffer("hist_mean", torch.zeros(1, VIEW_DIMS[2]))
        self.register_buffer("hist_precision", torch.zeros(VIEW_DIMS[2], VIEW_DIMS[2]))
        self.register_buffer("scales", torch.ones(len(VIEWS)))

    @staticmethod
    def _mahalanobis(v: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
        d = v[:, None, :] - means[None, :, :]  # (N, M, D)
        q = ((d @ precision) * d).sum(dim=-1)
        return torch.sqrt(q.clamp(min=0).amin(dim=1))

    def distances_from_views(self, features: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """(N, 4) unscaled distances from features and :func:`image_views`."""
        layout, asym, hist = split_views(views)
        return torch.stack([self._mahalanobis(features.float(), self.means, self.precision),
                            self._mahalanobis(layout, self.layout_mean, self.layout_precision),
                            self._mahalanobis(asym, self.asym_mean, self.asym_precision),
                            self._mahalanobis(hist, self.hist_mean, self.hist_precision)], dim=1)

    def distances(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(N, 4) unscaled distances: features, layout, asymmetry, histogram."""
        return self.distances_from_views(features, image_views(x))

    def forward(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (self.distances(features, x) / self.scales).amax(dim=1)


VARIANCE_FLOOR = 1e-4
"""Every direction's variance is at least this fraction of the values' mean square. A direction along which the
training images barely vary (a dead feature, a collapsed model) would otherwise get a precision so large that
float32 rounding - which differs between PyTorch and ONNX Runtime - decides the distance."""
MIN_SCALE = 0.1
"""A view's scale (its median validation distance) is at least this times sqrt(its dimension). Healthy data sit near
sqrt(dimension) (a chi distribution), so this never binds there; when every image has the same features (a
collapsed model) the distances are rounding noise, and dividing noise by noise would let the backend decide."""
MIN_MEAN_SQUARE = 1e-6
"""Values whose mean square is below this (features of an untrained or collapsed network, ~1e-14) are treated as
this large for the floor: they carry no information, so their distance stays near 0 instead of amplifying noise."""


def _lw(centred: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk precision of ``centred``, its variances floored at :data:`VARIANCE_FLOOR` of ``raw``'s
    mean square; and the shrinkage."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf(assume_centered=True).fit(centred)
    floor = VARIANCE_FLOOR * max(float(np.mean(np.square(raw))), MIN_MEAN_SQUARE)
    cov = lw.covariance_ + floor * np.eye(centred.shape[1])
    return np.linalg.inv(cov), float(lw.shrinkage_)


def fit_gate(train_features: np.ndarray, train_views: np.ndarray, train_targets: np.ndarray,
             val_features: np.ndarray | None, val_views: np.ndarray | None, quantile: float
             ) -> tuple[ScopeGateModule, ScopeGate, dict]:
    """Fit the gate's statistics on training images and its scales and threshold on validation images.

    Args:
        train_features: (N, C) penultimate features of the (unaugmented) training images.
        train_views: (N, 112) their :func:`image_views`.
        train_targets: (N,) class indices (one feature mean per class present).
        val_features, val_views: the same for the validation images; None falls back to the training images (noted).
        quantile: fraction of validation images to keep in scope, in (0, 1].

    Returns:
        (the module with its buffers set, its :class:`~covid_cxr.model.meta.ScopeGate`, a summary dict).
    """
    f = np.asarray(train_features, dtype=np.float64)
    v = np.asarray(train_views, dtype=np.float64)
    y = np.asarray(train_targets)
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(axis=0) for c in classes])
    precision, shrink_f = _lw(f - means[np.searchsorted(classes, y)], f)
    module = ScopeGateModule(f.shape[1], len(classes))
    for name, value in (("means", means), ("precision", precision)):
        getattr(module, name).copy_(torch.from_numpy(value).float())
    shrinks = [shrink_f]
    for prefix, part in zip(("layout", "asym", "hist"), split_views(v)):
        mean = part.mean(axis=0, keepdims=True)
        prec, shrink = _lw(part - mean, part)
        getattr(module, f"{prefix}_mean").copy_(torch.from_numpy(mean).float())
        getattr(module, f"{prefix}_precision").copy_(torch.from_numpy(prec).float())
        shrinks.append(shrink)
    on_val = val_features is not None and val_views is not None and len(val_features) > 0
    ref_f = torch.from_numpy(np.asarray(val_features if on_val else f, dtype=np.float32))
    ref_v = torch.from_numpy(np.asarray(val_views if on_val else v, dtype=np.float32))
    with torch.no_grad():
        d = module.distances_from_views(ref_f, ref_v).numpy()
        dims = np.array([f.shape[1], *VIEW_DIMS], dtype=np.float64)
        module.scales.copy_(torch.from_numpy(np.maximum(np.median(d, axis=0), MIN_SCALE * np.sqrt(dims))).float())
        ref = (module.distances_from_views(ref_f, ref_v) / module.scales).amax(dim=1).numpy()
        train_scores = (module.distances_from_views(torch.from_numpy(f).float(), torch.from_numpy(v).float())
                        / module.scales).amax(dim=1).numpy()
    threshold = float(np.quantile(ref, quantile, method="higher"))
    info = ScopeGate(threshold=threshold, quantile=float(quantile), method=METHOD, n_fit=int(len(f)),
                     n_val=int(len(ref_f)) if on_val else 0, dims=int(f.shape[1] + v.shape[1]),
                     feature_dim=int(f.shape[1]), n_means=int(len(classes)))
    summary = {"threshold": threshold, "quantile": quantile,
               "shrinkage": dict(zip(VIEWS, shrinks)),
               "scales": dict(zip(VIEWS, (float(x) for x in module.scales))),
               "train_in_scope": float(np.mean(train_scores <= threshold)),
               "val_in_scope": float(np.mean(ref <= threshold)),
               "fitted_threshold_on": "validation images" if on_val else "training images (no validation split)"}
    log.info("out-of-scope gate: threshold %.3g keeps %.0f%% of %s in scope", threshold, 100 * summary["val_in_scope"],
             summary["fitted_threshold_on"])
    return module, info, summary
