"""The ``covid-cxr`` command: a thin layer that parses options, calls ``covid_cxr.<stage>.run`` and prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from covid_cxr import DISCLAIMER, __version__
from covid_cxr.config import PROTOCOLS, TASKS, DataConfig, EvalConfig, PredictConfig, TrainConfig, make_config
from covid_cxr.errors import CovidCxrError
from covid_cxr.sources import READERS

log = logging.getLogger("covid_cxr")

S = argparse.SUPPRESS  # options not given stay unset, so YAML and dataclass defaults apply


def _source(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    if name not in READERS:
        raise argparse.ArgumentTypeError(f"unknown source {name!r}; use one of {', '.join(READERS)}")
    return name, path


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", default=None, help="YAML file of options (overridden by flags)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="build datasets from public sources",
                          description="Dataset commands.")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="{build,fetch}")
    p = dsub.add_parser(
        "build", help="sources -> manifest with patient-level splits",
        description="Read the public sources, check and hash every image, remove byte-identical copies, split "
                    "by patient (stratified by label) and write DATASET_DIR/{manifest.csv, ingest_report.json, "
                    "dropped.csv, dataset.json}. Every file or metadata row not used is counted with its reason.",
        epilog="sources: cohen (covid-chestxray-dataset: metadata.csv + images/), mooney (chest_xray/{train,val,"
               "test}/{NORMAL,PNEUMONIA}), radiography (COVID-19 Radiography Database, any published layout), "
               "actualmed, figure1 (Cohen-style metadata.csv), folder (ROOT/<covid|normal|pneumonia|other>/).")
    p.add_argument("--source", dest="sources", action="append", type=_source, metavar="NAME=PATH", default=S,
                   help="a source folder; repeat for each source")
    p.add_argument("--out", metavar="DATASET_DIR", default=S, help="dataset folder to write (required)")
    p.add_argument("--task", choices=list(TASKS), default=S,
                   help="classes: " + "; ".join(f"{k}: {t.description}" for k, t in TASKS.items()))
    p.add_argument("--test-per-class", type=int, default=S, help="test images per class (default 200)")
    p.add_argument("--val-fraction", type=float, default=S,
                   help="fraction of the non-test images held out for validation (default 0.1)")
    p.add_argument("--train-size", type=int, default=S, help="training images at most (default 850)")
    p.add_argument("--seed", type=int, default=S, help="seed of the split (default 0)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default=S,
                   help="patient: random split by patient (default); leave-source-out: the test split is the whole "
                        "--test-source, never seen in training (external validation)")
    p.add_argument("--test-source", default=S, metavar="NAME", help="source held out with --protocol leave-source-out")
    p.add_argument("--max-source-share", type=float, default=S, metavar="F",
                   help="cap any one source's share of a class (e.g. 0.6); surplus images are counted as unused")
    p.add_argument("--no-dedup", dest="dedup", action="store_false", default=S,
                   help="keep near-duplicate images (not recommended: copies then leak across splits)")
    p.add_argument("--cache-size", type=int, default=S, metavar="PX",
                   help="shorter side of the preprocessed image cache in DATASET_DIR/cache (default 256; 0 = none)")
    p.add_argument("--workers", type=int, default=S, help="processes for checking images (default: CPU count)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    _add_common(p)
    p.set_defaults(func=_cmd_data_build)
    f = dsub.add_parser(
        "fetch", help="download a public source",
        description="Download a source into the layout `data build` reads. cohen: GitHub repository archive with "
                    "resume and checksum; mooney, radiography: Kaggle (needs the kaggle package and credentials, "
                    "otherwise the exact manual steps are printed).")
    f.add_argument("source", choices=["cohen", "mooney", "radiography"], help="which source")
    f.add_argument("--out", metavar="PATH", default=S, help="folder to create (required)")
    f.add_argument("--url", default=S, help="archive URL (cohen; default: the GitHub master archive)")
    f.add_argument("--sha256", default=S, help="expected SHA-256 of the archive")
    f.add_argument("--overwrite", action="store_true", default=S, help="replace a non-empty --out")
    f.add_argument("--timeout", type=float, default=S, help="network timeout in seconds (default 60)")
    f.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")
    _add_common(f)
    f.set_defaults(func=_cmd_data_fetch)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune DenseNet-121",
        description="Fine-tune an ImageNet-pretrained DenseNet-121 (all layers unless --freeze-backbone) on the "
                    "train split; early stopping on validation ROC AUC. Writes RUN_DIR/{best.pt, last.pt, "
                    "metrics.jsonl, config.yaml}. Runs under torchrun for several GPUs.")
    p.add_argument("--data", metavar="DATASET_DIR", default=S, help="dataset folder from `data build` (required)")
    p.add_argument("--out", metavar="RUN_DIR", default=S, help="run folder to write (required)")
    p.add_argument("--epochs", type=int, default=S, help="maximum epochs (default 10)")
    p.add_argument("--image-size", type=int, default=S, help="input side in pixels (default 224)")
    p.add_argument("--batch-size", type=int, default=S, help="batch size (default 16)")
    p.add_argument("--weights", default=S, metavar="imagenet|none|FILE",
                   help="imagenet: torchvision's ImageNet weights from $TORCH_HOME/hub/checkpoints (downloaded if "
                        "possible); none: from scratch; FILE: a torchvision-format state dict (default imagenet)")
    p.add_argument("--freeze-backbone", action="store_true", default=S, help="train only the classifier")
    p.add_argument("--resume", action="store_true", default=S, help="continue from RUN_DIR/last.pt")
    p.add_argument("--lr", type=float, default=S, help="peak learning rate (default 1e-4, or 1e-3 with --weights none)")
    p.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--warmup-epochs", type=float, default=S, help="linear warm-up epochs (default 1)")
    p.add_argument("--patience", type=int, default=S, help="early-stopping patience in epochs, 0 = off (default 5)")
    p.add_argument("--balance", choices=["loss", "sampler"], default=S,
                   help="class balancing: weighted loss or balanced sampling (default loss)")
    p.add_argument("--threshold-rule", choices=["sensitivity", "youden"], default=S,
                   help="operating point chosen on validation after training (default sensitivity)")
    p.add_argument("--target-sensitivity", type=float, default=S,
                   help="COVID sensitivity the threshold must reach on validation (default 0.95)")
    p.add_argument("--seed", type=int, default=S, help="seed (default 0)")
    p.add_argument("--workers", type=int, default=S, help="DataLoader workers (default: 1 on CPU, up to 8 on CUDA)")
    p.add_argument("--device", default=S, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=S, help="no mixed precision on CUDA")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    _add_common(p)
    p.set_defaults(func=_cmd_train)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="metrics and reports on a split",
        description="Evaluate a run on a manifest split; writes RUN_DIR/eval-<split>/{classification_report.txt, "
                    "metrics.json, predictions.csv, confusion_matrix.png, roc.png, class_distribution.png, "
                    "samples.png}. Confidence intervals resample patients.")
    p.add_argument("--run", metavar="RUN_DIR", default=S, help="run folder (required)")
    p.add_argument("--data", metavar="DATASET_DIR", default=S, help="dataset folder (default: the training one)")
    p.add_argument("--split", choices=["train", "val", "test"], default=S, help="split (default test)")
    p.add_argument("--checkpoint", choices=["best", "last"], default=S, help="which checkpoint (default best)")
    p.add_argument("--batch-size", type=int, default=S, help="batch size (default 32)")
    p.add_argument("--bootstrap", type=int, default=S, help="bootstrap resamples for 95%% CIs (default 1000)")
    p.add_argument("--device", default=S, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--workers", type=int, default=S, help="processes for decoding (default: CPU count)")
    _add_common(p)
    p.set_defaults(func=_cmd_evaluate)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict images",
                       description="Class probabilities for PNG/JPEG files and folders (searched recursively).")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders")
    p.add_argument("--run", metavar="RUN_DIR", default=S, help="run folder or checkpoint file (required)")
    p.add_argument("--out", metavar="FILE", default=S, help="write here instead of standard output")
    p.add_argument("--format", choices=["csv", "json"], default=S, help="output format (default csv)")
    p.add_argument("--skip-unreadable", action="store_true", default=S,
                   help="write a row with the reason for an unreadable file instead of stopping")
    p.add_argument("--checkpoint", choices=["best", "last"], default=S, help="which checkpoint (default best)")
    p.add_argument("--batch-size", type=int, default=S, help="batch size (default 16)")
    p.add_argument("--device", default=S, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--backend", choices=["torch", "onnx"], default=S,
                   help="torch (checkpoint) or onnx (RUN/model.onnx from `covid-cxr export`) (default torch)")
    p.add_argument("--heatmaps", metavar="DIR", default=S, help="also write Grad-CAM overlays into DIR")
    _add_common(p)
    p.set_defaults(func=_cmd_predict)


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM overlays",
                       description="Write a Grad-CAM overlay PNG per image (and explanations.json) into --out.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders")
    p.add_argument("--run", metavar="RUN_DIR", default=S, help="run folder or checkpoint file (required)")
    p.add_argument("--out", metavar="DIR", default=S, help="output folder (required)")
    p.add_argument("--target", default=S, help="class to explain (default covid)")
    p.add_argument("--checkpoint", choices=["best", "last"], default=S, help="which checkpoint (default best)")
    p.add_argument("--device", default=S, help="auto, cpu, cuda or cuda:N (default auto)")
    _add_common(p)
    p.set_defaults(func=_cmd_explain)


def _add_audit(sub) -> None:
    p = sub.add_parser(
        "audit", help="shortcut audit",
        description="Does the model look at the lungs? Lungs-masked and border-only AUC, a source probe on frozen "
                    "features, per-source performance; writes RUN_DIR/audit-<split>/audit.json with verdicts.")
    p.add_argument("--run", metavar="RUN_DIR", default=S, help="run folder (required)")
    p.add_argument("--data", metavar="DATASET_DIR", default=S, help="dataset folder (default: the training one)")
    p.add_argument("--split", choices=["train", "val", "test"], default=S, help="split (default test)")
    p.add_argument("--checkpoint", choices=["best", "last"], default=S, help="which checkpoint (default best)")
    p.add_argument("--bootstrap", type=int, default=S, help="bootstrap resamples for AUC CIs (default 500)")
    p.add_argument("--device", default=S, help="auto, cpu, cuda or cuda:N (default auto)")
    _add_common(p)
    p.set_defaults(func=_cmd_audit)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export to ONNX",
                       description="Export the checkpoint to ONNX (dynamic batch) with its preprocessing metadata "
                                   "in a .json beside it; checked against PyTorch before it is written.")
    p.add_argument("--run", metavar="RUN_DIR", default=S, help="run folder or checkpoint file (required)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    p.add_argument("--out", metavar="FILE", default=None, help="output .onnx file (default RUN_DIR/model.onnx)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint (default best)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_export)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="web app and HTTP API",
                       description="Serve the model: POST /v1/predict, GET /healthz, OpenAPI docs at /docs, and a "
                                   "web page at / (research use only).")
    p.add_argument("--run", metavar="RUN_DIR", default=S, help="run folder (required)")
    p.add_argument("--host", default=S, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=S, help="port (default 8000)")
    p.add_argument("--backend", choices=["torch", "onnx"], default=S, help="inference backend (default torch)")
    p.add_argument("--max-upload-mb", type=float, default=S, help="upload size limit in MB (default 20)")
    p.add_argument("--workers", type=int, default=S, help="concurrent inferences (default 2)")
    _add_common(p)
    p.set_defaults(func=_cmd_serve)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report",
                       description="Write RUN_DIR/report.html: the study's table beside ours, metrics with CIs, ROC, "
                                   "confusion matrix, calibration, per-source table, audit, Grad-CAM examples, "
                                   "dataset card summary and model card. Runs evaluate (and audit) first if needed.")
    p.add_argument("--run", metavar="RUN_DIR", required=True, help="run folder")
    p.add_argument("--split", choices=["val", "test"], default="test", help="split (default test)")
    p.add_argument("--no-audit", dest="audit", action="store_false", help="do not run the audit if it is missing")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from covid_cxr import report

    path = report.run(args.run, split=args.split, audit=args.audit)
    print(f"report written to {path}")
    print(DISCLAIMER)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="offline end-to-end demo on synthetic phantoms",
        description="Generate synthetic phantom chest X-rays (not real patients), then run data build -> train "
                    "(from scratch, small images) -> evaluate -> predict. Works offline in a few minutes on CPU.")
    p.add_argument("--out", default="demo-output", help="output folder (default ./demo-output)")
    p.add_argument("--per-class", type=int, default=160, help="phantoms per class (default 160)")
    p.add_argument("--image-size", type=int, default=64, help="network input side (default 64)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_demo)


def _options(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    drop = {"func", "config", "verbose", "command", "data_command", *skip}
    return {k: v for k, v in vars(args).items() if k not in drop}


def _cmd_data_build(args) -> int:
    from covid_cxr import manifest

    cfg = make_config(DataConfig, _options(args), args.config)
    report = manifest.build(cfg)
    print(manifest.format_report(report, cfg.out))
    return 0


def _cmd_data_fetch(args) -> int:
    from covid_cxr import fetch

    summary = fetch.run(make_config(fetch.FetchConfig, _options(args), args.config))
    print(json.dumps({k: v for k, v in summary.items() if k != "next"}, indent=2))
    print(f"next: covid-cxr data build {summary['next']} ... --out DATASET_DIR")
    return 0


def _cmd_train(args) -> int:
    from covid_cxr import train

    summary = train.run(make_config(TrainConfig, _options(args), args.config))
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_evaluate(args) -> int:
    from covid_cxr import evaluate

    result = evaluate.run(make_config(EvalConfig, _options(args), args.config))
    print(evaluate.format_summary(result))
    return 0


def _cmd_predict(args) -> int:
    from covid_cxr import predict

    result = predict.run(make_config(PredictConfig, _options(args), args.config))
    if result["text"] is not None:
        sys.stdout.write(result["text"])
    else:
        print(f"wrote {result['images']} predictions to {result['out']}", file=sys.stderr)
    if result["unreadable"]:
        print(f"{result['unreadable']} unreadable files: see their 'error' column", file=sys.stderr)
    print(DISCLAIMER, file=sys.stderr)
    return 0


def _cmd_explain(args) -> int:
    from covid_cxr import explain

    result = explain.run(make_config(explain.ExplainConfig, _options(args), args.config))
    print(f"wrote {result['images']} Grad-CAM overlays to {result['out']}")
    print(DISCLAIMER)
    return 0


def _cmd_audit(args) -> int:
    from covid_cxr import audit

    result = audit.run(make_config(audit.AuditConfig, _options(args), args.config))
    print("\n".join(result["verdicts"]))
    print(f"audit written to {result['output_dir']}")
    print(DISCLAIMER)
    return 0


def _cmd_export(args) -> int:
    from pathlib import Path

    from covid_cxr import export
    from covid_cxr.model import resolve_checkpoint

    ckpt = resolve_checkpoint(args.run, args.checkpoint)
    out = args.out or str((Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent) / "model.onnx")
    summary = export.export_onnx(ckpt, out, **({"opset": args.opset} if args.opset else {}))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_serve(args) -> int:
    from covid_cxr import serve

    serve.run(make_config(serve.ServeConfig, _options(args), args.config))
    return 0


def _cmd_demo(args) -> int:
    from covid_cxr import demo

    demo.run(args.out, per_class=args.per_class, image_size=args.image_size, epochs=args.epochs, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covid-cxr",
        description="Build leak-aware COVID-19 chest X-ray datasets from public sources, fine-tune DenseNet-121, "
                    "evaluate with patient-level confidence intervals and predict. " + DISCLAIMER,
        epilog="typical run: covid-cxr data build --source cohen=... --source mooney=... --source radiography=... "
               "--out data/ds && covid-cxr train --data data/ds --out runs/r1 && covid-cxr evaluate --run runs/r1 "
               "&& covid-cxr predict --run runs/r1 images/")
    parser.add_argument("--version", action="version", version=f"covid-cxr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{data,train,evaluate,predict,explain,audit,report,export,serve,demo}")
    for add in (_add_data, _add_train, _add_evaluate, _add_predict, _add_explain, _add_audit, _add_report,
                _add_export, _add_serve, _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``covid-cxr`` command. Returns the exit status."""
    # Idle OpenMP threads sleep instead of spinning: on a small shared CPU, spinning threads made a
    # training epoch ~9x slower (550 s vs 58 s at 128 px on 2 cores with other jobs running). Set before
    # torch is imported (commands import it lazily); an explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CovidCxrError as exc:
        print(f"covid-cxr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covid-cxr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
