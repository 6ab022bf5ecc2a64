"""Standard weight formats: safetensors, and a Hugging Face-style model folder with a model card.

* ``covid-cxr export --format safetensors`` - ``model.safetensors``: the checkpoint's tensors (keys
  ``net.*`` for the torchvision backbone, ``head.*``, ``gate.*``) with the model's
  :class:`~covid_cxr.meta.ModelMeta` as JSON in the file's metadata, plus the same JSON beside it
  (``model.meta.json``). A checksum over the meta and every tensor (the checkpoints' own, from
  :func:`covid_cxr.model.checksum`) is stored too and verified on load: safetensors has none.
* ``covid-cxr export --format hf`` - a folder: ``model.safetensors``, ``config.json`` (labels, positive
  class, preprocessing, threshold, temperature, gate, arch and the full meta), ``README.md`` (a model card
  with YAML front matter, from the run's meta, ``eval-test/metrics.json`` and the crossval estimate) and,
  unless turned off, ``model.onnx`` + ``model.json`` for installs without PyTorch.

:func:`covid_cxr.api.load_run` reads both back. Reading the header (:func:`read_safetensors_header`) needs
only the standard library; loading weights needs PyTorch and the ``safetensors`` package.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.errors import CheckpointError, CovidCxrError, ExportError
from covid_cxr.files import atomic_write, read_json, to_json
from covid_cxr.images import sha256_file
from covid_cxr.meta import ModelMeta

log = logging.getLogger(__name__)

HF_FORMAT = 1
"""Version of the covid-cxr entries in config.json."""
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
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


# ----------------------------------------------------------------------------- reading

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
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
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
    from covid_cxr.model import Checkpoint, checksum, model_from_checkpoint

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
        config = read_json(path, "model config")
    except CovidCxrError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(config, dict) or config.get("library_name") != "covid-cxr" or META_KEY not in config:
        raise CheckpointError(f"{path} is not a covid-cxr model config (written by `covid-cxr export --format hf`)")
    if int(config.get("covid_cxr_format", 0)) > HF_FORMAT:
        raise CheckpointError(f"{path} was written by a newer covid-cxr; upgrade covid-cxr")
    return config


# ----------------------------------------------------------------------------- writing

def export_safetensors(checkpoint: str | Path, out: str | Path, sidecar: bool = True) -> dict:
    """Write the checkpoint's weights and meta as safetensors (atomically), plus ``<stem>.meta.json``.

    Raises:
        CheckpointError: the checkpoint is missing or damaged.
        ExportError: ``out`` does not end in .safetensors.
    """
    from covid_cxr.model import checksum, read_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"{out}: the file name must end in .safetensors")
    st = _safetensors()
    ckpt = read_checkpoint(checkpoint)
    # Own, contiguous storage per tensor: safetensors refuses tensors that share memory.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt.state_dict.items()}
    meta_dict = json.loads(to_json(ckpt.meta.to_dict()))
    source = {"file": checkpoint.name, "sha256": sha256_file(checkpoint)}
    metadata = {"format": "pt", META_KEY: json.dumps(meta_dict, sort_keys=True), "covid_cxr_version": __version__,
                CHECKSUM_KEY: checksum({"meta": meta_dict, "state_dict": state}),
                "source_checkpoint": json.dumps(source)}
    data = st.save(state, metadata=metadata)
    atomic_write(out, data)
    sha = sha256_file(out)
    summary = {"format": "safetensors", "safetensors": str(out), "bytes": len(data), "sha256": sha,
               "tensors": len(state), "labels": list(ckpt.meta.labels), "source_checkpoint": source}
    if sidecar:
        side = out.with_suffix(".meta.json")
        atomic_write(side, to_json({"covid_cxr_format": HF_FORMAT, "meta": meta_dict,
                                    "safetensors": {"file": out.name, "sha256": sha, "tensors": len(state),
                                                    "source_checkpoint": source, "covid_cxr_version": __version__}}))
        summary["json"] = str(side)
    log.info("wrote %s (%d tensors, %.1f MB)", out, len(state), len(data) / 2**20)
    return summary


def hf_config(meta: ModelMeta, weights_sha256: str, source: dict, onnx: bool) -> dict:
    """config.json: what a reader needs to use the weights without covid-cxr's code, and the full meta."""
    spec = meta.preprocess
    return {
        "library_name": "covid-cxr", "covid_cxr_format": HF_FORMAT, "covid_cxr_version": __version__,
        "model_type": "covid-cxr-classifier", "arch": meta.arch,
        "architecture": f"torchvision {meta.arch} without its last layer (state-dict keys net.*), a linear head "
                        "(head.*) and, when fitted, the out-of-scope gate (gate.*)",
        "num_labels": len(meta.labels), "labels": list(meta.labels),
        "id2label": {str(i): lab for i, lab in enumerate(meta.labels)},
        "label2id": {lab: i for i, lab in enumerate(meta.labels)},
        "positive_class": meta.positive,
        "decision": {"rule": meta.threshold_text(), "threshold": meta.threshold,
                     "threshold_log_odds": meta.threshold_log_odds,
                     "how": "two classes: predict the positive class when log(P(positive)/P(other)) >= "
                            "threshold_log_odds, P from softmax(logits / temperature); more classes: argmax"},
        "temperature": meta.temperature,
        "preprocessing": {**spec.to_dict(), "pixel_range": [0, 255], "description": spec.describe(),
                          "input": f"float32 (N, {spec.channels}, {spec.size}, {spec.size})"},
        "gate": None if meta.gate is None else {
            **meta.gate.to_dict(), "how": "the model's gate (gate.* tensors) gives a distance per image; above "
                                          "threshold the image is out of scope (unlike the training images)"},
        "training_data": meta.data.to_dict() if meta.data else None,
        "estimate": meta.estimate,
        "files": {"weights": WEIGHTS_NAME, "weights_sha256": weights_sha256, "card": CARD_NAME,
                  "onnx": "model.onnx" if onnx else None, "onnx_metadata": "model.json" if onnx else None},
        "source_checkpoint": source,
        "disclaimer": DISCLAIMER,
        META_KEY: json.loads(to_json(meta.to_dict())),
    }


def evaluation_for(run_root: Path, checkpoint: Path, meta: ModelMeta) -> tuple[dict | None, str]:
    """(eval-test/metrics.json of this checkpoint, or None; a note on why not)."""
    path = run_root / "eval-test" / "metrics.json"
    if not path.is_file():
        return None, f"not evaluated: no {path.relative_to(run_root)} (run `covid-cxr evaluate --run {run_root}`)"
    try:
        doc = read_json(path, "evaluation")
    except CovidCxrError as exc:
        return None, f"the evaluation could not be read ({exc})"
    same = Path(str(doc.get("checkpoint", ""))).name == checkpoint.name and doc.get("epoch") == meta.epoch
    if not same:
        return None, (f"{path.relative_to(run_root)} is of another checkpoint ({Path(str(doc.get('checkpoint'))).name},"
                      f" epoch {doc.get('epoch')}); evaluate {checkpoint.name} again")
    return doc, ""


def prepare_folder(out_dir: str | Path, overwrite: bool) -> Path:
    """The hf export folder, created; refused when it already holds files and ``overwrite`` is off.

    Raises:
        ExportError: the folder holds files.
    """
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} already holds files; pass --overwrite to replace them or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def export_hf(checkpoint: str | Path, out_dir: str | Path, run_root: str | Path | None = None,
              onnx: bool = False) -> dict:
    """Write model.safetensors, config.json and README.md into an hf export folder (see :func:`prepare_folder`).

    Args:
        checkpoint: the covid-cxr checkpoint.
        out_dir: the folder.
        run_root: the run folder whose ``eval-test/metrics.json`` feeds the model card.
        onnx: ``model.onnx`` + ``model.json`` of this checkpoint are already in the folder (written by
            :func:`covid_cxr.export.export_onnx`); otherwise any stale ones are removed.

    Raises:
        CheckpointError: the checkpoint is missing or damaged.
    """
    from covid_cxr.model import read_checkpoint
    from covid_cxr.modelcard import model_card

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    run_root = Path(run_root) if run_root is not None else checkpoint.parent
    meta = read_checkpoint(checkpoint).meta
    if not onnx:  # a graph from an earlier export must not be left beside new weights
        for name in ("model.onnx", "model.json"):
            (out_dir / name).unlink(missing_ok=True)
    weights = export_safetensors(checkpoint, out_dir / WEIGHTS_NAME, sidecar=False)
    atomic_write(out_dir / CONFIG_NAME, to_json(hf_config(meta, weights["sha256"], weights["source_checkpoint"],
                                                          onnx)))
    evaluation, note = evaluation_for(run_root, checkpoint, meta)
    atomic_write(out_dir / CARD_NAME, model_card(meta, evaluation, note, name=run_root.resolve().name, onnx=onnx))
    log.info("wrote %s: %s, %s, %s%s", out_dir, WEIGHTS_NAME, CONFIG_NAME, CARD_NAME,
             ", model.onnx, model.json" if onnx else "")
    return {"format": "hf", "folder": str(out_dir), "files": sorted(p.name for p in out_dir.iterdir()),
            "bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()), "labels": list(meta.labels),
            "evaluation": "eval-test/metrics.json" if evaluation else note, "estimate": bool(meta.estimate)}
