"""``covid-cxr calibrate``: refit a run's temperature and decision threshold on a hospital's own images and write
them into a NEW run folder (the run given is never changed). See docs/local-validation.md.

The fit is training's own (:func:`covid_cxr.evaluation.calibration.calibrate`: temperature by NLL, then the
threshold by the model's rule, its target sensitivity by default), on the images of ``--data`` instead of the
validation split. ``--data`` must be images the model was not trained on, by the rule local validation uses
(:func:`covid_cxr.evaluation.local.locality`: not the training dataset's folder, no training source): training
already fitted both on its validation split, and a refit on the training data passes for a local one. Only
``--allow-training-data`` lets it through (and the record says so). The new folder holds:

* ``best.pt``: the same weights (gate and lung segmenter included) with the new temperature, threshold and
  :class:`~covid_cxr.model.meta.Calibration`, and ``ModelMeta.recalibration`` recording what was done (dataset,
  split, images, patients, a fingerprint of each image, old and new values, date, and that metrics on those images
  are now optimistic); written by the one checkpoint writer (self-describing, checksummed);
* ``calibration.json`` (the new fit) and ``recalibration.png`` (reliability on these images before and after);
* ``config.yaml`` (the training options, dataset paths re-pointed from the new folder), ``metrics.jsonl`` and
  ``learning_curves.png`` (the training history: the weights are unchanged).

Everything else of the old run was made from the old temperature and threshold (``model.onnx``, ``model.json``,
int8 graphs, exported folders, ``eval-*``, ``audit-*``, ``report.html``) or is training state (``last.pt``: resuming
it would train again and undo the recalibration): it is left out and named in the result, with the commands that
make it again.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.errors import CalibrationError, OutputError, RunError
from covid_cxr.evaluation.calibration import (THRESHOLD_RULES, calibrate, expected_calibration_error,
                                              reliability_diagram_png)
from covid_cxr.evaluation.local import FINGERPRINT_DIGITS, locality
from covid_cxr.evaluation.metrics import MIN_PER_CLASS, headline_metrics
from covid_cxr.evaluation.options import CalibrateConfig
from covid_cxr.evaluation.split import ALL, SplitData, load_split
from covid_cxr.files import TEMP_MARK, relative_or_absolute, write_json, write_yaml
from covid_cxr.imaging.images import sha256_file
from covid_cxr.model.checkpoint import save_checkpoint
from covid_cxr.model.meta import ModelMeta, now
from covid_cxr.paths import RunDir, locate_checkpoint

log = logging.getLogger(__name__)

RECALIBRATION_PNG = "recalibration.png"
"""The reliability diagram of the images calibrated on, before and after, in the new run folder."""
CARRIED = ("metrics.jsonl", "learning_curves.png")
"""Files of the old run copied as they are: the training history, which the new temperature and threshold do not
change (config.yaml is carried too, its dataset paths re-pointed)."""
NOTE = ("the temperature and decision threshold were fitted on these images: sensitivity, specificity and calibration "
        "measured on them are now optimistic; measure the model on other images of the same hospital (a later period) "
        "for an honest number")


def _check_out(out: Path, run: RunDir) -> None:
    """``--out`` must be a new folder outside the run (calibrate never writes into ``--run``)."""
    target, root = out.resolve(), run.root.resolve()
    if target == root or root in target.parents:
        raise RunError(f"--out {out} is inside the run folder {run.root}; calibrate never changes --run: pass a new "
                       "folder beside it, e.g. --out runs/NAME-local")
    if out.exists() or out.is_symlink():
        raise RunError(f"--out {out} already exists; calibrate writes a new run folder and never overwrites one: "
                       "choose a new name")


def _check_local(d: SplitData, allowed: bool) -> dict:
    """:func:`~covid_cxr.evaluation.local.locality` of the data; refuses the model's training data unless
    ``allowed`` (--allow-training-data)."""
    where = locality(d)
    if where["local"]:
        return where
    if not allowed:
        raise CalibrationError(
            f"refusing to calibrate on {d.dataset.dir.root}: {where['why']}. calibrate refits the temperature and "
            "threshold on a hospital's own images; training already fitted them on its validation split, and a refit "
            "on its own data would later pass for a local one. Pass --data with images the model was not trained on "
            "(docs/local-validation.md), or --allow-training-data to refit on these anyway")
    log.warning("calibrating on the model's training data (--allow-training-data): %s", where["why"])
    return where


def _rule(cfg: CalibrateConfig, meta: ModelMeta) -> tuple[str, float]:
    """The threshold rule and target sensitivity: the options given, else the model's own."""
    cal = meta.calibration
    rule = cfg.threshold_rule or (cal.threshold_rule if cal and cal.threshold_rule in THRESHOLD_RULES else None) \
        or "sensitivity"
    target = cfg.target_sensitivity or (cal.target_sensitivity if cal else None)
    if rule == "sensitivity" and target is None and meta.binary:
        raise CalibrationError("the model records no target sensitivity (its threshold was not chosen by one): pass "
                               "--target-sensitivity (e.g. 0.95) or --threshold-rule youden")
    return rule, float(target) if target is not None else 1.0


def _check_counts(d: SplitData) -> dict[str, int]:
    """Images per class; refuses fewer than :data:`MIN_PER_CLASS` of any class."""
    labels = d.predictor.meta.labels
    counts = {lab: int((d.targets == i).sum()) for i, lab in enumerate(labels)}
    few = [f"{n} {lab}" for lab, n in counts.items() if n < MIN_PER_CLASS]
    if few:
        which = "every split" if d.split == ALL else f"the {d.split} split"
        raise CalibrationError(
            f"too few images to calibrate on in {d.dataset.dir.root} ({which}): "
            f"{' and '.join(few)} image(s), fewer than {MIN_PER_CLASS} of a class; a temperature and a threshold "
            f"fitted on so few would be noise. Collect at least {MIN_PER_CLASS} images of each class "
            f"({', '.join(labels)}), or use the model as it is")
    return counts


def _values(meta: ModelMeta, logits: np.ndarray, targets: np.ndarray) -> dict:
    """A model's temperature and threshold, and what they give on these images."""
    lp = meta.log_probs(logits)
    m = headline_metrics(targets, lp, meta.decide(lp), meta.positive_index)
    cal = meta.calibration
    return {"temperature": meta.temperature, "threshold": meta.threshold,
            "threshold_log_odds": meta.threshold_log_odds if meta.binary else None,
            "threshold_text": meta.threshold_text(), "threshold_rule": cal.threshold_rule if cal else "default 0.5",
            "target_sensitivity": cal.target_sensitivity if cal else None,
            "ece": expected_calibration_error(np.exp(lp), targets)["ece"],
            "sensitivity": m.get("sensitivity"), "specificity": m.get("specificity")}


def _estimate_from(meta: ModelMeta, run: RunDir, out: Path) -> dict | None:
    """The model's estimate with its crossval folder re-pointed from the new run folder."""
    est = meta.estimate
    if not est or not est.get("crossval") or Path(est["crossval"]).is_absolute():
        return est
    return {**est, "crossval": relative_or_absolute(run.root / est["crossval"], out)}


def _config(run: RunDir, out: Path) -> dict:
    """The run's training options with its dataset (and crossval) paths relative to the new folder."""
    opts = dict(run.training_options())
    for key in ("data", "estimate_from"):
        value = opts.get(key)
        if value and not Path(value).is_absolute():
            opts[key] = relative_or_absolute(run.root / value, out)
    return opts


def run(cfg: CalibrateConfig) -> dict:
    """Refit temperature and threshold on ``cfg.data`` and write the new run folder ``cfg.out``.

    Raises:
        RunError: ``--out`` exists or lies inside ``--run``. DatasetError: the dataset's classes are not the model's,
            or it is empty. CalibrationError: the model's training data (without --allow-training-data), fewer than
            :data:`MIN_PER_CLASS` images of a class, or no target sensitivity. ImageReadError: an unreadable image
            (never skipped).
    """
    run_dir, _ = locate_checkpoint(cfg.run, cfg.checkpoint)
    out = Path(cfg.out)
    _check_out(out, run_dir)
    d = load_split(cfg.run, cfg.split, cfg.data, cfg.checkpoint, cfg.device, cfg.workers, cfg.source_roots)
    where = _check_local(d, bool(cfg.allow_training_data))
    meta = d.predictor.meta
    counts = _check_counts(d)
    rule, target = _rule(cfg, meta)
    log.info("calibrating %s on %d images of %s (%s)", d.predictor.source, len(d.pixels), d.dataset.dir.root,
             ", ".join(f"{k} {v}" for k, v in counts.items()))
    logits = d.predictor.outputs(d.pixels, cfg.batch_size, lungs=d.lungs).logits
    targets = d.targets
    cal, threshold_lo, plot = calibrate(logits, targets, meta.positive_index if meta.binary else None, rule, target)
    fitted = meta.replace(temperature=cal.temperature, threshold_log_odds=threshold_lo, calibration=cal)
    record = {
        "dataset": str(d.dataset.dir.root.resolve()), "split": cfg.split,
        "sources": sorted(set(d.rows["source"])), "images": int(len(targets)),
        "patients": int(d.rows["group"].nunique()), "images_per_class": counts,
        "local": where["local"], "why": where["why"],
        "image_fingerprints": sorted({str(h)[:FINGERPRINT_DIGITS] for h in d.rows["sha256"] if h}),
        "from_run": str(run_dir.root.resolve()), "from_checkpoint": d.predictor.source.name,
        "from_sha256": sha256_file(d.predictor.source),
        "old": _values(meta, logits, targets), "new": _values(fitted, logits, targets),
        "date": now(), "note": NOTE, "previous": meta.recalibration, "covid_cxr_version": __version__,
    }
    new_meta = fitted.replace(recalibration=record, estimate=_estimate_from(meta, run_dir, out))
    left_out = _write_run(out, run_dir, d, new_meta, cal, plot, targets)
    for w in cal.warnings:
        log.warning("calibration: %s", w)
    return {"out": str(out), "recalibration": record, "warnings": list(cal.warnings), "left_out": left_out,
            "status": cal.status}


def _write_run(out: Path, run_dir: RunDir, d: SplitData, meta: ModelMeta, cal, plot: dict,
               targets: np.ndarray) -> list[str]:
    """Write the new run folder next to ``out`` under a temporary name and rename it into place (a crash leaves no
    half-written run folder under ``out``). Returns the old run's entries left out."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{TEMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    new = RunDir(tmp)
    try:
        save_checkpoint(new.best, d.predictor.model, meta)
        for name in CARRIED:
            if (run_dir.root / name).is_file():
                shutil.copy2(run_dir.root / name, tmp / name)
        opts = _config(run_dir, out)
        if opts:
            write_yaml(new.config, opts)
        write_json(new.calibration, {
            "split": d.split, "dataset": meta.recalibration["dataset"], "n": int(len(targets)),
            "calibration": cal.to_dict(), "threshold": meta.threshold, "threshold_log_odds": meta.threshold_log_odds,
            "threshold_text": meta.threshold_text(), "recalibration": meta.recalibration})
        old_t = meta.recalibration["old"]["temperature"]
        reliability_diagram_png(plot["probs_after"], targets, tmp / RECALIBRATION_PNG,
                                f"{d.dataset.dir.root.name}, temperature {old_t:.3g} -> {cal.temperature:.3g} "
                                f"({cal.status})", probs_before=plot["probs_before"],
                                mode="positive" if meta.binary and meta.positive_index == 1 else "top_label")
        os.rename(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(exc.errno, exc.strerror, exc.filename, f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kept = {"best.pt", "config.yaml", "calibration.json", *CARRIED}  # the first three are written anew
    return sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.root.iterdir()
                  if p.name not in kept and not p.name.startswith("."))


def format_summary(result: dict) -> str:
    """Old -> new values, what was left out and why, for the terminal."""
    r = result["recalibration"]
    old, new = r["old"], r["new"]

    def rate(v) -> str:
        return "n/a" if v is None or v != v else f"{v:.3f}"

    lines = [f"recalibrated {r['from_run']} ({r['from_checkpoint']}) on {r['images']} images of {r['patients']} "
             f"patients ({', '.join(f'{k} {v}' for k, v in r['images_per_class'].items())}) in {r['dataset']}",
             f"  temperature  {old['temperature']:.4g} -> {new['temperature']:.4g} ({result['status']})",
             f"  threshold    {old['threshold_text']} -> {new['threshold_text']}"
             + (f" (rule: {new['threshold_rule']}" + (f", target sensitivity {new['target_sensitivity']:g}"
                                                       if new.get("target_sensitivity") else "") + ")"),
             f"  on these images: ECE {rate(old['ece'])} -> {rate(new['ece'])}, sensitivity {rate(old['sensitivity'])} "
             f"-> {rate(new['sensitivity'])}, specificity {rate(old['specificity'])} -> {rate(new['specificity'])}"]
    if r.get("local") is False:
        lines.append(f"WARNING: calibrated on the model's training data (--allow-training-data): {r['why']}")
    lines += [f"WARNING: {w}" for w in result["warnings"]]
    lines.append(f"note: {r['note']}")
    lines.append(f"wrote {result['out']} (best.pt, calibration.json, {RECALIBRATION_PNG}); the run given was not "
                 "changed")
    if result["left_out"]:
        lines.append(f"left out, made from the old temperature and threshold or training state: "
                     f"{', '.join(result['left_out'])}. Make them again from the new run: covid-cxr export --run "
                     f"{result['out']} (model.onnx, model.json; --quantize int8), covid-cxr evaluate / report --run "
                     f"{result['out']}")
    lines.append(DISCLAIMER)
    return "\n".join(lines)
