"""What a trained model is: :class:`ModelMeta`, the one typed description every stage reads.

A checkpoint holds the weights and a :class:`ModelMeta`; an ONNX export's ``model.json`` holds the
same meta, serialised. Every stage takes the labels, the positive class, the preprocessing, the
threshold, the temperature and the out-of-scope gate from here, never from dict keys.

Scores. All decisions and rankings are made on log-probabilities computed in float64 from logits
(:func:`log_probs`), never on float32 probabilities: softmax in float32 rounds to exactly 1.0 once
a logit difference passes ~17, which ties every confident image and corrupts AUCs and thresholds.
The binary operating threshold is stored as log-odds for the same reason.

NumPy only, so the ONNX backend does not need PyTorch.
"""

from __future__ import annotations

import datetime as _dt
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from covid_cxr import __version__
from covid_cxr.config import PEDIATRIC_SOURCES
from covid_cxr.errors import CheckpointError
from covid_cxr.imaging.pixels import PreprocessSpec

META_FORMAT = 3
"""Version of the serialised meta (1 was covid-cxr 0.1's untyped checkpoint keys; 3 adds the lung view)."""
META_FORMAT_WHOLE_IMAGE = 2
"""The format written for a model without a lung view: covid-cxr versions that know no lung view read it as it
is, and refuse a lung-view model (format 3) instead of feeding it whole images."""


# ----------------------------------------------------------------------------- scores

def log_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, K) log-probabilities of ``softmax(logits / temperature)``, in float64 (no saturation)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if z.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, K) class probabilities (float64) with the given temperature."""
    return np.exp(log_probs(logits, temperature))


def class_log_odds(lp: np.ndarray, k: int) -> np.ndarray:
    """log(P(class k) / P(not class k)) per row of (N, K) log-probabilities, computed without leaving log space."""
    others = np.delete(np.asarray(lp, dtype=np.float64), k, axis=1)
    m = others.max(axis=1, keepdims=True)
    return lp[:, k] - (m + np.log(np.exp(others - m).sum(axis=1, keepdims=True)))[:, 0]


def logit(p: float) -> float:
    """log(p / (1 - p)); +-inf at 1 and 0."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def format_probability(p: float | None, min_digits: int = 2) -> str:
    """A probability with the digits that tell it apart from 0 and 1: ``0.50``, ``0.99988``, ``1 - 3.1e-09``."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    p = float(p)
    tail = min(p, 1.0 - p)
    if tail <= 0.0:
        return "1" if p >= 1.0 else "0"
    if tail < 1e-4:
        return f"1 - {1.0 - p:.2g}" if p > 0.5 else f"{p:.2g}"
    digits = max(min_digits, math.ceil(-math.log10(tail)) + 1)
    return f"{p:.{digits}f}"


def _apart(p: float, threshold: float) -> tuple[str, str]:
    """``p`` and the threshold with enough digits (at least 3) that a value below the threshold never reads as equal
    to or above it: 0.487 vs 0.488, not 0.49 vs 0.488."""
    for digits in range(3, 10):
        a, b = format_probability(p, min_digits=digits), format_probability(threshold, min_digits=digits)
        if a != b or p == threshold:
            return a, b
    return a, b


# ----------------------------------------------------------------------------- typed parts

@dataclass(frozen=True)
class Calibration:
    """How the temperature and the operating point were chosen (on the validation split)."""

    temperature: float = 1.0
    """The temperature applied: ``softmax(logits / temperature)``."""
    status: str = "not fitted"
    """``fitted``; ``not fitted``; ``at lower bound`` (validation perfectly separated, so the NLL keeps falling
    as T -> 0: the fit is meaningless and T = 1 is kept); ``at upper bound`` (logits no better than chance)."""
    fitted_temperature: float | None = None
    """What the fit returned (equals ``temperature`` unless it hit a bound)."""
    threshold_rule: str = "default 0.5"
    """``sensitivity``, ``youden``, ``default 0.5`` (not chosen) or ``argmax`` (more than two classes)."""
    target_sensitivity: float | None = None
    val_sensitivity: float | None = None
    """Sensitivity and specificity the threshold reached on validation."""
    val_specificity: float | None = None
    separated: bool = False
    """Validation separated the classes completely, so the threshold was put midway between them (and the target
    sensitivity could not be checked there)."""
    n_val: int = 0
    nll_before: float | None = None
    nll_after: float | None = None
    ece_before: float | None = None
    ece_after: float | None = None
    warnings: tuple[str, ...] = ()
    """Plain-language warnings shown in the terminal, calibration.json and the report."""

    def to_dict(self) -> dict:
        return {**asdict(self), "warnings": list(self.warnings)}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(**{**_known(cls, d), "warnings": tuple(d.get("warnings") or ())})


MAX_LABELS = 64
"""Most classes a model may have (covid-cxr's tasks have 2 or 3): a model file listing more is refused before any
tensor is allocated for it."""
MAX_GATE_FEATURES = 4096
"""Largest feature width of the out-of-scope gate (the backbones give 512-2048): its precision matrix is this
squared, so a file claiming 100,000 would ask for 40 GB."""


def _finite(where: str, name: str, value: Any) -> float:
    """``value`` as a finite float, or a :class:`CheckpointError` naming the field."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{where}: {name} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise CheckpointError(f"{where}: {name} is {number}, not a finite number; the model file was edited or "
                              "damaged: export or train the model again")
    return number


def _count(where: str, name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in [low, high], or a :class:`CheckpointError` naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value) or not low <= int(value) <= high:
        raise CheckpointError(f"{where}: {name} must be a whole number from {low} to {high}, got {str(value)[:40]}")
    return int(value)


@dataclass(frozen=True)
class ScopeGate:
    """The out-of-scope gate's decision rule (its fitted statistics are tensors inside the model)."""

    threshold: float
    """Images whose scope score exceeds this are flagged out of scope."""
    quantile: float
    """Fraction of validation images the threshold keeps in scope."""
    method: str
    n_fit: int
    """Training images the statistics were fitted on."""
    n_val: int
    dims: int
    """Dimensions the gate measures in: the network's features plus its image views."""
    feature_dim: int
    n_means: int
    """Class means (the score is the distance to the nearest)."""

    def __post_init__(self) -> None:
        where = "the out-of-scope gate"
        object.__setattr__(self, "threshold", _finite(where, "threshold", self.threshold))
        object.__setattr__(self, "quantile", _finite(where, "quantile", self.quantile))
        object.__setattr__(self, "feature_dim", _count(where, "feature_dim", self.feature_dim, 1, MAX_GATE_FEATURES))
        object.__setattr__(self, "n_means", _count(where, "n_means", self.n_means, 1, MAX_LABELS))
        # features plus the gate's image views (a few hundred): informational, never allocated from
        object.__setattr__(self, "dims", _count(where, "dims", self.dims, 0, 2 * MAX_GATE_FEATURES))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ScopeGate":
        return cls(**_known(cls, d))


@dataclass(frozen=True)
class LungUse:
    """The lung segmenter a classifier carries (its weights are the model's ``lungs.*`` tensors): an image whose
    model pixels show no two plausible lung fields is out of scope (``covid-cxr train --lungs LUNGS``)."""

    width: int
    """The segmenter's first-level channels (its architecture)."""
    size: int
    """The side of the square it sees (the model pixels are resized to it)."""
    segmenter_checksum: str = ""
    """Checksum of the ``lungs.pt`` it came from (provenance)."""
    dice: float | None = None
    """Its held-out Dice when it was trained."""

    def __post_init__(self) -> None:
        where = "the lung segmenter"
        object.__setattr__(self, "width", _count(where, "width", self.width, 4, 64))
        object.__setattr__(self, "size", _count(where, "size", self.size, 32, 1024))
        if self.size % 8:
            raise CheckpointError(f"{where}: size must be a multiple of 8, got {self.size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LungUse":
        return cls(**_known(cls, d))


@dataclass(frozen=True)
class TrainingData:
    """What the model was trained on (for model cards, reports and the web page)."""

    task: str
    sources: tuple[str, ...]
    synthetic_sources: tuple[str, ...] = ()
    """Sources made of synthetic images (phantoms); reports carry a SYNTHETIC banner."""
    protocol: str = ""
    n_train: int = 0
    n_val: int = 0
    test_split: bool = True
    """False for a final model trained on every image (its estimate comes from crossval)."""

    def to_dict(self) -> dict:
        return {**asdict(self), "sources": list(self.sources), "synthetic_sources": list(self.synthetic_sources)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingData":
        v = _known(cls, d)
        v["sources"] = tuple(v.get("sources") or ())
        v["synthetic_sources"] = tuple(v.get("synthetic_sources") or ())
        return cls(**v)

    @property
    def synthetic(self) -> bool:
        return bool(self.synthetic_sources)

    @property
    def pediatric_sources(self) -> tuple[str, ...]:
        """Training sources whose patients are children (:data:`covid_cxr.config.PEDIATRIC_SOURCES`)."""
        return tuple(s for s in self.sources if s in PEDIATRIC_SOURCES)

    def images_out_of_scope(self) -> str:
        """The kinds of image its training data does not cover, in words (model card, report). Children are named
        only when no training source had children; with pediatric training images, :meth:`age_caveat` says why
        a child's output still means little."""
        kinds = ["other hospitals and scanners", "lateral views", "CT", "photographs of films or screens"]
        if not self.pediatric_sources:
            kinds.insert(1, "children")
        return ", ".join(kinds)

    def age_caveat(self) -> str | None:
        """With pediatric training sources: their children are in the training data, but (in the public
        collections) not among the COVID-19 images, so age is a shortcut. None otherwise."""
        if not self.pediatric_sources:
            return None
        return (f"Children are in the training data ({', '.join(self.pediatric_sources)}: patients aged 1-5), but "
                "only in its non-COVID classes, while the COVID-19 images are mostly adults: age is a shortcut the "
                "model can learn, so its output on a child's X-ray says little about COVID-19.")


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (d or {}).items() if k in names}


# ----------------------------------------------------------------------------- the meta

@dataclass(frozen=True)
class ModelMeta:
    """Everything about a trained model except its weights.

    ``positive`` is the task's positive class (``covid``), set once from the task. For two classes the
    prediction is the positive class when its log-odds reach ``threshold_log_odds``; for more classes
    it is the argmax.
    """

    arch: str
    labels: tuple[str, ...]
    positive: str | None
    preprocess: PreprocessSpec
    threshold_log_odds: float = 0.0
    """Two classes: predict ``positive`` when log(P(positive) / P(other)) >= this (0.0 is P >= 0.5)."""
    temperature: float = 1.0
    calibration: Calibration | None = None
    gate: ScopeGate | None = None
    data: TrainingData | None = None
    lungs: LungUse | None = None
    """The lung segmenter the model carries, if any (images without two plausible lung fields are out of scope)."""
    training: dict = field(default_factory=dict)
    """The resolved training options."""
    estimate: dict | None = None
    """Where this model's performance estimate comes from when it has no test split (crossval)."""
    recalibration: dict | None = None
    """Set by ``covid-cxr calibrate``: the temperature and threshold were refitted on a hospital's own images
    (dataset, images, patients, old and new temperature and threshold, date, and that metrics on those images are
    now optimistic); None for a model as training calibrated it."""
    epoch: int | None = None
    val_metrics: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if len(self.labels) > MAX_LABELS:
            raise CheckpointError(f"a model lists {len(self.labels)} labels, more than the {MAX_LABELS} allowed; the "
                                  "model file was edited or damaged")
        if not all(isinstance(lab, str) and 0 < len(lab) <= 64 for lab in self.labels):
            raise CheckpointError("every label must be a name of 1 to 64 characters")
        object.__setattr__(self, "threshold_log_odds",
                           _finite("the model", "threshold_log_odds", self.threshold_log_odds))
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise CheckpointError(f"a model needs at least two distinct labels, got {list(self.labels)}")
        if self.positive is not None and self.positive not in self.labels:
            raise CheckpointError(f"positive class {self.positive!r} is not one of the labels {list(self.labels)}")
        object.__setattr__(self, "temperature", _finite("the model", "temperature", self.temperature))
        if not self.temperature > 0:
            raise CheckpointError(f"temperature must be a positive number, got {self.temperature}")

    # -- the decision rule ---------------------------------------------------------------------------
    @property
    def positive_index(self) -> int | None:
        """Index of the positive class, or None when the task has none."""
        return None if self.positive is None else self.labels.index(self.positive)

    @property
    def binary(self) -> bool:
        """Two classes with a positive class: a threshold applies (else the argmax)."""
        return len(self.labels) == 2 and self.positive is not None

    @property
    def threshold(self) -> float | None:
        """The operating threshold on P(positive) (float64), or None for argmax models."""
        return sigmoid(self.threshold_log_odds) if self.binary else None

    def threshold_text(self) -> str:
        """The threshold as people should read it: ``P(covid) >= 0.99988`` or ``argmax``."""
        if not self.binary:
            return "argmax (largest probability)"
        return f"P({self.positive}) >= {format_probability(self.threshold, min_digits=3)}"

    def threshold_reason(self) -> str:
        """How the threshold was chosen, in plain words: ``set to catch 95 % of covid cases on validation``."""
        cal = self.calibration
        if not self.binary:
            return "the class with the largest probability is the decision"
        rule = cal.threshold_rule if cal else "default 0.5"
        separated = bool(cal) and cal.separated
        where = "on validation"
        if self.recalibration:  # covid-cxr calibrate: refitted on a hospital's own images
            where = "on local data (covid-cxr calibrate)"
        if rule == "sensitivity" and cal.target_sensitivity is not None:
            text = f"set to catch {100 * cal.target_sensitivity:g} % of {self.positive} cases {where}"
        elif rule == "youden":
            text = f"set {where} to balance sensitivity and specificity (Youden's J)"
        else:
            return "the default 0.5: no threshold was chosen on validation"
        return text + (f" ({where.removeprefix('on ').split(' (')[0]} separated the classes, so it lies midway "
                       "between them)" if separated else "")

    def explain_decision(self, probabilities: dict[str, float], label: str, in_scope: bool | None = None) -> str:
        """The decision in one sentence, e.g. ``covid: P(covid) 0.33 is above the decision threshold 0.237, which
        was set to catch 95 % of covid cases on validation``; an out-of-scope image says that first."""
        if self.binary:
            p, t, reason = probabilities[self.positive], self.threshold, self.threshold_reason()
            side = "at or above" if label == self.positive else "below"
            p_text, t_text = _apart(p, t)
            text = (f"{label}: P({self.positive}) {p_text} is {side} the decision threshold {t_text}"
                    + (f", which was {reason}" if reason.startswith("set") else f" ({reason})"))
        else:
            text = f"{label}: the largest probability ({format_probability(probabilities[label])})"
        if in_scope is False:
            return ("out of scope: this image is unlike the chest X-rays the model was trained on, so its output is "
                    f"not meaningful (had it been in scope: {text})")
        return text

    def log_probs(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated log-probabilities (float64) of raw logits."""
        return log_probs(logits, self.temperature)

    def positive_log_odds(self, lp: np.ndarray) -> np.ndarray:
        """log(P(positive) / P(not positive)) per row of log-probabilities: the score AUCs are computed on."""
        if self.positive_index is None:
            raise ValueError("this model has no positive class")
        return class_log_odds(lp, self.positive_index)

    def decide(self, lp: np.ndarray) -> np.ndarray:
        """Predicted class index per row of log-probabilities."""
        if self.binary:
            pos = self.positive_index
            return np.where(self.positive_log_odds(lp) >= self.threshold_log_odds, pos, 1 - pos)
        return lp.argmax(axis=1)

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": META_FORMAT if self.preprocess.needs_lungs else META_FORMAT_WHOLE_IMAGE, "arch": self.arch, "labels": list(self.labels), "positive": self.positive,
            "preprocess": self.preprocess.to_dict(), "threshold_log_odds": self.threshold_log_odds,
            "threshold": self.threshold, "temperature": self.temperature,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "gate": self.gate.to_dict() if self.gate else None,
            "data": self.data.to_dict() if self.data else None,
            "lungs": self.lungs.to_dict() if self.lungs else None,
            "training": self.training, "estimate": self.estimate, "recalibration": self.recalibration,
            "epoch": self.epoch,
            "val_metrics": self.val_metrics, "versions": self.versions, "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "model metadata") -> "ModelMeta":
        """Parse :meth:`to_dict`'s output. ``threshold`` is derived, not read.

        Raises:
            CheckpointError: a newer format, or missing or malformed fields (naming ``where``).
        """
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: not a covid-cxr model description")
        fmt = d.get("format", 0)
        if not isinstance(fmt, int) or isinstance(fmt, bool):
            raise CheckpointError(f"{where}: format must be an integer, got {str(fmt)[:40]!r}; the file was edited or "
                                  "not written by covid-cxr")
        if fmt > META_FORMAT:
            raise CheckpointError(f"{where} was written by a newer covid-cxr (format {fmt}); upgrade covid-cxr")
        labels = d.get("labels")
        if labels is None:
            raise CheckpointError(f"{where}: malformed model description (no labels)")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise CheckpointError(f"{where}: labels must be a list of class names, got {str(labels)[:60]!r}")
        for key, required in (("preprocess", True), ("calibration", False), ("gate", False), ("data", False),
                              ("lungs", False), ("recalibration", False)):
            value = d.get(key)
            if (required or value) and not isinstance(value, dict):
                raise CheckpointError(f"{where}: {key} must be an object of named fields, got "
                                      f"{type(value).__name__} {str(value)[:40]}")
        try:
            return cls(
                arch=str(d["arch"]), labels=tuple(d["labels"]), positive=d.get("positive"),
                preprocess=PreprocessSpec.from_dict(d["preprocess"]),
                threshold_log_odds=d.get("threshold_log_odds", 0.0), temperature=d.get("temperature", 1.0),
                calibration=Calibration.from_dict(d["calibration"]) if d.get("calibration") else None,
                gate=ScopeGate.from_dict(d["gate"]) if d.get("gate") else None,
                data=TrainingData.from_dict(d["data"]) if d.get("data") else None,
                lungs=LungUse.from_dict(d["lungs"]) if d.get("lungs") else None,
                training=dict(d.get("training") or {}), estimate=d.get("estimate"),
                recalibration=d.get("recalibration") or None, epoch=d.get("epoch"),
                val_metrics=dict(d.get("val_metrics") or {}), versions=dict(d.get("versions") or {}),
                created=str(d.get("created", "")))
        except CheckpointError as exc:  # a field's own check: say which file it is in
            if str(exc).startswith(where):
                raise
            raise CheckpointError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CheckpointError(f"{where}: malformed model description ({type(exc).__name__}: {str(exc)[:200]})"
                                  ) from None

    def replace(self, **changes: Any) -> "ModelMeta":
        return replace(self, **changes)

    def describe(self) -> str:
        """One paragraph for terminals and model cards."""
        parts = [f"{self.arch}, classes {', '.join(self.labels)}", self.threshold_text(),
                 f"temperature {self.temperature:.3g}", f"input {self.preprocess.size} px"
                 + ("" if self.preprocess.intensity == "none" else f" with {self.preprocess.intensity}")]
        if self.gate:
            parts.append(f"out-of-scope gate at score {self.gate.threshold:.3g} ({self.gate.quantile:.0%} of "
                         "validation images in scope)")
        return "; ".join(parts)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def base_versions() -> dict[str, str]:
    return {"covid_cxr": __version__}
