"""The one inference path: model pixels in, logits (and the out-of-scope score, and optionally
features) out, with either backend, for predict, evaluate, audit, explain, export checks and serve.

* :func:`forward_pixels` - the one forward loop of a PyTorch model over (N, S, S) uint8 model
  pixels (stages 1-2 of :mod:`covid_cxr.imaging.pixels`); it applies stages 3-4 batch by batch.
* :class:`~covid_cxr.model.onnx_model.OnnxModel` - an exported graph run by ONNX Runtime, the same contract.
* :class:`Predictor` / :func:`load_predictor` - a loaded model of either backend plus its
  :class:`~covid_cxr.model.meta.ModelMeta`: decisions, probabilities, the gate, rows for files.

PyTorch is imported only by the torch backend, so ONNX inference runs without it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from covid_cxr.errors import CheckpointError, CovidCxrError, ImageReadError
from covid_cxr.imaging.images import load_image
from covid_cxr.imaging.pixels import finish, geometry, shrink_short_side, stage2
from covid_cxr.model import formats
from covid_cxr.model.meta import ModelMeta
from covid_cxr.model.onnx_model import OnnxModel
from covid_cxr.model.results import Explanation, Outputs, Prediction, as_gray_image, chunks, expand_inputs
from covid_cxr.paths import RunDir, locate_checkpoint

log = logging.getLogger(__name__)

def forward_pixels(model, pixels: np.ndarray, spec, device, batch_size: int = 32, features: bool = False,
                   dtype=None, lungs: list | None = None) -> Outputs:
    """The PyTorch forward loop: (N, S, S) uint8 model pixels -> :class:`Outputs` in input order.

    Args:
        model: a :class:`~covid_cxr.model.networks.CxrNet` (its mode is restored afterwards).
        pixels: model pixels (stages 1-2); stages 3-4 are applied here.
        spec: the model's :class:`~covid_cxr.imaging.pixels.PreprocessSpec`.
        device: where to run.
        batch_size: images per forward pass.
        features: also return the penultimate features.
        dtype: autocast dtype on CUDA (None: full precision).
        lungs: with a lung view (``spec.lung_view``), each image's lung verdict, found when its pixels were made
            (:func:`~covid_cxr.imaging.pixels.pixels_and_lungs`): the model pixels are then a crop, not the image
            (None while training: logits only).
    """
    import torch

    from covid_cxr.model.runtime import autocast

    if pixels.ndim != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected (N, S, S) uint8 model pixels, got {pixels.dtype} {pixels.shape}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    from covid_cxr.model.gate import image_views

    logits, scopes, feats, views = [], [], [], []
    gate = getattr(model, "gate", None)
    try:
        with torch.inference_mode():
            for start in range(0, len(pixels), batch_size):
                x = torch.from_numpy(finish(pixels[start:start + batch_size], spec)).to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, dtype):
                    out, f = model(x, with_features=True)
                f = f.float()
                logits.append(out.float().cpu())
                if gate is not None:
                    scopes.append(gate(f, x).cpu())
                if features:
                    feats.append(f.cpu())
                    views.append(image_views(x).cpu())
    finally:
        model.train(was_training)
    k = model.head.out_features
    cat = (lambda xs, shape: torch.cat(xs).numpy() if xs else np.zeros(shape, dtype=np.float32))
    if spec.needs_lungs:
        if lungs is not None and len(lungs) != len(pixels):
            raise ValueError(f"{len(lungs)} lung verdicts for {len(pixels)} images")
    elif getattr(model, "lungs", None) is not None:  # the segmenter reads the same model pixels
        from covid_cxr.imaging.lung_masks import lung_checks
        from covid_cxr.model.lungs import lung_probabilities

        lungs = lung_checks(lung_probabilities(model.lungs, pixels, model.lungs.input_size, device, batch_size))
    return Outputs(logits=cat(logits, (0, k)), scope=cat(scopes, (0,)) if gate is not None else None, lungs=lungs,
                   features=cat(feats, (0, model.feature_dim)) if features else None,
                   views=cat(views, (0, 112)) if features else None)


# ----------------------------------------------------------------------------- the predictor

BACKENDS = ("torch", "onnx")


class Predictor:
    """A loaded model (either backend) and its meta: the one way every stage predicts.

    Build it with :func:`load_predictor`. Thread safety: prediction does not change the model, so
    several threads may predict at once.
    """

    def __init__(self, meta: ModelMeta, backend: str, source: Path, run: RunDir | None, model: Any = None,
                 onnx: OnnxModel | None = None, device: Any = "cpu"):
        if meta.preprocess.needs_lungs and meta.lungs is None:
            raise CheckpointError(f"{source}: its preprocessing has the {meta.preprocess.lung_view!r} lung view but "
                                  "the model carries no lung segmenter to find the lungs: a training checkpoint gets "
                                  "it only when training finishes; finish the run (covid-cxr train ... --resume) and "
                                  "use its best.pt or its export")
        self.meta = meta
        self.backend = backend
        self.source = Path(source)
        """The checkpoint or ONNX file the model came from."""
        self.run = run
        self.model = model
        self.onnx = onnx
        self.device = device
        self._cam_model = None

    @property
    def labels(self) -> tuple[str, ...]:
        return self.meta.labels

    def outputs(self, pixels: np.ndarray, batch_size: int = 32, features: bool = False,
                lungs: list | None = None) -> Outputs:
        """Logits (and scope, and optionally features) for (N, S, S) uint8 model pixels; ``lungs``: their lung
        verdicts, required for a lung-view model (:meth:`pixels` gives both)."""
        if self.meta.preprocess.needs_lungs and lungs is None:
            raise ValueError("the model pixels of a lung-view model come with each image's lung verdict "
                             "(Predictor.pixels, Dataset.pixels_and_lungs)")
        if self.backend == "onnx":
            if features:
                raise CovidCxrError("features need the PyTorch backend (--backend torch)")
            return self.onnx.forward_pixels(pixels, batch_size, lungs=lungs)
        return forward_pixels(self.model, pixels, self.meta.preprocess, self.device, batch_size, features,
                              lungs=lungs)

    def lung_masker(self):
        """The segmenter the model carries as a :class:`~covid_cxr.imaging.pixels.LungMasker` (either backend), or
        None."""
        if self.meta.lungs is None:
            return None
        if self.backend == "onnx":
            return self.onnx.lung_masker()
        from covid_cxr.model.lungs import TorchLungMasker

        return TorchLungMasker(self.model.lungs, self.device, self.meta.lungs.segmenter_checksum)

    def pixels(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list | None]:
        """Model pixels of decoded (H, W) uint8 images, and with a lung view their lung verdicts."""
        spec = self.meta.preprocess
        if not spec.needs_lungs:
            return np.stack([geometry(img, spec) for img in images]), None
        stage1 = [shrink_short_side(np.ascontiguousarray(img), spec.base_short_side) for img in images]
        masks = self.lung_masker().masks(stage1)
        done = [stage2(img, spec, m) for img, m in zip(stage1, masks)]
        return np.stack([px for px, _ in done]), [check for _, check in done]

    def results(self, out: Outputs) -> list[dict]:
        """One result per image: ``probabilities``, ``label``, ``log_odds`` (two classes), ``in_scope``,
        ``scope_score`` and ``explanation`` (the decision in one sentence)."""
        lp = self.meta.log_probs(out.logits)
        probs = np.exp(lp)
        decided = self.meta.decide(lp)
        log_odds = self.meta.positive_log_odds(lp) if self.meta.binary else None
        rows = []
        for i in range(len(lp)):
            row = {"probabilities": {lab: float(p) for lab, p in zip(self.labels, probs[i])},
                   "label": self.labels[int(decided[i])],
                   "log_odds": None if log_odds is None else float(log_odds[i]),
                   "in_scope": None, "scope_score": None, "lung_fields": None}
            if out.scope is not None and self.meta.gate is not None:
                row["scope_score"] = float(out.scope[i])
                row["in_scope"] = bool(out.scope[i] <= self.meta.gate.threshold)
            if out.lungs is not None:  # no two plausible lung fields: out of scope, whatever the gate says
                row["lung_fields"] = out.lungs[i].reason
                if not out.lungs[i].plausible:
                    row["in_scope"] = False
            row["explanation"] = self.meta.explain_decision(row["probabilities"], row["label"], row["in_scope"])
            if out.lungs is not None and not out.lungs[i].plausible:
                row["explanation"] = f"out of scope: {out.lungs[i].reason}; {row['explanation']}"
            rows.append(row)
        return rows

    def predict_arrays(self, images: Sequence[np.ndarray], batch_size: int = 32) -> list[dict]:
        """Results for decoded (H, W) uint8 images."""
        if not len(images):
            return []
        pixels, lungs = self.pixels(images)
        return self.results(self.outputs(pixels, batch_size, lungs=lungs))

    def predict_files(self, paths: Sequence[str | Path], batch_size: int = 16, skip_unreadable: bool = False,
                      progress: bool = False) -> list[dict]:
        """One flat row per file (for CSV/JSON): ``path``, ``prob_<label>``..., ``log_odds``,
        ``predicted_label``, ``threshold``, ``in_scope``, ``scope_score``, ``error``.

        Raises:
            ImageReadError: an unreadable file, unless ``skip_unreadable`` (then its row carries the reason).
        """
        from tqdm.auto import tqdm

        rows: list[dict] = []
        bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress)
        try:
            for start in range(0, len(paths), batch_size):
                chunk = [Path(p) for p in paths[start:start + batch_size]]
                decoded, ok = [], []
                for p in chunk:
                    try:
                        decoded.append(load_image(p))
                        ok.append(p)
                    except ImageReadError as exc:
                        if not skip_unreadable:
                            raise
                        rows.append(self.flat_row(p, None, exc.reason))
                for p, res in zip(ok, self.predict_arrays(decoded, batch_size)):
                    rows.append(self.flat_row(p, res))
                bar.update(len(chunk))
        finally:
            bar.close()
        order = {str(p): i for i, p in enumerate(paths)}
        return sorted(rows, key=lambda r: order[r["path"]])

    def flat_row(self, path: str | Path, res: dict | None, error: str = "") -> dict:
        row: dict[str, Any] = {"path": str(path)}
        for lab in self.labels:
            row[f"prob_{lab}"] = None if res is None else res["probabilities"][lab]
        if self.meta.binary:
            row["log_odds"] = None if res is None else res["log_odds"]
        row["predicted_label"] = None if res is None else res["label"]
        row["threshold"] = self.meta.threshold if self.meta.binary else "argmax"
        row["in_scope"] = None if res is None else res["in_scope"]
        row["scope_score"] = None if res is None else res["scope_score"]
        if self.meta.lungs is not None:  # a column only for a model that carries a lung segmenter
            row["lung_fields"] = None if res is None else res["lung_fields"]
        row["error"] = error
        return row

    def torch_model(self):
        """The PyTorch network (for Grad-CAM): this one, or for the ONNX backend the checkpoint it was
        exported from (checked by sha256) when the run folder still holds it.

        Raises:
            CheckpointError: an ONNX model whose checkpoint is not available.
        """
        if self.backend == "torch":
            return self.model
        from covid_cxr.imaging.images import sha256_file
        from covid_cxr.model.checkpoint import load_model

        want = (self.onnx.export.get("source_checkpoint") or {}).get("sha256")
        for cand in (self.source.parent / "best.pt", self.source.parent / "last.pt"):
            if cand.is_file() and sha256_file(cand) == want:
                model, _ = load_model(cand, self.device if self.device != "cpu" else "cpu")
                return model
        if formats.is_hf_folder(self.source.parent):  # an hf export: its safetensors come from the same checkpoint
            config = formats.read_hf_config(self.source.parent)
            if (config.get("source_checkpoint") or {}).get("sha256") == want:
                return formats.load_hf_model(self.source.parent, "cpu")[0]
        raise CheckpointError(f"heatmaps need the PyTorch checkpoint {self.source.name} was exported from "
                              f"(sha256 {str(want)[:12]}...), and it is not beside it; use --backend torch")

    def describe(self) -> str:
        return f"{self.source} ({self.backend}): {self.meta.describe()}"

    def __repr__(self) -> str:
        return f"Predictor({str(self.source)!r}, backend={self.backend!r}, labels={list(self.labels)})"

    # -- the Python API (covid_cxr.load_run) -----------------------------------------------------------
    def predict(self, images_or_paths: Any, batch_size: int = 16, progress: bool = False) -> list[Prediction]:
        """Predict image files (PNG, JPEG, DICOM; folders are searched), Pillow images or NumPy arrays.

        Args:
            images_or_paths: one image or a list of them (paths, ``PIL.Image``, (H, W) uint8 arrays; see
                :func:`covid_cxr.model.results.as_gray_image`).
            batch_size: images per forward pass (and decoded at a time).
            progress: show a progress bar.

        Returns:
            One :class:`~covid_cxr.model.results.Prediction` per image, in input order.

        Raises:
            ImageReadError: an unreadable file or an array that is not an image.
        """
        from tqdm.auto import tqdm

        items = expand_inputs(images_or_paths)
        out: list[Prediction] = []
        with tqdm(total=len(items), desc="predicting", unit="img", disable=not progress) as bar:
            for start, chunk in chunks(items, batch_size):
                decoded = [as_gray_image(item, start + i) for i, item in enumerate(chunk)]
                for (_, name), res in zip(decoded, self.predict_arrays([img for img, _ in decoded], batch_size)):
                    out.append(self._prediction(name, res))
                bar.update(len(chunk))
        return out

    def _prediction(self, name: str, res: dict) -> Prediction:
        meta = self.meta
        return Prediction(source=name, probabilities=res["probabilities"], label=res["label"],
                          threshold=meta.threshold, threshold_text=meta.threshold_text(),
                          positive_class=meta.positive, log_odds=res["log_odds"], in_scope=res["in_scope"],
                          scope_score=res["scope_score"], explanation=res["explanation"],
                          lung_fields=res.get("lung_fields"))

    def explain(self, images_or_paths: Any, target: str | int | None = None, out_dir: str | Path | None = None,
                layer: str | None = None, progress: bool = False) -> list[Explanation]:
        """Grad-CAM heatmaps (needs PyTorch; for the ONNX backend the checkpoint it was exported from).

        Args:
            images_or_paths: as for :meth:`predict`.
            target: class to explain (label or index); default the positive class.
            out_dir: also write ``<name>_gradcam.png`` overlays there.
            layer: a Grad-CAM layer of the architecture (default: the deepest with at least 7x7 cells).
            progress: show a progress bar.

        Grad-CAM attaches hooks to the model while it runs: do not explain with one predictor from several
        threads at once.

        Returns:
            One :class:`~covid_cxr.model.results.Explanation` per image (heatmap, display image, prediction).
        """
        from tqdm.auto import tqdm

        from covid_cxr.model.gradcam import caption_for, explain_array, overlay_png, resolve_target, unique_names

        if target is not None:
            resolve_target(self.meta, target)  # an unknown class fails before any work
        if self._cam_model is None:
            self._cam_model = self.torch_model()
        items = expand_inputs(images_or_paths)
        folder = Path(out_dir) if out_dir is not None else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        names = unique_names([Path(str(i)) if isinstance(i, (str, Path)) else Path(f"image-{n}")
                              for n, i in enumerate(items)])
        out = []
        synthetic = bool(self.meta.data and self.meta.data.synthetic)
        for i, item in enumerate(tqdm(items, desc="explaining", unit="img", disable=not progress)):
            image, name = as_gray_image(item, i)
            r = explain_array(self._cam_model, self.meta, image, target, layer, path=name)
            pred = self._prediction(name, self.predict_arrays([image])[0])
            png = None
            if folder is not None:
                png = str(folder / names[i])
                overlay_png(r["display"], r["heatmap"], png, caption_for(Path(name).name, self.meta, r["log_probs"],
                                                                         r["target"], pred.in_scope),
                            synthetic=synthetic)
            out.append(Explanation(source=name, heatmap=r["heatmap"], image=r["display"],
                                   target=self.labels[r["target"]], layer=r["layer"], prediction=pred,
                                   overlay_png=png))
        return out


def load_predictor(run: str | Path, backend: str = "torch", device: str = "auto", checkpoint: str = "best",
                   onnx_path: str | Path | None = None, threads: int | None = None) -> Predictor:
    """Load a model for inference.

    Args:
        run: a run folder, a checkpoint file, or (ONNX backend) an ``.onnx`` file.
        backend: ``torch`` (the checkpoint) or ``onnx`` (``RUN/model.onnx`` or ``onnx_path``, written by
            ``covid-cxr export``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        checkpoint: ``best`` or ``last`` (for a run folder).
        onnx_path: the ONNX file for the ONNX backend (default ``RUN/model.onnx``).
        threads: ONNX Runtime intra-op threads on CPU (default: all usable CPUs).

    Raises:
        CheckpointError, RunError: the model cannot be found or loaded (the message says how to make it).
    """
    if backend not in BACKENDS:
        raise CovidCxrError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onnx":
        p = Path(onnx_path) if onnx_path else Path(run)
        onnx_file = p if p.suffix == ".onnx" else RunDir(p).onnx
        if not onnx_file.is_file():
            raise CheckpointError(f"{onnx_file} not found; export the model first: covid-cxr export --run {run}")
        model = OnnxModel(onnx_file, device="cpu" if device == "cpu" else "auto", threads=threads)
        run_dir = RunDir(onnx_file.parent) if onnx_file.parent.joinpath("best.pt").exists() else None
        return Predictor(model.meta, "onnx", onnx_file, run_dir, onnx=model, device="cpu")
    from covid_cxr.model.checkpoint import load_model
    from covid_cxr.model.runtime import resolve_device

    run_dir, ckpt = locate_checkpoint(run, checkpoint)
    dev = resolve_device(device)
    model, meta = load_model(ckpt, dev)
    return Predictor(meta, "torch", ckpt, run_dir, model=model, device=dev)
