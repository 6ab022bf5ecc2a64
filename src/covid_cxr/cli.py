"""The ``covid-cxr`` command: a thin layer generated from each stage's options dataclasses (:mod:`covid_cxr.config`).

Each command is one row of :data:`COMMANDS`: its config class (fields become flags, field docstrings
become help), the library function it calls, and how its result is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import logging
import os
import sys
import typing
from dataclasses import dataclass, fields
from typing import Any, Callable, Literal

from covid_cxr import DISCLAIMER, __version__
from covid_cxr import config as C
from covid_cxr.data.options import DataConfig, FetchConfig
from covid_cxr.demo import DemoConfig
from covid_cxr.deploy.options import (ExplainConfig, ExportConfig, ListenConfig, LungsPredictConfig, PredictConfig,
                                      ServeConfig)
from covid_cxr.errors import CovidCxrError
from covid_cxr.evaluation.options import AuditConfig, CalibrateConfig, EvalConfig, ReportConfig
from covid_cxr.files import describe_os_error, printable
from covid_cxr.training.options import CrossvalConfig, LungsTrainConfig, TrainConfig

log = logging.getLogger("covid_cxr")

NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export", "torch.fx", "matplotlib",
                 "PIL", "httpx", "urllib3", "multipart", "python_multipart", "asyncio")
"""Third-party loggers that chatter at INFO; only their warnings are shown."""

NO_FLAG_HELP = "Turns off (on by default): "
"""How the help of every ``--no-x`` flag starts: the field's docstring describes the option when it is on."""

SPECIAL_METAVARS = {"weights": "imagenet|none|FILE", "device": "auto|cpu|cuda|cuda:N", "run": "RUN_DIR",
                    "data": "DATASET_DIR", "inputs": "IMAGE_OR_FOLDER", "crossval": "CV_DIR",
                    "estimate_from": "CV_DIR", "allow_links_to": "DIR", "stow": "DICOMWEB_URL",
                    "send_to": "AET@HOST:PORT", "dicom_out": "DIR", "dicom_store": "DIR", "labels": "LABELS_CSV"}


def _pair(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def _source(value: str) -> tuple[str, str]:
    from covid_cxr.data.sources import SOURCE_NAMES

    name, path = _pair(value)
    if name not in SOURCE_NAMES:
        raise argparse.ArgumentTypeError(f"unknown source {name!r}; use one of {', '.join(SOURCE_NAMES)}")
    return name, path


def _flag(name: str, repeated: bool) -> str:
    if repeated and name.endswith("ies"):
        name = name[:-3] + "y"  # --modality for modalities
    elif repeated and name.endswith("s"):
        name = name[:-1]
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls: type, provided: set[str]) -> None:
    """One argument per field of ``cls``: flag, type, choices and help from the field's type and docstring.

    Options not given on the command line stay unset (``SUPPRESS``), so YAML and dataclass defaults apply.
    Fields without a default are required unless ``provided`` (by a YAML file).
    """
    docs, hints, required = C.field_docs(cls), C.field_types(cls), set(C.required_fields(cls))
    # argparse %-formats help strings: a docstring's "95%" must reach it as "95%%"
    docs = {k: v.replace("%", "%%") for k, v in docs.items()}
    for f in fields(cls):
        tp, optional = C.unwrap_optional(hints[f.name])
        origin = typing.get_origin(tp)
        help_text = docs.get(f.name, "")
        if f.default is not dataclasses.MISSING and f.default is not None and f.default != ():
            shown = (("on" if f.default else "off") if isinstance(f.default, bool) else
                     " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default)
            help_text += f" (default: {shown})"
        elif f.default_factory is not dataclasses.MISSING:
            help_text += " (default: the usable CPUs)"
        must = f.name in required and f.name not in provided
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if f.name == "inputs":
            parser.add_argument("inputs", nargs="+" if must else "*", metavar=SPECIAL_METAVARS["inputs"],
                                help=help_text, default=argparse.SUPPRESS)
            continue
        repeated = origin is tuple
        flag = _flag(f.name, repeated)
        if tp is bool:
            if f.default is True:  # on by default: the flag turns it off
                # The docstring says what the option does when on; the flag's help must say that the flag undoes it.
                parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                    help=NO_FLAG_HELP + docs.get(f.name, ""))
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS,
                                    help=docs.get(f.name, ""))
            continue
        if origin is Literal:
            kw["choices"] = list(typing.get_args(tp))
        elif repeated:
            inner = typing.get_args(tp)[0]
            kw["action"] = "append"
            if typing.get_origin(inner) is tuple:
                kw["type"] = _source if f.name == "sources" else _pair
                kw["metavar"] = "NAME=PATH"
            else:
                kw["metavar"] = SPECIAL_METAVARS.get(f.name, flag[2:].replace("-", "_").upper())
        else:
            kw["type"] = tp if tp in (int, float) else str
            kw["metavar"] = SPECIAL_METAVARS.get(f.name, f.name.upper())
        if must:
            kw["required"] = True
        parser.add_argument(flag, dest=f.name, **kw)  # --source fills sources


# ----------------------------------------------------------------------------- printing results

def _print_build(result: dict, cfg) -> None:
    from covid_cxr.data.manifest import format_report

    print(format_report(result, cfg.out))


def _print_fetch(result: dict, cfg) -> None:
    if "steps" in result:  # a set to get by hand
        print(printable(result["steps"]))
        return
    for k, v in result.items():
        if k != "next":
            print(f"{k}: {v}")
    print(f"next: covid-cxr data build {result['next']} ... --out DATASET_DIR")


def _print_with(module: str, fn: str = "format_summary") -> Callable[[Any, Any], None]:
    def show(result, cfg) -> None:
        print(getattr(importlib.import_module(module), fn)(result))
    return show


def _print_predict(result: dict, cfg) -> None:
    if result["text"] is not None:
        sys.stdout.write(printable(result["text"]) if result.get("format") == "table" else result["text"])
    else:
        print(printable(f"wrote {result['images']} predictions to {result['out']}"), file=sys.stderr)
    if result.get("format") == "table":  # the table ends with the summary and the decision rule
        print(DISCLAIMER, file=sys.stderr)
        return
    print(printable(result["summary"]), file=sys.stderr)
    if result["unreadable"]:
        print(f"{result['unreadable']} unreadable files: see their 'error' column", file=sys.stderr)
    if result["out_of_scope"]:
        print(f"{result['out_of_scope']} images are OUT OF SCOPE (unlike the training chest X-rays; in_scope column): "
              "their outputs are not meaningful", file=sys.stderr)
    print(DISCLAIMER, file=sys.stderr)


def _print_explain(result: dict, cfg) -> None:
    print(printable(f"wrote {result['images']} Grad-CAM overlays and explanations.json to {result['out']}"))
    print(result["caveat"])


def _print_audit(result: dict, cfg) -> None:
    if result.get("synthetic_sources"):
        print(f"SYNTHETIC DATA ({', '.join(result['synthetic_sources'])})")
    print("\n".join(f"- {v}" for v in result["verdicts"]))
    print(f"audit written to {result['output_dir']}")
    print(DISCLAIMER)


def _print_report(result, cfg) -> None:
    print(f"report written to {result}")
    print(DISCLAIMER)


def _print_nothing(result, cfg) -> None:
    return None


@dataclass(frozen=True)
class Command:
    """One row of the command table."""

    name: str
    config: type
    target: str
    """``module:function`` called with the config."""
    show: Callable[[Any, Any], None]
    help: str


GROUP_HELP = {"data": "dataset", "lungs": "lung-field segmenter"}
"""What a two-word command's first word stands for, in its group's help."""

COMMANDS: tuple[Command, ...] = (
    Command("data build", DataConfig, "covid_cxr.data.manifest:build", _print_build,
            "sources -> manifest with patient-level splits"),
    Command("data fetch", FetchConfig, "covid_cxr.data.fetch:run", _print_fetch, "download a public source"),
    Command("train", TrainConfig, "covid_cxr.training.train:run", _print_with("covid_cxr.training.train"), "train a model"),
    Command("crossval", CrossvalConfig, "covid_cxr.training.crossval:run", _print_with("covid_cxr.training.crossval"),
            "out-of-source validation: one model per held-out source"),
    Command("evaluate", EvalConfig, "covid_cxr.evaluation.evaluate:run", _print_with("covid_cxr.evaluation.evaluate"),
            "metrics with confidence intervals on a split"),
    Command("predict", PredictConfig, "covid_cxr.deploy.predict:run", _print_predict, "predict images"),
    Command("explain", ExplainConfig, "covid_cxr.deploy.explain:run", _print_explain, "Grad-CAM overlays"),
    Command("audit", AuditConfig, "covid_cxr.evaluation.audit:run", _print_audit, "shortcut audit"),
    Command("report", ReportConfig, "covid_cxr.evaluation.report:run", _print_report, "one self-contained HTML report"),
    Command("calibrate", CalibrateConfig, "covid_cxr.evaluation.recalibrate:run",
            _print_with("covid_cxr.evaluation.recalibrate"),
            "refit temperature and threshold on a hospital's own images into a new run folder"),
    Command("export", ExportConfig, "covid_cxr.deploy.export:run", _print_with("covid_cxr.deploy.export"),
            "export the model: ONNX, safetensors or a Hugging Face-style folder with a model card"),
    Command("lungs train", LungsTrainConfig, "covid_cxr.training.lungs:run", _print_with("covid_cxr.training.lungs"),
            "train the lung-field segmenter on images with lung masks"),
    Command("lungs predict", LungsPredictConfig, "covid_cxr.deploy.lungs:run", _print_with("covid_cxr.deploy.lungs"),
            "lung-field masks and overlays, with a plausibility verdict"),
    Command("serve", ServeConfig, "covid_cxr.deploy.serve:run", _print_nothing, "web app and HTTP API"),
    Command("dicom listen", ListenConfig, "covid_cxr.deploy.listener:run", _print_with("covid_cxr.deploy.listener"),
            "C-STORE receiver: predict each received radiograph, send the SR and SC back to the PACS"),
    Command("demo", DemoConfig, "covid_cxr.demo:run", _print_nothing, "offline end-to-end demo on synthetic phantoms"),
)

CONFIGS: dict[str, type] = {c.name: c.config for c in COMMANDS}
"""Command -> its options class (each defined in its stage's ``options`` module)."""


def _yaml_keys(argv: list[str]) -> set[str]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    return set(C.load_yaml_options(known.config)) if known.config else set()


def build_parser(provided: set[str] = frozenset()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covid-cxr",
        description="Build leak-aware COVID-19 chest X-ray datasets from public sources, train and validate models "
                    "on sources they never saw, evaluate with patient-level confidence intervals, explain, audit, "
                    "export and serve. " + DISCLAIMER,
        epilog="typical run: covid-cxr data build --source cohen=... --source mooney=... --source radiography=... "
               "--out data/ds && covid-cxr crossval --data data/ds --out cv && covid-cxr train --data data/ds --out "
               "runs/r1 && covid-cxr report --run runs/r1 --crossval cv")
    parser.add_argument("--version", action="version", version=f"covid-cxr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    commands: dict[str, argparse.ArgumentParser] = {}
    for cmd in COMMANDS:
        words = cmd.name.split()
        owner = sub
        if len(words) == 2:
            if words[0] not in groups:
                members = [c.name.split()[1] for c in COMMANDS if c.name.split()[0] == words[0]]
                what = GROUP_HELP.get(words[0], words[0])
                g = sub.add_parser(words[0], help=f"{what} commands: {', '.join(members)}",
                                   description=f"{what.capitalize()} commands.")
                groups[words[0]] = g.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            owner = groups[words[0]]
        p = owner.add_parser(words[-1], help=cmd.help, description=C.class_doc(cmd.config))
        add_options(p, cmd.config, provided)
        p.add_argument("--config", metavar="YAML", default=None,
                       help="YAML file of options (keys are the option names); flags override it")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
        p.set_defaults(_command=cmd)
        commands[cmd.name] = p
    parser.commands = commands  # command name -> its parser (for errors in the command's own words)
    return parser


def unrecognized(extra: list[str], parser: argparse.ArgumentParser) -> str:
    """The error for arguments a command does not take, with the closest option for each misspelled one."""
    known = sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--")})
    hints = []
    for arg in extra:
        name = arg.split("=", 1)[0]
        if name.startswith("--"):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{name}: did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(extra)}" + ("; " + "; ".join(hints) if hints else "")


def _rank() -> int:
    """This process's rank under torchrun (RANK), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _configure_logging(verbose: bool) -> None:
    # Under torchrun only rank 0 reports progress; the other ranks log warnings and errors, tagged with their rank.
    rank = _rank()
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    tag = f" [rank {rank}]" if rank else ""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s",
                        datefmt="%H:%M:%S")
    if not verbose:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def _error(message: object) -> int:
    """Print the one-line error (file names that are not UTF-8 shown as \\xNN); the exit status of user errors."""
    print(f"covid-cxr: error: {printable(message)}", file=sys.stderr)
    return 2


def _tolerant_output() -> None:
    """Standard output writes file names that are not UTF-8 as their original bytes (as ``ls`` does) instead of
    failing: a CSV printed by predict must name the file that exists. (Python does this itself only in the C locale;
    standard error already escapes them.)"""
    out = sys.stdout
    if getattr(out, "errors", None) == "strict" and hasattr(out, "reconfigure"):
        try:
            out.reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # pragma: no cover - a stream that cannot be reconfigured
            pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``covid-cxr`` command. Returns the exit status."""
    # Idle OpenMP threads sleep instead of spinning: on a small shared CPU, spinning threads made a training
    # epoch ~9x slower (550 s vs 58 s at 128 px on 2 cores with other jobs running). Set before torch is
    # imported (commands import it lazily); an explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _tolerant_output()
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        provided = _yaml_keys(argv)
    except CovidCxrError as exc:
        return _error(exc)
    parser = build_parser(provided)
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's own parser: its usage, and the option meant
        parser.commands[args._command.name].error(unrecognized(extra, parser.commands[args._command.name]))
    _configure_logging(args.verbose)
    cmd: Command = args._command
    options = {k: v for k, v in vars(args).items() if k not in ("_command", "config", "verbose", "command",
                                                                 "subcommand")}
    try:
        cfg = C.make_config(cmd.config, options, args.config)
        module, fn = cmd.target.split(":")
        result = getattr(importlib.import_module(module), fn)(cfg)
        if _rank() == 0:  # under torchrun, rank 0 prints the result once
            cmd.show(result, cfg)
        return 0
    except CovidCxrError as exc:
        return _error(exc)
    except KeyboardInterrupt:
        print("covid-cxr: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the environment (a full disk, a read-only folder), not a bug: one line, exit 2
        message = describe_os_error(exc)
        if message is None:
            return _bug(exc, verbose)
        return _error(message)
    except Exception as exc:  # a bug: say so in one line, the traceback only with -v
        from covid_cxr.extras import missing_extra_hint

        hint = missing_extra_hint(exc, cmd.name)  # a lean install without an optional package is no bug
        if hint:
            print(f"covid-cxr: error: {hint}", file=sys.stderr)
            return 2
        return _bug(exc, verbose)


def _bug(exc: BaseException, verbose: bool) -> int:
    if verbose:
        raise exc
    print(printable(f"covid-cxr: unexpected error ({type(exc).__name__}: {exc}); this is a bug in covid-cxr: please "
                    "report it with the command you ran (add -v for the traceback)"), file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
