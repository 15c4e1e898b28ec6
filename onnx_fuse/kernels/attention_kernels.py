"""Triton attention kernels: flash-attention forward (prefill) and split-KV decode.

Semantics are those of onnx_fuse.plugin_ops' attention op (reference.attention). Inputs are
contiguous: Q [B, Nq, Sq, H], K [B, Nkv, Skv, H], V [B, Nkv, Skv, Hv], key_mask [B, Skv],
sinks [Nq], kv_lengths int32 [B]; out [B, Nq, Sq, Hv]. Query head h reads KV head
h // (Nq // Nkv), so GQA/MQA never materializes repeated K/V.

Kernel signatures keep TensorRT's AOT order (tensor inputs, int32 scalars, outputs) and take
the op's attributes as constexprs, so the same kernel serves the torch launcher here and
trt_plugins' ahead-of-time compilation (which can pass only int32 scalars at run time).
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _scores(q, k_t, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """Scores in the log2 domain (exp2 is the fast path): scale, then the tanh softcap."""
    s = tl.dot(q, k_t)
    if SOFTCAP > 0:
        x = s * (SCALE / SOFTCAP)
        # tanh through exp: saturates cleanly at +-1 when exp overflows or underflows.
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
        s = t * (SOFTCAP * LOG2E)
    else:
        s = s * (SCALE * LOG2E)
    return s


@triton.jit
def _keep(offs_n, pos, kv_len, Mb, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
          HAS_MASK: tl.constexpr, POSITIONAL: tl.constexpr):
    """[M, N] visibility of keys offs_n from queries at positions pos."""
    keep = offs_n[None, :] < kv_len
    if POSITIONAL:
        if CAUSAL != 0:
            keep = keep & (offs_n[None, :] <= pos[:, None])
            if WINDOW > 0:
                keep = keep & (offs_n[None, :] > pos[:, None] - WINDOW)
    if HAS_MASK:
        km = tl.load(Mb + offs_n, mask=offs_n < kv_len, other=0)
        keep = keep & (km != 0)[None, :]
    return keep


@triton.jit
def _attn_loop(acc, m_i, l_i, q, Kb, Vb, Mb, lo, hi, pos, kv_len,
               SCALE: tl.constexpr, SOFTCAP: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
               HEAD: tl.constexpr, HEAD_V: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASKED: the blocks may hold invisible keys."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_mask = (offs_d[None, :] < HEAD)
        v_mask = (offs_dv[None, :] < HEAD_V)
        if MASKED:
            k_mask = k_mask & (offs_n[:, None] < kv_len)
            v_mask = v_mask & (offs_n[:, None] < kv_len)
        k = tl.load(Kb + offs_n[:, None] * HEAD + offs_d[None, :], mask=k_mask, other=0.0)
        s = _scores(q, tl.trans(k), SCALE, SOFTCAP)
        if MASKED or HAS_MASK:
            keep = _keep(offs_n, pos, kv_len, Mb, CAUSAL, WINDOW, HAS_MASK, MASKED)
            s = tl.where(keep, s, NEG_INF)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(Vb + offs_n[:, None] * HEAD_V + offs_dv[None, :], mask=v_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _mean_v(Vb, Skv, HEAD_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mean of V over all Skv keys: what a finite-min softmax gives a fully masked row."""
    offs_dv = tl.arange(0, BLOCK_DV)
    total = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, Skv, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        v = tl.load(Vb + offs_n[:, None] * HEAD_V + offs_dv[None, :],
                    mask=(offs_n[:, None] < Skv) & (offs_dv[None, :] < HEAD_V), other=0.0)
        total += tl.sum(v.to(tl.float32), 0)
    return total / Skv


@triton.jit
def _finish(acc, l_i, Vb, Skv, row_ok, MASKED_ROW: tl.constexpr, HEAD_V: tl.constexpr,
            BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Normalize; rows with no visible key and no sink get zeros or the mean of V."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if MASKED_ROW == 1:
        if tl.max(tl.where(empty & row_ok, 1, 0), 0) > 0:
            mean = _mean_v(Vb, Skv, HEAD_V, BLOCK_DV, BLOCK_N)
            out = tl.where(empty[:, None], mean[None, :], out)
    return out


@triton.jit
def _key_ranges(pmin, pmax, kv_len, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) any query in [pmin, pmax] sees, and [flo, fhi) that all see fully.

    Blocks outside [lo, hi) are skipped; [lo, flo) and [fhi, hi) need the positional mask.
    """
    hi = kv_len
    fhi = kv_len
    if CAUSAL != 0:
        hi = tl.minimum(hi, pmax + 1)
        fhi = tl.minimum(fhi, pmin + 1)
    hi = tl.maximum(hi, 0)
    fhi = tl.maximum(fhi, 0) // BLOCK_N * BLOCK_N
    lo = hi * 0
    flo = hi * 0
    if CAUSAL != 0:
        if WINDOW > 0:
            lo = tl.maximum(pmin - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
            flo = tl.cdiv(tl.maximum(pmax - WINDOW + 1, 0), BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    flo = tl.maximum(flo, lo)
    fhi = tl.minimum(fhi, hi)
    no_full = fhi < flo
    flo = tl.where(no_full, hi, flo)
    fhi = tl.where(no_full, hi, fhi)
    return lo, flo, fhi, hi


@triton.jit
def _init_softmax(Sinks, h, BLOCK_M: tl.constexpr):
    """Running max and sum start from the sink logit: it joins the softmax denominator."""
    sink = tl.load(Sinks + h).to(tl.float32) * LOG2E
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
    l_i = tl.where(m_i == NEG_INF, 0.0, 1.0)
    return m_i, l_i


@triton.jit
def attn_fwd_kernel(Q, K, V, Mask, Sinks, KvLen, Nq, Nkv, Sq, Skv, Out,
                    SCALE: tl.constexpr, SOFTCAP: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW: tl.constexpr, MASKED_ROW: tl.constexpr, HAS_MASK: tl.constexpr,
                    HEAD: tl.constexpr, HEAD_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Sq, BLOCK_M), B * Nq): one program per query block and head."""
    pid_m = tl.program_id(0)
    if CAUSAL != 0:
        # The longest causal rows first: the tail of the grid gets the short ones.
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // Nq
    h = pid_bh % Nq
    g = h // (Nq // Nkv)
    kv_len = tl.minimum(tl.maximum(tl.load(KvLen + b), 0), Skv)
    offset = 0
    if CAUSAL == 2:
        offset = kv_len - Sq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    q_base = (b * Nq + h).to(tl.int64) * Sq
    q = tl.load(Q + (q_base + offs_m[:, None]) * HEAD + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD), other=0.0)
    kv_base = (b * Nkv + g).to(tl.int64) * Skv
    Kb = K + kv_base * HEAD
    Vb = V + kv_base * HEAD_V
    Mb = Mask + b.to(tl.int64) * Skv
    pos = offs_m + offset
    pmin = pid_m * BLOCK_M + offset
    pmax = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Sq) - 1 + offset
    lo, flo, fhi, hi = _key_ranges(pmin, pmax, kv_len, CAUSAL, WINDOW, BLOCK_N)
    m_i, l_i = _init_softmax(Sinks, h, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, m_i, l_i = _attn_loop(acc, m_i, l_i, q, Kb, Vb, Mb, lo, flo, pos, kv_len, SCALE,
                               SOFTCAP, CAUSAL, WINDOW, HAS_MASK, True, HEAD, HEAD_V, BLOCK_D,
                               BLOCK_DV, BLOCK_N)
    acc, m_i, l_i = _attn_loop(acc, m_i, l_i, q, Kb, Vb, Mb, flo, fhi, pos, kv_len, SCALE,
                               SOFTCAP, CAUSAL, WINDOW, HAS_MASK, False, HEAD, HEAD_V, BLOCK_D,
                               BLOCK_DV, BLOCK_N)
    acc, m_i, l_i = _attn_loop(acc, m_i, l_i, q, Kb, Vb, Mb, fhi, hi, pos, kv_len, SCALE,
                               SOFTCAP, CAUSAL, WINDOW, HAS_MASK, True, HEAD, HEAD_V, BLOCK_D,
                               BLOCK_DV, BLOCK_N)
    out = _finish(acc, l_i, Vb, Skv, row_ok, MASKED_ROW, HEAD_V, BLOCK_DV, BLOCK_N)
    tl.store(Out + (q_base + offs_m[:, None]) * HEAD_V + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_V))


@triton.jit
def attn_decode_split_kernel(Q, K, V, Mask, KvLen, Nq, Nkv, Sq, Skv, PartO, PartM, PartL,
                             SCALE: tl.constexpr, SOFTCAP: tl.constexpr, CAUSAL: tl.constexpr,
                             WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HEAD: tl.constexpr,
                             HEAD_V: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    """Grid (splits, B * Nkv): one program per KV head and slice of the cache.

    Its rows are every query of every query head that reads this KV head (group * Sq rows),
    so each K/V tile is read from memory once. Writes unnormalized partials per split.
    """
    split = tl.program_id(0)
    splits = tl.num_programs(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // Nkv
    g = pid_bg % Nkv
    group = Nq // Nkv
    kv_len = tl.minimum(tl.maximum(tl.load(KvLen + b), 0), Skv)
    offset = 0
    if CAUSAL == 2:
        offset = kv_len - Sq
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < group * Sq
    h = g * group + rows // Sq
    i = rows % Sq
    q_row = ((b * Nq + h).to(tl.int64) * Sq + i)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + q_row[:, None] * HEAD + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD), other=0.0)
    kv_base = (b * Nkv + g).to(tl.int64) * Skv
    pos = i + offset
    lo, flo, fhi, hi = _key_ranges(offset, Sq - 1 + offset, kv_len, CAUSAL, WINDOW, BLOCK_N)
    chunk = tl.cdiv(tl.cdiv(Skv, BLOCK_N), splits) * BLOCK_N
    s_lo = tl.maximum(lo, split * chunk)
    s_hi = tl.minimum(hi, split * chunk + chunk)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + NEG_INF
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, m_i, l_i = _attn_loop(acc, m_i, l_i, q, K + kv_base * HEAD, V + kv_base * HEAD_V,
                               Mask + b.to(tl.int64) * Skv, s_lo, s_hi, pos, kv_len, SCALE,
                               SOFTCAP, CAUSAL, WINDOW, HAS_MASK, True, HEAD, HEAD_V, BLOCK_D,
                               BLOCK_DV, BLOCK_N)
    part = q_row * splits + split
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(PartO + part[:, None] * HEAD_V + offs_dv[None, :], acc,
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_V))
    tl.store(PartM + part, m_i, mask=row_ok)
    tl.store(PartL + part, l_i, mask=row_ok)


@triton.jit
def attn_decode_combine_kernel(PartO, PartM, PartL, Sinks, V, Nq, Nkv, Sq, Skv, Out,
                               MASKED_ROW: tl.constexpr, HEAD_V: tl.constexpr,
                               BLOCK_DV: tl.constexpr, SPLITS: tl.constexpr,
                               BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (B * Nq * Sq,): merges the splits of one query row, adding the sink."""
    row = tl.program_id(0).to(tl.int64)
    h = (row // Sq) % Nq
    b = row // (Sq * Nq)
    g = h // (Nq // Nkv)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < SPLITS
    m = tl.load(PartM + row * SPLITS + offs_s, mask=s_ok, other=NEG_INF)
    l = tl.load(PartL + row * SPLITS + offs_s, mask=s_ok, other=0.0)
    sink = tl.load(Sinks + h).to(tl.float32) * LOG2E
    m_all = tl.maximum(tl.max(m, 0), sink)
    m_use = tl.where(m_all == NEG_INF, 0.0, m_all)
    w = tl.math.exp2(m - m_use)
    acc = tl.load(PartO + (row * SPLITS + offs_s)[:, None] * HEAD_V + offs_dv[None, :],
                  mask=s_ok[:, None] & (offs_dv[None, :] < HEAD_V), other=0.0)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0) + tl.math.exp2(sink - m_use)
    out = num / tl.where(den == 0.0, 1.0, den)
    if MASKED_ROW == 1:
        if den == 0.0:
            out = _mean_v(V + (b * Nkv + g) * Skv * HEAD_V, Skv, HEAD_V, BLOCK_DV, BLOCK_N)
    tl.store(Out + row * HEAD_V + offs_dv, out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_V)
