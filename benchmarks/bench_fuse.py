#!/usr/bin/env python
"""Fuse time and memory on Llama-shaped graphs of 32 and 80 layers, against other tools.

The graphs are the tiny random-weight Llama (grouped-query attention) of models/export.py with
32 and 80 layers, exported for decode (past key/values in, present out) by the TorchScript
exporter at opset 17: about 7.3k and 18.2k nodes. They are built once with torch (see
build_models.py; a Python with torch is looked for, or pass --export-python) and cached under
benchmarks/out/ (gitignored).

Every tool runs in a fresh child process on the same files; the table gives its time, the
child's peak resident memory (wait4's ru_maxrss) and the attention cores in its result
(Attention, MultiHeadAttention and GroupQueryAttention nodes, any domain):

- onnx-fuse in-process: load -> fuse(check=False) -> save, timed inside the child (as for the
  two other libraries, after the imports);
- onnx-fuse CLI: the whole `onnx-fuse fuse IN -o OUT --no-check` command, timed from outside
  (interpreter start and imports included);
- onnxscript: `onnxscript.rewriter.ort_fusions.optimize_for_ort`, ir.load -> optimize -> ir.save;
- onnxruntime: `onnxruntime.transformers.optimizer.optimize_model(model_type="gpt2",
  num_heads=4, hidden_size=64, opt_level=0)` (Python fusions only, no session), then save.

    python benchmarks/bench_fuse.py [--layers 32 80] [--tools ...] [--repeat 3] [--json OUT]

The Python running this needs onnx_fuse importable (pip install -e .); the tools that are not
installed are reported as "failed: ...".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from build_models import model_path  # noqa: E402

ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
TOOLS = ("onnx-fuse", "onnx-fuse-cli", "onnxscript", "onnxruntime")
HEADS, HIDDEN = 4, 64  # the export's config (models/export.py)
SLOW_S = 10.0  # a tool slower than this is run once, whatever --repeat says


# --------------------------------------------------------------------------- child side


def _worker(tool: str, src: str, dst: str) -> dict:
    """Run one tool on `src`, writing `dst`; imports happen before the clock starts."""
    import warnings

    warnings.simplefilter("ignore")
    if tool == "onnx-fuse":
        import onnx_fuse
        from onnx_fuse.model_io import load_model

        started = time.perf_counter()
        result = onnx_fuse.fuse(load_model(src), check=False)
        result.save(dst)
        info = {"counts": result.report["counts"]}
    elif tool == "onnxscript":
        import onnxscript.ir as ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        started = time.perf_counter()
        model, stats = optimize_for_ort(ir.load(src))
        ir.save(model, dst)
        info = {"counts": {k: v for k, v in stats.items() if v}}
    elif tool == "onnxruntime":
        import logging

        logging.disable(logging.WARNING)
        from onnxruntime.transformers.optimizer import optimize_model

        started = time.perf_counter()
        optimized = optimize_model(src, model_type="gpt2", num_heads=HEADS, hidden_size=HIDDEN,
                                   opt_level=0, use_gpu=False)
        optimized.save_model_to_file(dst)
        info = {"counts": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}}
    else:
        raise SystemExit(f"unknown tool {tool}")
    info["seconds"] = time.perf_counter() - started
    return info


# --------------------------------------------------------------------------- parent side


def _run_child(argv: list[str], timeout: float) -> tuple[int, str, str, float, int]:
    """Run a child; (exit code, stdout, stderr, wall seconds, peak RSS in bytes)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return (child.returncode, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"), wall, peak)


def _attention_cores(path: str) -> int | None:
    import onnx

    if not os.path.exists(path):
        return None
    model = onnx.load(path, load_external_data=False)
    return sum(1 for n in model.graph.node if n.op_type in ATTENTION_OPS)


def _node_count(path: str) -> int:
    import onnx

    return len(onnx.load(path, load_external_data=False).graph.node)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else "no message"


def run_tool(tool: str, src: str, work: str, python: str, timeout: float) -> dict:
    dst = os.path.join(work, f"{tool}-{os.path.basename(src)}")
    if os.path.exists(dst):
        os.unlink(dst)
    if tool == "onnx-fuse-cli":
        script = shutil.which("onnx-fuse", path=os.path.dirname(python))
        command = [script] if script else [python, "-m", "onnx_fuse.cli"]
        argv = command + ["fuse", src, "-o", dst, "--no-check"]
    else:
        argv = [python, os.path.abspath(__file__), "--worker", tool, src, dst]
    code, out, err, wall, peak = _run_child(argv, timeout)
    row = {"tool": tool, "peak_rss": peak, "wall": wall}
    if code != 0:
        row["error"] = f"failed: {_one_line(err or out)}" if wall < timeout else f"failed: over {timeout:.0f} s"
        return row
    if tool == "onnx-fuse-cli":
        row["seconds"] = wall
    else:
        info = json.loads(out.strip().splitlines()[-1])
        row["seconds"] = info["seconds"]
        row["counts"] = info.get("counts")
    row["attention"] = _attention_cores(dst)
    return row


def ensure_models(layers: list[int], out_dir: str, export_python: str | None) -> dict[int, str]:
    paths = {n: model_path(out_dir, n) for n in layers}
    missing = [n for n, p in paths.items() if not os.path.exists(p)]
    if missing:
        python = export_python or _python_with_torch()
        print(f"exporting {missing} layers with {python} (once; cached in {out_dir})", flush=True)
        subprocess.run([python, os.path.join(HERE, "build_models.py"), out_dir,
                        *map(str, missing)], check=True)
    return paths


def _python_with_torch() -> str:
    candidates = [sys.executable, "/work/venv-export/bin/python"]
    for python in candidates:
        if os.path.exists(python) and subprocess.run(
                [python, "-c", "import torch, transformers"], capture_output=True).returncode == 0:
            return python
    raise SystemExit("exporting the benchmark models needs torch and transformers: "
                     "pass --export-python")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 80])
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--repeat", type=int, default=3, help="runs per fast tool (best time)")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("--python", default=sys.executable, help="Python that runs the tools")
    parser.add_argument("--export-python", help="Python with torch for building the models")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker)))
        return 0

    paths = ensure_models(args.layers, args.out, args.export_python)
    work = os.path.join(args.out, "results")
    os.makedirs(work, exist_ok=True)
    rows = []
    for n, path in paths.items():
        nodes = _node_count(path)
        for tool in args.tools:
            best = None
            for attempt in range(max(1, args.repeat)):
                row = run_tool(tool, path, work, args.python, args.timeout)
                row.update(layers=n, nodes=nodes)
                if best is None or "error" not in row and row["seconds"] < best.get("seconds", 1e9):
                    best = row
                if "error" in row or row["seconds"] > SLOW_S:
                    break
            rows.append(best)
            print(_format_row(best), flush=True)
    print()
    print(table(rows))
    print()
    for line in verdicts(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _format_row(row: dict) -> str:
    seconds = row.get("error") or f"{row['seconds']:.2f} s"
    return (f"{row['tool']:<14} {row['layers']:>3} layers {row['nodes']:>6} nodes: {seconds}, "
            f"peak {row['peak_rss'] / 2**20:.0f} MiB, attention {row.get('attention')}")


def table(rows: list[dict]) -> str:
    lines = ["| tool | layers | nodes | seconds | peak RSS (MiB) | attention cores fused |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        seconds = r.get("error") or f"{r['seconds']:.2f}"
        attention = "" if "error" in r else r.get("attention")
        lines.append(f"| {r['tool']} | {r['layers']} | {r['nodes']} | {seconds} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {attention} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """The targets the issues set, each PASS or FAIL with the figures."""
    by = {(r["tool"], r["layers"]): r for r in rows if "error" not in r}
    out = []
    fuse32, cli32 = by.get(("onnx-fuse", 32)), by.get(("onnx-fuse-cli", 32))
    if fuse32:
        out.append(_verdict(fuse32["seconds"] < 1.0,
                            f"32 layers in-process load->fuse->save {fuse32['seconds']:.2f} s (< 1 s)"))
    if cli32:
        out.append(_verdict(cli32["seconds"] < 3.0, f"32 layers CLI {cli32['seconds']:.2f} s (< 3 s)"))
    other = by.get(("onnxscript", 32))
    if fuse32 and other:
        speedup = other["seconds"] / fuse32["seconds"]
        out.append(_verdict(speedup >= 10, f"{speedup:.0f}x faster than onnxscript optimize_for_ort "
                                           "at 32 layers (>= 10x)"))
    fuse80 = by.get(("onnx-fuse", 80))
    if fuse32 and fuse80:
        grow = fuse80["seconds"] / fuse32["seconds"]
        nodes = fuse80["nodes"] / fuse32["nodes"]
        out.append(_verdict(grow <= nodes * 1.05, f"32 -> 80 layers: time x{grow:.2f}, nodes "
                                                  f"x{nodes:.2f} (time grows no faster, 5% noise)"))
    return out


def _verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}: {text}"


if __name__ == "__main__":
    sys.exit(main())
