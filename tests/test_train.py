"""Training loop: resume equivalence, run-folder safety, frozen backbone, sampling, augmentation, learning."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from covid_cxr.config import ConfigError
from covid_cxr.data.options import DataConfig
from covid_cxr.errors import CheckpointError, RunError
from covid_cxr.evaluation.options import EvalConfig
from covid_cxr.files import RunLock
from covid_cxr.imaging.augment import AugmentSpec, augment
from covid_cxr.imaging.pixels import PreprocessSpec, finish
from covid_cxr.model.checkpoint import read_checkpoint
from covid_cxr.training import loop as loop_mod
from covid_cxr.training import train as train_mod
from covid_cxr.training.loaders import EpochSampler, StackDataset, sample_seed
from covid_cxr.training.options import TrainConfig


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A built dataset of 16 phantoms per class at 32 px (about 22 train, 6 val, 4 test images): enough to
    exercise the training loop in a few seconds."""
    from covid_cxr.data.manifest import build
    from covid_cxr.imaging.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("small")
    src = root / "synthetic-phantoms"
    generate_phantoms(src, 16, size=32, seed=5)
    out = root / "dataset"
    build(DataConfig(sources=(("folder", str(src)),), out=str(out), test_per_class=2, val_fraction=0.2,
                     train_size=200, seed=0, workers=1, progress=False, dedup=False))
    return out


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), epochs=2, image_size=32, batch_size=8, weights="none",
                progress=False, patience=0)
    base.update(kw)
    return TrainConfig(**base)


def _state(path):
    return read_checkpoint(path).state_dict  # checksum verified


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(small_dataset, tmp_path, monkeypatch):
    """Interrupted during epoch 2 and resumed: bit-identical weights and the same losses as an uninterrupted
    run. The runs use different DataLoader worker counts (0 and 1): results depend on (seed, epoch, index) only.
    Calibration and the gate (after the last epoch) are tested elsewhere and skipped here to keep this cheap."""
    monkeypatch.setattr(train_mod, "finalize", lambda *args, **kwargs: {})
    full = tmp_path / "full"
    train_mod.run(_cfg(small_dataset, full, workers=0))

    real = loop_mod.train_one_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the machine goes down during epoch 2
        return real(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(loop_mod, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mod.run(_cfg(small_dataset, part, workers=1))
    last = read_checkpoint(part / "last.pt")
    assert last.meta.epoch == 1 and last.training["train_state"]["epoch"] == 1
    monkeypatch.setattr(loop_mod, "train_one_epoch", real)
    train_mod.run(_cfg(small_dataset, part, resume=True, workers=0))
    assert calls["n"] == 2

    for name in ("last.pt", "best.pt"):
        a, b = _state(full / name), _state(part / name)
        assert a.keys() == b.keys()
        for k in a:  # bit for bit: one machine, one process, the same batches, kernels and thread count (conftest)
            assert torch.equal(a[k], b[k]), (name, k)
    assert read_checkpoint(part / "last.pt").meta.epoch == 2
    lines_full = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lines_part = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines_part] == [1, 2]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_auc", "lr", "best_epoch"):
        assert [x[key] for x in lines_full] == [x[key] for x in lines_part], key


def test_run_folder_is_never_overwritten_and_resume_checks_options(small_dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_mod.run(_cfg(small_dataset, out, epochs=1))
    before = (out / "last.pt").read_bytes()
    with pytest.raises(RunError, match="already holds a run"):
        train_mod.run(_cfg(small_dataset, out, epochs=1))
    with pytest.raises(RunError, match="options differ") as err:
        train_mod.run(_cfg(small_dataset, out, epochs=1, lr=0.5, resume=True))
    assert "--lr was 0.001, now 0.5" in str(err.value)
    with pytest.raises(RunError, match="--image-size was 32, now 64"):
        train_mod.run(_cfg(small_dataset, out, epochs=1, image_size=64, resume=True))
    assert (out / "last.pt").read_bytes() == before
    with pytest.raises(CheckpointError, match="not found"):
        train_mod.run(_cfg(small_dataset, tmp_path / "new", resume=True))

    # The same run spelled relative to another working directory is the same run: resume accepts it
    # (no epochs are left, so it only calibrates again).
    monkeypatch.chdir(tmp_path)
    rel_data = os.path.relpath(small_dataset, tmp_path)
    assert not os.path.isabs(rel_data)
    summary = train_mod.run(_cfg(rel_data, "run", epochs=1, resume=True, workers=0))  # workers may differ
    assert summary["epochs_run"] == 1
    assert (out / "last.pt").read_bytes() == before


def test_resume_refuses_a_last_checkpoint_without_training_state(small_dataset, tmp_path):
    out = tmp_path / "run"
    train_mod.run(_cfg(small_dataset, out, epochs=1))
    shutil.copyfile(out / "best.pt", out / "last.pt")  # a valid checkpoint, but not one --resume can continue
    with pytest.raises(CheckpointError, match="holds no training state") as err:
        train_mod.run(_cfg(small_dataset, out, epochs=2, resume=True))
    assert str(out / "last.pt") in str(err.value)


def test_a_locked_run_folder_is_refused(small_dataset, tmp_path):
    out = tmp_path / "run"
    with RunLock(out / ".lock"):  # another process is training into this folder
        with pytest.raises(RunError, match="in use"):
            train_mod.run(_cfg(small_dataset, out, epochs=1))
        assert not (out / "config.yaml").exists() and not (out / "last.pt").exists()
    train_mod.run(_cfg(small_dataset, out, epochs=1))  # free again once the lock is released
    with RunLock(out / ".lock"):  # and training released it when it finished
        pass


def test_run_outputs_describe_themselves(small_dataset, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="covid_cxr.training.train"):
        summary = train_mod.run(_cfg(small_dataset, out, epochs=2))
    steps = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("finalize ")]
    assert steps == [f"finalize {k}/4" for k in range(1, 5)]  # no silent stage after the last epoch
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["image_size"] == 32 and cfg["lr"] == pytest.approx(1e-3) and cfg["labels"] == ["normal", "covid"]
    assert cfg["positive"] == "covid" and cfg["preprocess"]["size"] == 32
    assert cfg["out"] == "." and not os.path.isabs(cfg["data"])  # the run folder can move with its dataset
    assert (out / cfg["data"]).resolve() == small_dataset.resolve()
    assert cfg["data_absolute"] == str(small_dataset.resolve())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert {"train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "epoch_seconds"} <= lines[0].keys()
    best = read_checkpoint(out / "best.pt")
    assert best.meta.epoch == summary["best_epoch"]
    assert best.meta.preprocess.size == 32 and best.meta.labels == ("normal", "covid")
    assert best.meta.positive == "covid" and best.meta.data.synthetic and best.meta.data.n_train > 0
    assert best.training is None  # only last.pt carries the training state
    assert best.meta.training == {k: v for k, v in cfg.items() if k not in ("labels", "positive", "preprocess")}
    assert best.meta.calibration is not None and best.meta.gate is not None  # fitted after training
    assert best.meta.temperature == summary["temperature"] and best.meta.threshold == summary["threshold"]
    last = read_checkpoint(out / "last.pt")
    assert "optimizer" in last.training and last.meta.gate is None and last.meta.epoch == 2
    assert summary["threshold_text"] == best.meta.threshold_text()
    assert summary["calibration_status"] == best.meta.calibration.status
    text = train_mod.format_summary(summary)
    assert summary["threshold_text"] in text and summary["best_checkpoint"] in text
    assert train_mod.read_metrics(train_mod.RunDir(out)) == lines
    assert (out / "calibration.json").is_file() and (out / "learning_curves.png").is_file()
    assert not list(out.glob(".*tmp*"))


def test_freeze_backbone_trains_only_the_head(small_dataset, tmp_path):
    torch.manual_seed(0)
    from covid_cxr.model.networks import build_model

    init = build_model(["normal", "covid"], weights=None).state_dict()
    out = tmp_path / "frozen"
    train_mod.run(_cfg(small_dataset, out, epochs=1, freeze_backbone=True, seed=0))
    after = _state(out / "last.pt")
    assert after.keys() == init.keys()
    changed = [k for k in after if not torch.equal(after[k], init[k])]
    assert changed and all(k.startswith("head.") for k in changed)


def test_train_with_imagenet_weights_from_torch_home(small_dataset, tmp_path, monkeypatch):
    """--weights imagenet loads torchvision's cached file offline; with a frozen backbone the trained
    checkpoint still holds exactly the file's backbone tensors."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(42)
    state = torchvision.models.densenet121(weights=None).state_dict()
    path = tmp_path / "torch" / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    out = tmp_path / "run"
    train_mod.run(_cfg(small_dataset, out, epochs=1, weights="imagenet", freeze_backbone=True))
    after = _state(out / "last.pt")
    for k, v in state.items():
        if not k.startswith("classifier."):
            assert torch.equal(after["net." + k], v), k
    assert after["head.weight"].shape == (2, 1024)
    assert read_checkpoint(out / "best.pt").meta.training["weights"] == "imagenet"


def test_warmup_cosine_schedule():
    f = loop_mod.warmup_cosine(total_steps=100, warmup_steps=10)
    # float64 arithmetic and cos() of a few operations: ~1e-16 off (approx: rel 1e-6, abs 1e-12 at 0)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_reverse_gradient_is_identity_forward_and_reversed_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = loop_mod.reverse_gradient(x, 0.5)  # exact below: scaling small integers by -0.5 and -2 is exact in binary
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -0.5))
    x.grad = None
    (loop_mod.reverse_gradient(x, 2.0) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-2.0, -4.0, -6.0]))
    # the DANN ramp 2 / (1 + exp(-10 p)) - 1: 0 at p = 0, 0.99991 at p = 1
    assert loop_mod.adversary_weight(1.0, 0.0) == 0.0 and 0.99 < loop_mod.adversary_weight(1.0, 1.0) <= 1.0


def test_source_adversary_pushes_features_against_its_own_gradient():
    torch.manual_seed(0)
    adv = loop_mod.SourceAdversary(feature_dim=8, n_sources=3, hidden=4)
    f = torch.randn(5, 8, requires_grad=True)
    src = torch.tensor([0, 1, 2, 0, 1])
    torch.nn.functional.cross_entropy(adv(f, 1.0), src).backward()
    reversed_grad = f.grad.clone()
    f.grad = None
    torch.nn.functional.cross_entropy(adv.net(f), src).backward()  # the same head without the reversal
    assert torch.allclose(reversed_grad, -f.grad)  # exact: the same backward, times -1.0


def test_validation_metrics_on_saturated_logits():
    logits = np.array([[0.0, 40.0], [0.0, 45.0], [30.0, 0.0]], dtype=np.float32)
    m = loop_mod.validation_metrics(logits, np.array([0, 1, 0]), 1)
    assert m["auc"] == 1.0  # log-odds keep 40 and 45 apart; float32 probabilities would tie them
    assert m["accuracy"] == pytest.approx(2 / 3)
    # (40 + log(1 + e^-40) + log(1 + e^-45) + log(1 + e^-30)) / 3 = 40/3 + 3e-14; float32 rounding would be 1e-7
    assert np.isfinite(m["loss"]) and m["loss"] == pytest.approx(40.0 / 3, rel=1e-6)


def test_epoch_sampler_shards_and_reproducibility():
    targets = np.array([0] * 30 + [1] * 7)
    shards = [list(EpochSampler(targets, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 19
    assert set(shards[0]) | set(shards[1]) == set(range(37))
    s = EpochSampler(targets, seed=1)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(2)
    assert list(s) != e1
    s.set_epoch(1)
    assert list(s) == e1
    bal = EpochSampler(targets, seed=0, strata=targets)
    drawn = targets[list(bal)]
    bal.set_epoch(5)
    drawn = np.concatenate([drawn, targets[list(bal)]])
    # classes drawn about equally despite 30:7: 74 balanced draws have mean 0.5 +- 0.058 (0.514 for this seed, the
    # same on every CPU); 0.2 is 3.4 sd, and unbalanced draws would give 7/37 = 0.19
    assert 0.3 < drawn.mean() < 0.7
    assert list(EpochSampler(targets, seed=0, shuffle=False)) == list(range(37))


def test_epoch_sampler_balances_source_by_class_strata():
    sources = np.array(["a"] * 40 + ["b"] * 10 + ["a"] * 5 + ["b"] * 5)
    targets = np.array([0] * 50 + [1] * 10)
    strata = np.char.add(np.char.add(sources, "|"), targets.astype(str))
    s = EpochSampler(targets, seed=3, strata=strata)
    drawn = []
    for epoch in range(20):
        s.set_epoch(epoch)
        drawn.extend(s)
    counts = {k: int((strata[drawn] == k).sum()) for k in ("a|0", "b|0", "a|1", "b|1")}
    # 1200 draws, 1/4 each: sd sqrt(0.25 x 0.75 / 1200) = 0.0125, so 0.05 is 4 sd (0.234-0.259 for this seed);
    # source-blind sampling would give a|0 40/60 = 0.67
    assert all(0.2 < c / len(drawn) < 0.3 for c in counts.values()), counts


def test_augmentation_depends_only_on_seed_epoch_and_index():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
    spec = PreprocessSpec(size=32)
    ds = StackDataset(images, np.array([0, 1, 0, 1]), spec, AugmentSpec(), seed=3)
    ds.set_epoch(1)
    a = ds[2][0]
    ds2 = StackDataset(images, np.array([0, 1, 0, 1]), spec, AugmentSpec(), seed=3)
    ds2.set_epoch(1)
    assert torch.equal(a, ds2[2][0])
    ds2.set_epoch(2)
    assert not torch.equal(a, ds2[2][0])
    plain = StackDataset(images, np.array([0, 1, 0, 1]), spec)
    assert plain[2][0].shape == (3, 32, 32) and not torch.equal(a, plain[2][0])
    assert np.array_equal(plain[2][0].numpy(), finish(images[2], spec))  # exactly the inference input
    # the dataset's augmentation is covid_cxr.imaging.augment.augment with a generator seeded by (seed, epoch, index)
    g = torch.Generator().manual_seed(sample_seed(3, 1, 2))
    assert np.array_equal(a.numpy(), finish(augment(images[2], AugmentSpec(), g), spec))
    assert ds[2][1:] == (0, 2)


def test_augment_is_a_pure_function_of_the_generator():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    keep = img.copy()
    for spec in (AugmentSpec(), AugmentSpec(acquisition=True)):
        a = augment(img, spec, torch.Generator().manual_seed(7))
        b = augment(torch.from_numpy(img), spec, torch.Generator().manual_seed(7))  # a uint8 tensor is accepted
        assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == (32, 32)
        assert np.array_equal(a, b)
        assert not np.array_equal(a, augment(img, spec, torch.Generator().manual_seed(8)))
    assert np.array_equal(img, keep)  # input untouched
    with pytest.raises(ValueError, match="uint8"):
        augment(img.astype(np.float32), AugmentSpec(), torch.Generator())


def test_config_checks():
    with pytest.raises(ConfigError, match="--weights"):
        TrainConfig(data="d", out="o", weights="/no/such/file.pth")
    with pytest.raises(ConfigError):
        TrainConfig(data="d", out="o", image_size=8)
    assert TrainConfig(data="d", out="o").lr == 1e-4
    assert TrainConfig(data="d", out="o", weights="none").lr == 1e-3
    with pytest.raises(TypeError):
        TrainConfig("d", "o")  # keyword-only: positional options cannot be mixed up
    with pytest.raises(ConfigError):
        DataConfig(sources=(), out="x")
    with pytest.raises(ConfigError, match="--split"):
        EvalConfig(run="r", split="holdout")
    with pytest.raises(ConfigError, match="--balance"):  # choices are checked in Python, not only on the CLI
        TrainConfig(data="d", out="o", balance="classes")
    from covid_cxr.config import make_config

    with pytest.raises(ConfigError, match="--split"):
        make_config(EvalConfig, {"run": "r", "split": "holdout"})


@pytest.mark.slow
def test_learns_phantoms_from_scratch(learned_phantom_run):
    """Training from scratch reaches >= 0.9 accuracy on held-out phantoms. Statistical, not rounding (the model a
    CPU trains is its own): a model that learned the lesions is right on nearly all of the 80 images, and 0.9 is 8
    wrong; the binomial sd at 0.97 is 0.019, so 0.9 is 3.7 sd below."""
    from covid_cxr.evaluation import evaluate

    result = evaluate.run(EvalConfig(run=str(learned_phantom_run), bootstrap=0))
    assert result["protocol"]["images"] == 80
    assert result["metrics"]["accuracy"] >= 0.9, result["classification_report"]


def _same_weights(a_path, b_path) -> None:
    a, b = _state(a_path), _state(b_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_run_interrupted_before_its_first_last_checkpoint_can_be_resumed(small_dataset, tmp_path, monkeypatch):
    """Killed (or out of disk) after best.pt but before last.pt of epoch 1: the folder used to be neither resumable
    (no last.pt) nor restartable (a best.pt). Now --resume starts it again, to the same weights."""
    monkeypatch.setattr(train_mod, "finalize", lambda *args, **kwargs: {})
    full = tmp_path / "full"
    train_mod.run(_cfg(small_dataset, full, workers=0))
    part = tmp_path / "part"
    train_mod.run(_cfg(small_dataset, part, workers=0))
    (part / "last.pt").unlink()  # what the interruption leaves: config.yaml, metrics.jsonl, best.pt
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # and, from an older version, half a line
    with pytest.raises(RunError, match="interrupted during its first epoch; pass --resume"):
        train_mod.run(_cfg(small_dataset, part, workers=0))
    with pytest.raises(RunError, match="--lr was 0.001, now 0.5"):  # options are still checked (from config.yaml)
        train_mod.run(_cfg(small_dataset, part, workers=0, lr=0.5, resume=True))
    summary = train_mod.run(_cfg(small_dataset, part, workers=0, resume=True))
    assert summary["epochs_run"] == 2
    for name in ("best.pt", "last.pt"):
        _same_weights(full / name, part / name)
    assert [json.loads(x)["epoch"] for x in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(CheckpointError, match="not found; start the run without --resume"):  # nothing started here
        train_mod.run(_cfg(small_dataset, tmp_path / "never-started", resume=True))
    (tmp_path / "copied").mkdir()
    shutil.copyfile(full / "best.pt", tmp_path / "copied" / "best.pt")
    with pytest.raises(RunError, match="already holds a model"):
        train_mod.run(_cfg(small_dataset, tmp_path / "copied"))


def test_resume_drops_damaged_metric_lines_and_stale_temporary_files(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "finalize", lambda *args, **kwargs: {})
    out = tmp_path / "run"
    train_mod.run(_cfg(small_dataset, out, epochs=1, workers=0))
    stale = [out / ".last.pt.tmp-999999-deadbeef", out / ".metrics.jsonl.tmp-1-00000000"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)  # what kill -9 during a write leaves
    with open(out / "metrics.jsonl", "a") as f:
        f.write("garbage\n")
    assert [r["epoch"] for r in train_mod.read_metrics(train_mod.RunDir(out))] == [1]  # read despite the damage
    train_mod.run(_cfg(small_dataset, out, epochs=1, workers=0, resume=True))
    assert not any(p.exists() for p in stale)
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_the_same_out_spelled_relative_or_absolute_is_the_same_run(small_dataset, tmp_path, monkeypatch, capsys):
    """`--out ./C/int` and its absolute spelling (and the dataset likewise) are the same run to --resume."""
    from covid_cxr.cli import main

    monkeypatch.setattr(train_mod, "finalize", lambda *args, **kwargs: {"threshold_text": "P(covid) >= 0.5",
                                                                         "temperature": 1.0,
                                                                         "calibration_status": "skipped"})
    monkeypatch.chdir(tmp_path)
    base = ["train", "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--weights", "none", "--patience",
            "0", "--no-progress", "--workers", "0"]
    assert main(base + ["--data", str(small_dataset), "--out", "./C/int"]) == 0
    rel_data = os.path.relpath(small_dataset, tmp_path)
    assert main(base + ["--data", rel_data, "--out", str(tmp_path / "C" / "int"), "--resume"]) == 0
    assert main(base + ["--data", "./" + rel_data, "--out", "C/./int/", "--resume"]) == 0
    assert "options differ" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- --compile

def test_compile_setting_auto_is_cuda_only_and_on_refuses_where_unavailable(monkeypatch, caplog):
    from covid_cxr.model import runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(runtime, "compile_unavailable", lambda device: None)
    assert [runtime.use_compile(s, cpu) for s in ("auto", "on", "off")] == [False, True, False]
    assert [runtime.use_compile(s, cuda) for s in ("auto", "on", "off")] == [True, True, False]
    monkeypatch.setattr(runtime, "compile_unavailable", lambda device: "no Triton here")
    assert runtime.use_compile("auto", cuda) is False  # falls back to eager mode, with a warning
    assert "no Triton here" in caplog.text
    with pytest.raises(ConfigError, match="--compile on: no Triton here.*--compile off"):
        runtime.use_compile("on", cpu)
    with pytest.raises(ConfigError, match="--compile"):
        TrainConfig(data="d", out="o", compile="yes")


def test_checkpoint_of_a_compiled_model_has_the_plain_key_names(tmp_path):
    """save_checkpoint writes the module inside torch.compile (and DDP): no `_orig_mod.` prefix, and the
    checkpoint loads strictly into a fresh model. (torch.compile is lazy: nothing is compiled here.)"""
    from covid_cxr.model.checkpoint import model_from_checkpoint, new_meta, save_checkpoint
    from covid_cxr.model.networks import build_model

    if not hasattr(torch, "compile"):
        pytest.skip(f"torch {torch.__version__} has no torch.compile")
    torch.manual_seed(0)
    model = build_model(["normal", "covid"], arch="resnet18", weights=None)
    compiled = torch.compile(model)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())  # what a naive save would write
    meta = new_meta("resnet18", ("normal", "covid"), "covid", PreprocessSpec.for_size(32), {}, None)
    save_checkpoint(tmp_path / "c.pt", compiled, meta)
    ckpt = read_checkpoint(tmp_path / "c.pt")
    assert list(ckpt.state_dict) == list(model.state_dict())
    loaded = model_from_checkpoint(ckpt, torch.device("cpu"))  # strict load
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_compile_on_trains_the_compiled_model_and_saves_plain_keys(small_dataset, tmp_path, monkeypatch):
    """--compile on wraps the training model in torch.compile (here with the 'eager' backend, which traces with
    TorchDynamo but skips Inductor's minutes of code generation); last.pt and best.pt keep the plain keys, and
    --resume may change --compile."""
    if not hasattr(torch, "compile"):
        pytest.skip(f"torch {torch.__version__} has no torch.compile")
    from torch import _dynamo

    monkeypatch.setattr(train_mod, "finalize", lambda *args, **kwargs: {})
    monkeypatch.setattr("covid_cxr.model.runtime.compile_unavailable", lambda device: None)
    real, calls = torch.compile, []

    def eager_compile(model, **kw):
        calls.append(type(model).__name__)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    _dynamo.reset()
    out = tmp_path / "run"
    train_mod.run(_cfg(small_dataset, out, epochs=1, workers=0, arch="resnet18", compile="on"))
    assert calls == ["CxrNet"]
    plain = list(train_mod.build_model(["normal", "covid"], arch="resnet18", weights=None).state_dict())
    for name in ("last.pt", "best.pt"):
        assert list(_state(out / name)) == plain
    summary = train_mod.run(_cfg(small_dataset, out, epochs=1, workers=0, arch="resnet18", compile="off",
                                 resume=True))  # no "options differ": --compile does not change the model
    assert summary["epochs_run"] == 1 and calls == ["CxrNet"]


@pytest.mark.slow
def test_compile_on_cpu_with_inductor(small_dataset, tmp_path, monkeypatch):
    """The real thing: Inductor compiles the training step on CPU (about a minute on 2 cores)."""
    from covid_cxr.model.runtime import compile_unavailable

    reason = compile_unavailable(torch.device("cpu"))
    if reason:
        pytest.skip(f"torch.compile unavailable: {reason}")
    monkeypatch.setattr(train_mod, "finalize", lambda *args, **kwargs: {})
    out = tmp_path / "run"
    train_mod.run(_cfg(small_dataset, out, epochs=1, workers=0, arch="resnet18", compile="on"))
    record = json.loads((out / "metrics.jsonl").read_text())
    assert np.isfinite(record["train_loss"])
    assert not any(k.startswith("_orig_mod.") for k in _state(out / "last.pt"))


def test_augmentation_on_the_device_is_independent_of_loader_workers(small_dataset, tmp_path, monkeypatch, caplog):
    """--augment-on device (tested here on the CPU device): loader workers only hand over pixels, the batch is
    augmented in the training process; 0 and 2 workers give bit-identical weights, and the weights differ from
    augmentation in the workers (another implementation of the same draws)."""

    monkeypatch.setattr(train_mod, "finalize", lambda *args, **kwargs: {})
    caplog.set_level(logging.INFO, logger="covid_cxr.training.train")
    runs = {}
    for name, kw in {"device-0": dict(augment_on="device", workers=0), "device-2": dict(augment_on="device", workers=2),
                     "workers": dict(augment_on="workers", workers=0)}.items():
        train_mod.run(_cfg(small_dataset, tmp_path / name, epochs=1, **kw))
        runs[name] = _state(tmp_path / name / "last.pt")
    assert "augmentation: batched on cpu" in caplog.text
    assert "augmentation: image by image in the loader workers" in caplog.text
    for k in runs["device-0"]:  # bit for bit: the workers hand over uint8 pixels only; training is in this process
        assert torch.equal(runs["device-0"][k], runs["device-2"][k]), k
    assert any(not torch.equal(runs["device-0"][k], runs["workers"][k]) for k in runs["workers"]
               if runs["workers"][k].is_floating_point())


def test_augment_location_auto_is_the_gpu():
    assert train_mod.augment_location("auto", torch.device("cuda", 0)) == "device"
    assert train_mod.augment_location("auto", torch.device("cpu")) == "workers"
    assert train_mod.augment_location("device", torch.device("cpu")) == "device"
    assert train_mod.loader_workers(None, torch.device("cuda", 0), augmenting=False) <= 2
    assert train_mod.loader_workers(3, torch.device("cuda", 0), augmenting=False) == 3
