"""Tile configurations and launch grids, shared by the torch launchers and the TensorRT AOT step.

Grid functions use only + - * // so they work on ints and on TensorRT's symbolic shape
expressions alike (trt_plugins passes tensorrt.plugin ShapeExprs through them).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a, b):
    return (a + b - 1) // b


def prefill_tile(head, head_v):
    """Hopper tiles: 128-row query blocks over 8 warps (two warpgroups); smaller for large heads."""
    width = max(next_pow2(head), next_pow2(head_v))
    if width <= 64:
        return Tile(128, 128, 8, 3)
    if width <= 128:
        return Tile(128, 128, 8, 2)
    return Tile(64, 64, 4, 2)


def decode_tile(group_rows, head, head_v):
    """Rows = query heads per KV head x queries (at least 16, tl.dot's minimum)."""
    width = max(next_pow2(head), next_pow2(head_v))
    return Tile(max(16, next_pow2(group_rows)), 64 if width <= 128 else 32, 4, 3)


def decode_splits(batch, nkv, skv, block_n, sms=132):
    """Enough programs to keep every multiprocessor streaming, each over 4+ key blocks."""
    want = cdiv(4 * sms, batch * nkv)
    return max(1, min(want, cdiv(skv, 4 * block_n)))


def prefill_grid(batch, nq, sq, tile):
    return (cdiv(sq, tile.block_m), batch * nq, 1)


def decode_grid(batch, nkv, splits):
    return (splits, batch * nkv, 1)


def rows_tile(head):
    """Rows per program for the row-wise kernels (RoPE, KV write): ~4K elements each."""
    width = next_pow2(head)
    return max(1, 4096 // width), width


def rows_grid(rows, block_r):
    return (cdiv(rows, block_r), 1, 1)
