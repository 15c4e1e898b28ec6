"""Torch references of the plugin ops: the semantics of onnx_fuse.plugin_ops, computed in float64.

Each function computes what the kernels must compute, in the most direct form (no tiling, no
online softmax), so a kernel is checked against the op's definition and not against itself.
"""
import math

import torch


def query_positions(kv_lengths, sq, causal):
    """Position of each query [B, Sq]: upper-left (i) or lower-right (kv_lengths[b] - Sq + i)."""
    i = torch.arange(sq, device=kv_lengths.device)
    offset = kv_lengths.long() - sq
    if causal != 2:
        offset = torch.zeros_like(offset)
    return offset[:, None] + i[None, :]


def visible_keys(key_mask, kv_lengths, sq, skv, causal, window, use_key_mask=1):
    """[B, Sq, Skv] bool: which key each query may attend to."""
    j = torch.arange(skv, device=kv_lengths.device)
    lengths = kv_lengths.long().clamp(0, skv)
    valid = j[None, :] < lengths[:, None]
    if use_key_mask:
        valid = valid & (key_mask != 0)
    vis = valid[:, None, :].expand(-1, sq, -1)
    if causal:
        p = query_positions(lengths, sq, causal)[:, :, None]
        vis = vis & (j <= p)
        if window:
            vis = vis & (j > p - window)
    return vis


def attention(q, k, v, key_mask, sinks, kv_lengths, *, scale, causal=0, window=0, softcap=0.0,
              masked_row=0, use_key_mask=1):
    b, nq, sq, _ = q.shape
    nkv, skv = k.shape[1], k.shape[2]
    group = nq // nkv
    qd, kd, vd = (t.double() for t in (q, k, v))
    kd = kd.repeat_interleave(group, dim=1)
    vd = vd.repeat_interleave(group, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", qd, kd) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    vis = visible_keys(key_mask, kv_lengths, sq, skv, causal, window, use_key_mask)[:, None]
    s = s.masked_fill(~vis, -math.inf)
    sink = sinks.double().view(1, nq, 1, 1).expand(b, nq, sq, 1)
    m = torch.maximum(s.amax(-1, keepdim=True), sink)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True) + torch.exp(sink - m)
    empty = denom == 0
    out = (e @ vd) / torch.where(empty, torch.ones_like(denom), denom)
    fallback = vd.mean(2, keepdim=True) * masked_row
    out = torch.where(empty, fallback.expand_as(out), out)
    return out.to(q.dtype)


def rope(x, cos_cache, sin_cache, position_ids, *, interleaved=0, rotary_dim=0):
    h = x.shape[-1]
    r = rotary_dim or h
    xd = x.double()
    cos = cos_cache.double()[position_ids][:, None]
    sin = sin_cache.double()[position_ids][:, None]
    rot = xd[..., :r]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, xd[..., r:]), dim=-1).to(x.dtype)


def kv_write(cache, update, write_indices):
    """The cache with update[b, :, t] at slot write_indices[b] + t; slots outside [0, L) dropped."""
    out = cache.clone()
    length, steps = cache.shape[2], update.shape[2]
    for b, start in enumerate(write_indices.tolist()):
        for t in range(steps):
            if 0 <= start + t < length:
                out[b, :, start + t] = update[b, :, t]
    return out
