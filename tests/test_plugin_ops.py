"""Layer 1: the plugin ops' function bodies, run by onnxruntime (CPU), against an independent
float64 numpy reference of the op contract (loops over every query, no broadcasting tricks).
"""
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_fuse import plugin_ops

NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16,
              np.int32: TensorProto.INT32, np.int64: TensorProto.INT64, np.bool_: TensorProto.BOOL,
              np.uint8: TensorProto.UINT8}


def run(node, feeds, out_dtype, opset=23, functions=None):
    """One node in a model with its function attached, through onnxruntime."""
    inputs = [helper.make_tensor_value_info(n, NP_TO_ONNX[a.dtype.type], a.shape)
              for n, a in feeds.items()]
    output = helper.make_tensor_value_info(node.output[0], NP_TO_ONNX[out_dtype], [None] * 4)
    graph = helper.make_graph([node], "g", inputs, [output])
    model = helper.make_model(graph, opset_imports=plugin_ops.opset_imports(opset),
                              functions=functions or plugin_ops.functions_for(graph, opset))
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


# ---------------------------------------------------------------- attention

def attention_ref(q, k, v, key_mask, sinks, kv_lengths, scale, causal, window, softcap,
                  masked_row, use_key_mask):
    q, k, v = (t.astype(np.float64) for t in (q, k, v))
    b_, nq, sq, _ = q.shape
    nkv, skv, hv = k.shape[1], k.shape[2], v.shape[3]
    out = np.zeros((b_, nq, sq, hv))
    for b in range(b_):
        length = min(max(int(kv_lengths[b]), 0), skv)
        for h in range(nq):
            g = h // (nq // nkv)
            for i in range(sq):
                p = length - sq + i if causal == 2 else i
                logits, rows = [], []
                for j in range(skv):
                    visible = j < length and (not use_key_mask or key_mask[b, j] != 0)
                    if causal:
                        visible = visible and j <= p and (window == 0 or j > p - window)
                    if visible:
                        s = scale * float(q[b, h, i] @ k[b, g, j])
                        if softcap > 0:
                            s = softcap * math.tanh(s / softcap)
                        logits.append(s)
                        rows.append(v[b, g, j])
                sink = float(sinks[h])
                if not logits and sink == -math.inf:
                    out[b, h, i] = v[b, g].mean(0) if masked_row else 0.0
                    continue
                top = max(logits + [sink])
                weights = [math.exp(s - top) for s in logits]
                den = sum(weights) + math.exp(sink - top)
                out[b, h, i] = sum((w * r for w, r in zip(weights, rows)), np.zeros(hv)) / den
    return out


def attention_inputs(rng, dtype, b=2, nq=4, nkv=2, sq=3, skv=9, head=8, head_v=6,
                     mask_dtype=np.bool_, empty_row=False, sinks=False):
    q = rng.standard_normal((b, nq, sq, head)).astype(dtype)
    k = rng.standard_normal((b, nkv, skv, head)).astype(dtype)
    v = rng.standard_normal((b, nkv, skv, head_v)).astype(dtype)
    mask = np.ones((b, skv), dtype=mask_dtype)
    mask[0, :2] = 0                       # left padding
    mask[1, skv - 2:] = 0                 # right padding
    if empty_row:
        mask[1] = 0
    lengths = np.array([skv, skv - 1], dtype=np.int32)[:b]
    sink = (rng.standard_normal(nq) if sinks else np.full(nq, -np.inf)).astype(np.float32)
    return dict(Q=q, K=k, V=v, key_mask=mask, sinks=sink, kv_lengths=lengths)


ATTENTION_CASES = [
    dict(causal=0),
    dict(causal=1),
    dict(causal=2),
    dict(causal=1, window=2),
    dict(causal=2, window=3),
    dict(causal=2, window=1, softcap=2.0),
    dict(causal=0, sinks=True),
    dict(causal=2, sinks=True, softcap=1.5),
    dict(causal=0, empty_row=True, masked_row=0),
    dict(causal=2, empty_row=True, masked_row=1),
    dict(causal=1, empty_row=True, masked_row=1, sinks=True),
    dict(causal=2, use_key_mask=0),
    dict(causal=2, mask_dtype=np.int64, nq=6, nkv=1),           # MQA, int mask
    dict(causal=2, sq=12, skv=9),                               # more queries than valid keys
    dict(causal=1, nq=4, nkv=4, head=8, head_v=8, mask_dtype=np.int32),
]
TOL = {np.float32: 1e-5, np.float16: 3e-3}


def case_id(case):
    return "-".join(f"{k}{getattr(v, '__name__', v)}" for k, v in case.items())


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_id)
def test_attention_body(dtype, case):
    case = dict(case)
    shape = {k: case.pop(k) for k in ("nq", "nkv", "sq", "skv", "head", "head_v", "mask_dtype",
                                      "empty_row", "sinks") if k in case}
    feeds = attention_inputs(np.random.default_rng(0), dtype, **shape)
    attrs = dict(dict(scale=0.4, causal=0, window=0, softcap=0.0, masked_row=0, use_key_mask=1),
                 **case)
    if feeds["key_mask"].dtype == np.bool_ and not attrs["use_key_mask"]:
        feeds["key_mask"] = np.ones((1, 1), dtype=np.bool_)
    node = plugin_ops.attention_node(*feeds, "Y", **attrs)
    out = run(node, feeds, dtype)
    ref = attention_ref(**{k.lower() if k in "QKV" else k: a for k, a in feeds.items()}, **attrs)
    assert out.dtype == dtype and out.shape == ref.shape
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_window_off_by_one_body_fails_the_comparison():
    """The comparison can fail: the same body with j >= p - window instead of j > p - window."""
    feeds = attention_inputs(np.random.default_rng(1), np.float32)
    attrs = dict(scale=0.4, causal=2, window=3, softcap=0.0, masked_row=0, use_key_mask=1)
    broken = plugin_ops.function(plugin_ops.ATTENTION.name)
    bound = next(n for n in broken.node if n.name == "window_lower_bound")
    bound.op_type = "GreaterOrEqual"
    node = plugin_ops.attention_node(*feeds, "Y", **attrs)
    ref = attention_ref(**{k.lower() if k in "QKV" else k: a for k, a in feeds.items()}, **attrs)
    np.testing.assert_allclose(run(node, feeds, np.float32), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(run(node, feeds, np.float32, functions=[broken]), ref,
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- RoPE

def rope_ref(x, cos, sin, pos, interleaved, rotary_dim):
    x = x.astype(np.float64)
    out = x.copy()
    r = rotary_dim or x.shape[-1]
    for b, n, s in np.ndindex(*x.shape[:3]):
        c, sn = cos[pos[b, s]].astype(np.float64), sin[pos[b, s]].astype(np.float64)
        for kk in range(r // 2):
            ia, ib = (2 * kk, 2 * kk + 1) if interleaved else (kk, kk + r // 2)
            a, bb = x[b, n, s, ia], x[b, n, s, ib]
            out[b, n, s, ia] = a * c[kk] - bb * sn[kk]
            out[b, n, s, ib] = bb * c[kk] + a * sn[kk]
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("head,rotary_dim", [(8, 0), (8, 4), (12, 6)])
def test_rope_body(dtype, interleaved, head, rotary_dim):
    rng = np.random.default_rng(2)
    positions, half = 16, (rotary_dim or head) // 2
    angles = rng.standard_normal((positions, half)) * 3
    feeds = dict(x=rng.standard_normal((2, 3, 5, head)).astype(dtype),
                 cos_cache=np.cos(angles).astype(dtype), sin_cache=np.sin(angles).astype(dtype),
                 position_ids=rng.integers(0, positions, (2, 5)).astype(np.int64))
    node = plugin_ops.rope_node(*feeds, "y", interleaved=interleaved, rotary_dim=rotary_dim)
    out = run(node, feeds, dtype)
    ref = rope_ref(*feeds.values(), interleaved, rotary_dim)
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=TOL[dtype], atol=TOL[dtype])


# ---------------------------------------------------------------- KV write

def kv_write_ref(cache, update, idx):
    out = cache.copy()
    for b in range(cache.shape[0]):
        for t in range(update.shape[2]):
            if 0 <= idx[b] + t < cache.shape[2]:
                out[b, :, idx[b] + t] = update[b, :, t]
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_kv_write_body(dtype, index_dtype):
    rng = np.random.default_rng(3)
    length, steps = 10, 3
    feeds = dict(cache=rng.standard_normal((4, 2, length, 5)).astype(dtype),
                 update=rng.standard_normal((4, 2, steps, 5)).astype(dtype),
                 # the last slots, past the end (dropped), from the start, before it (dropped)
                 write_indices=np.array([length - steps, length - 1, 0, -2], dtype=index_dtype))
    out = run(plugin_ops.kv_write_node(*feeds, "present"), feeds, dtype)
    np.testing.assert_array_equal(out, kv_write_ref(*feeds.values()))


# ---------------------------------------------------------------- the contract

def test_nodes_carry_the_plugin_binding():
    node = plugin_ops.attention_node("q", "k", "v", "m", "s", "l", "y", scale=0.125, causal=2)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "onnx_fuse.trt" and node.op_type == "FusedAttention"
    assert attrs["plugin_namespace"] == b"onnx_fuse" and attrs["plugin_version"] == b"1"
    assert {a.name: a.type for a in node.attribute} == {
        "scale": onnx.AttributeProto.FLOAT, "causal": onnx.AttributeProto.INT,
        "window": onnx.AttributeProto.INT, "softcap": onnx.AttributeProto.FLOAT,
        "masked_row": onnx.AttributeProto.INT, "use_key_mask": onnx.AttributeProto.INT,
        "plugin_namespace": onnx.AttributeProto.STRING,
        "plugin_version": onnx.AttributeProto.STRING}


def test_op_names_avoid_tensorrt_builtin_importers():
    for name in plugin_ops.OPS:
        assert name not in ("Attention", "RotaryEmbedding", "TensorScatter")
        assert not name.startswith("TRT_")


@pytest.mark.parametrize("bad", [dict(scale=0.0), dict(scale=0.1, causal=3),
                                 dict(scale=0.1, window=4), dict(scale=0.1, softcap=-1.0),
                                 dict(scale=0.1, bogus=1)])
def test_attention_node_rejects_bad_attributes(bad):
    with pytest.raises(ValueError):
        plugin_ops.make_node("FusedAttention", list("qkvmsl"), ["y"], **bad)


def test_nodes_need_every_input():
    with pytest.raises(ValueError):
        plugin_ops.make_node("FusedKVWrite", ["cache", "update", ""], ["present"])


@pytest.mark.parametrize("opset", [18, 24])
def test_bodies_at_other_opsets(opset):
    feeds = attention_inputs(np.random.default_rng(4), np.float32)
    attrs = dict(scale=0.4, causal=2, window=3, softcap=0.0, masked_row=1, use_key_mask=1)
    out = run(plugin_ops.attention_node(*feeds, "Y", **attrs), feeds, np.float32, opset=opset)
    ref = attention_ref(**{k.lower() if k in "QKV" else k: a for k, a in feeds.items()}, **attrs)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
