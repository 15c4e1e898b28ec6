"""Triton kernels for onnx_fuse.plugin_ops' ops, with torch launchers.

`attention` (flash prefill; split-KV decode when the queries of a KV head fit one tile),
`rope`, `kv_write` (from ops.py, loaded on first use: torch is needed only then);
`reference` holds their float64 torch definitions; `launch` the tiles and grids, shared with
the TensorRT AOT step. Needs torch and triton (the `kernels` extra). Inputs are made
contiguous; attributes match the ONNX op's.
"""
import importlib

_OPS = ("attention", "rope", "kv_write")


def __getattr__(name):
    if name in _OPS:
        return getattr(importlib.import_module(".ops", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
