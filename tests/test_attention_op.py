"""ONNX Attention the exporter already wrote (patterns/attention_op.py): hand-built Attention nodes
(4-D and 3-D, GQA, boolean and additive masks computed from a padding input, is_causal, softcap)
are rewritten into every target's op with the check passing, kept byte for byte under target
onnx, and refused with the reason where the spec cannot say them; the committed opset-23 exports
per target, --kv-cache static included."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnx_fuse
from graphs import GraphBuilder
from onnx_fuse.specs import AttentionSpec, MaskClass

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
EXPORTED = sorted(n for n, t in MANIFEST.items() if t.get("native_attention_ops"))
REWRITING = ["ort", "trt11", "trt-plugin", "primitive-trt"]
# What each target writes in place of the op (primitive-trt: the Softmax of its causal form).
WRITES = {"ort": "GroupQueryAttention", "trt11": "TRT_Attention", "trt-plugin": "FusedAttention",
          "primitive-trt": "Softmax"}
F32 = TensorProto.FLOAT
HEADS, KV_HEADS, HEAD = 4, 2, 8
SIZES = {"B": 2, "S": 3, "P": 4, "T": 5}  # batch, new tokens, past, another sequence


def causal_padding_visibility(g, q, k, mask_input):
    """Boolean [B, 1, S, T]: key j visible from query i iff j <= i + T - S and mask[b, j] == 1,
    computed from the shapes and the 0/1 attention_mask as decoders do."""
    lengths = [g.op("Squeeze", g.op("Shape", t, start=2, end=3)) for t in (q, k)]
    zero, one = g.const(0, np.int64), g.const(1, np.int64)
    queries = g.op("Add", g.op("Range", zero, lengths[0], one), g.op("Sub", lengths[1], lengths[0]))
    keys = g.op("Range", zero, lengths[1], one)
    causal = g.op("GreaterOrEqual", g.op("Unsqueeze", queries, g.const([1], np.int64)), keys)
    valid = g.op("Unsqueeze", g.op("Cast", mask_input, to=TensorProto.BOOL), g.const([1, 2], np.int64))
    return g.op("And", g.op("Unsqueeze", causal, g.const([0, 1], np.int64)), valid)


def attention_op_model(*, rank=4, gqa="expand", mask="bool", cache=True, is_causal=0, softcap=0.0,
                       scale=None, opset=23, extra_inputs=(), outputs=1, attrs=None, keys="own",
                       dtype=F32):
    """One ONNX Attention as torch's dynamo exporter writes it in a decoder layer: Q [B, 4, S, 8]
    and new K/V [B, 2, S, 8] projected from the hidden states x [B, S, 32] (keys "memory": from
    another sequence [B, T, 32]); K/V grown by Concat(past [B, 2, P, 8], new) and repeated to 4
    heads (gqa "expand") or passed grouped (None); the mask computed from attention_mask
    [B, P + S] ("bool", "additive" with finfo.min, None). rank 3 packs Q, K, V as [B, S, N·H]
    (q_num_heads, kv_num_heads). dtype: of every float tensor (the mask's too)."""
    g = GraphBuilder()
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    x = g.input("x", dtype, ["B", "S", HEADS * HEAD])
    source = x if keys == "own" else g.input("memory", dtype, ["B", "T", HEADS * HEAD])
    q = heads(g, x, HEADS, np.eye(HEADS * HEAD, dtype=np_type))
    k, v = (heads(g, source, KV_HEADS, weight.astype(np_type)) for weight in WEIGHTS)
    if cache:
        k, v = (g.op("Concat", g.input(f"past_{n}", dtype, ["B", KV_HEADS, "P", HEAD]), t, axis=2)
                for n, t in (("key", k), ("value", v)))
    if gqa == "expand":
        k, v = (repeat(g, t) for t in (k, v))
    inputs = [q, k, v]
    if rank == 3:
        inputs = [packed(g, t) for t in inputs]
    if mask is not None:
        total = "P + S" if cache else "S"
        visible = causal_padding_visibility(g, q, k, g.input("attention_mask", TensorProto.INT64, ["B", total]))
        if mask == "additive":
            visible = g.op("Where", visible, g.const(0.0, np_type), g.const(np.finfo(np_type).min, np_type))
        inputs.append(visible)
    inputs += ([""] * (4 - len(inputs)) if extra_inputs else []) + list(extra_inputs)
    attributes = {"is_causal": is_causal, "softcap": softcap, **(attrs or {})}
    if scale is not None:
        attributes["scale"] = scale
    if rank == 3:
        attributes.update(q_num_heads=HEADS, kv_num_heads=KV_HEADS if gqa is None else HEADS)
    names = ["y"] + [f"y{i}" for i in range(1, outputs)]
    g.nodes.append(helper.make_node("Attention", inputs, names, name="sdpa", **attributes))
    return g.model("y", opset=opset, dtype=dtype)


WEIGHTS = [np.random.default_rng(seed).standard_normal((HEADS * HEAD, KV_HEADS * HEAD)) for seed in (1, 2)]


def heads(g, x, count, weight):
    """x [B, S, D] projected by `weight` and split into `count` heads of 8: [B, count, S, 8]."""
    projected = g.op("MatMul", x, g.const(weight, weight.dtype))
    return g.op("Transpose", g.op("Reshape", projected, g.const([0, 0, count, HEAD], np.int64)),
                perm=[0, 2, 1, 3])


def repeat(g, x):
    """Unsqueeze → Expand [B, 2, 2, T, 8] → Reshape [B, 4, T, 8]: torch's repeat_kv."""
    wide = g.op("Expand", g.op("Unsqueeze", x, g.const([2], np.int64)),
                g.const([1, 1, HEADS // KV_HEADS, 1, 1], np.int64))
    return g.op("Reshape", wide, g.const([0, HEADS, -1, HEAD], np.int64))


def packed(g, x):
    """[B, N, S, H] as [B, S, N·H]."""
    return g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3]), g.const([0, 0, -1], np.int64))


def feeds_for(model, seed=0):
    """Random Q/K/V and caches; attention_mask with row 1 left-padded by 2 (its keys 0 and 1
    hidden, every query still sees its own)."""
    rng = np.random.default_rng(seed)
    sizes = {**SIZES, "P + S": SIZES["P"] + SIZES["S"]}
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value or sizes[d.dim_param] for d in value.type.tensor_type.shape.dim]
        if value.name == "attention_mask":
            feeds[value.name] = np.ones(dims, np.int64)
            feeds[value.name][1, :2] = 0
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(
                helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
    return feeds


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def fused(model, target, tolerance=1e-5, **options):
    feeds = feeds_for(model)
    result = onnx_fuse.fuse(model, target=target, inputs=feeds, **options)
    assert result.report["check"]["passed"], result.report["check"]["message"]
    got, want = (run(m, feeds).astype(np.float32) for m in (result.proto, model))
    np.testing.assert_allclose(got, want, rtol=10 * tolerance, atol=tolerance)
    return result


def op_types(model):
    return [n.op_type for n in model.graph.node]


CASES = {
    "4-D GQA, boolean causal + padding": dict(),
    "4-D GQA, additive causal + padding": dict(mask="additive"),
    "4-D grouped K/V (no repetition)": dict(gqa=None),
    "3-D, boolean causal + padding": dict(rank=3),
    "3-D grouped": dict(rank=3, gqa=None),
    "softcap": dict(softcap=30.0),
    "explicit scale": dict(scale=0.2),
    "is_causal without a cache": dict(cache=False, mask=None, is_causal=1),
}


def written_op(case: str, target: str) -> str:
    """What the target writes for a case: trt11 writes softcapped attention in the primitive
    form; ort writes MultiHeadAttention where K/V have all the query heads and no cache GQA takes."""
    options = CASES[case]
    if target == "trt11" and options.get("softcap"):
        return WRITES["primitive-trt"]
    if target == "ort" and options.get("rank") == 3 and options.get("gqa", "expand") is not None:
        return "MultiHeadAttention"
    return WRITES[target]


# 3-D K/V of a decode step hide the cache's Concat from GroupQueryAttention, and their two
# heads rule out MultiHeadAttention: ort leaves the op as it is, saying why.
ORT_STAYS = {"3-D grouped"}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("target", REWRITING)
def test_each_form_becomes_the_targets_op_and_checks(case, target):
    model = attention_op_model(**CASES[case])
    if target == "ort" and case in ORT_STAYS:
        report = onnx_fuse.fuse(model, target=target, inputs=feeds_for(model)).report
        (miss,) = report["unfused"]
        assert report["counts"] == {} and "stays the ONNX Attention the model has" in miss["reason"]
        return
    result = fused(model, target)
    assert result.report["counts"] == {"attention": 1}, result.report["unfused"]
    assert "Attention" not in op_types(result.proto)
    assert written_op(case, target) in op_types(result.proto)
    (entry,) = result.report["fused"]
    assert entry["written_as"] == "Attention"
    grouped = CASES[case].get("gqa", "expand") is None or CASES[case].get("rank") != 3
    assert (entry["q_heads"], entry["kv_heads"], entry["head_size"]) == \
        (HEADS, KV_HEADS if grouped else HEADS, HEAD)  # torch's repeat_kv looked through
    assert entry["scale"] == pytest.approx(CASES[case].get("scale", HEAD ** -0.5))
    assert entry["softcap"] == CASES[case].get("softcap", 0.0)
    assert entry["mask_class"] == ("causal_upper_left" if CASES[case].get("is_causal") else "causal_padding")


@pytest.mark.parametrize("target", REWRITING)
def test_float16_with_a_float32_softmax_and_a_float16_mask(target):
    """softmax_precision FLOAT over float16 Q/K/V with a float16 additive mask: the TensorRT
    targets compute in float32, and the narrower mask is cast up (exactly) for them."""
    model = attention_op_model(dtype=TensorProto.FLOAT16, mask="additive",
                               attrs={"softmax_precision": TensorProto.FLOAT})
    result = fused(model, target, tolerance=2e-3)
    (entry,) = result.report["fused"]
    assert entry["dtype"] == "float16" and "Attention" not in op_types(result.proto)


@pytest.mark.parametrize("target", ["ort", "trt11"])
def test_the_mask_class_is_proven_as_for_primitive_attention(target):
    result = fused(attention_op_model(), target)
    ((_, spec),) = result.specs(AttentionSpec)
    assert spec.mask.klass.kind == "causal_padding" and spec.mask.klass.alignment == "lower_right"
    assert spec.mask.klass.padding_input == "attention_mask"


def test_ort_writes_gqa_for_a_decode_step_and_mha_where_k_and_v_have_every_head():
    decode = fused(attention_op_model(), "ort")
    assert decode.report["fused"][0]["op"] == "GroupQueryAttention"
    (gqa,) = [n for n in decode.proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert list(gqa.input[3:5]) == ["past_key", "past_value"]  # the Concat became GQA's past
    encoder = fused(attention_op_model(rank=3, cache=False, mask=None), "ort")  # K/V packed repeated
    assert encoder.report["fused"][0]["op"] == "MultiHeadAttention"


@pytest.mark.parametrize("case", CASES)
def test_target_onnx_keeps_the_op_byte_for_byte(case):
    model = attention_op_model(**CASES[case])
    result = onnx_fuse.fuse(model, inputs=feeds_for(model))
    assert result.report["counts"] == {} and result.report["unfused"] == [] and not result.changed
    assert result.proto.SerializeToString() == model.SerializeToString()
    (kept,) = result.report["kept"]
    assert kept["anchor"] == "Attention 'sdpa'" and "already Attention" in kept["reason"]


# What an AttentionSpec cannot say: refused with the reason under every rewriting target, kept
# as it is (and not reported unfused) under target onnx.
PAST = ["past_key", "past_value"]
REFUSED = {
    "past_key": (dict(cache=False, extra_inputs=PAST), "past_key"),
    "nonpad_kv_seqlen": (dict(opset=24, extra_inputs=["", "", "lengths"]), "nonpad_kv_seqlen"),
    "qk_matmul_output_mode": (dict(attrs={"qk_matmul_output_mode": 1}), "qk_matmul_output_mode=1"),
    "present_key read": (dict(outputs=2), "present_key is read"),
    "is_causal with a mask": (dict(is_causal=1), "is_causal=1 together with attn_mask"),
    "a later opset's window": (dict(opset=25, attrs={"left_window_size": 2}), "left_window_size"),
    "a negative softcap": (dict(softcap=-1.0), "negative"),
}


def refused_model(case):
    options, _ = REFUSED[case]
    model = attention_op_model(**options)
    for name in options.get("extra_inputs", []):
        if name in PAST:
            model.graph.input.append(helper.make_tensor_value_info(name, F32, ["B", HEADS, "P", HEAD]))
        elif name:
            model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.INT64, ["B"]))
    if options.get("outputs", 1) > 1:
        model.graph.output.append(helper.make_tensor_value_info("y1", F32, None))
    return model


@pytest.mark.parametrize("case", REFUSED)
@pytest.mark.parametrize("target", REWRITING)
def test_what_the_spec_cannot_say_is_refused_with_the_reason(case, target):
    model = refused_model(case)
    report = onnx_fuse.fuse(model, target=target, check=False).report
    assert report["counts"] == {}
    (miss,) = report["unfused"]
    assert miss["anchor"] == "Attention 'sdpa'" and REFUSED[case][1] in miss["reason"], miss


@pytest.mark.parametrize("case", REFUSED)
def test_what_the_spec_cannot_say_is_still_target_onnxs_own_op(case):
    model = refused_model(case)
    result = onnx_fuse.fuse(model, check=False)
    assert result.report["unfused"] == [] and len(result.report["kept"]) == 1 and not result.changed


@pytest.mark.parametrize("target", REWRITING)
def test_a_mask_shorter_than_the_keys_is_refused(target):
    g = GraphBuilder()
    q, k, v = (g.input(n, F32, [2, HEADS, 3 if n == "q" else 5, HEAD]) for n in "qkv")
    g.nodes.append(helper.make_node("Attention", [q, k, v, g.input("m", TensorProto.BOOL, [2, 1, 3, 4])],
                                    ["y"], name="sdpa"))
    report = onnx_fuse.fuse(g.model("y"), target=target, check=False).report
    (miss,) = report["unfused"]
    assert "attn_mask covers 4 of 5 keys" in miss["reason"]


def test_microsofts_attention_is_another_op():
    model = attention_op_model(mask=None)
    model.graph.node[-1].domain = "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    report = onnx_fuse.fuse(model, target="trt11", check=False).report
    assert report["counts"] == {} and report["unfused"] == [] and "kept" not in report


# --------------------------------------------------------------------------- the checks can fail


def test_a_wrong_head_split_fails_the_check(monkeypatch):
    from onnx_fuse.targets import views

    def unsplit(packed, heads, count, size, rw):  # heads taken as [B, S, N, H]: no transpose
        rw.op("Reshape", [packed, rw.const("split", np.array([0, 0, count, size], np.int64))],
              outputs=[heads])

    monkeypatch.setattr(views, "_split_heads", unsplit)
    model = attention_op_model(rank=3, gqa=None)
    with pytest.raises(onnx_fuse.CheckFailed):
        onnx_fuse.fuse(model, target="trt11", inputs=feeds_for(model))


def test_is_causal_taken_as_lower_right_fails_the_check(monkeypatch):
    from onnx_fuse.patterns import attention_op

    model = attention_op_model(cache=False, mask=None, is_causal=1, keys="memory")  # T keys, S queries
    feeds = feeds_for(model)
    assert onnx_fuse.fuse(model, target="trt11", inputs=feeds).report["check"]["passed"]
    monkeypatch.setattr(attention_op, "_IS_CAUSAL", MaskClass("causal_lower_right", alignment="lower_right"))
    with pytest.raises(onnx_fuse.CheckFailed):
        onnx_fuse.fuse(model, target="trt11", inputs=feeds)


def test_a_target_without_onnx_attention_as_its_own_op_rewrites_it(monkeypatch):
    from onnx_fuse import targets
    from onnx_fuse.targets.onnx import OnnxTarget

    class Rewriting(OnnxTarget):  # the onnx target, without claiming Attention as its own
        name = "onnx-rewriting"
        own_ops = frozenset()

    monkeypatch.setitem(targets.TARGETS, "onnx-rewriting", Rewriting())
    model = attention_op_model()
    result = fused(model, "onnx-rewriting")
    assert result.report["counts"] == {"attention": 1} and "kept" not in result.report
    assert result.proto.SerializeToString() != model.SerializeToString()


# --------------------------------------------------------------------------- committed exports


@pytest.mark.parametrize("name", EXPORTED)
@pytest.mark.parametrize("target", REWRITING)
def test_committed_exports_become_the_targets_op(name, target):
    truth = MANIFEST[name]
    result = onnx_fuse.fuse(os.path.join(MODELS, name), target=target)
    report = result.report
    assert report["check"]["passed"], report["check"]["message"]
    assert report["counts"].get("attention") == truth["attention_cores"] and not report["unfused"]
    ops = op_types(result.proto)
    assert "Attention" not in ops and ops.count(WRITES[target]) == truth["attention_cores"]
    for entry in (f for f in report["fused"] if f["rule"] == "attention"):
        assert (entry["q_heads"], entry["kv_heads"], entry["head_size"]) == \
            (truth["q_heads"], truth["kv_heads"], truth["head_size"])
        assert entry["mask_class"] == "causal_padding" and entry["scale"] == pytest.approx(truth["attention_scale"])


@pytest.mark.parametrize("name", EXPORTED)
def test_committed_exports_come_back_unchanged_under_onnx_and_refusing_again(name, tmp_path):
    path = os.path.join(MODELS, name)
    result = onnx_fuse.fuse(path)
    assert result.report["counts"] == {} and result.report["unfused"] == []
    assert len(result.report["kept"]) == MANIFEST[name]["native_attention_ops"]
    out = tmp_path / "out.onnx"
    result.save(str(out))
    again = onnx_fuse.fuse(str(out))
    assert again.report["counts"] == {} and not again.changed  # fusing the output changes nothing
    if not result.report["repairs"]:  # nothing repaired: the input's own bytes
        assert out.read_bytes() == open(path, "rb").read()


@pytest.mark.parametrize("name", EXPORTED)
@pytest.mark.parametrize("target", ["onnx", "trt11", "trt-plugin"])
def test_committed_exports_go_static(name, target):
    result = onnx_fuse.fuse(os.path.join(MODELS, name), target=target, kv_cache="static", max_cache_len=16)
    assert result.report["check"]["passed"], result.report["check"]["message"]
    layers = result.report["kv_cache"]["layers"]
    assert len(layers) == MANIFEST[name]["attention_cores"]
    written_by = "the exporter" if target == "onnx" else "the pass"
    assert {layer["mask_proven_for"] for layer in layers} == {written_by}


def test_the_command_and_the_page_say_what_was_kept(capsys):
    from onnx_fuse import cli, report_html

    path = os.path.join(MODELS, EXPORTED[0])
    assert cli.main(["inspect", path]) == 0
    printed = capsys.readouterr().out
    assert "kept as written: 2 (already the target's op)" in printed
    assert printed.count("  keeps   attention  at Attention '") == 2
    report = onnx_fuse.fuse(path).report
    assert "kept as written<b>2</b>" in report_html.render(report)
    assert "kept as written" not in report_html.render(onnx_fuse.fuse(path, target="trt11").report)
