"""Torch launchers of the kernels (the public functions of onnx_fuse.kernels)."""
import math
from dataclasses import astuple

import torch

from . import launch
from .attention_kernels import (attn_decode_combine_kernel, attn_decode_split_kernel,
                                attn_fwd_kernel)
from .kv_write_kernels import kv_write_kernel
from .rope_kernels import rope_kernel


def _neutral_inputs(q, k, key_mask, sinks, kv_lengths):
    b, nq = q.shape[:2]
    skv = k.shape[2]
    if key_mask is None:
        key_mask = torch.ones((1, 1), dtype=torch.bool, device=q.device)
    if sinks is None:
        sinks = torch.full((nq,), -math.inf, dtype=torch.float32, device=q.device)
    if kv_lengths is None:
        kv_lengths = torch.full((b,), skv, dtype=torch.int32, device=q.device)
    return key_mask, sinks, kv_lengths.to(torch.int32)


def attention(q, k, v, key_mask=None, sinks=None, kv_lengths=None, *, scale=None, causal=0,
              window=0, softcap=0.0, masked_row=0, decode=None, tile=None, splits=None, out=None):
    """The attention op. key_mask None: no mask; sinks None: none; kv_lengths None: Skv.

    decode None picks the split-KV kernel when the query rows of a KV head fit one tile.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, nq, sq, head = q.shape
    nkv, skv, head_v = k.shape[1], k.shape[2], v.shape[3]
    use_mask = key_mask is not None
    key_mask, sinks, kv_lengths = _neutral_inputs(q, k, key_mask, sinks, kv_lengths)
    scale = 1.0 / math.sqrt(head) if scale is None else scale
    const = launch.attention_constexprs(head, head_v, scale=scale, causal=causal, window=window,
                                        softcap=softcap, use_key_mask=use_mask)
    if out is None:
        out = torch.empty((b, nq, sq, head_v), dtype=q.dtype, device=q.device)
    inputs = (q, k, v, key_mask.contiguous(), sinks, kv_lengths)
    rows = nq // nkv * sq
    if decode is None:
        decode = rows <= 64 and skv >= 4 * sq
    if decode:
        _decode(inputs, out, const, int(masked_row), tile, splits)
    else:
        _prefill(inputs, out, const, int(masked_row), tile)
    return out


def _prefill(inputs, out, const, masked_row, tile):
    q, k = inputs[:2]
    (b, nq, sq, _), nkv, skv = q.shape, k.shape[1], k.shape[2]
    tile = tile or launch.prefill_tile(const["HEAD"], const["HEAD_V"])
    attn_fwd_kernel[launch.prefill_grid(b, nq, sq, tile)[:2]](
        *inputs, nq, nkv, sq, skv, out, MASKED_ROW=masked_row, BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n, num_warps=tile.num_warps, num_stages=tile.num_stages, **const)


def _decode(inputs, out, const, masked_row, tile, splits):
    """Split-KV: partial softmax per slice of the cache, then one merge per query row."""
    q, k, v, key_mask, sinks, kv_lengths = inputs
    (b, nq, sq, _), nkv, skv = q.shape, k.shape[1], k.shape[2]
    rows = nq // nkv * sq
    tile = tile or launch.decode_tile(rows, const["HEAD"], const["HEAD_V"])
    # every query row of a KV head lives in one tile
    tile = launch.Tile(max(tile.block_m, launch.next_pow2(rows)), *astuple(tile)[1:])
    splits = splits or launch.decode_splits(b, nkv, skv, tile.block_n, _sm_count(q))
    part_o = torch.empty((b * nq * sq, splits, const["HEAD_V"]), dtype=torch.float32,
                         device=q.device)
    part_m = torch.empty((b * nq * sq, splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    attn_decode_split_kernel[launch.decode_grid(b, nkv, splits)[:2]](
        q, k, v, key_mask, kv_lengths, nq, nkv, sq, skv, part_o, part_m, part_l,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps,
        num_stages=tile.num_stages, **const)
    attn_decode_combine_kernel[(b * nq * sq,)](
        part_o, part_m, part_l, sinks, v, nq, nkv, sq, skv, out, MASKED_ROW=masked_row,
        HEAD_V=const["HEAD_V"], BLOCK_DV=const["BLOCK_DV"], SPLITS=splits,
        BLOCK_S=launch.next_pow2(splits), BLOCK_N=tile.block_n, num_warps=4)


def _sm_count(t):
    if t.device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(t.device).multi_processor_count


def rope(x, cos_cache, sin_cache, position_ids, *, interleaved=0, rotary_dim=0, out=None,
         tile=None):
    """Out of place by default; out=x rotates in place."""
    x = x.contiguous()
    b, n, s, head = x.shape
    half = (rotary_dim or head) // 2
    in_place = out is not None and out.data_ptr() == x.data_ptr()
    out = torch.empty_like(x) if out is None else out
    tile = tile or launch.ROPE_TILE
    const = launch.rope_constexprs(head, half, interleaved, in_place, tile)
    rows = b * n * s
    rope_kernel[launch.rows_grid(rows, const["BLOCK_R"])[:1]](
        x, cos_cache.contiguous(), sin_cache.contiguous(), position_ids.contiguous(), rows,
        n * s, s, out, num_warps=tile.num_warps, **const)
    return out


def kv_write(cache, update, write_indices, *, tile=None):
    """Writes update into cache in place (cache must be contiguous) and returns it."""
    assert cache.is_contiguous()
    update = update.contiguous()
    b, n, length, head = cache.shape
    s = update.shape[2]
    tile = tile or launch.KV_WRITE_TILE
    const = launch.kv_write_constexprs(head, tile)
    rows = b * n * s
    kv_write_kernel[launch.rows_grid(rows, const["BLOCK_R"])[:1]](
        cache, update, write_indices.contiguous(), rows, n, s, length, cache,
        num_warps=tile.num_warps, **const)
    return cache
