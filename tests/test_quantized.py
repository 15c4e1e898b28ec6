"""Quantized attention (issue 15): Q/DQ pairs as NVIDIA ModelOpt writes them.

The committed quantized models (models/quantized/, made by ModelOpt on CPU) fuse under
primitive-trt and trt11 with the check passing and the lint finding the Q/DQ placement valid;
hand-built graphs cover what ModelOpt did not write: a pair on the scores before the scale, one
on the scaled scores, Sage-style dynamic quantization, per-channel and mismatched pairs, a core
with Q/K/V pairs only (which target onnx keeps around Attention). The checker's part is tested
too: the opset conversion of a float16 Q/DQ model agrees exactly under it and not without it, its
quantization-noise tolerance is reported per output, and it still fails wrong models.
"""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_fuse
from graphs import GraphBuilder
from onnx_fuse import check, lint
from onnx_fuse.check import ModelRef
from onnx_fuse.errors import CheckFailed
from onnx_fuse.exact_quantize import exactly_quantized
from onnx_fuse.opset import raise_opset
from onnx_fuse.targets.base import Target
from onnx_fuse.specs import AttentionSpec

HERE = os.path.dirname(__file__)
QUANTIZED = os.path.join(HERE, os.pardir, "models", "quantized")
QUANT_MANIFEST = json.load(open(os.path.join(QUANTIZED, "manifest.json")))["files"]
MANIFEST = json.load(open(os.path.join(HERE, os.pardir, "models", "manifest.json")))["files"]
FUSABLE = sorted(name for name, entry in QUANT_MANIFEST.items() if entry["quantization"]["attention_fusable"])
MISPLACED = sorted(name for name in QUANT_MANIFEST if name not in FUSABLE)
# The fp8 Llama prefill gives NaN for its whole left-padded batch row (float16 scores plus
# finfo.min overflow to -inf, fp8 keeps the NaN that int8 saturates away, and 0 · NaN carries it
# from the padded keys to the real tokens); TRT_QuantizedAttention's clamped mask gives numbers
# there, so the check refuses the result (exit 1, nothing written) and says why; on inputs the
# original is defined on (no padded row) it fuses and checks.
NAN_ROWS = {("llama-gqa_prefill_eager_torchscript_fp8.onnx", "trt11")}


def path(name):
    return os.path.join(QUANTIZED, name)


def quant_findings(model):
    """The lint's Q/DQ-placement findings of every verdict, at TensorRT 11."""
    return [f["message"] for v in lint.lint(model, "11")["verdicts"] for f in v["findings"]
            if f["rule"] == "quantization"]


# --------------------------------------------------------------------------- committed models


@pytest.mark.parametrize("target", ["primitive-trt", "trt11"])
@pytest.mark.parametrize("name", FUSABLE)
def test_every_quantized_core_fuses_with_its_pairs(name, target):
    check_batch = None
    if (name, target) in NAN_ROWS:
        with pytest.raises(CheckFailed, match="the original computes NaN at .* --check-batch 1"):
            onnx_fuse.fuse(path(name), target=target, max_positions=128)
        check_batch = 1  # what the message tells the user: inputs without the padded row
    result = onnx_fuse.fuse(path(name), target=target, max_positions=128, check_batch=check_batch)
    cores = MANIFEST[QUANT_MANIFEST[name]["source"]]["attention_cores"]
    attention = [f.spec for f in result.fused if isinstance(f.spec, AttentionSpec)]
    assert len(attention) == cores and not [u for u in result.unfused if u.pattern == "attention"]
    mode = {"int8": "int8", "fp8": "float8e4m3fn"}[QUANT_MANIFEST[name]["quantization"]["mode"]]
    for spec in attention:
        pairs = spec.quant.summary()
        assert sorted(pairs) == ["key", "probs", "query", "value"]
        assert {p["dtype"] for p in pairs.values()} == {mode} and {p["zero_point"] for p in pairs.values()} == {0.0}
    assert result.report["check"]["passed"]
    for output in result.report["check"]["outputs"].values():  # the tolerance says where it came from
        assert output["tolerance"]["quantization_noise"] >= 0
    assert quant_findings(result.proto) == []
    if target == "trt11":
        nodes = [n for n in result.proto.graph.node if n.op_type == "TRT_QuantizedAttention"]
        assert len(nodes) == cores and all(len(n.input) == 5 for n in nodes)
        assert lint.exit_code(lint.lint(result.proto, "11")) == 0


@pytest.mark.parametrize("target", ["onnx", "primitive-trt", "trt11"])
def test_modelopts_pair_on_the_scaled_scores_is_left_unfused_with_the_reason(target):
    name, = MISPLACED
    result = onnx_fuse.fuse(path(name), target=target, max_positions=128)
    reasons = [u.reason for u in result.unfused if u.pattern == "attention"]
    assert len(reasons) == MANIFEST[QUANT_MANIFEST[name]["source"]]["attention_cores"]
    assert all(r.startswith("a Q/DQ pair sits on the scaled scores before the mask") for r in reasons)
    assert not [f for f in result.fused if isinstance(f.spec, AttentionSpec)]
    assert any("sits on the scores" in m for m in quant_findings(onnx.load(path(name))))


def test_target_onnx_refuses_a_quantized_softmax_output():
    result = onnx_fuse.fuse(path(FUSABLE[0]), target="onnx")
    assert {u.reason for u in result.unfused} == {
        "ONNX Attention cannot quantize its softmax output (the Q/DQ pair before the product with V): "
        "the quantized core is left as it is"}


# --------------------------------------------------------------------------- the function body


def quantized_attention_node(dtype, attrs, mask=None):
    """One TRT_QuantizedAttention over float32 Q [2, 4, 3, 8], K/V [2, 2, 5, 8] with its body."""
    from onnx_fuse.targets.trt11_quantized import quantized_attention_function

    names = ["q", "k", "v", "m" if mask is not None else "", "s"]
    node = helper.make_node("TRT_QuantizedAttention", names, ["y"], domain="trt",
                            normalization_quantize_to_type=dtype, **attrs)
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "k", "v")]
    if mask is not None:
        values.append(helper.make_tensor_value_info("m", TensorProto.BOOL, None))
    scale = onnx.numpy_helper.from_array(np.array(1 / 127 if dtype == TensorProto.INT8 else 1 / 448, np.float32), "s")
    graph = helper.make_graph([node], "g", values, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("trt", 1)],
                              functions=[quantized_attention_function(23)])
    model.ir_version = 10
    return model, float(onnx.numpy_helper.to_array(scale))


def reference(q, k, v, step, dtype, scale, causal=False, mask=None):
    """Attention-23 with the softmax output quantized: numpy, float64."""
    import ml_dtypes

    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1).astype(np.float64), np.repeat(v, rep, axis=1).astype(np.float64)
    scores = scale * q.astype(np.float64) @ np.swapaxes(k, -1, -2)
    visible = np.ones(scores.shape, bool) if mask is None else np.broadcast_to(mask, scores.shape)
    if causal:
        visible = visible & np.tril(np.ones(scores.shape[-2:], bool))
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    if dtype == TensorProto.INT8:
        codes = np.clip(np.rint(probs / np.float32(step)), -128, 127)
    else:
        codes = (probs / np.float32(step)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return (codes * step) @ v


@pytest.mark.parametrize("dtype", [TensorProto.INT8, TensorProto.FLOAT8E4M3FN])
@pytest.mark.parametrize("case", ["plain", "causal", "mask"])
def test_the_body_computes_quantized_attention(dtype, case):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ([2, 4, 3, 8], [2, 2, 5, 8], [2, 2, 5, 8]))
    mask = rng.random((2, 1, 3, 5)) > 0.3 if case == "mask" else None
    if mask is not None:
        mask[..., 0] = True  # no row hides every key
    attrs = {"scale": 0.3, **({"is_causal": 1} if case == "causal" else {})}
    model, step = quantized_attention_node(dtype, attrs, mask)
    feeds = {"q": q, "k": k, "v": v, **({"m": mask} if mask is not None else {})}
    got = check.run_model(ModelRef(model), feeds)["y"]
    want = reference(q, k, v, step, dtype, 0.3, causal=case == "causal", mask=mask)
    assert np.abs(got - want).max() < 1e-5
    wrong = reference(q, k, v, step * 2, dtype if dtype == TensorProto.INT8 else TensorProto.INT8, 0.3,
                      causal=case == "causal", mask=mask)  # another quantization: it must show
    assert np.abs(got - wrong).max() > 1e-3


# --------------------------------------------------------------------------- hand-built graphs

B, N, S, H = 2, 4, 6, 8
STEP = {"q": 0.05, "k": 0.06, "v": 0.04, "probs": 1 / 127, "scores": 0.1}


def pair(g, x, scale, zero_point=np.int8(0), dq_scale=None):
    codes = g.op("QuantizeLinear", x, g.const(scale), g.const(zero_point, zero_point.dtype))
    return g.op("DequantizeLinear", codes, g.const(scale if dq_scale is None else dq_scale),
                g.const(zero_point, zero_point.dtype))


def dynamic(g, x):
    names = [f"{x}_dq{i}" for i in range(3)]
    g.nodes.append(helper.make_node("DynamicQuantizeLinear", [x], names, name=f"{x}_dynamic"))
    return g.op("DequantizeLinear", *names)


def quantized_attention(pairs=("q", "k", "v", "probs"), on_scores=None, sage=False, k_scale=None,
                        k_dq_scale=None, opset=19):
    """softmax(Q Kᵀ / sqrt(H) + padding mask) V, float32, with Q/DQ pairs on `pairs`; `on_scores`:
    a pair on the product before its scale ("qk_product") or after it ("scaled"); `sage`:
    DynamicQuantizeLinear on Q, K and V instead."""
    g = GraphBuilder()
    q, k, v = (g.input(name, TensorProto.FLOAT, ["B", N, "S", H]) for name in "qkv")
    mask = g.input("mask", TensorProto.FLOAT, ["B", 1, 1, "S"])
    quantize = (lambda x, name: dynamic(g, x)) if sage else (
        lambda x, name: pair(g, x, STEP[name]) if name in pairs else x)
    key_t = g.op("Transpose", k, perm=[0, 1, 3, 2])
    if k_scale is not None:
        key_t = pair(g, key_t, k_scale, dq_scale=k_dq_scale)
    else:
        key_t = quantize(key_t, "k")
    scores = g.op("MatMul", quantize(q, "q"), key_t)
    if on_scores == "qk_product":
        scores = pair(g, scores, STEP["scores"])
    scores = g.op("Mul", scores, g.const(1 / np.sqrt(H)))
    if on_scores == "scaled":
        scores = pair(g, scores, STEP["scores"])
    probs = g.op("Softmax", g.op("Add", scores, mask), axis=-1)
    probs = pair(g, probs, STEP["probs"]) if "probs" in pairs and not sage else probs
    return g.model(g.op("MatMul", probs, quantize(v, "v")), opset=opset)


def feeds(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, 1, 1, S), np.float32)
    mask[1, ..., :2] = np.finfo(np.float32).min  # a left-padded row
    return {**{name: rng.standard_normal((B, N, S, H)).astype(np.float32) for name in "qkv"}, "mask": mask}


def unfused_reasons(model, target="trt11"):
    result = onnx_fuse.fuse(model, target=target, inputs=feeds())
    return [u.reason for u in result.unfused if u.pattern == "attention"], result


@pytest.mark.parametrize("where, says", [
    ("qk_product", "a Q/DQ pair sits on the Q·Kᵀ product before its scale"),
    ("scaled", "a Q/DQ pair sits on the scaled scores before the mask"),
])
def test_a_pair_on_the_scores_is_left_unfused_with_the_reason(where, says):
    for target in ("onnx", "primitive-trt", "trt11"):
        reasons, result = unfused_reasons(quantized_attention(on_scores=where), target)
        assert len(reasons) == 1 and reasons[0].startswith(says), reasons
        assert not result.fused and result.report["counts"] == {}


def test_sage_dynamic_quantization_is_recognised_and_left_intact():
    model = quantized_attention(sage=True)
    reasons, result = unfused_reasons(model)
    assert reasons == ["Q, K, V quantized dynamically (DynamicQuantizeLinear, Sage-style attention): left "
                       "as it is, since TensorRT's parser takes no DynamicQuantizeLinear"]
    assert result.proto.SerializeToString() == model.SerializeToString()


def test_per_channel_and_mismatched_pairs_are_refused_with_the_reason():
    per_channel, _ = unfused_reasons(quantized_attention(k_scale=np.full(S, 0.06, np.float32)))
    assert per_channel[0].startswith("K is quantized per channel or per block")
    mismatched, _ = unfused_reasons(quantized_attention(k_scale=0.06, k_dq_scale=0.07))
    assert mismatched == ["the Q/DQ pair on K quantizes and dequantizes with different scales or zero points"]


def test_target_onnx_keeps_the_qkv_pairs_in_front_of_attention():
    result = onnx_fuse.fuse(quantized_attention(pairs=("q", "k", "v")), target="onnx", inputs=feeds())
    assert result.report["counts"] == {"attention": 1} and result.report["check"]["passed"]
    graph = result.proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    attention, = [n for n in graph.node if n.op_type == "Attention"]
    for name in attention.input[:3]:  # Q, K (transposed back) and V each straight from a pair
        dq = producer[name]
        assert dq.op_type == "DequantizeLinear" and producer[dq.input[0]].op_type == "QuantizeLinear"


@pytest.mark.parametrize("pairs, missing", [(("q", "k", "v"), "probs is"), (("q", "v", "probs"), "key is")])
def test_trt11_needs_all_four_pairs(pairs, missing):
    reasons, _ = unfused_reasons(quantized_attention(pairs=pairs))
    assert reasons == [f"TRT_QuantizedAttention needs Q/DQ pairs on Q, K, V and the softmax output; {missing} "
                       "not quantized"]


@pytest.mark.parametrize("target", ["primitive-trt", "trt11"])
def test_hand_built_quantized_core_fuses_and_checks(target):
    result = onnx_fuse.fuse(quantized_attention(), target=target, inputs=feeds())
    assert result.report["counts"] == {"attention": 1} and result.report["check"]["passed"]
    assert quant_findings(result.proto) == []


def test_a_target_that_does_not_keep_quantization_refuses_it():
    class Plain(Target):
        name = "plain"
        floor_opset = 23
        emitters = {AttentionSpec: lambda spec, rw: None}

    spec = AttentionSpec.__new__(AttentionSpec)
    spec.quant = object()
    assert Plain().refusal(spec) == "target plain does not write quantized attention (its Q/DQ pairs); left as it is"


# --------------------------------------------------------------------------- the checker


def test_float16_conversion_to_opset_23_agrees_exactly_only_when_quantize_divides_exactly():
    source = onnx.load(path("vit_encoder_eager_torchscript_fp8.onnx"))
    converted = raise_opset(source, 23)
    x = {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    as_checked = [check.run_model(ModelRef(m), x)["logits"] for m in (source, converted)]
    assert np.array_equal(*as_checked)
    from onnx_fuse import runtime  # onnxruntime's own kernels: the opsets round differently

    raw = [runtime.session(m.SerializeToString()).run(None, x)[0] for m in (source, converted)]
    assert np.abs(raw[0] - raw[1]).max() > 1e-2
    plain = onnx.load(os.path.join(HERE, os.pardir, "models", "vit_encoder_eager_torchscript.onnx"))
    assert exactly_quantized(plain) is plain


def doubled_query_scale(model):
    """`model` (primitive-trt's output) with the factor on Q doubled, its Q/DQ pair unchanged: the
    scores twice what they were, as a wrong scale would make them."""
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    consumers = {}
    for node in wrong.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {t.name: t for t in wrong.graph.initializer}

    def quantized_next(node):  # feeds a QuantizeLinear, directly or through the Cast back from float32
        users = consumers.get(node.output[0], [])
        if [u.op_type for u in users] == ["Cast"]:
            users = consumers.get(users[0].output[0], [])
        return [u.op_type for u in users] == ["QuantizeLinear"]

    changed = 0
    for node in wrong.graph.node:
        if node.op_type == "Mul" and quantized_next(node) and node.input[1] in inits:
            tensor = inits[node.input[1]]
            value = onnx.numpy_helper.to_array(tensor)
            tensor.CopyFrom(onnx.numpy_helper.from_array((value * 2).astype(value.dtype), tensor.name))
            changed += 1
    assert changed
    return wrong


@pytest.mark.parametrize("name", ["bert_encoder_eager_torchscript_int8.onnx", "vit_encoder_eager_torchscript_fp8.onnx"])
def test_the_quantization_tolerance_still_fails_a_wrong_quantization(name):
    source = onnx.load(path(name))
    fused = onnx_fuse.fuse(source, target="primitive-trt").proto
    assert check.check_equivalent(ModelRef(source), ModelRef(fused)).passed
    wrong = check.check_equivalent(ModelRef(source), ModelRef(doubled_query_scale(fused)))
    assert not wrong.passed and "differs" in wrong.message


def test_a_global_atol_wins_over_the_quantization_widening():
    """The widening is the default a caller's tolerance replaces: a per-output and a global atol
    both apply as given (a global one used to be overridden by the widened per-output values)."""
    from onnx_fuse.tolerances import Tolerances

    name = "bert_encoder_eager_torchscript_int8.onnx"
    widened = onnx_fuse.fuse(path(name), target="trt11").report["check"]["outputs"]
    assert any(o["max_abs"] > 1e-6 for o in widened.values())  # the fused model moves by steps
    for atol in ({"": 1e-6}, {output: 1e-6 for output in widened}):
        with pytest.raises(CheckFailed):
            onnx_fuse.fuse(path(name), target="trt11", tolerances=Tolerances(atol, {"": 0.0}))
