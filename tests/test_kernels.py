"""Layer 2: every Triton kernel against its torch reference, on tiny shapes.

Runs on the CPU through Triton's interpreter. Triton reads TRITON_INTERPRET when it is
imported, so this module sets it first; in a process that imported Triton for compilation
before (test_trt_plugins collected first), the module is skipped: run it on its own. Small
tiles (16) make every shape span several blocks, so the full/masked block split, the causal
skipping and the split-KV merge are all exercised.
"""
import math
import os
import sys

import pytest

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("triton")
import triton.language.standard  # noqa: E402

if type(triton.language.standard.cdiv).__name__ != "InterpretedFunction":
    pytest.skip("Triton was imported without TRITON_INTERPRET=1 in this process",
                allow_module_level=True)

from onnx_fuse import kernels  # noqa: E402
from onnx_fuse.kernels import launch, reference  # noqa: E402

SMALL = launch.Tile(16, 16, 4, 1)
# Triton's interpreter computes tl.dot on bfloat16 operands wrongly (a 16x16 product off by
# ~1e10, seen with Triton 3.9), so attention runs in float16 here; its bfloat16 path is checked
# on the GPU (benchmarks/bench_kernels.py, KERNELS.md). RoPE and the KV write use no dot.
DOT_DTYPES = [torch.float16]
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def close(out, ref, dtype):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    err = (out - ref).norm() / ref.norm().clamp_min(1e-12)
    assert err < TOL[dtype], f"relative error {err:.2e}"
    assert (out - ref).abs().max() < 20 * TOL[dtype] * ref.abs().max().clamp_min(1)


def attention_inputs(gen, dtype, b=2, nq=4, nkv=2, sq=19, skv=37, head=24, head_v=16,
                     padding=True, empty_row=False):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)
    q, k, v = rnd(b, nq, sq, head), rnd(b, nkv, skv, head), rnd(b, nkv, skv, head_v)
    mask = torch.ones(b, skv, dtype=torch.bool)
    lengths = torch.full((b,), skv, dtype=torch.int32)
    if padding:
        mask[0, :3] = False            # left padding
        lengths[1] = skv - 5           # right padding through kv_lengths
        mask[1, skv - 9:] = False      # and through the mask
    if empty_row:
        mask[b - 1] = False
    sinks = torch.randn(nq, generator=gen)
    return q, k, v, mask, sinks, lengths


CASES = [
    dict(causal=0),
    dict(causal=1),
    dict(causal=2),
    dict(causal=2, window=5),
    dict(causal=1, window=7, softcap=4.0),
    dict(causal=0, sinks=True),
    dict(causal=2, sinks=True, softcap=3.0),
    dict(causal=0, empty_row=True, masked_row=0),
    dict(causal=2, empty_row=True, masked_row=1),
    dict(causal=1, empty_row=True, masked_row=1, sinks=True),
    dict(causal=2, no_mask=True, nq=6, nkv=1),   # MQA, no key mask input
]


def run_attention(dtype, case, decode, sq, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, mask, sinks, lengths = attention_inputs(gen, dtype, sq=sq, nq=case.get("nq", 4),
                                                     nkv=case.get("nkv", 2),
                                                     empty_row=case.get("empty_row", False))
    mask = None if case.get("no_mask") else mask
    sinks = sinks if case.get("sinks") else None
    attrs = dict(scale=0.3, causal=case["causal"], window=case.get("window", 0),
                 softcap=case.get("softcap", 0.0), masked_row=case.get("masked_row", 0))
    out = kernels.attention(q, k, v, mask, sinks, lengths, decode=decode, tile=SMALL,
                            splits=3 if decode else None, **attrs)
    ref_mask = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool) if mask is None else mask
    ref_sinks = torch.full((q.shape[1],), -math.inf) if sinks is None else sinks
    ref = reference.attention(q, k, v, ref_mask, ref_sinks, lengths, **attrs)
    close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_attention_prefill(dtype, case):
    run_attention(dtype, case, decode=False, sq=19, seed=1)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("case", CASES[1:], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_attention_decode(dtype, sq, case):
    run_attention(dtype, case, decode=True, sq=sq, seed=2)


def test_reference_window_is_hugging_face_convention():
    """Key j is visible from position p iff p - window < j <= p."""
    vis = reference.visible_keys(torch.ones(1, 8, dtype=torch.bool), torch.tensor([8]), 8, 8,
                                 causal=1, window=3)
    assert vis[0, 5].nonzero().flatten().tolist() == [3, 4, 5]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("head,rotary_dim", [(32, 0), (32, 16), (24, 12)])
@pytest.mark.parametrize("in_place", [False, True])
def test_rope(dtype, interleaved, head, rotary_dim, in_place):
    gen = torch.Generator().manual_seed(3)
    b, n, s, positions = 2, 3, 5, 40
    half = (rotary_dim or head) // 2
    x = torch.randn(b, n, s, head, generator=gen).to(dtype)
    angles = torch.randn(positions, half, generator=gen) * 3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    pos = torch.randint(0, positions, (b, s), generator=gen)
    ref = reference.rope(x, cos, sin, pos, interleaved=interleaved, rotary_dim=rotary_dim)
    target = x.clone() if in_place else None
    out = kernels.rope(x if target is None else target, cos, sin, pos, interleaved=interleaved,
                       rotary_dim=rotary_dim, out=target)
    if in_place:
        assert out.data_ptr() == target.data_ptr()
    close(out, ref, dtype)
    assert torch.equal(out[..., rotary_dim or head:], x[..., rotary_dim or head:])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("head", [32, 24])
def test_kv_write(index_dtype, head):
    gen = torch.Generator().manual_seed(4)
    b, n, length, s = 3, 2, 11, 3
    cache = torch.randn(b, n, length, head, generator=gen).half()
    update = torch.randn(b, n, s, head, generator=gen).half()
    # the last slots exactly, a write running off the end (dropped), one from the start
    idx = torch.tensor([length - s, length - 1, 0], dtype=index_dtype)
    ref = reference.kv_write(cache, update, idx)
    out = kernels.kv_write(cache, update, idx)
    assert out.data_ptr() == cache.data_ptr()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("case", [c for c in CASES if not c.get("no_mask")],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_reference_matches_the_onnx_function_body(case):
    """The kernels' reference and the op's ONNX body (onnxruntime) compute the same function."""
    from test_plugin_ops import run

    from onnx_fuse import plugin_ops

    gen = torch.Generator().manual_seed(5)
    q, k, v, mask, sinks, lengths = attention_inputs(gen, torch.float32, sq=5, skv=11,
                                                     empty_row=case.get("empty_row", False))
    sinks = sinks if case.get("sinks") else torch.full((4,), -math.inf)
    attrs = dict(scale=0.3, causal=case["causal"], window=case.get("window", 0),
                 softcap=case.get("softcap", 0.0), masked_row=case.get("masked_row", 0))
    feeds = dict(Q=q.numpy(), K=k.numpy(), V=v.numpy(), key_mask=mask.numpy(),
                 sinks=sinks.numpy(), kv_lengths=lengths.numpy())
    body = run(plugin_ops.attention_node(*feeds, "Y", **attrs), feeds, q.numpy().dtype.type)
    ref = reference.attention(q, k, v, mask, sinks, lengths, **attrs)
    torch.testing.assert_close(torch.from_numpy(body), ref, rtol=1e-5, atol=1e-5)
