"""Triton RoPE: x [B, N, S, H] rotated by cos/sin tables [P, R/2] gathered at position_ids [B, S].

One code path for both layouts: each element d < R pairs with a partner element
(d ^ 1 interleaved, d -+ R/2 rotate-half) and out[d] = x[d] cos[k] + sign x[partner] sin[k].
Rows are loaded whole and contiguous; the partner load hits the same cache lines. Elements
d >= R pass through. In place (Out = X) is safe: a program reads all of its rows before it
writes them, and programs own disjoint rows.
"""
import triton
import triton.language as tl


@triton.jit
def rope_kernel(X, Cos, Sin, Pos, Rows, NS, S, Out, HEAD: tl.constexpr, HALF: tl.constexpr,
                INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid (cdiv(Rows, BLOCK_R),), Rows = B * N * S, NS = N * S: row r is (r // NS, ., r % S)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < Rows
    rows64 = rows.to(tl.int64)
    b = rows64 // NS
    s = rows64 % S
    pos = tl.load(Pos + b * S + s, mask=row_ok, other=0)
    rot = d < 2 * HALF
    if INTERLEAVED:
        partner = d ^ 1
        k = d // 2
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    else:
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        k = tl.where(d < HALF, d, d - HALF)
        sign = tl.where(d < HALF, -1.0, 1.0)
    ok = row_ok[:, None] & (d[None, :] < HEAD)
    base = rows64[:, None] * HEAD
    x = tl.load(X + base + d[None, :], mask=ok, other=0.0).to(tl.float32)
    rok = ok & rot[None, :]
    xp = tl.load(X + base + partner[None, :], mask=rok, other=0.0).to(tl.float32)
    t = pos[:, None] * HALF + k[None, :]
    c = tl.load(Cos + t, mask=rok, other=1.0).to(tl.float32)
    sn = tl.load(Sin + t, mask=rok, other=0.0).to(tl.float32)
    out = x * c + sign[None, :] * xp * sn
    tl.store(Out + base + d[None, :], out.to(Out.dtype.element_ty), mask=ok)
