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
    """Hopper tiles: 128-row query blocks over 8 warps (two warpgroups), 3 stages of 64 keys.

    Best of 8 candidates on an H200 for heads 64 and 128 (benchmarks/KERNELS.md); larger
    heads halve the tiles to fit shared memory.
    """
    width = max(next_pow2(head), next_pow2(head_v))
    if width <= 128:
        return Tile(128, 64, 8, 3)
    return Tile(64, 64, 4, 2)


def decode_tile(group_rows, head, head_v):
    """Rows = query heads per KV head x queries (at least 16, tl.dot's minimum).

    32-key blocks, 3 stages: best of 12 tile/split candidates on an H200 (within 10% of all).
    """
    return Tile(max(16, next_pow2(group_rows)), 32, 4, 3)


def decode_splits(batch, nkv, skv, block_n, sms=132, per_sm=4, min_blocks=4):
    """Enough programs for per_sm per multiprocessor, each over min_blocks+ key blocks."""
    want = cdiv(per_sm * sms, batch * nkv)
    return max(1, min(want, cdiv(skv, min_blocks * block_n)))


def prefill_grid(batch, nq, sq, tile):
    return (cdiv(sq, tile.block_m), batch * nq, 1)


def decode_grid(batch, nkv, splits):
    return (splits, batch * nkv, 1)


@dataclass(frozen=True)
class RowTile:
    """Row-wise kernels (RoPE, KV write): elements per program and warps."""
    elems: int
    num_warps: int


# Best of 6 on an H200 (benchmarks/KERNELS.md).
ROPE_TILE = RowTile(4096, 4)
KV_WRITE_TILE = RowTile(4096, 8)


def rows_per_program(width, tile):
    return max(1, tile.elems // width)


def rows_grid(rows, block_r):
    return (cdiv(rows, block_r), 1, 1)


def attention_constexprs(head, head_v, *, scale, causal, window, softcap, use_key_mask):
    """The op's attributes and head sizes as the attention kernels' constexprs."""
    return dict(SCALE=float(scale), SOFTCAP=float(softcap), CAUSAL=int(causal), WINDOW=int(window),
                HAS_MASK=bool(use_key_mask), HEAD=head, HEAD_V=head_v,
                BLOCK_D=next_pow2(head), BLOCK_DV=next_pow2(head_v))


def rope_constexprs(head, half, interleaved, in_place, tile):
    block_h = next_pow2(half)
    rest = head - 2 * half
    return dict(HEAD=head, HALF=half, INTERLEAVED=bool(interleaved),
                COPY_REST=bool(rest) and not in_place, BLOCK_H=block_h,
                BLOCK_P=next_pow2(max(rest, 1)),
                BLOCK_R=rows_per_program(2 * block_h, tile))


def kv_write_constexprs(head, tile):
    block_d = next_pow2(head)
    return dict(HEAD=head, BLOCK_D=block_d, BLOCK_R=rows_per_program(block_d, tile))
