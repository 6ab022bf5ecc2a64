"""Reading the exported weight formats back: a covid-cxr ``model.safetensors`` file and an hf folder
(``config.json`` + ``model.safetensors``), both written by :mod:`covid_cxr.deploy.hub`.

Reading the header (:func:`read_safetensors_header`) needs only the standard library; loading weights needs PyTorch
and the ``safetensors`` package.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

from covid_cxr.errors import CheckpointError, CovidCxrError
from covid_cxr.files import read_json
from covid_cxr.limits import MAX_MODEL_JSON_BYTES
from covid_cxr.model.meta import ModelMeta

log = logging.getLogger(__name__)

HF_FORMAT = 1
"""Version of the covid-cxr entries in config.json."""
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
META_KEY = "covid_cxr_meta"
"""safetensors metadata key holding ``ModelMeta.to_dict()`` as JSON."""
CHECKSUM_KEY = "covid_cxr_checksum"
MAX_HEADER_BYTES = 100 * 2**20



def _safetensors():
    try:
        import safetensors.torch as st
    except ModuleNotFoundError:
        raise CovidCxrError("safetensors export and loading need the 'safetensors' package: pip install "
                            "'covid-cxr[train]' (or pip install safetensors)") from None
    return st


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads`` hook: a JSON object naming one key twice is refused with a ValueError (Python would keep the
    last silently, the safetensors loader might keep another)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"names {str(key)[:80]!r} twice")
        out[key] = value
    return out


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (tensor table and ``__metadata__``), without loading tensors.

    Raises:
        CheckpointError: not a safetensors file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    except ValueError as exc:  # _unique_keys (JSON and Unicode errors are caught above)
        raise CheckpointError(f"{path}: its header {exc} (one of the two would be loaded silently); the file was "
                              "altered or written wrongly: use another copy or export the model again") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not a safetensors file (its header is nested absurdly deep)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file")
    return header


def safetensors_meta(path: str | Path) -> ModelMeta:
    """The :class:`ModelMeta` stored in a covid-cxr safetensors file.

    Raises:
        CheckpointError: not a covid-cxr export (no meta in the metadata).
    """
    metadata = read_safetensors_header(path).get("__metadata__") or {}
    if META_KEY not in metadata:
        raise CheckpointError(f"{path} holds no covid-cxr model description (metadata key {META_KEY!r}); it is not "
                              "a file written by `covid-cxr export --format safetensors|hf`. For backbone weights "
                              "use `covid-cxr train --weights FILE`")
    try:
        return ModelMeta.from_dict(json.loads(metadata[META_KEY]), where=str(path))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its covid-cxr metadata is not JSON") from None


def is_hf_folder(path: str | Path) -> bool:
    """True for a folder written by ``covid-cxr export --format hf``."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def load_safetensors_model(path: str | Path, device: Any = "cpu"):
    """(model in eval mode, meta) from a covid-cxr ``.safetensors`` file (checksum verified, strict load).

    Raises:
        CheckpointError: not a covid-cxr export, damaged (checksum), or not matching the architecture.
    """
    from covid_cxr.model.checkpoint import Checkpoint, checksum, model_from_checkpoint

    path = Path(path)
    st = _safetensors()
    meta = safetensors_meta(path)
    metadata = read_safetensors_header(path).get("__metadata__") or {}
    try:
        state = st.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError types
        raise CheckpointError(f"cannot read {path} ({type(exc).__name__}: {exc}); export the model again") from None
    actual = checksum({"meta": json.loads(metadata[META_KEY]), "state_dict": state})
    if metadata.get(CHECKSUM_KEY) != actual:
        raise CheckpointError(f"{path} is damaged: its tensors or metadata do not match the checksum written with "
                              "them; use another copy or export the model again")
    return model_from_checkpoint(Checkpoint(path, meta, state, None, actual), device), meta


def load_hf_model(folder: str | Path, device: Any = "cpu"):
    """(model in eval mode, meta) from an ``export --format hf`` folder; config.json must agree with the weights.

    Raises:
        CheckpointError: files missing or damaged, or config.json edited so it no longer matches the weights.
    """
    folder = Path(folder)
    config = read_hf_config(folder)
    model, meta = load_safetensors_model(folder / WEIGHTS_NAME, device)
    stored = json.loads((read_safetensors_header(folder / WEIGHTS_NAME).get("__metadata__") or {})[META_KEY])
    if config.get(META_KEY) != stored:
        raise CheckpointError(f"{folder / CONFIG_NAME} does not describe {WEIGHTS_NAME} (labels, threshold or another "
                              "setting differs from the metadata inside the weights); export the model again rather "
                              "than editing config.json")
    return model, meta


def read_hf_config(folder: str | Path) -> dict:
    """config.json of an hf export folder.

    Raises:
        CheckpointError: missing, not JSON, not covid-cxr's, or written by a newer covid-cxr.
    """
    path = Path(folder) / CONFIG_NAME
    try:
        config = read_json(path, "model config", max_bytes=MAX_MODEL_JSON_BYTES)
    except CovidCxrError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(config, dict) or config.get("library_name") != "covid-cxr" or META_KEY not in config:
        raise CheckpointError(f"{path} is not a covid-cxr model config (written by `covid-cxr export --format hf`)")
    if int(config.get("covid_cxr_format", 0)) > HF_FORMAT:
        raise CheckpointError(f"{path} was written by a newer covid-cxr; upgrade covid-cxr")
    return config
