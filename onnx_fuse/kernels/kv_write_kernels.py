"""Triton KV-cache write: update [B, N, S, H] into cache [B, N, L, H] at slots w[b] .. w[b] + S - 1.

In place: the kernel touches only the written slots, so the cache is never copied (TensorRT
aliases the plugin's output to its cache input). Slots outside [0, L) are dropped, as
TensorRT's KV-cache update drops out-of-range writes.
"""
import triton
import triton.language as tl


@triton.jit
def kv_write_kernel(Cache, Update, WriteIdx, Rows, N, S, L, Out, HEAD: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid (cdiv(Rows, BLOCK_R),), Rows = B * N * S; Out is Cache (in place)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    bn = rows // S
    t = rows % S
    slot = tl.load(WriteIdx + bn // N, mask=rows < Rows, other=0).to(tl.int64) + t
    ok = (rows < Rows) & (slot >= 0) & (slot < L)
    mask = ok[:, None] & (d[None, :] < HEAD)
    x = tl.load(Update + rows[:, None] * HEAD + d[None, :], mask=mask)
    tl.store(Out + (bn * L + slot)[:, None] * HEAD + d[None, :], x, mask=mask)
