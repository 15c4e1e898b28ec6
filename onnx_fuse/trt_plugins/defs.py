"""tensorrt.plugin definitions of the ops; importing this module registers them.

Descriptors give TensorRT the output shapes (FusedKVWrite's output aliases its cache input);
aot_impl returns the PTX and launch parameters from aot.py, with TensorRT's symbolic shapes
passed through the same grid functions the torch launchers use; autotune lists the supported
types (one combination per dtype, every position single-typed) and tactics; impl is the JIT
fallback through onnx_fuse.kernels on TensorRT's stream.
"""
from typing import Tuple

import tensorrt as trt
import tensorrt.plugin as trtp

from .. import plugin_ops
from . import aot

NS = plugin_ops.PLUGIN_NAMESPACE
ATTENTION = f"{NS}::{plugin_ops.ATTENTION.name}"
ROPE = f"{NS}::{plugin_ops.ROPE.name}"
KV_WRITE = f"{NS}::{plugin_ops.KV_WRITE.name}"

TRITON_TYPES = {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32",
                trt.int32: "i32", trt.int64: "i64", trt.bool: "i1"}
FLOATS = ("FP16", "BF16")


def _arch():
    """The compute capability TensorRT builds for: the current GPU's (e.g. 90)."""
    import triton

    return triton.runtime.driver.active.get_current_target().arch


def _static(dim, what):
    if not dim.is_constant:
        raise ValueError(f"{what} must be static to compile the kernel")
    return dim.constant_value()


def _launch(params):
    out = trtp.KernelLaunchParams()
    out.grid_x, out.grid_y, out.grid_z = params.grid
    out.block_x, out.block_y, out.block_z = params.block
    out.shared_mem = params.shared
    return out


def _extra(values):
    return trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in values])


def _torch(*tensors):
    import torch

    return [torch.as_tensor(t, device="cuda") for t in tensors]


def _on_stream(stream):
    import torch

    return torch.cuda.stream(torch.cuda.ExternalStream(stream))


# ---------------------------------------------------------------- FusedAttention

@trtp.register(ATTENTION)
def attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                   key_mask: trtp.TensorDesc, sinks: trtp.TensorDesc,
                   kv_lengths: trtp.TensorDesc, scale: float, causal: int, window: int,
                   softcap: float, masked_row: int, use_key_mask: int) -> trtp.TensorDesc:
    out = q.like()
    out.shape_expr[3] = v.shape_expr[3]
    return out


@trtp.autotune(ATTENTION)
def attention_autotune(q, k, v, key_mask, sinks, kv_lengths, outputs):
    combos = []
    for dtype in FLOATS:
        for mask in ("BOOL", "INT32"):
            for sink in ("FP32", dtype):
                combos.append(trtp.AutoTuneCombination(
                    f"{dtype}, {dtype}, {dtype}, {mask}, {sink}, INT32, {dtype}", "LINEAR",
                    [1, 2]))
    return combos


@trtp.aot_impl(ATTENTION)
def attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                  key_mask: trtp.TensorDesc, sinks: trtp.TensorDesc, kv_lengths: trtp.TensorDesc,
                  scale: float, causal: int, window: int, softcap: float, masked_row: int,
                  use_key_mask: int, outputs: Tuple[trtp.TensorDesc], tactic: int):
    head = _static(q.shape_expr[3], "the head size")
    head_v = _static(v.shape_expr[3], "V's head size")
    attrs = dict(scale=scale, causal=causal, window=window, softcap=softcap,
                 masked_row=masked_row, use_key_mask=use_key_mask)
    tile = aot.attention_tactics(head, head_v)[tactic]
    compiled, tile = aot.attention_kernel(TRITON_TYPES[q.dtype], TRITON_TYPES[key_mask.dtype],
                                          TRITON_TYPES[sinks.dtype], head, head_v, attrs,
                                          _arch(), tile)
    b, nq, sq = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
    params = aot.attention_launch(compiled, tile, b, nq, sq)
    extra = aot.attention_extra_args(nq, k.shape_expr[1], sq, k.shape_expr[2])
    return compiled.name, compiled.ptx, _launch(params), _extra(extra)


@trtp.impl(ATTENTION)
def attention_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, key_mask: trtp.Tensor,
                   sinks: trtp.Tensor, kv_lengths: trtp.Tensor, scale: float, causal: int,
                   window: int, softcap: float, masked_row: int, use_key_mask: int,
                   outputs: Tuple[trtp.Tensor], stream: int, tactic: int) -> None:
    from .. import kernels

    q_t, k_t, v_t, mask_t, sinks_t, len_t, out_t = _torch(q, k, v, key_mask, sinks, kv_lengths,
                                                         outputs[0])
    with _on_stream(stream):
        kernels.attention(q_t, k_t, v_t, mask_t if use_key_mask else None, sinks_t, len_t,
                          scale=scale, causal=causal, window=window, softcap=softcap,
                          masked_row=masked_row, out=out_t)


# ---------------------------------------------------------------- FusedRotary

@trtp.register(ROPE)
def rope_desc(x: trtp.TensorDesc, cos_cache: trtp.TensorDesc, sin_cache: trtp.TensorDesc,
              position_ids: trtp.TensorDesc, interleaved: int, rotary_dim: int) -> trtp.TensorDesc:
    return x.like()


@trtp.autotune(ROPE)
def rope_autotune(x, cos_cache, sin_cache, position_ids, outputs):
    return [trtp.AutoTuneCombination(f"{t}, {t}, {t}, INT64, {t}", "LINEAR", [1]) for t in FLOATS]


@trtp.aot_impl(ROPE)
def rope_aot(x: trtp.TensorDesc, cos_cache: trtp.TensorDesc, sin_cache: trtp.TensorDesc,
             position_ids: trtp.TensorDesc, interleaved: int, rotary_dim: int,
             outputs: Tuple[trtp.TensorDesc], tactic: int):
    head = _static(x.shape_expr[3], "the head size")
    half = (rotary_dim or head) // 2
    compiled, const = aot.rope_kernel(TRITON_TYPES[x.dtype], head, half, interleaved, _arch())
    b, n, s = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
    params = aot.rows_launch(compiled, const, b * n * s)
    return compiled.name, compiled.ptx, _launch(params), _extra(aot.rope_extra_args(b, n, s))


@trtp.impl(ROPE)
def rope_impl(x: trtp.Tensor, cos_cache: trtp.Tensor, sin_cache: trtp.Tensor,
              position_ids: trtp.Tensor, interleaved: int, rotary_dim: int,
              outputs: Tuple[trtp.Tensor], stream: int, tactic: int) -> None:
    from .. import kernels

    x_t, cos_t, sin_t, pos_t, out_t = _torch(x, cos_cache, sin_cache, position_ids, outputs[0])
    with _on_stream(stream):
        kernels.rope(x_t, cos_t, sin_t, pos_t, interleaved=interleaved, rotary_dim=rotary_dim,
                     out=out_t)


# ---------------------------------------------------------------- FusedKVWrite

@trtp.register(KV_WRITE)
def kv_write_desc(cache: trtp.TensorDesc, update: trtp.TensorDesc,
                  write_indices: trtp.TensorDesc) -> trtp.TensorDesc:
    return cache.aliased()


@trtp.autotune(KV_WRITE)
def kv_write_autotune(cache, update, write_indices, outputs):
    return [trtp.AutoTuneCombination(f"{t}, {t}, {i}, {t}", "LINEAR", [1])
            for t in FLOATS for i in ("INT32", "INT64")]


@trtp.aot_impl(KV_WRITE)
def kv_write_aot(cache: trtp.TensorDesc, update: trtp.TensorDesc,
                 write_indices: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc], tactic: int):
    head = _static(cache.shape_expr[3], "the head size")
    compiled, const = aot.kv_write_kernel(TRITON_TYPES[cache.dtype],
                                          TRITON_TYPES[write_indices.dtype], head, _arch())
    b, n, length, s = (cache.shape_expr[0], cache.shape_expr[1], cache.shape_expr[2],
                       update.shape_expr[2])
    params = aot.rows_launch(compiled, const, b * n * s)
    return compiled.name, compiled.ptx, _launch(params), _extra(
        aot.kv_write_extra_args(b, n, length, s))


@trtp.impl(KV_WRITE)
def kv_write_impl(cache: trtp.Tensor, update: trtp.Tensor, write_indices: trtp.Tensor,
                  outputs: Tuple[trtp.Tensor], stream: int, tactic: int) -> None:
    from .. import kernels

    out_t, update_t, idx_t = _torch(outputs[0], update, write_indices)
    with _on_stream(stream):
        kernels.kv_write(out_t, update_t, idx_t)
