"""The ``spa`` command: a thin shell over :mod:`spa.api`.

The options' flags are made from the option dataclasses (:class:`spa.api.PruneOptions`,
:class:`spa.api.CheckOptions`: :mod:`spa.options`), which declare each default, help text and
choice once; choices come from the enums and registries, so a new criterion shows up in
``spa prune --help`` by itself. Only the command's own flags (``-o``, ``--plan``, ``--report``…)
are written here. Errors a user can fix print one line and exit with a
documented code (see :class:`spa.errors.ExitCode`); set ``SPA_DEBUG=1`` for tracebacks.

For pipelines: every option can come from ``--config FILE.toml`` (:mod:`spa.config`; flags on
the command line win); with ``--json`` stdout holds exactly one JSON document and everything
else (notes, warnings, progress bars) goes to stderr; ``--quiet`` silences notes and progress.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

from spa.config import config_defaults
from spa.errors import ExitCode, OptionError, SpaError
from spa.options import add_flags, from_args, positive
from spa.progress import ProgressSettings, progress_settings

if TYPE_CHECKING:
    from collections.abc import Sequence


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and SPA's bad-input exit code."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(int(ExitCode.BAD_INPUT))


COMMANDS = {"analyze": "show channel groups, frozen groups and costs",
            "prune": "prune a model and write the smaller model",
            "apply": "apply a saved plan to its model",
            "recover": "distil the dense model into a pruned one (needs PyTorch)"}


def build_parser(*, commands: bool = True) -> argparse.ArgumentParser:
    """The ``spa`` parser. ``commands=False`` leaves the subcommands' options out, and with
    them the imports of the pass library that their choices come from: ``spa --help`` and
    ``spa --version`` then start in a tenth of the time."""
    parser = _Parser(prog="spa", description="Structurally Prune Anything: "
                                     "prune coupled channel groups of an ONNX model.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress (and onnx-graphsurgeon's messages)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    if not commands:
        for name, text in COMMANDS.items():
            sub.add_parser(name, help=text)
        return parser
    _command_parsers(sub)
    return parser


def _command_parsers(sub) -> None:
    from spa.api import CheckOptions, PruneOptions

    an = sub.add_parser("analyze", help=COMMANDS["analyze"])
    an.add_argument("model", help="ONNX file")
    an.add_argument("--json", action="store_true", help="print the analysis as JSON")
    an.add_argument("--explain", action="store_true", help="list why each frozen group is frozen")
    _common_flags(an)
    add_flags(an, PruneOptions, only=["ignore"])
    an.add_argument("--hidden", action="store_true",
                    help="analyse with hidden-size (residual stream) pruning enabled")

    pr = sub.add_parser("prune", help=COMMANDS["prune"])
    pr.add_argument("model", help="ONNX file (never modified)")
    pr.add_argument("-o", "--output", help="where to write the pruned model (required unless "
                    "--dry-run)")
    pr.add_argument("--dry-run", action="store_true",
                    help="analyse and plan, print the plan summary and write no model (--plan, "
                    "--report and --report-html are still written when given)")
    add_flags(pr, PruneOptions, skip=["input_dims"], grouped=False)
    pr.add_argument("--plan", metavar="PLAN.json", help="also write the plan as JSON")
    pr.add_argument("--recover", nargs="?", const=200, type=positive, metavar="STEPS",
                    help="after pruning, distil the dense model into the pruned one on --calib "
                    "for STEPS steps (default 200; see spa recover); needs PyTorch")
    add_flags(pr, PruneOptions, grouped=True)
    _check_flags(pr, CheckOptions)

    ap = sub.add_parser("apply", help=COMMANDS["apply"])
    ap.add_argument("model", help="ONNX file, or a folder `spa prune folder/ --plan` planned "
                    "(never modified)")
    ap.add_argument("plan", help="plan JSON written by `spa prune --plan`")
    ap.add_argument("-o", "--output", help="where to write the pruned model (required)")
    _check_flags(ap, CheckOptions)
    _recover_parser(sub)


def _recover_parser(sub) -> None:
    from spa.calibration import CalibrationOptions
    from spa.recovery import RecoverOptions

    rc = sub.add_parser("recover", help=COMMANDS["recover"])
    rc.add_argument("dense", help="the ONNX model that was pruned (the teacher; never modified)")
    rc.add_argument("pruned", help="the pruned ONNX model (the student; never modified)")
    rc.add_argument("-o", "--output", required=True, help="where to write the recovered model")
    rc.add_argument("--calib", required=True, metavar="PATH",
                    help="calibration data to distil on (a share is held out to judge)")
    groups: dict = {}
    add_flags(rc, RecoverOptions, groups=groups)
    add_flags(rc, CalibrationOptions, groups=groups)
    _common_flags(rc)
    rc.add_argument("--report", metavar="REPORT.json", help="write the recovery report")
    rc.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml",
                   help="read options from a TOML file (keys: long option names, top level or "
                   "in a [analyze]/[prune]/[apply]/[recover] table); flags given here win")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars and no notes on stderr (errors are still printed)")


def _check_flags(p: argparse.ArgumentParser, checks: type) -> None:
    _common_flags(p)
    add_flags(p, checks, only=["input_dims"])
    p.add_argument("--report", metavar="REPORT.json", help="write the before/after report")
    p.add_argument("--report-html", metavar="REPORT.html",
                   help="write a self-contained HTML report (tables, per-group chart, frozen "
                   "groups and why, options, latency)")
    add_flags(p, checks, only=["check_masked", "validate", "latency"])
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def _version() -> str:
    from spa import __version__

    return f"spa {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(commands=any(a in COMMANDS for a in argv))
    root_level = logging.getLogger().level
    terminate = _exit_cleanly_on_sigterm()
    try:
        args = _parse(parser, argv)
        _configure_logging(args)
        _give_back_freed_memory()
        with progress_settings(ProgressSettings(enabled=False if args.quiet else None)):
            return {"analyze": _analyze, "prune": _prune, "apply": _apply,
                    "recover": _recover}[args.command](args)
    except SpaError as exc:
        if os.environ.get("SPA_DEBUG"):
            raise
        print(f"spa: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except BrokenPipeError:  # `spa analyze model.onnx | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush too
        return 128 + signal.SIGPIPE
    finally:
        logging.getLogger().setLevel(root_level)  # main() may be called in-process (tests)
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)


def _exit_cleanly_on_sigterm():
    """SIGTERM (a CI timeout, ``kill``, a container stopping) becomes SystemExit(143), so that
    the staged output, spilled activations and temporary files are removed on the way out as
    on Ctrl-C; by default Python dies at once and leaves them. Returns the handler to restore
    (None off the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def _give_back_freed_memory() -> None:
    """Have glibc serve blocks of 8 MiB and up by mmap, so that they go back to the system
    when freed. Its default threshold grows up to 32 MiB after the first big free, and then
    the many short-lived weight copies a run makes (protos, onnxruntime sessions, segments)
    stay on a fragmented heap: ResNet-50's post-training planning (256 images) peaked at
    1.41 GB and kept 0.82 GB, and now 1.21 and 0.76 GB (1 MiB: 1.17 GB, but twice the system
    time in page faults). Not glibc (macOS, musl): nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 8 << 20)
    except (OSError, AttributeError):
        pass


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse once to find the command and ``--config``; the file's values become the
    subcommand's defaults, and a second parse lets the command line override them."""
    args = parser.parse_args(argv)
    if args.config:
        sub = _subparsers(parser)[args.command]
        sub.set_defaults(**config_defaults(args.config, args.command, sub))
        args = parser.parse_args(argv)
    if args.command == "apply" and not args.output:
        raise OptionError("spa apply needs -o/--output")
    if args.command == "prune" and not (args.output or args.dry_run):
        raise OptionError("spa prune needs -o/--output (or --dry-run)")
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("spa's parser has no subcommands")


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="spa: %(message)s")
    logging.getLogger().setLevel(level)


def _note(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


def _analyze(args: argparse.Namespace) -> int:
    from spa.api import analyze
    from spa.pipeline.genai import is_genai_folder
    from spa.report import analysis_summary, analysis_text

    if os.path.isdir(args.model) and not is_genai_folder(args.model):
        from spa.pipeline.family import analyse_together

        files = analyse_together(args.model, ignore=tuple(args.ignore), hidden=args.hidden)
        if args.json:
            print(json.dumps({"files": {n: analysis_summary(a) for n, a in files.items()}},
                             indent=1))
        else:
            for name, analysis in files.items():
                print(f"{name}:")
                print(analysis_text(analysis, explain=args.explain))
        return int(ExitCode.OK)
    analysis = analyze(args.model, ignore=tuple(args.ignore), hidden=args.hidden)
    if args.json:
        print(json.dumps(analysis_summary(analysis), indent=1))
    else:
        print(analysis_text(analysis, explain=args.explain))
    return int(ExitCode.OK)


def _checks(args: argparse.Namespace):
    from spa.api import CheckOptions

    return from_args(CheckOptions, args)


def _check_outputs(args: argparse.Namespace) -> None:
    """Every path the command will write (model, plan, reports) is checked before any work, so
    that a bad one fails at once, not after the model was written; no two may coincide."""
    from pathlib import Path

    from spa.ir.save import check_output_path

    paths = [args.report, args.report_html]
    if args.command == "prune":
        paths.append(args.plan)  # apply's --plan is what it reads
    if not getattr(args, "dry_run", False):
        paths.append(args.output)
    paths = [p for p in paths if p]
    folder = args.output if Path(args.model).is_dir() else None  # checked as a folder there
    for p in paths:
        if p is not folder:
            check_output_path(p, input_path=Path(args.model))
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        raise OptionError(f"two outputs would be written to the same file: {', '.join(paths)}")


def _finish(args: argparse.Namespace, report, the_plan) -> int:
    from spa.html_report import write_html_report
    from spa.report import report_notes, report_table, write_report

    if args.report:
        write_report(report, args.report)
    if args.report_html:
        write_html_report(args.report_html, the_plan, report)
    for note in report_notes(report):
        _note(args, note)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report_table(report))
        print(f"wrote {report.output}")
    return int(ExitCode.OK)


def _dry_run(args: argparse.Namespace, options) -> int:
    from spa.api import dry_run
    from spa.html_report import write_html_report
    from spa.report import plan_summary, plan_text, write_text_atomic

    the_plan = dry_run(args.model, options, plan_path=args.plan)
    summary = plan_summary(the_plan, args.model)
    if args.report:
        write_text_atomic(args.report, json.dumps(summary, indent=1) + "\n")
    if args.report_html:
        write_html_report(args.report_html, the_plan, model=args.model)
    print(json.dumps(summary, indent=1) if args.json else plan_text(summary))
    return int(ExitCode.OK)


def _prune(args: argparse.Namespace) -> int:
    from spa.api import PruneOptions, prune

    options = from_args(PruneOptions, args)
    _check_outputs(args)
    from spa.pipeline.genai import is_genai_folder

    if os.path.isdir(args.model) and not is_genai_folder(args.model):
        return _prune_family(args, options)
    if args.dry_run:
        return _dry_run(args, options)
    if args.recover:
        return _prune_and_recover(args, options)
    report, the_plan = prune(args.model, args.output, options, _checks(args),
                             plan_path=args.plan)
    return _finish(args, report, the_plan)


def _prune_family(args: argparse.Namespace, options) -> int:
    """``spa prune folder/ -o out/``: the ONNX files of one model, pruned together
    (spa/pipeline/family.py)."""
    from spa.api import prune_family

    if args.dry_run:
        return _dry_run_family(args, options)
    if args.recover:
        return _prune_family_and_recover(args, options)
    return _family_done(args, prune_family(args.model, args.output, options, _checks(args),
                                           plan_path=args.plan))


def _prune_family_and_recover(args: argparse.Namespace, options) -> int:
    """``spa prune folder/ -o out/ --recover N``: a folder whose files pass caches (a seq2seq
    export) has its encoder and first-step decoder distilled together, else its one
    calibrated file is distilled alone (its with-past twin, float16 and int8 copies then take
    the trained values), before the folder is checked and written
    (spa/pipeline/family.py, spa/pipeline/joined.py)."""
    from spa.api import prune_family
    from spa.torch.recover import joint_distiller

    _, _, recover_options = _recovery(options)
    distil = joint_distiller(recover_options(args.recover, options.seed))
    return _family_done(args, prune_family(args.model, args.output, options, _checks(args),
                                           plan_path=args.plan, distil=distil))


def _recovery(options):
    """spa.torch.recover's ``recover``, ``calibration_for`` and the options maker; a clear
    error without calibration data or without PyTorch."""
    from spa.pipeline.options import SYNTHETIC
    from spa.recovery import SYNTHETIC_REFUSED, TORCH_MISSING, RecoverOptions

    if not options.calib:
        raise OptionError("--recover distils on calibration data: give --calib PATH")
    if options.calib == SYNTHETIC:
        raise OptionError(f"--recover: {SYNTHETIC_REFUSED}, or prune without --recover")
    try:
        from spa.torch.recover import calibration_for, recover
    except ImportError as exc:
        raise OptionError(TORCH_MISSING) from exc
    return recover, calibration_for, lambda steps, seed: RecoverOptions(steps=steps, seed=seed)


def _family_done(args: argparse.Namespace, family) -> int:
    """Report a folder written by ``spa prune folder/`` or ``spa apply folder/``."""
    from spa.html_report import write_folder_html
    from spa.report import (
        folder_lines,
        folder_notes,
        report_notes,
        report_table,
        write_text_atomic,
    )

    if args.report:
        write_text_atomic(args.report, json.dumps(family.to_dict(), indent=1) + "\n")
    if args.report_html:
        write_folder_html(args.report_html, family.plans, family, folder=args.model)
    for note in folder_notes(family):
        _note(args, note)
    for report in family.reports.values():
        for note in report_notes(report):
            _note(args, note)
    if args.json:
        print(json.dumps(family.to_dict(), indent=1))
        return int(ExitCode.OK)
    for name, report in family.reports.items():
        print(f"{name}:")
        print(report_table(report))
    for line in folder_lines(family):
        print(line)
    print(f"wrote {family.output}")
    return int(ExitCode.OK)


def _dry_run_family(args: argparse.Namespace, options) -> int:
    """``spa prune folder/ --dry-run``: each file's plan, the ties followed; nothing written."""
    from spa.pipeline.family import plan_together
    from spa.report import plan_summary, plan_text, ties_line, write_text_atomic

    together = plan_together(args.model, options, _checks(args), plan_path=args.plan)
    if args.plan:
        write_text_atomic(args.plan, together.saved().to_json() + "\n")
    if args.report_html:
        from spa.html_report import write_folder_html

        write_folder_html(args.report_html, together.plans, folder=args.model)
    files = {n: plan_summary(p, together.origins[n]) for n, p in together.plans.items()}
    summary = {"files": files,
               "skipped": together.skipped, "tied_spaces": len(together.sites),
               "groups_following": together.followed, "kept_whole": together.kept_whole}
    if args.report:
        write_text_atomic(args.report, json.dumps(summary, indent=1) + "\n")
    if args.json:
        print(json.dumps(summary, indent=1))
        return int(ExitCode.OK)
    for name, why in together.skipped.items():
        _note(args, f"{name}: {why}")
    for name, one in files.items():
        print(f"{name}:")
        print(plan_text(one))
    print(ties_line(len(together.sites), together.followed))
    return int(ExitCode.OK)


def _prune_and_recover(args: argparse.Namespace, options) -> int:
    """``spa prune --recover N``: prune into a staging directory beside the output, then
    distil from there into the output (nothing is left behind if either step fails)."""
    import tempfile
    from pathlib import Path

    from spa.api import prune
    from spa.metrics import file_size
    from spa.pipeline.genai import decoder_of, is_genai_folder

    recover, calibration_for, recover_options = _recovery(options)
    from spa.torch.recover import recover_folder  # importable: _recovery checked torch
    out = Path(args.output)
    genai = is_genai_folder(args.model)  # its decoder recovers; the folder is written whole
    with tempfile.TemporaryDirectory(prefix=".spa-", dir=out.parent or ".") as tmp:
        staged = Path(tmp) / out.name
        report, the_plan = prune(args.model, staged, options, _checks(args),
                                 plan_path=args.plan)
        calib = calibration_for(str(decoder_of(staged)), options.calib, options.calibration,
                                seed=options.seed, tokenizer_from=(str(decoder_of(args.model)),))
        done = (recover_folder if genai else recover)(
            args.model, staged, out, calib, recover_options(args.recover, options.seed))
    report.output, report.bytes_after = str(out), file_size(str(decoder_of(out)))
    report.fidelity["recovered"] = done.fidelity_after
    report.recovery = done.to_dict()
    return _finish(args, report, the_plan)


def _apply(args: argparse.Namespace) -> int:
    from spa.api import apply
    from spa.pipeline.genai import is_genai_folder
    from spa.plan import Plan

    _check_outputs(args)
    if os.path.isdir(args.model) and not is_genai_folder(args.model):
        from spa.api import apply_family

        return _family_done(args, apply_family(args.model, args.plan, args.output,
                                               _checks(args)))
    the_plan = Plan.load(args.plan)
    return _finish(args, apply(args.model, the_plan, args.output, _checks(args)), the_plan)


def _recover(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spa.calibration import CalibrationOptions
    from spa.fidelity import describe
    from spa.ir.save import check_output_folder, check_output_path
    from spa.pipeline.genai import decoder_of, is_genai_folder
    from spa.recovery import TORCH_MISSING, RecoverOptions
    from spa.report import write_text_atomic

    genai = all(is_genai_folder(m) for m in (args.dense, args.pruned))
    folders = [m for m in (args.dense, args.pruned) if os.path.isdir(m)]
    if folders and not genai:
        raise OptionError(f"spa recover distils one ONNX file into another, or one "
                          f"onnxruntime-genai folder into another, and {folders[0]} is another "
                          "folder: a seq2seq export's files are recovered together when it is "
                          "pruned (spa prune FOLDER -o OUT --calib PATH --recover STEPS)")
    try:
        from spa.torch.recover import calibration_for, recover, recover_folder
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "torch":
            raise
        raise OptionError(TORCH_MISSING) from exc
    outputs = [p for p in (None if genai else args.output, args.report) if p]
    for path in outputs:
        for model in (args.dense, args.pruned):
            check_output_path(path, input_path=Path(model))
    if genai:
        check_output_folder(Path(args.output))
    dense, pruned = str(decoder_of(args.dense)), str(decoder_of(args.pruned))
    options = from_args(RecoverOptions, args)
    calibration = calibration_for(pruned, args.calib, from_args(CalibrationOptions, args),
                                  seed=options.seed, tokenizer_from=(dense, pruned))
    report = (recover_folder if genai else recover)(args.dense, args.pruned, args.output,
                                                    calibration, options)
    if os.environ.get("RANK", "0") != "0":  # torchrun: process 0 reports
        return int(ExitCode.OK)
    if args.report:
        write_text_atomic(args.report, json.dumps(report.to_dict(), indent=1) + "\n")
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        weight = f", matched weight {report.matched_weight:g}" if report.matched_weight else ""
        source = report.calibration.get("held_out_path")
        where = f" of {source}" if source else ""
        print(f"{report.measure} on held-out samples{where}: "
              f"{describe(report.fidelity_before)} -> "
              f"{describe(report.fidelity_after)} (lr {report.lr:g}{weight}, "
              f"{report.steps} steps)")
        print(f"wrote {report.output} ({report.kept})")
    return int(ExitCode.OK)


if __name__ == "__main__":
    raise SystemExit(main())
