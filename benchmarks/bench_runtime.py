"""Runtime of decoders on onnxruntime's CPU provider: the original export against onnxscript's
`optimize_for_ort`, onnx-fuse `--target ort` and onnx-fuse `--target onnx`.

Llama- and Qwen2-shaped decoders at realistic width (hidden 2048, 32 query / 8 KV heads, head 64,
intermediate 5632, vocabulary 32000, 2 layers, random weights), built here with transformers and
exported by both torch exporters (decode form: past inputs, which prefill feeds with length 0).
Cached under benchmarks/out/ (git-ignored). Each variant runs in a fresh process (default session
options, every core): prefill latency at S = 128, 512, 2048 and decode latency per token at past
128, 1024, 4096 (batch 1; medians of a few runs), and the process's peak RSS; every variant twice,
the order reversed the second time, the faster kept (the load of a shared machine varies). Prints a markdown table and writes
benchmarks/runtime.png (latency against length).

    python benchmarks/bench_runtime.py [--layers 2] [--archs llama qwen2] [--json OUT]

Needs torch (CPU), transformers, onnxscript and matplotlib besides onnx_fuse.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
PREFILL, DECODE = (128, 512, 2048), (128, 1024, 4096)
VARIANTS = ("original", "onnxscript", "onnx-fuse ort", "onnx-fuse onnx")
SHAPE = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             intermediate_size=5632, vocab_size=32000, max_position_embeddings=8192)


def build_original(arch: str, exporter: str, layers: int) -> str:
    """The exported decoder (cached): models/export.py's decode wrapper and dynamic axes."""
    path = os.path.join(OUT, f"{arch}{layers}_{exporter}.onnx")
    if os.path.exists(path):
        return path
    import torch
    import transformers

    sys.path.insert(0, os.path.join(HERE, os.pardir, "models"))
    import export as exporting

    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    config = config_class(num_hidden_layers=layers, **SHAPE)
    config._attn_implementation = "sdpa"
    model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch]
    torch.manual_seed(0)
    model = model_class(config).eval()
    exporting.randomize_parameters(model, 0)
    wrapper = exporting.DecodeWrapper(model)
    inputs = _torch_inputs(config, layers)
    names = list(inputs)
    outputs = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    with torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(wrapper, tuple(inputs.values()), path, dynamo=False, opset_version=17,
                              input_names=names, output_names=outputs,
                              dynamic_axes=exporting.dynamic_axes_ts(names, outputs, "decode", "text"))
        else:
            program = torch.onnx.export(wrapper, tuple(inputs.values()), dynamo=True, input_names=names,
                                        output_names=outputs, optimize=True,
                                        dynamic_shapes=exporting.dynamic_shapes_dynamo(names, "decode", "text"))
            program.save(path, external_data=False)
    return path


def _torch_inputs(config, layers: int) -> dict:
    import torch

    inputs = {"input_ids": torch.randint(0, config.vocab_size, (1, 3)),
              "attention_mask": torch.ones(1, 7, dtype=torch.int64)}
    for i in range(layers):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{i}.{kind}"] = torch.randn(1, config.num_key_value_heads, 4, config.head_dim)
    return inputs


def make_variant(original: str, variant: str) -> tuple[str, dict]:
    """The variant's model file (cached) and what its tool reported."""
    if variant == "original":
        return original, {}
    tag = variant.replace(" ", "-")
    path = original.replace(".onnx", f".{tag}.onnx")
    info_path = path + ".json"
    if not os.path.exists(path):
        started = time.perf_counter()
        if variant == "onnxscript":
            import onnx_ir as ir
            from onnxscript.rewriter.ort_fusions import optimize_for_ort

            model, stats = optimize_for_ort(ir.load(original))
            ir.save(model, path)
            info = {"fused": {k: v for k, v in stats.items() if v}}
        else:
            import onnx_fuse

            result = onnx_fuse.fuse(original, target=variant.split()[-1], max_positions=8192)
            result.save(path)
            info = {"fused": result.report["counts"], "check": result.report["check"]["passed"]}
        info["seconds"] = round(time.perf_counter() - started, 1)
        json.dump(info, open(info_path, "w"))
    return path, json.load(open(info_path))


def measure(path: str) -> dict:
    """In this (fresh) process: latencies in ms (median) and the peak RSS in MiB."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    kv_heads, head = past_inputs[0].shape[1], past_inputs[0].shape[3]
    rng = np.random.default_rng(0)

    def feeds(seq: int, past: int) -> dict:
        result = {"input_ids": rng.integers(0, SHAPE["vocab_size"], (1, seq)),
                  "attention_mask": np.ones((1, past + seq), np.int64)}
        result.update({i.name: rng.standard_normal((1, kv_heads, past, head)).astype(np.float32)
                       for i in past_inputs})
        return result

    def timed(inputs: dict, repeat: int) -> float:
        if repeat > 1:
            session.run(None, inputs)  # warm-up (the longest prefill is warmed by the shorter)
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            session.run(None, inputs)
            times.append(time.perf_counter() - started)
        return round(1000 * float(np.median(times)), 2)

    prefill = {s: timed(feeds(s, 0), {128: 3, 512: 2}.get(s, 1)) for s in PREFILL}
    decode = {p: timed(feeds(1, p), 8) for p in DECODE}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"prefill": prefill, "decode": decode, "peak_rss_mib": round(peak)}


def measure_variants(paths: dict[str, str], passes: int) -> dict[str, dict]:
    """Each variant measured `passes` times, the order reversed every other pass; per cell the
    fastest pass (a shared machine's load comes and goes), per variant the highest peak RSS."""
    runs: dict[str, list[dict]] = {variant: [] for variant in paths}
    for number in range(passes):
        for variant in (list(paths) if number % 2 == 0 else reversed(list(paths))):
            runs[variant].append(run_measurement(paths[variant]))
    return {variant: _fastest(found) for variant, found in runs.items()}


def _fastest(runs: list[dict]) -> dict:
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    return {"prefill": {s: min(r["prefill"][s] for r in runs) for s in runs[0]["prefill"]},
            "decode": {p: min(r["decode"][p] for r in runs) for p in runs[0]["decode"]},
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def run_measurement(path: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--measure", path], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| model | variant | fused | " + " | ".join(f"prefill {s} (ms)" for s in PREFILL) + " | "
            + " | ".join(f"decode @{p} (ms)" for p in DECODE) + " | peak RSS (MiB) |")
    lines = [head, "|" + "---|" * (4 + len(PREFILL) + len(DECODE))]
    for row in rows:
        timing = row["timing"]
        if "error" in timing:
            cells = [f"failed: {timing['error']}"] + [""] * (len(PREFILL) + len(DECODE))
        else:
            cells = [str(timing["prefill"][s]) for s in PREFILL] + [str(timing["decode"][p]) for p in DECODE] \
                    + [str(timing["peak_rss_mib"])]
        fused = ", ".join(f"{k} {v}" for k, v in row["info"].get("fused", {}).items()) or "-"
        lines.append(f"| {row['model']} | {row['variant']} | {fused} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    figure, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False)
    for column, model in enumerate(models):
        for row in (r for r in rows if r["model"] == model and "error" not in r["timing"]):
            for line, (phase, lengths) in enumerate((("prefill", PREFILL), ("decode", DECODE))):
                values = [row["timing"][phase][n] for n in lengths]
                axes[line][column].plot(lengths, values, marker="o", label=row["variant"])
        for line, phase in enumerate(("prefill: ms for S tokens", "decode: ms per token at past P")):
            axis = axes[line][column]
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_title(f"{model}\n{phase}", fontsize=9)
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--archs", nargs="+", default=["llama", "qwen2"])
    parser.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"])
    parser.add_argument("--passes", type=int, default=2, help="measurements per variant (fastest kept)")
    parser.add_argument("--json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for arch in args.archs:
        for exporter in args.exporters:
            model = f"{arch} {exporter}"
            original = build_original(arch, exporter, args.layers)
            paths, infos, failures = {}, {}, {}
            for variant in VARIANTS:
                try:
                    paths[variant], infos[variant] = make_variant(original, variant)
                except Exception as exc:  # a tool that fails is a row of the table, not the end
                    failures[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:150]}"}
            timings = {**measure_variants(paths, args.passes), **failures}
            for variant in VARIANTS:
                rows.append({"model": model, "variant": variant, "info": infos.get(variant, {}),
                             "timing": timings[variant]})
                print(rows[-1], flush=True)
    print(table(rows))
    plot(rows, os.path.join(HERE, "runtime.png"))
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
