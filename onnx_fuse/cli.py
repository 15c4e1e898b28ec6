"""The `onnx-fuse` command.

Exit codes: 0 success, 1 the equivalence check failed (nothing written), 2 bad input or usage,
3 an internal error (a bug: set ONNX_FUSE_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings

from . import progress
from .errors import BadInput, CheckFailed

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr like every other error."""

    def error(self, message):
        raise _UsageError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        return _error(str(exc), EXIT_BAD_INPUT)
    try:
        with warnings.catch_warnings(), _native_stderr_silenced() as terminal, _graphsurgeon_quiet(), \
                progress.shown(terminal, quiet=getattr(args, "quiet", False)):
            if not os.environ.get("ONNX_FUSE_DEBUG"):
                warnings.simplefilter("ignore")  # library warnings would add lines to stderr
            return args.run(args)
    except BadInput as exc:
        return _error(str(exc), EXIT_BAD_INPUT)
    except CheckFailed as exc:
        if exc.check is not None:
            _write_failed_check(args, {"check": exc.check, "error": str(exc)})
        return _error(str(exc), EXIT_CHECK_FAILED)
    except KeyboardInterrupt:
        return _error("interrupted", EXIT_INTERNAL)
    except Exception as exc:  # never a traceback for users; ONNX_FUSE_DEBUG shows it
        if os.environ.get("ONNX_FUSE_DEBUG"):
            raise
        from .check import CheckError

        if isinstance(exc, CheckError):
            return _error(f"cannot check: {exc}", EXIT_BAD_INPUT)
        line = str(exc).strip().splitlines()
        return _error(f"internal error: {type(exc).__name__}: {line[0] if line else ''}", EXIT_INTERNAL)


@contextlib.contextmanager
def _native_stderr_silenced():
    """onnxruntime's and onnx's C++ code log straight to file descriptor 2 (a failing session,
    the version converter's warnings); while the command runs that goes to /dev/null, so that an
    error is the one line printed after. ONNX_FUSE_DEBUG keeps it. Yields the descriptor of the
    real stderr (for progress), or None where there is none."""
    if os.environ.get("ONNX_FUSE_DEBUG"):
        yield 2
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield None
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield saved
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _graphsurgeon_quiet():
    """onnx-graphsurgeon prints its warnings to stdout (e.g. one per bfloat16 constant it reads);
    the command's output is its own summary. ONNX_FUSE_DEBUG keeps them."""
    if os.environ.get("ONNX_FUSE_DEBUG"):
        yield
        return
    from onnx_graphsurgeon.logger import G_LOGGER

    saved, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = saved


_TARGET_HELP = "what to emit: onnx (default), primitive-trt, ort, trt-plugin or trt11"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnx-fuse", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"onnx-fuse {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    fuse = commands.add_parser("fuse", help="rewrite a model with fused ops")
    fuse.add_argument("input", help="model file (.onnx)")
    fuse.add_argument("-o", "--output", required=True, help="where to write the fused model")
    fuse.add_argument("--target", default="onnx", help=_TARGET_HELP)
    fuse.add_argument("--check", dest="check", action="store_true", default=True,
                      help="prove the result equal to the input in onnxruntime (default)")
    fuse.add_argument("--no-check", dest="check", action="store_false", help="skip the check")
    _add_check_options(fuse)
    fuse.add_argument("--report", help="write a JSON report here")
    fuse.add_argument("--report-html", metavar="R.html",
                      help="write the report as a self-contained HTML page here")
    fuse.add_argument("-q", "--quiet", action="store_true", help="no progress line on the terminal")
    fuse.add_argument("--max-positions", type=int, metavar="N",
                      help="positions the RoPE caches cover, where the graph does not bound them")
    fuse.add_argument("--kv-cache", choices=["static"],
                      help="static: turn caches that grow by Concat into fixed caches of "
                           "--max-cache-len slots written by TensorScatter, or the target's own write "
                           "(ort: GroupQueryAttention over a shared buffer) (checked over decode steps)")
    fuse.add_argument("--max-cache-len", type=int, metavar="N", help="cache slots for --kv-cache static")
    _target_options(fuse)
    fuse.set_defaults(run=_fuse)

    inspect = commands.add_parser("inspect", help="say what would fuse and why the rest does not")
    inspect.add_argument("input")
    inspect.add_argument("--target", default="onnx", help=_TARGET_HELP)
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--max-positions", type=int, metavar="N")
    inspect.add_argument("-q", "--quiet", action="store_true", help="no progress line on the terminal")
    _target_options(inspect)
    inspect.set_defaults(run=_inspect)

    check = commands.add_parser("check", help="compare two models in onnxruntime")
    check.add_argument("reference")
    check.add_argument("candidate")
    _add_check_options(check)
    check.set_defaults(run=_check)

    lint = commands.add_parser("lint", help="say whether TensorRT's parser takes each transformer "
                                            "layer and gives it a fused kernel (exit 1: findings)")
    lint.add_argument("input")
    lint.add_argument("--trt", required=True, choices=_trt_versions(), help="TensorRT version")
    lint.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    lint.set_defaults(run=_lint)
    return parser


def _add_check_options(command: argparse.ArgumentParser) -> None:
    """The check's options, as Polygraphy spells them."""
    command.add_argument("--inputs", metavar="FILE",
                         help="inputs for the check instead of synthesized ones: an .npz of named "
                              "arrays, or Polygraphy's JSON (polygraphy run --save-inputs); every "
                              "feed in the file is checked")
    for flag, what in (("--atol", "absolute"), ("--rtol", "relative")):
        command.add_argument(flag, nargs="+", metavar="[OUTPUT:]TOL",
                             help=f"{what} tolerance for every output (1e-4) or one (logits:1e-3), "
                                  "instead of the dtype's")
    command.add_argument("--check-batch", type=int, metavar="N",
                         help="batch size of the synthesized inputs (default 2)")


def _target_options(command) -> None:
    command.add_argument("--cp-ranks", type=int, metavar="N",
                         help="trt11: nb_rank=N on every TRT_Attention (TensorRT's multi-device "
                              "attention over N GPUs, a preview feature; FP16/BF16)")
    command.add_argument("--decomposable", action="store_true",
                         help="trt11: TRT_decomposable=1 (a decomposed fallback where no fused "
                              "kernel fits, instead of a failed build)")


def _options_for_target(args) -> dict:
    """The target options given on the command line (the target says which it takes)."""
    options = {}
    if args.cp_ranks is not None:
        options["cp_ranks"] = args.cp_ranks
    if args.decomposable:
        options["decomposable"] = True
    return options


def _trt_versions() -> tuple[str, ...]:
    from .trt_facts import VERSIONS

    return VERSIONS


def _fuse(args) -> int:
    from .api import fuse
    from .model_io import check_output_path, external_files, load_model

    if os.path.abspath(args.output) == os.path.abspath(args.input):
        raise BadInput("refusing to overwrite the input model; give -o another path")
    progress.phase("load")
    source = load_model(args.input)
    # Everything that could stop the output from being written is checked before the work.
    data_files = [os.path.join(source.base_dir, loc) for loc in external_files(source.model)]
    check_output_path(args.output, args.input, data_files)
    _check_report_paths(args, data_files)
    inputs = _load_inputs(args.inputs)
    if (args.kv_cache is None) != (args.max_cache_len is None):
        raise BadInput("--kv-cache static and --max-cache-len N go together")
    if args.max_cache_len is not None and args.max_cache_len <= 0:
        raise BadInput(f"--max-cache-len must be positive, got {args.max_cache_len}")
    extra = {} if args.kv_cache is None else {"kv_cache": args.kv_cache,
                                              "max_cache_len": args.max_cache_len}
    result = fuse(source, target=args.target, check=args.check, inputs=inputs,
                  max_positions=_positive(args.max_positions), target_options=_options_for_target(args),
                  **_check_options(args), **extra)
    progress.phase("save")
    result.save(args.output)
    written = []
    try:
        for path, text in _report_writers(args):
            _write_text(path, text(result.report))
            written.append(path)
    except BadInput:
        for path in [args.output] + written:  # all or nothing
            os.unlink(path)
        raise
    print(_summary(result.report))
    for note in result.report.get("target_notes", []):
        print(f"note: {note}")
    print(f"wrote {args.output}")
    return EXIT_OK


def _check_report_paths(args, data_files: list[str]) -> None:
    """BadInput unless every report asked for can be written, over neither a model nor another
    report."""
    from .model_io import check_output_path

    reports = [path for path in (args.report, args.report_html) if path]
    for report in reports:
        if os.path.abspath(report) in (os.path.abspath(args.output), os.path.abspath(args.input)):
            raise BadInput(f"{report}: the report may not overwrite a model")
        check_output_path(report, args.input, data_files)
    if len({os.path.abspath(path) for path in reports}) < len(reports):
        raise BadInput("--report and --report-html name the same file")


def _inspect(args) -> int:
    from .api import fuse

    report = fuse(args.input, target=args.target, check=False, apply=False,
                  max_positions=_positive(args.max_positions),
                  target_options=_options_for_target(args)).report
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(_summary(report))
    for fused in report["fused"]:
        details = ", ".join(f"{k}={v}" for k, v in fused.items() if k not in ("rule", "anchor"))
        print(f"  fuses   {fused['rule']:<10} at {fused['anchor']}: {details}")
    for miss in report["unfused"]:
        print(f"  unfused {miss['pattern']:<10} at {miss['anchor']}: {miss['reason']}")
    for kept in report.get("kept", []):
        print(f"  keeps   {kept['pattern']:<10} at {kept['anchor']}: {kept['reason']}")
    for repair in report.get("repairs", []):
        print(f"  repairs {repair['op']} '{repair['node']}': {repair['problem']}; {repair['fix']}")
    return EXIT_OK


def _check(args) -> int:
    from .api import check_prover
    from .model_io import load_model

    reference, candidate = load_model(args.reference), load_model(args.candidate)
    prover = check_prover(reference, _load_inputs(args.inputs), **_check_options(args))
    try:
        prover.require(candidate.model, args.candidate, candidate.base_dir)
    except CheckFailed:
        pass  # the outcome is printed below either way
    outcome = prover.last
    for name, diff in outcome["outputs"].items():
        verdict = "ok" if diff["passed"] else "DIFFERS"
        print(f"  {name}: {_errors(diff)} {verdict}")
    print(("passed: " if outcome["passed"] else "failed: ") + outcome["message"])
    return EXIT_OK if outcome["passed"] else EXIT_CHECK_FAILED


def _errors(diff: dict) -> str:
    """One output's errors as the check command prints them."""
    stats = diff.get("stats")
    if stats is None:
        return "cannot be compared"
    return ", ".join(f"{kind} max {stats[kind]['max']:.3g} mean {stats[kind]['mean']:.3g} "
                     f"p99 {stats[kind]['p99']:.3g}" for kind in ("abs", "rel"))


def _check_options(args) -> dict:
    from .tolerances import parse_tolerances

    return {"tolerances": parse_tolerances(args.atol, args.rtol), "check_batch": args.check_batch}


def _lint(args) -> int:
    from . import lint
    from .model_io import load_model

    report = lint.lint(load_model(args.input).model, args.trt)
    print(json.dumps(report, indent=2) if args.json else lint.render(report))
    return lint.exit_code(report)


def _version() -> str:
    from . import __version__

    return __version__


def _positive(value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise BadInput(f"--max-positions must be positive, got {value}")
    return value


def _load_inputs(path: str | None):
    if path is None:
        return None
    from .inputs_file import load_inputs

    try:
        return load_inputs(path)
    except (ValueError, OSError) as exc:
        raise BadInput(str(exc).splitlines()[0]) from None


def _summary(report: dict) -> str:
    counts = ", ".join(f"{n} {c}" for n, c in sorted(report["counts"].items())) or "nothing"
    opset = report["opset"]
    line = f"fused: {counts}; unfused candidates: {len(report['unfused'])}"
    if report.get("kept"):
        line += f"; kept as written: {len(report['kept'])} (already the target's op)"
    if opset["to"] != opset["from"]:
        line += f"; opset {opset['from']} -> {opset['to']}"
    if report.get("repairs"):
        line += f"; repaired {len(report['repairs'])} exporter-written node(s)"
    check = report.get("check")
    if check is not None:
        widened = f" (as {check['checked_as']})" if check.get("checked_as") else ""
        line += f"; check {'passed' if check['passed'] else 'FAILED'}{widened}: {check['message']}"
    return line


def _write_failed_check(args, report: dict) -> None:
    """The reports of a failed check: its verdict and per-output errors (no model is written)."""
    for path, text in _report_writers(args):
        try:
            _write_text(path, text(report))
        except BadInput:
            pass  # the check's verdict is the error to report


def _report_writers(args) -> list:
    """(path, report -> text) for each report the command was asked to write."""
    writers = []
    if getattr(args, "report", None):
        writers.append((args.report, lambda report: json.dumps(report, indent=2)))
    if getattr(args, "report_html", None):
        from .report_html import render

        title = os.path.basename(args.input)
        writers.append((args.report_html, lambda report: render(report, title)))
    return writers


def _write_text(path: str, text: str) -> None:
    tmp = None
    try:
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                   dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise BadInput(f"{path}: cannot write the report ({exc.strerror})") from None


def _error(message: str, code: int) -> int:
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"onnx-fuse: error: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
