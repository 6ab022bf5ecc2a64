"""Standard weight formats: safetensors, and a Hugging Face-style model folder with a model card.

* ``covid-cxr export --format safetensors`` - ``model.safetensors``: the checkpoint's tensors (keys
  ``net.*`` for the torchvision backbone, ``head.*``, ``gate.*``) with the model's
  :class:`~covid_cxr.model.meta.ModelMeta` as JSON in the file's metadata, plus the same JSON beside it
  (``model.meta.json``). A checksum over the meta and every tensor (the checkpoints' own, from
  :func:`covid_cxr.model.checkpoint.checksum`) is stored too and verified on load: safetensors has none.
* ``covid-cxr export --format hf`` - a folder: ``model.safetensors``, ``config.json`` (labels, positive
  class, preprocessing, threshold, temperature, gate, arch and the full meta), ``README.md`` (a model card
  with YAML front matter, from the run's meta, ``eval-test/metrics.json`` and the crossval estimate) and,
  unless turned off, ``model.onnx`` + ``model.json`` for installs without PyTorch.

:func:`covid_cxr.deploy.api.load_run` reads both back (:mod:`covid_cxr.model.formats`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.errors import CovidCxrError, ExportError
from covid_cxr.files import atomic_write, read_json, to_json
from covid_cxr.imaging.images import sha256_file
from covid_cxr.limits import MAX_MODEL_JSON_BYTES
from covid_cxr.model.formats import CHECKSUM_KEY, CONFIG_NAME, HF_FORMAT, META_KEY, WEIGHTS_NAME, _safetensors
from covid_cxr.model.meta import ModelMeta

log = logging.getLogger(__name__)

CARD_NAME = "README.md"

# ----------------------------------------------------------------------------- writing

def export_safetensors(checkpoint: str | Path, out: str | Path, sidecar: bool = True) -> dict:
    """Write the checkpoint's weights and meta as safetensors (atomically), plus ``<stem>.meta.json``.

    Raises:
        CheckpointError: the checkpoint is missing or damaged.
        ExportError: ``out`` does not end in .safetensors.
    """
    from covid_cxr.model.checkpoint import checksum, read_checkpoint

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
                        "(head.*), when fitted the out-of-scope gate (gate.*) and, when carried, the lung segmenter "
                        "(lungs.*)" + ("; with a lung view the segmenter first finds the lung fields' box, which "
                                       "the preprocessing crops before the resize (preprocessing.lung_view)"
                                       if spec.needs_lungs else ""),
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
    """The hf export folder, created; refused when it already holds files and ``overwrite`` is off, and even with
    ``overwrite`` when those files are not an earlier export's (:func:`is_hf_export`): the user's own README.md or
    model.onnx are never replaced or removed.

    Raises:
        ExportError: the folder holds files (naming the ones an export would touch).
    """
    out_dir = Path(out_dir)
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if present and not overwrite:
        raise ExportError(f"{out_dir} already holds files; pass --overwrite to replace them or choose another --out")
    if present and not is_hf_export(out_dir):
        touched = [n for n in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, "model.onnx", "model.json") if n in present]
        raise ExportError(f"{out_dir} was not written by covid-cxr export (its {CONFIG_NAME} is not an export's), so "
                          "--overwrite does not apply: it would replace or remove "
                          f"{', '.join(touched) or 'nothing, but mix with ' + ', '.join(present[:5])}; "
                          "choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def is_hf_export(folder: Path) -> bool:
    """True when ``folder/config.json`` is a covid-cxr hf export's (it carries the model's metadata under
    ``covid_cxr_meta``): the marker that lets ``--overwrite`` replace the folder's files."""
    try:
        config = read_json(folder / CONFIG_NAME, "config", max_bytes=MAX_MODEL_JSON_BYTES)
    except CovidCxrError:
        return False
    return isinstance(config, dict) and isinstance(config.get(META_KEY), dict)


def export_hf(checkpoint: str | Path, out_dir: str | Path, run_root: str | Path | None = None,
              onnx: bool = False) -> dict:
    """Write model.safetensors, config.json and README.md into an hf export folder (see :func:`prepare_folder`).

    Args:
        checkpoint: the covid-cxr checkpoint.
        out_dir: the folder.
        run_root: the run folder whose ``eval-test/metrics.json`` feeds the model card.
        onnx: ``model.onnx`` + ``model.json`` of this checkpoint are already in the folder (written by
            :func:`covid_cxr.deploy.export.export_onnx`); otherwise any stale ones are removed.

    Raises:
        CheckpointError: the checkpoint is missing or damaged.
    """
    from covid_cxr.deploy.modelcard import model_card
    from covid_cxr.model.checkpoint import read_checkpoint

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
