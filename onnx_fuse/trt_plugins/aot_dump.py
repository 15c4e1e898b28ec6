"""Writes AOT PTX and its launch parameters for a few fixed shapes, to inspect or to launch.

    python -m onnx_fuse.trt_plugins.aot_dump DIR

DIR gets one .ptx per kernel and architecture and manifest.json (kernel name, grid, block,
shared memory, int32 extra arguments, shapes, attributes). benchmarks/bench_kernels.py --ptx
DIR launches them through the CUDA driver on a GPU, as TensorRT would, and checks the results.
"""
import json
import math
import os
import sys

from . import aot

HIDDEN_PARAMS = 2   # Triton's global and profile scratch pointers, unused by these kernels


def _attention(arch, label, b, sq, skv, head, **attrs):
    full = dict(dict(scale=1 / math.sqrt(head), window=0, softcap=0.0, masked_row=0,
                     use_key_mask=1), **attrs)
    compiled, tile = aot.attention_kernel("fp16", "i1", "fp32", head, head, full, arch)
    params = aot.attention_launch(compiled, tile, b, 32, sq)
    return compiled, params, aot.attention_extra_args(32, 8, sq, skv), dict(
        op="attention", label=label, shape=[b, sq, skv, head],
        attrs={k: v for k, v in full.items() if k != "scale"})


def _rope(arch, b, n, s, head):
    compiled, const = aot.rope_kernel("fp16", head, head // 2, 0, arch)
    params = aot.rows_launch(compiled, const, b * n * s)
    return compiled, params, aot.rope_extra_args(b, n, s), dict(
        op="rope", label="rope", shape=[b, n, s, head], attrs=dict(interleaved=0, rotary_dim=0))


def _kv_write(arch, b, n, length, s, head):
    compiled, const = aot.kv_write_kernel("fp16", "i64", head, arch)
    params = aot.rows_launch(compiled, const, b * n * s)
    return compiled, params, aot.kv_write_extra_args(b, n, length, s), dict(
        op="kv_write", label="kv_write", shape=[b, n, length, s, head], attrs={})


def dump(folder):
    os.makedirs(folder, exist_ok=True)
    manifest = []
    for arch in aot.ARCHS:
        jobs = [_attention(arch, "attention lower-right+pad+sinks", 2, 300, 1000, 128, causal=2),
                _attention(arch, "attention window+softcap+mean-V rows", 2, 300, 1000, 128,
                           causal=1, window=64, softcap=20.0, masked_row=1),
                _rope(arch, 2, 8, 256, 128), _kv_write(arch, 4, 8, 512, 16, 128)]
        for i, (compiled, params, extra, entry) in enumerate(jobs):
            file = f"sm{arch}_{i}_{entry['op']}.ptx"
            with open(os.path.join(folder, file), "w") as f:
                f.write(compiled.ptx)
            manifest.append(dict(entry, arch=arch, file=file, name=compiled.name,
                                 grid=list(params.grid), block=list(params.block),
                                 shared=params.shared, extra_args=list(extra),
                                 hidden_params=HIDDEN_PARAMS))
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


if __name__ == "__main__":
    dump(sys.argv[1])
