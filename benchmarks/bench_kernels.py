"""Correctness at full size and speed of onnx_fuse.kernels on a CUDA GPU.

    python benchmarks/bench_kernels.py --out DIR [--ptx DIR]

1. checks every kernel against reference.py (float64) on real sizes, outputs poisoned with
   NaN first; with --ptx, also launches the PTX that trt_plugins' AOT step wrote there
   (`python -m onnx_fuse.trt_plugins.aot_dump DIR`) through the CUDA driver (cupy), as
   TensorRT would, and checks it too;
2. times them (triton.testing.do_bench, median): prefill TFLOP/s against torch's
   scaled_dot_product_attention (flash backend), decode, RoPE and KV-write GB/s against a
   device-to-device copy measured in the same run; checks the floors;
3. writes results.json and kernels.png (matplotlib) into --out and prints the table last.
"""
import argparse
import json
import math
import os
import sys

import torch
import triton
from triton.testing import do_bench

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
try:
    import onnx_fuse  # noqa: F401  (the engine's dependencies are there)
except ImportError:
    # A GPU machine may lack the engine's dependencies (onnx-graphsurgeon); the kernels need
    # none of them, so the package is entered without running its __init__.
    import types
    _pkg = types.ModuleType("onnx_fuse")
    _pkg.__path__ = [os.path.join(ROOT, "onnx_fuse")]
    sys.modules["onnx_fuse"] = _pkg
from onnx_fuse import kernels  # noqa: E402
from onnx_fuse.kernels import launch, reference  # noqa: E402

DEV = "cuda"
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
NQ, NKV = 32, 8
SIZES = (512, 1024, 2048, 4096, 8192, 16384)
TOKENS = 16384            # batch * S for the prefill table


def median_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def rnd(*shape, dtype=torch.float16):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)


# ---------------------------------------------------------------- correctness

def attention_case(dtype, b, sq, skv, head, head_v, *, padding=False, empty_row=False,
                   sinks=False, **attrs):
    q, k, v = rnd(b, NQ, sq, head, dtype=dtype), rnd(b, NKV, skv, head, dtype=dtype), \
        rnd(b, NKV, skv, head_v, dtype=dtype)
    mask = torch.ones(b, skv, dtype=torch.bool, device=DEV)
    lengths = torch.full((b,), skv, dtype=torch.int32, device=DEV)
    if padding:
        mask[0, :skv // 7] = False
        lengths[-1] = skv - skv // 5
        mask[-1, skv - skv // 3:] = False
    if empty_row:
        mask[-1] = False
    sink_t = torch.randn(NQ, device=DEV) if sinks else torch.full((NQ,), -math.inf, device=DEV)
    return (q, k, v, mask, sink_t, lengths), dict(scale=1 / math.sqrt(head), **attrs)


def check_attention(name, inputs, attrs, decode, use_mask=True):
    q, k, v, mask, sinks, lengths = inputs
    out = torch.full((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), math.nan, dtype=q.dtype,
                     device=DEV)
    kernels.attention(q, k, v, mask if use_mask else None, sinks, lengths, decode=decode,
                      out=out, **attrs)
    ref = reference.attention(q, k, v, mask, sinks, lengths, use_key_mask=int(use_mask), **attrs)
    return name, rel_err(out, ref), TOL[q.dtype]


def correctness():
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        tag = str(dtype).split(".")[1]
        for head, head_v in ((64, 64), (128, 128), (256, 256), (192, 128)):
            inp, attrs = attention_case(dtype, 2, 1024, 1024, head, head_v, causal=1)
            rows.append(check_attention(f"prefill {tag} H{head}/{head_v} causal", inp, attrs,
                                        False, use_mask=False))
        inp, attrs = attention_case(dtype, 3, 700, 1500, 128, 128, padding=True, sinks=True,
                                    causal=2, window=256, softcap=30.0)
        rows.append(check_attention(f"prefill {tag} lower-right+window+pad+sinks+softcap", inp,
                                    attrs, False))
        inp, attrs = attention_case(dtype, 2, 300, 300, 128, 128, padding=True, empty_row=True,
                                    causal=0, masked_row=1)
        rows.append(check_attention(f"prefill {tag} padding, empty row -> mean V", inp, attrs,
                                    False))
        for sq in (1, 4):
            inp, attrs = attention_case(dtype, 4, sq, 8192, 128, 128, padding=True, sinks=True,
                                        causal=2, window=3000)
            rows.append(check_attention(f"decode {tag} Sq{sq} static cache+window+pad+sinks",
                                        inp, attrs, True))
        inp, attrs = attention_case(dtype, 2, 1, 4096, 128, 128, padding=True, empty_row=True,
                                    causal=2, masked_row=1)
        rows.append(check_attention(f"decode {tag} empty row -> mean V", inp, attrs, True))
        rows += check_rope(dtype, tag)
        rows.append(check_kv_write(dtype, tag))
    return rows


def rope_inputs(dtype, head, rotary_dim, b=4, n=32, s=1024, positions=4096):
    half = (rotary_dim or head) // 2
    angles = torch.rand(positions, half, device=DEV) * 100
    pos = torch.randint(0, positions, (b, s), device=DEV)
    return rnd(b, n, s, head, dtype=dtype), angles.cos().to(dtype), angles.sin().to(dtype), pos


def check_rope(dtype, tag):
    rows = []
    for interleaved in (0, 1):
        for head, rotary_dim in ((128, 0), (96, 32)):
            x, cos, sin, pos = rope_inputs(dtype, head, rotary_dim)
            ref = reference.rope(x, cos, sin, pos, interleaved=interleaved, rotary_dim=rotary_dim)
            out = torch.full_like(x, math.nan)
            kernels.rope(x, cos, sin, pos, interleaved=interleaved, rotary_dim=rotary_dim, out=out)
            rows.append((f"rope {tag} H{head} R{rotary_dim or head} il{interleaved}",
                         rel_err(out, ref), TOL[dtype]))
            kernels.rope(x, cos, sin, pos, interleaved=interleaved, rotary_dim=rotary_dim, out=x)
            rows.append((f"rope {tag} H{head} R{rotary_dim or head} il{interleaved} in place",
                         rel_err(x, ref), TOL[dtype]))
    return rows


def check_kv_write(dtype, tag):
    b, n, length, s, head = 8, 8, 4096, 16, 128
    cache, update = rnd(b, n, length, head, dtype=dtype), rnd(b, n, s, head, dtype=dtype)
    idx = torch.tensor([0, length - s, length - 3, 17, 1000, 2, length - s - 1, 5], device=DEV)
    ref = reference.kv_write(cache, update, idx)
    kernels.kv_write(cache, update, idx)
    return f"kv_write {tag} (last slots, overflow dropped)", float(not torch.equal(cache, ref)), 0.5


# ---------------------------------------------------------------- AOT PTX through the driver

def check_ptx(ptx_dir):
    """Launch the AOT PTX as TensorRT would: inputs, int32 extras, outputs, launch params."""
    import cupy
    import numpy as np

    with open(os.path.join(ptx_dir, "manifest.json")) as f:
        manifest = json.load(f)
    rows = []
    for entry in manifest:
        mod = cupy.RawModule(path=os.path.join(ptx_dir, entry["file"]))
        fn = mod.get_function(entry["name"])
        fn.max_dynamic_shared_size_bytes = entry["shared"]
        inputs, ref = _ptx_inputs(entry)
        out = torch.full_like(ref, math.nan) if entry["op"] != "kv_write" else inputs[0]
        ptrs = [np.uint64(t.data_ptr()) for t in inputs]
        extras = [np.int32(x) for x in entry["extra_args"]]
        scratch = [np.uint64(0)] * entry["hidden_params"]
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            fn(tuple(entry["grid"]), tuple(entry["block"]),
               (*ptrs, *extras, np.uint64(out.data_ptr()), *scratch),
               shared_mem=entry["shared"])
        torch.cuda.synchronize()
        rows.append((f"AOT PTX sm_{entry['arch']} {entry['label']}", rel_err(out, ref),
                     TOL[torch.float16]))
    return rows


def _ptx_inputs(entry):
    torch.manual_seed(7)
    shape = entry["shape"]
    if entry["op"] == "attention":
        b, sq, skv, head = shape
        (q, k, v, mask, sinks, lengths), attrs = attention_case(
            torch.float16, b, sq, skv, head, head, padding=True, sinks=True, **entry["attrs"])
        ref = reference.attention(q, k, v, mask, sinks, lengths, **attrs)
        return [q, k, v, mask, sinks, lengths], ref
    if entry["op"] == "rope":
        b, n, s, head = shape
        x, cos, sin, pos = rope_inputs(torch.float16, head, 0, b, n, s)
        return [x, cos, sin, pos], reference.rope(x, cos, sin, pos, **entry["attrs"])
    b, n, length, s, head = shape
    cache, update = rnd(b, n, length, head), rnd(b, n, s, head)
    idx = torch.arange(b, device=DEV) * 7 % length
    return [cache, update, idx], reference.kv_write(cache, update, idx)


# ---------------------------------------------------------------- speed

L2_BYTES = 60 * 2**20


def graph_ms(fns, reps=30, replays=10):
    """Median time of one call, replaying fns (one per input set) in a CUDA graph.

    Memory-bound kernels: launch gaps leave the timing, and rotating input sets larger than
    the L2 together keeps the cache from serving repeated reads. Each sample times `replays`
    back-to-back replays, so the graph's own launch is amortized and the clocks stay up.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / replays)
    return sorted(times)[len(times) // 2] / len(fns)


def copies(nbytes):
    """How many input sets make 4x the L2."""
    return max(1, min(64, math.ceil(4 * L2_BYTES / nbytes)))


def copy_gbs():
    """1 GiB device-to-device copy_, bytes read plus written, timed back to back (do_bench).

    Inside a CUDA graph torch's copy becomes a memcpy node, measured far slower (2.8 TB/s
    against 4.2 on the H200), so the copy is not graph-timed.
    """
    x = torch.empty(2**29, dtype=torch.float16, device=DEV).normal_()
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / median_ms(lambda: y.copy_(x)) / 1e6


def sdpa_ms(q, k, v):
    """The faster of SDPA's flash backend with enable_gqa and on K/V repeated beforehand."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    kr, vr = (t.repeat_interleave(NQ // NKV, 1) for t in (k, v))
    results = {}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            results["gqa"] = median_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True))
        except RuntimeError:
            pass
        results["repeated kv"] = median_ms(lambda: sdpa(q, kr, vr, is_causal=True))
    how = min(results, key=results.get)
    return results[how], how, results


def prefill_inputs(dtype, s, head):
    b = max(1, TOKENS // s)
    return b, rnd(b, NQ, s, head, dtype=dtype), rnd(b, NKV, s, head, dtype=dtype), \
        rnd(b, NKV, s, head, dtype=dtype)


def causal_tflops(b, s, head, ms):
    return 4 * b * NQ * s * s * head / 2 / ms / 1e9


def tune_prefill(dtype, head, s=4096):
    """Times candidate tiles at one size; the best one is used for the table."""
    candidates = [launch.Tile(128, 64, 8, 2), launch.Tile(128, 64, 8, 3),
                  launch.Tile(128, 64, 8, 4), launch.Tile(128, 128, 8, 2),
                  launch.Tile(128, 128, 8, 3), launch.Tile(64, 64, 4, 3),
                  launch.Tile(128, 32, 4, 3), launch.Tile(64, 128, 4, 2)]
    b, q, k, v = prefill_inputs(dtype, s, head)
    timings = []
    for tile in candidates:
        try:
            ms = median_ms(lambda: kernels.attention(q, k, v, causal=1, tile=tile, decode=False))
        except (triton.runtime.errors.OutOfResources, RuntimeError) as err:
            print(f"  tile {tile}: {type(err).__name__}")
            continue
        timings.append((ms, tile))
        print(f"  {dtype} H{head} {tile}: {causal_tflops(b, s, head, ms):.0f} TFLOP/s")
    return min(timings, key=lambda t: t[0])[1], timings


def prefill_table(tiles):
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for head in (64, 128):
            for s in SIZES:
                b, q, k, v = prefill_inputs(dtype, s, head)
                tile = tiles[(dtype, head)]
                ours = median_ms(lambda: kernels.attention(q, k, v, causal=1, tile=tile,
                                                           decode=False))
                ref, how, both = sdpa_ms(q, k, v)
                rows.append(dict(dtype=str(dtype).split(".")[1], head=head, s=s, batch=b,
                                 ours=causal_tflops(b, s, head, ours),
                                 sdpa=causal_tflops(b, s, head, ref), sdpa_mode=how,
                                 sdpa_modes={m: causal_tflops(b, s, head, t)
                                             for m, t in both.items()}))
    return rows


def decode_call(b, past, head=128, tile=None, split=(4, 4)):
    """One decode step per input set, over a full static cache of `past` slots."""
    kv_bytes = 2 * b * NKV * past * head * 2
    sets = []
    for _ in range(copies(kv_bytes)):
        q = rnd(b, NQ, 1, head)
        k, v = rnd(b, NKV, past, head), rnd(b, NKV, past, head)
        lengths = torch.full((b,), past, dtype=torch.int32, device=DEV)
        sets.append((q, k, v, lengths))
    block_n = (tile or launch.decode_tile(NQ // NKV, head, head)).block_n
    splits = launch.decode_splits(b, NKV, past, block_n, 132, *split)
    fns = [lambda q=q, k=k, v=v, n=n: kernels.attention(q, k, v, None, None, n, causal=2,
                                                        decode=True, tile=tile, splits=splits)
           for q, k, v, n in sets]
    return fns, kv_bytes + 2 * sets[0][0].numel() * 2


def tune_decode():
    """Tiles x (programs per SM, least key blocks per program) on the shapes that need it."""
    candidates = [(launch.Tile(16, n, w, st), split) for n, w, st in
                  ((64, 4, 2), (64, 4, 3), (32, 4, 3), (128, 4, 2))
                  for split in ((4, 4), (8, 1), (16, 1))]
    timings = []
    for tile, split in candidates:
        total = 0.0
        for b, past in ((1, 4096), (1, 16384), (8, 4096)):
            fns, _ = decode_call(b, past, tile=tile, split=split)
            total += graph_ms(fns)
        timings.append((total, tile, split))
        print(f"  decode {tile} split {split}: {total * 1e3:.1f} us (B1/4k + B1/16k + B8/4k)")
    return min(timings, key=lambda t: t[0])[1:], timings


def decode_table(copy, tile, split):
    rows = []
    for past in (1024, 4096, 16384, 65536):
        for b in (1, 8, 64):
            fns, moved = decode_call(b, past, tile=tile, split=split)
            gbs = moved / graph_ms(fns) / 1e6
            rows.append(dict(past=past, batch=b, gbs=gbs, frac=gbs / copy))
            del fns
            torch.cuda.empty_cache()
    return rows


def rows_ops(tile):
    """(name, fn, bytes moved) for RoPE and the KV write at one row tile."""
    x, cos, sin, pos = rope_inputs(torch.float16, 128, 0, b=8, n=32, s=4096)
    y = torch.empty_like(x)
    cache, update = rnd(16, 8, 8192, 128), rnd(16, 8, 4096, 128)
    idx = torch.randint(0, 4096, (16,), device=DEV)
    rope_bytes = 2 * x.numel() * 2
    return [
        ("rope il0 out of place", lambda: kernels.rope(x, cos, sin, pos, out=y, tile=tile),
         rope_bytes),
        ("rope il1 out of place", lambda: kernels.rope(x, cos, sin, pos, interleaved=1, out=y,
                                                       tile=tile), rope_bytes),
        ("rope in place", lambda: kernels.rope(x, cos, sin, pos, out=x, tile=tile), rope_bytes),
        ("kv_write in place", lambda: kernels.kv_write(cache, update, idx, tile=tile),
         2 * update.numel() * 2),
    ]


def pointwise_table(copy):
    """Each op at its best row tile among a few (reported)."""
    best = {}
    for elems in (4096, 8192, 16384):
        for warps in (4, 8):
            tile = launch.RowTile(elems, warps)
            for name, fn, moved in rows_ops(tile):
                gbs = moved / graph_ms([fn]) / 1e6
                if gbs > best.get(name, {}).get("gbs", 0):
                    best[name] = dict(op=name, gbs=gbs, frac=gbs / copy, tile=str(tile))
            torch.cuda.empty_cache()
    return list(best.values())


# ---------------------------------------------------------------- report

def plot(path, prefill, decode, pointwise, copy):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    for dtype in ("float16", "bfloat16"):
        for head in (64, 128):
            sel = [r for r in prefill if r["dtype"] == dtype and r["head"] == head]
            line, = ax.plot([r["s"] for r in sel], [r["ours"] for r in sel], "o-",
                            label=f"ours {dtype} H{head}")
            ax.plot([r["s"] for r in sel], [r["sdpa"] for r in sel], "x--",
                    color=line.get_color(), label=f"SDPA {dtype} H{head}")
    ax.set(xscale="log", xlabel="sequence length", ylabel="TFLOP/s",
           title="causal prefill, 32 q / 8 kv heads")
    ax.legend(fontsize=7)
    ax = axes[1]
    for b in (1, 8, 64):
        sel = [r for r in decode if r["batch"] == b]
        ax.plot([r["past"] for r in sel], [r["gbs"] for r in sel], "o-", label=f"B={b}")
    ax.axhline(copy, color="k", ls=":", label="copy")
    ax.axhline(0.6 * copy, color="r", ls=":", label="60% floor")
    ax.set(xscale="log", xlabel="past length", ylabel="GB/s", title="decode attention fp16 H128")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.barh([r["op"] for r in pointwise], [r["gbs"] for r in pointwise])
    ax.axvline(copy, color="k", ls=":", label="copy")
    ax.axvline(0.9 * copy, color="r", ls=":", label="90% floor")
    ax.set(xlabel="GB/s", title="RoPE and KV write fp16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(checks, prefill, decode, pointwise, copy, tuning):
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{triton.__version__}  copy {copy:.0f} GB/s")
    print("\ncorrectness (relative error vs float64 reference)")
    for name, err, tol in checks:
        print(f"  {'ok ' if err <= tol else 'BAD'} {err:9.2e}  {name}")
    print("\ntuning:", {f"prefill fp16 H{h}": str(t) for (d, h), t in tuning.items()
                        if d == torch.float16})
    print("\nprefill causal TFLOP/s (floor: 0.9 x SDPA at fp16, H128, S >= 2048)")
    print("  dtype        H      S   B   ours   SDPA  ratio")
    for r in prefill:
        gated = r["dtype"] == "float16" and r["head"] == 128 and r["s"] >= 2048
        ratio = r["ours"] / r["sdpa"]
        verdict = ("met" if ratio >= 0.9 else f"MISSED by {0.9 - ratio:.2f}") if gated else ""
        print(f"  {r['dtype']:9s} {r['head']:4d} {r['s']:6d} {r['batch']:3d} {r['ours']:6.0f} "
              f"{r['sdpa']:6.0f} {ratio:6.2f}  {verdict}  (SDPA {r['sdpa_mode']})")
    print("\ndecode fp16 H128 (GB/s, fraction of copy; floor 0.6 at past>=4096)")
    for r in decode:
        verdict = ("met" if r["frac"] >= 0.6 else "MISSED") if r["past"] >= 4096 else ""
        print(f"  past {r['past']:6d} B {r['batch']:3d}: {r['gbs']:6.0f}  {r['frac']:.2f}  "
              f"{verdict}")
    print("\nRoPE / KV write (floor 0.9 of copy)")
    for r in pointwise:
        print(f"  {r['op']:24s} {r['gbs']:6.0f}  {r['frac']:.2f}  "
              f"{'met' if r['frac'] >= 0.9 else 'MISSED'}  {r['tile']}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--ptx", help="folder written by onnx_fuse.trt_plugins.aot_dump")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    checks = correctness()
    if args.ptx:
        checks += check_ptx(args.ptx)
    torch.cuda.empty_cache()
    copy = copy_gbs()
    tuning, sweeps = {}, {}
    for head in (64, 128):
        best, sweeps[(torch.float16, head)] = tune_prefill(torch.float16, head)
        tuning[(torch.float16, head)] = tuning[(torch.bfloat16, head)] = best
    prefill = prefill_table(tuning)
    (decode_tile, split), decode_sweep = tune_decode()
    print(f"decode tile {decode_tile}, (programs per SM, least blocks per program) {split}")
    decode = decode_table(copy, decode_tile, split)
    pointwise = pointwise_table(copy)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__, copy_gbs=copy, checks=checks,
                       tuning={f"{d}-{h}": [(ms, str(t)) for ms, t in s]
                               for (d, h), s in sweeps.items()},
                       decode_tuning=[(ms, str(t), m) for ms, t, m in decode_sweep],
                       prefill=prefill, decode=decode, pointwise=pointwise), f, indent=1)
    plot(os.path.join(args.out, "kernels.png"), prefill, decode, pointwise, copy)
    report(checks, prefill, decode, pointwise, copy, tuning)


if __name__ == "__main__":
    main()
