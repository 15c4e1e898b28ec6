"""Runtime of decoders on onnxruntime's CPU provider: the original export against onnxscript's
`optimize_for_ort`, onnx-fuse `--target ort`, onnx-fuse `--target onnx` and onnx-fuse `--target ort
--kv-cache static` (fixed caches of STATIC_SLOTS slots, each bound once to its past and present,
the buffer they share, with write_position = past: how a runtime runs that form).

Llama- and Qwen2-shaped decoders at realistic width (hidden 2048, 32 query / 8 KV heads, head 64,
intermediate 5632, vocabulary 32000, 2 layers, random weights), built here with transformers and
exported by both torch exporters (decode form: past inputs, which prefill feeds with length 0).
Cached under benchmarks/out/ (git-ignored). Prefill latency at S = 128, 512, 2048 and decode
latency per token at past 128, 1024, 4096 (batch 1): all variants of a model loaded side by side
in one fresh process and run in alternating order, round by round (the load of a shared machine
falls on all alike; the median of the rounds); then each variant's peak RSS in a process of its
own (default session options, every core). Prints a markdown table and writes
benchmarks/runtime.png (latency against length).

    python benchmarks/bench_runtime.py [--layers 2] [--archs llama qwen2] [--variants ...] [--json OUT]

Needs torch (CPU), transformers, onnxscript and matplotlib besides onnx_fuse.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
PREFILL, DECODE = (128, 512, 2048), (128, 1024, 4096)
STATIC = "onnx-fuse ort static"
VARIANTS = ("original", "onnxscript", "onnx-fuse ort", "onnx-fuse onnx", STATIC)
STATIC_SLOTS = DECODE[-1] + 64  # the fixed caches: every measured length fits
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

            static = {"kv_cache": "static", "max_cache_len": STATIC_SLOTS} if variant == STATIC else {}
            result = onnx_fuse.fuse(original, target=variant.split()[1], max_positions=8192, **static)
            result.save(path)
            info = {"fused": result.report["counts"], "check": result.report["check"]["passed"]}
        info["seconds"] = round(time.perf_counter() - started, 1)
        json.dump(info, open(info_path, "w"))
    return path, json.load(open(info_path))


def measure(paths: dict[str, str]) -> dict[str, dict]:
    """In this (fresh) process: every variant's session side by side, each timed run of one
    variant followed by one of each other (the order reversed every round), so that the load of
    a shared machine falls on all alike; latencies in ms, the median of the rounds."""
    import onnxruntime as ort

    sessions = {v: ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for v, p in paths.items()}
    rng = np.random.default_rng(0)

    def timed(seq: int, past: int, rounds: int) -> dict[str, float]:
        runs = {v: step(session, seq, past, rng) for v, session in sessions.items()}
        times: dict[str, list[float]] = {v: [] for v in sessions}
        for number in range(rounds + 1):  # round 0 warms up
            for variant in (list(sessions) if number % 2 else reversed(list(sessions))):
                started = time.perf_counter()
                runs[variant]()
                if number:
                    times[variant].append(time.perf_counter() - started)
        return {v: round(1000 * float(np.median(t)), 2) for v, t in times.items()}

    prefill = {s: timed(s, 0, {128: 7, 512: 5}.get(s, 3)) for s in PREFILL}
    decode = {p: timed(1, p, 15) for p in DECODE}
    return {v: {"prefill": {s: prefill[s][v] for s in PREFILL}, "decode": {p: decode[p][v] for p in DECODE}}
            for v in sessions}


def step(session, seq: int, past: int, rng):
    """A call that runs one step of `seq` new tokens after `past` (batch 1): the growing-cache
    interface, or, for fixed caches, buffers bound once to both the past and its present (the
    buffer they share) with write_position = past."""
    names = [i.name for i in session.get_inputs()]
    caches = [n for n in names if n.startswith("past_key_values")]
    ids = rng.integers(0, SHAPE["vocab_size"], (1, seq))
    cache_shape = (1, SHAPE["num_key_value_heads"], past, SHAPE["head_dim"])
    if "write_position" not in names:
        inputs = {"input_ids": ids, "attention_mask": np.ones((1, past + seq), np.int64)}
        inputs.update({n: rng.standard_normal(cache_shape).astype(np.float32) for n in caches})
        return lambda: session.run(None, inputs)
    import onnxruntime as ort

    mask = np.zeros((1, STATIC_SLOTS), np.int64)
    mask[:, :past + seq] = 1
    binding = session.io_binding()
    for name, value in (("input_ids", ids), ("attention_mask", mask), ("write_position", np.array([past]))):
        binding.bind_cpu_input(name, value)
    fixed = cache_shape[:2] + (STATIC_SLOTS,) + cache_shape[3:]
    buffers = {n: ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(fixed).astype(np.float32)) for n in caches}
    for name, buffer in buffers.items():
        binding.bind_ortvalue_input(name, buffer)
    pairs = json.loads(session.get_modelmeta().custom_metadata_map["onnx_fuse.kv_cache.pairs"])
    for output in session.get_outputs():
        if output.name in pairs:
            binding.bind_ortvalue_output(output.name, buffers[pairs[output.name]])
        else:
            binding.bind_output(output.name)
    return lambda: session.run_with_iobinding(binding)


def peak_rss(path: str) -> int:
    """In this (fresh) process: MiB of peak RSS for a session that runs the longest prefill and
    the longest decode."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for seq, past in ((PREFILL[-1], 0), (1, DECODE[-1])):
        step(session, seq, past, np.random.default_rng(0))()
    # VmHWM, not getrusage's ru_maxrss: that one keeps the parent's high-water mark across
    # fork and exec (the parent holds the models it fused).
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return round(kib / 1024)


def measure_variants(paths: dict[str, str]) -> dict[str, dict]:
    """Latencies of all variants in one process, then each variant's peak RSS in its own."""
    found = _subprocess(["--measure", json.dumps(paths)])
    if "error" in found:
        return {v: found for v in paths}
    for variant, path in paths.items():  # JSON made the lengths strings
        found[variant] = {phase: {int(n): ms for n, ms in found[variant][phase].items()}
                          for phase in ("prefill", "decode")}
        rss = _subprocess(["--peak", path])
        found[variant]["peak_rss_mib"] = rss.get("peak", "failed")
    return found


def _subprocess(arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True)
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
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # JSON {variant: path}
    parser.add_argument("--peak", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    if args.peak:
        print(json.dumps({"peak": peak_rss(args.peak)}))
        return
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for arch in args.archs:
        for exporter in args.exporters:
            model = f"{arch} {exporter}"
            original = build_original(arch, exporter, args.layers)
            paths, infos, failures = {}, {}, {}
            for variant in args.variants:
                try:
                    paths[variant], infos[variant] = make_variant(original, variant)
                except Exception as exc:  # a tool that fails is a row of the table, not the end
                    failures[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:150]}"}
            timings = {**measure_variants(paths), **failures}
            for variant in args.variants:
                rows.append({"model": model, "variant": variant, "info": infos.get(variant, {}),
                             "timing": timings[variant]})
                print(rows[-1], flush=True)
    print(table(rows))
    if args.json:  # before the plot: figures are kept where matplotlib is missing
        json.dump(rows, open(args.json, "w"), indent=1)
    plot(rows, os.path.join(HERE, "runtime.png"))


if __name__ == "__main__":
    main()
