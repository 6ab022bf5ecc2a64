"""``train --lung-view crop|mask``: the classifier sees the lung fields' box (or only the lungs), cut from the
stage-1 image before its resize, by one pure function (:func:`covid_cxr.imaging.lung_masks.view_lungs`) that
training, evaluation, prediction (both backends) and Grad-CAM share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covid_cxr.imaging.lung_masks import LUNG_VIEWS, check_lungs, lung_box, resize_mask, view_lungs
from covid_cxr.imaging.phantoms import make_phantom_with_masks
from covid_cxr.imaging.pixels import PreprocessSpec, geometry, pixels_and_lungs, shrink_short_side, stage2


def _phantom(seed: int = 0, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    p = make_phantom_with_masks("covid", size, np.random.default_rng(seed))
    return p["image"], p["lung_mask"]


def test_the_crop_holds_every_lung_pixel_with_its_margin_and_nothing_far_outside() -> None:
    image, truth = _phantom()
    assert check_lungs(truth).plausible
    top, bottom, left, right = lung_box(truth, 0.0)
    rows, cols = np.flatnonzero(truth.any(1)), np.flatnonzero(truth.any(0))
    h, w = truth.shape
    assert (top, bottom, left, right) == (rows[0] / h, (rows[-1] + 1) / h, cols[0] / w, (cols[-1] + 1) / w)
    crop, check = view_lungs(image, truth, "crop", 0.1)
    assert check.plausible and crop.dtype == np.uint8
    # the box widened by 10 % of its size on each side, clipped to the frame (+1 px for rounding outward)
    bh, bw = (rows[-1] + 1 - rows[0]), (cols[-1] + 1 - cols[0])
    assert crop.shape[0] <= min(h, bh * 1.2 + 2) and crop.shape[1] <= min(w, bw * 1.2 + 2)
    assert crop.shape[0] >= bh and crop.shape[1] >= bw
    # a mask given at another resolution (the segmenter's square) selects the same region of the image
    small = resize_mask(truth, (48, 48))
    assert abs(view_lungs(image, small, "crop", 0.1)[0].shape[0] - crop.shape[0]) <= h / 48 * 2 + 1


def test_the_mask_view_blacks_out_what_lies_outside_the_grown_lungs() -> None:
    image, truth = _phantom(1)
    crop, _ = view_lungs(image, truth, "crop", 0.1)
    masked, _ = view_lungs(image, truth, "mask", 0.1)
    assert masked.shape == crop.shape
    outside = masked == 0
    assert outside.any() and (crop[~outside] == masked[~outside]).all()
    # nothing inside the lungs is blacked out (the phantoms' lungs are dark but never 0)
    top, _, left, _ = lung_box(truth, 0.1)
    y0, x0 = int(np.floor(top * truth.shape[0])), int(np.floor(left * truth.shape[1]))
    inside = truth[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]]
    assert (masked[inside] == crop[inside]).all()


def test_an_implausible_mask_crops_nothing_and_says_why() -> None:
    image, truth = _phantom(2)
    one_field = truth.copy()
    one_field[:, truth.shape[1] // 2:] = False
    for view in LUNG_VIEWS:
        out, check = view_lungs(image, one_field, view)
        assert out is image and not check.plausible and "one lung field" in check.reason
    with pytest.raises(ValueError, match="lung view must be one of"):
        view_lungs(image, truth, "lungs")


def test_the_spec_stores_the_view_and_old_specs_read_as_whole_image() -> None:
    spec = PreprocessSpec(size=32, lung_view="mask", lung_margin=0.05)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec and spec.needs_lungs
    assert "black outside the lungs" in spec.describe()
    old = {k: v for k, v in spec.to_dict().items() if not k.startswith("lung")}
    assert PreprocessSpec.from_dict(old).lung_view == "none" and not PreprocessSpec.from_dict(old).needs_lungs
    for bad in ({"lung_view": "lungs"}, {"lung_margin": 0.9}, {"lung_margin": True}):
        with pytest.raises(ValueError, match="lung_"):
            PreprocessSpec(size=32, **bad)
    image, _ = _phantom()
    with pytest.raises(ValueError, match="needs each image's lung mask"):
        geometry(image, spec)


class _TrueMasks:
    """A LungMasker that knows the phantoms' true lungs (by their pixels) and counts its calls."""

    def __init__(self, truths: dict[bytes, np.ndarray], size: int = 48):
        self.truths, self.size, self.key, self.calls = truths, size, "ab" * 8, 0

    def masks(self, images):
        self.calls += len(images)
        return np.stack([resize_mask(self.truths[np.asarray(img).tobytes()], (self.size, self.size))
                         for img in images])


def test_pixels_of_files_equal_the_pure_function_and_masks_are_segmented_once(tmp_path: Path) -> None:
    from PIL import Image

    from covid_cxr.imaging.cache import ImageCache, MaskCache
    from covid_cxr.imaging.images import load_image, sha256_file

    paths, truths = [], {}
    for i in range(5):
        image, truth = _phantom(10 + i, size=80)
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
        truths[shrink_short_side(image, 64).tobytes()] = truth
    spec = PreprocessSpec(size=32, base_short_side=64, lung_view="crop")
    shas = [sha256_file(p) for p in paths]
    masker = _TrueMasks(truths)
    cache = ImageCache(tmp_path / "cache", 64)
    store = MaskCache(tmp_path / "cache", masker.key, masker.size, 64)
    px, checks = pixels_and_lungs(paths, spec, shas, cache=cache, workers=1, lungs=masker, masks=store)
    assert masker.calls == 5 and all(c.plausible for c in checks)
    expected = [stage2(shrink_short_side(load_image(p), 64), spec, masker.masks([shrink_short_side(load_image(p),
                                                                                                   64)])[0])
                for p in paths]
    assert np.array_equal(px, np.stack([e[0] for e in expected]))
    # a second pass reads the stage-1 images and the masks from the cache: the same pixels, no segmentation
    masker.calls = 0
    again, checks2 = pixels_and_lungs(paths, spec, shas, cache=cache, workers=1, lungs=masker, masks=store)
    assert masker.calls == 0 and np.array_equal(again, px) and checks2 == checks
    # the crop is a different picture from the whole image squashed
    assert not np.array_equal(px, np.stack([geometry(load_image(p), PreprocessSpec(size=32, base_short_side=64))
                                            for p in paths]))
    with pytest.raises(ValueError, match="needs the model's lung segmenter"):
        pixels_and_lungs(paths, spec, shas, workers=1)


@pytest.mark.slow  # trains a classifier with a lung view and exports it: ~30 s on 2 cores
@pytest.mark.parametrize("view", ["crop", "mask"])
def test_training_evaluation_prediction_and_onnx_see_the_same_lung_view(phantom_dataset, phantom_segmenter,
                                                                        tmp_path, view) -> None:
    import torch

    from covid_cxr.data.dataset import read_dataset
    from covid_cxr.deploy.export import export_onnx
    from covid_cxr.evaluation.split import load_split
    from covid_cxr.imaging.images import load_image
    from covid_cxr.model.inference import load_predictor
    from covid_cxr.model.lungs import TorchLungMasker, load_segmenter
    from covid_cxr.training.options import TrainConfig
    from covid_cxr.training.train import run

    torch.manual_seed(0)
    out = tmp_path / "run"
    run(TrainConfig(data=str(phantom_dataset), out=str(out), epochs=1, image_size=32, batch_size=16, weights="none",
                    progress=False, lungs=str(phantom_segmenter), lung_view=view))
    torch_pred = load_predictor(out, "torch", "cpu")
    assert torch_pred.meta.preprocess.lung_view == view
    # training's pixels (the dataset, with the segmenter as train loads it)
    ds = read_dataset(phantom_dataset)
    rows = ds.rows("test")
    seg = load_segmenter(phantom_segmenter)
    train_px, train_checks = ds.pixels_and_lungs(rows, torch_pred.meta.preprocess,
                                                 lungs=TorchLungMasker(seg.model, "cpu", seg.checksum))
    # evaluation's, and prediction's from decoded files with either backend
    split = load_split(out, "test", device="cpu")
    images = [load_image(p) for p in rows["path"]]
    pred_px, pred_checks = torch_pred.pixels(images)
    export_onnx(out / "best.pt", out / "model.onnx")
    onnx_pred = load_predictor(out, "onnx", "cpu")
    onnx_px, onnx_checks = onnx_pred.pixels(images)
    assert np.array_equal(train_px, split.pixels) and np.array_equal(train_px, pred_px)
    assert np.array_equal(train_px, onnx_px)
    assert train_checks == split.lungs == pred_checks == onnx_checks
    assert sum(c.plausible for c in train_checks) >= len(rows) * 0.9
    whole = ds.pixels(rows, PreprocessSpec.for_size(32))
    assert not np.array_equal(train_px, whole)  # the view is not the whole image
    # the same decisions and verdicts whichever backend, and a lung-view model refuses pixels without verdicts
    a, b = torch_pred.predict(images), onnx_pred.predict(images)
    assert [p.label for p in a] == [p.label for p in b] and [p.in_scope for p in a] == [p.in_scope for p in b]
    with pytest.raises(ValueError, match="come with each image's lung verdict"):
        torch_pred.outputs(pred_px)
    # Grad-CAM explains the view the model saw, shown on the same view of the image
    e = torch_pred.explain(images[:1])[0]
    assert e.heatmap.shape == e.image.shape and e.image.shape[0] < images[0].shape[0]
    # int8: the segmenter's nodes stay float32, so the int8 graph finds the same lungs and crops the same view
    # (the AUC bar is lifted: a one-epoch model's AUC on 24 test images says nothing about quantisation)
    from covid_cxr.deploy import export
    from covid_cxr.deploy.options import ExportConfig

    summary = export.run(ExportConfig(run=str(out), quantize="int8", max_auc_drop=1.0, calibration_images=16))
    assert summary["quantization"]["lung_fields_agree"] == 1.0
    int8 = load_predictor(out, "onnx", "cpu", onnx_path=out / "model.int8.onnx")
    int8_px, int8_checks = int8.pixels(images)
    assert np.array_equal(int8_px, train_px) and int8_checks == train_checks
    assert [p.in_scope for p in int8.predict(images)] == [p.in_scope for p in b] or not all(
        c.plausible for c in train_checks)  # lung verdicts are identical; the feature gate is quantised


def test_a_lung_view_needs_a_segmenter_at_training_and_at_prediction(tiny_run) -> None:
    from dataclasses import replace

    from covid_cxr.errors import CheckpointError, ConfigError
    from covid_cxr.model.inference import Predictor, load_predictor
    from covid_cxr.training.options import TrainConfig

    with pytest.raises(ConfigError, match="--lung-view crop needs --lungs"):
        TrainConfig(data="d", out="o", lung_view="crop")
    # the default ('auto'): the lung view measured best out of source when there is a segmenter, else the whole image
    from covid_cxr.training.options import DEFAULT_LUNG_VIEW

    assert TrainConfig(data="d", out="o").resolved_lung_view == "none"
    assert TrainConfig(data="d", out="o", lungs="lungs.pt").resolved_lung_view == DEFAULT_LUNG_VIEW != "none"
    assert TrainConfig(data="d", out="o", lungs="lungs.pt", lung_view="none").resolved_lung_view == "none"
    plain = load_predictor(tiny_run, "torch", "cpu")
    assert plain.lung_masker() is None and plain.pixels([_phantom()[0]])[1] is None
    meta = plain.meta.replace(preprocess=replace(plain.meta.preprocess, lung_view="crop"))
    # a lung-view model is written as meta format 3, which covid-cxr versions without lung views refuse ("upgrade")
    # instead of feeding it whole images; a model without one keeps format 2
    from covid_cxr.model.meta import META_FORMAT, ModelMeta

    assert plain.meta.to_dict()["format"] == 2 and meta.to_dict()["format"] == META_FORMAT == 3
    assert ModelMeta.from_dict(meta.to_dict()).preprocess.lung_view == "crop"
    with pytest.raises(CheckpointError, match="newer covid-cxr"):
        ModelMeta.from_dict({**meta.to_dict(), "format": META_FORMAT + 1})
    with pytest.raises(CheckpointError, match="carries no lung segmenter.*--resume"):
        Predictor(meta, "torch", tiny_run / "last.pt", None, model=plain.model)


def test_masks_that_cannot_be_kept_are_computed_again_not_an_error(tmp_path: Path, caplog, monkeypatch) -> None:
    """A dataset cache on a read-only disk (atomic_write's OutputError, as root cannot be denied a write here)."""
    from covid_cxr.errors import OutputError
    from covid_cxr.imaging import cache as cache_module
    from covid_cxr.imaging.cache import MaskCache

    def read_only(path, data):
        import errno

        raise OutputError(errno.EROFS, "Read-only file system", str(path), f"cannot write {path}: read-only")

    with monkeypatch.context() as m:
        m.setattr(cache_module, "atomic_write", read_only)
        store = MaskCache(tmp_path / "ro", "ab" * 8, 16)
        store.put("0" * 64, np.ones((16, 16), bool))  # no error: logged once
        store.put("1" * 64, np.ones((16, 16), bool))
        assert store.get("0" * 64) is None
    assert sum("cannot be kept" in r.getMessage() for r in caplog.records) == 1
    ok = MaskCache(tmp_path / "cache", "ab" * 8, 16)
    mask = np.random.default_rng(0).random((16, 16)) > 0.5
    ok.put("2" * 64, mask)
    assert np.array_equal(ok.get("2" * 64), mask)
    with pytest.raises(ValueError, match="hex checksum"):
        MaskCache(tmp_path, "../../etc", 16)


def test_the_model_card_says_what_a_carried_segmenter_turns_away(tiny_run) -> None:
    from dataclasses import replace

    from covid_cxr.deploy.modelcard import model_card
    from covid_cxr.model.inference import load_predictor
    from covid_cxr.model.meta import LungUse

    meta = load_predictor(tiny_run, "torch", "cpu").meta
    assert "Lung fields" not in model_card(meta, None, "not evaluated", "m", False)
    lungs = meta.replace(lungs=LungUse(width=8, size=64, dice=0.977))
    card = model_card(lungs, None, "not evaluated", "m", False)
    assert "Dice 0.977" in card and "out of scope" in card and "lung view" not in card
    view = lungs.replace(preprocess=replace(meta.preprocess, lung_view="mask"))
    card = model_card(view, None, "not evaluated", "m", False)
    assert "sees only the mask lung view" in card and "black outside the lungs" in card
