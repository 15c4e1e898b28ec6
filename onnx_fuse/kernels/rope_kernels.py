"""Triton RoPE: x [B, N, S, H] rotated by cos/sin tables [P, R/2] gathered at position_ids [B, S].

Every access is a contiguous tile, so loads and stores are 16-byte vectors: rotate-half
loads the two halves as two tiles; interleaved loads the pairs as one tile and splits it in
registers (tl.split / tl.join). Elements d >= R pass through: copied out of place, untouched
in place (out = x), which is safe because each program reads its rows before writing them
and programs own disjoint rows.
"""
import triton
import triton.language as tl


@triton.jit
def _rotate(x1, x2, c, s):
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def rope_kernel(X, Cos, Sin, Pos, Rows, NS, S, Out, HEAD: tl.constexpr, HALF: tl.constexpr,
                INTERLEAVED: tl.constexpr, COPY_REST: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid (cdiv(Rows, BLOCK_R),), Rows = B * N * S, NS = N * S: row r is (r // NS, ., r % S)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < Rows
    pos = tl.load(Pos + (rows // NS) * S + rows % S, mask=row_ok, other=0)
    k = tl.arange(0, BLOCK_H)
    ok = row_ok[:, None] & (k[None, :] < HALF)
    t = pos[:, None] * HALF + k[None, :]
    c = tl.load(Cos + t, mask=ok, other=1.0).to(tl.float32)
    s = tl.load(Sin + t, mask=ok, other=0.0).to(tl.float32)
    base = X + rows[:, None] * HEAD
    out = Out + rows[:, None] * HEAD
    dt = Out.dtype.element_ty
    if INTERLEAVED:
        d = tl.arange(0, 2 * BLOCK_H)
        pair_ok = row_ok[:, None] & (d[None, :] < 2 * HALF)
        x = tl.load(base + d[None, :], mask=pair_ok, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_R, BLOCK_H, 2]))
        o1, o2 = _rotate(x1, x2, c, s)
        y = tl.reshape(tl.join(o1, o2), [BLOCK_R, 2 * BLOCK_H])
        tl.store(out + d[None, :], y.to(dt), mask=pair_ok)
    else:
        x1 = tl.load(base + k[None, :], mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + k[None, :], mask=ok, other=0.0).to(tl.float32)
        o1, o2 = _rotate(x1, x2, c, s)
        tl.store(out + k[None, :], o1.to(dt), mask=ok)
        tl.store(out + HALF + k[None, :], o2.to(dt), mask=ok)
    if COPY_REST:
        p = 2 * HALF + tl.arange(0, BLOCK_P)
        rest_ok = row_ok[:, None] & (p[None, :] < HEAD)
        tl.store(out + p[None, :], tl.load(base + p[None, :], mask=rest_ok), mask=rest_ok)
