"""What every command's options share: the base class, the tasks and choice types, the checks, and the one
generator that reads them for the CLI and the YAML overlay.

Each stage owns its commands' options (``covid_cxr.<stage>.options``): frozen dataclasses with defaults, a
docstring per field and checks in ``__post_init__``. The CLI (:mod:`covid_cxr.cli`) is generated from these
classes: a field becomes a flag named after it
(``image_size`` -> ``--image-size``), its type gives the parser (``bool`` -> ``--x/--no-x``, ``Literal``
-> choices, ``tuple`` -> repeatable), and the docstring under it is the help text. A YAML file can
overlay the defaults (``--config``), flags overlay the YAML, and the resolved config is written next to
every output.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import reprlib
import textwrap
import types
import typing
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import yaml

from covid_cxr.errors import ConfigError

# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A classification task: its classes in index order, its positive class, and how source labels map."""

    classes: tuple[str, ...]
    mapping: Mapping[str, str]
    """Manifest label (normal, covid, pneumonia, other) -> class; labels not listed are outside the task."""
    positive: str = "covid"
    """The class whose sensitivity and specificity are reported and thresholded (set here, once)."""
    description: str = ""


TASKS: dict[str, Task] = {
    "covid-vs-normal": Task(("normal", "covid"), {"normal": "normal", "covid": "covid"}, "covid",
                            "COVID-19 against normal (the original study; normal = 0, covid = 1)"),
    "covid-vs-rest": Task(("rest", "covid"), {"normal": "rest", "pneumonia": "rest", "other": "rest",
                                              "covid": "covid"}, "covid",
                          "COVID-19 against everything else: normal, other pneumonia and other findings"),
    "covid-pneumonia-normal": Task(("normal", "covid", "pneumonia"),
                                   {"normal": "normal", "covid": "covid", "pneumonia": "pneumonia"}, "covid",
                                   "three classes: normal, COVID-19, other pneumonia"),
}
"""Task name -> :class:`Task`."""

PEDIATRIC_SOURCES = frozenset({"mooney"})
"""Sources whose patients are children (Kermany/Mooney: aged 1-5); every other public source is mostly adults (OpenIST
is adults only; the cxnet reader leaves out COVID-CXNet's rows under 18). The dataset warnings, the model card and the
report read it from here."""
PROTOCOLS = ("patient", "leave-source-out")
SplitName = Literal["train", "val", "test", "all"]
"""A manifest split; ``all`` is every image of the task's classes whatever its split (a hospital's own dataset is
measured as a whole: ``covid-cxr evaluate --split all``)."""
Checkpoint = Literal["best", "last"]
Backend = Literal["torch", "onnx"]
Arch = Literal["densenet121", "resnet18", "resnet50", "efficientnet_b0", "convnext_tiny"]
Intensity = Literal["none", "equalize", "clahe"]
EXPERIMENT_LOGS = ("tensorboard", "mlflow")
DEVICE_HELP = "auto (CUDA if available), cpu, cuda or cuda:N"
MAX_WORKERS = 256
"""Most worker processes any option may ask for (a typo must not fork thousands of processes)."""
MAX_CONFIG_BYTES = 1 << 20
UNLEARNED_OPTIONS = ("resume", "workers", "progress", "device", "logs", "compile")
"""Training options that do not change what a run learns: they may differ between an interrupted run and its
``--resume``, and between a crossval and the run whose out-of-source estimate it is."""
"""Largest YAML config file read (options files are a few hundred bytes)."""

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 80, 80, 2, 5, 5


def shown(value: Any) -> str:
    """A value for an error message: a repr cut short (a YAML file can hold a list of a billion strings built from
    a few aliases, whose full repr would never finish)."""
    return _REPR.repr(value)


def check_device_option(value: str) -> None:
    if not (value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(value))):
        raise ConfigError(f"--device {shown(value)} is not valid; use {DEVICE_HELP}")


def _check_common(config: Any) -> None:
    """Checks of the fields several configs share: seeds NumPy and torch accept, a sane number of processes."""
    seed = getattr(config, "seed", None)
    if isinstance(seed, int) and not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be between 0 and {2**32 - 1}, got {seed}")
    workers = getattr(config, "workers", None)
    if isinstance(workers, int) and not isinstance(workers, bool) and workers > MAX_WORKERS:
        raise ConfigError(f"--workers {workers} is more than the {MAX_WORKERS} allowed; use about as many as CPU cores")


def check_positive(name: str, value: float | int, minimum: float = 0, strict: bool = True) -> None:
    if (value <= minimum if strict else value < minimum) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"--{name.replace('_', '-')} must be {'>' if strict else '>='} {minimum}, got {value}")


class CommandOptions:
    """Shared behaviour: ``to_dict`` (for config.yaml and checkpoints), and the choice fields (``Literal``) checked
    on construction, also when a config is built in Python rather than through :func:`make_config`."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # A class without a __post_init__ of its own keeps its nearest base's checks.
        own = cls.__dict__.get("__post_init__")
        if own is None:
            own = next((c.__dict__["_own_post_init"] for c in cls.__mro__[1:] if "_own_post_init" in c.__dict__), None)
        cls._own_post_init = own

        def __post_init__(self) -> None:
            _check_choices(self)
            _check_common(self)
            if own is not None:
                own(self)

        cls.__post_init__ = __post_init__

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        return d


# ----------------------------------------------------------------------------- reflection: docs and types

@lru_cache(maxsize=None)
def _class_nodes(module: str) -> dict[str, ast.ClassDef]:
    """The top-level class definitions of a module's source, parsed once (``--help`` builds every command's
    options; parsing the module once per class took ~0.3 s of each start-up)."""
    import sys

    try:
        tree = ast.parse(inspect.getsource(sys.modules[module]))
    except (KeyError, OSError, TypeError):  # pragma: no cover - no source available
        return {}
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (and of its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        node = _class_nodes(klass.__module__).get(klass.__qualname__)
        if node is None:
            try:
                node = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0]
            except (OSError, TypeError):  # pragma: no cover - no source available
                continue
        body = node.body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def class_doc(cls: type) -> str:
    """The class docstring as plain text (for ``--help``)."""
    return " ".join((cls.__doc__ or "").replace("``", "").split())


@lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def required_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


@lru_cache(maxsize=None)
def _choice_fields(cls: type) -> tuple[tuple[str, tuple], ...]:
    """(name, allowed values) of every ``Literal`` field of a config class."""
    out = []
    for name, tp in field_types(cls).items():
        inner, _ = unwrap_optional(tp)
        if typing.get_origin(inner) is Literal:
            out.append((name, typing.get_args(inner)))
    return tuple(out)


def _check_choices(config: Any) -> None:
    for name, choices in _choice_fields(type(config)):
        value = getattr(config, name)
        if value is not None and value not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, "
                              f"got {shown(value)}")


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Check a value read from YAML (or given in Python) against the field's type; convert lists to tuples."""
    tp, optional = unwrap_optional(field_types(cls)[name])
    flag = "--" + name.replace("_", "-")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{flag} cannot be empty")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}, got {shown(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} must be true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{flag} must be a whole number, got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag} must be a number, got {shown(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{flag} must be text, got {shown(value)}")
        return str(value)
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        if typing.get_origin(inner) is tuple:
            out = []
            for item in value:
                if isinstance(item, str) and "=" in item:
                    item = item.split("=", 1)
                elif isinstance(item, Mapping) and len(item) == 1:
                    item = next(iter(item.items()))
                if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(isinstance(x, str) for x in item):
                    raise ConfigError(f"{flag} takes NAME=PATH pairs, got {shown(item)}")
                out.append((item[0], item[1]))
            return tuple(out)
        if not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in value):
            raise ConfigError(f"{flag} takes a list of text values, got {shown(value)}")
        return tuple(str(x) for x in value)
    return value


T = TypeVar("T")


def load_yaml_options(yaml_file: str | Path) -> dict:
    """The options in a YAML file (a mapping of option names to values).

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, uses tags, or is not a mapping.
    """
    path = Path(yaml_file)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES:,} bytes; an options file is a "
                              "short YAML mapping of option names to values")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; write it as a YAML mapping of options") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{at}: {problem}; only plain YAML mappings of "
                          "option names to values are read (no tags)") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests lists or mappings too deeply to read; options are plain "
                          "values or short lists") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a value PyYAML cannot build, e.g. the date 2020-13-45
        raise ConfigError(f"config file {path} holds a value that cannot be read ({exc}); quote it if it is "
                          "text") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise ConfigError(f"config file {path}: expected a mapping of option names to values, got "
                          f"{type(loaded).__name__ if not isinstance(loaded, dict) else 'other keys than names'}")
    return {k.replace("-", "_"): v for k, v in loaded.items()}


def make_config(cls: type[T], overrides: Mapping[str, Any], yaml_file: str | None = None) -> T:
    """Build ``cls`` from its defaults, overlaid by ``yaml_file`` then by ``overrides``.

    Raises:
        ConfigError: the YAML is broken or names an unknown option, a value has the wrong type, an option is
            missing, or a value is invalid. Messages name options as flags, never internal classes.
    """
    values: dict[str, Any] = {}
    if yaml_file:
        values.update(load_yaml_options(yaml_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(u[:60] for u in unknown[:10])}"
                          f"{' ...' if len(unknown) > 10 else ''}; valid: {', '.join(names)}")
    missing = [n for n in required_fields(cls) if n not in values]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join('--' + n.replace('_', '-') for n in missing)}")
    values = {k: _coerce(cls, k, v) for k, v in values.items()}
    return cls(**values)
