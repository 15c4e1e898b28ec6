"""Attention fusion on hand-built graphs: every placement of the scale, K layout and mask kind
fuses to one Attention node that computes the same thing; near-misses stay unfused with a reason."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnx_fuse
from graphs import (attention_model, flat_attention_model, float16_upcast_attention_model, random_inputs,
                    router_and_attention_model)


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def attention_nodes(model):
    return [n for n in model.graph.node if n.op_type == "Attention"]


def assert_fused_and_equal(model, sizes=None, **expect):
    feeds = random_inputs(model, sizes)
    result = onnx_fuse.fuse(model, check=True, inputs=feeds)
    assert result.report["counts"] == {"attention": 1}, result.report["unfused"]
    assert result.report["check"]["passed"]
    nodes = attention_nodes(result.model)
    assert len(nodes) == 1
    assert not any(n.op_type in ("Softmax", "MatMul") for n in result.model.graph.node)
    np.testing.assert_allclose(run(result.model, feeds), run(model, feeds), rtol=1e-4, atol=1e-5)
    fused = result.report["fused"][0]
    for key, value in expect.items():
        assert fused[key] == pytest.approx(value), key
    return result


@pytest.mark.parametrize("scale_on", ["scores", "q", "k", "kt", "both", "none"])
@pytest.mark.parametrize("scale_op", ["Mul", "Div"])
def test_every_scale_placement(scale_on, scale_op):
    model = attention_model(scale_on=scale_on, scale_op=scale_op)
    expected = 1.0 if scale_on == "none" else 1 / np.sqrt(8)
    result = assert_fused_and_equal(model, scale=expected)
    scale = onnx.helper.get_attribute_value(attention_nodes(result.model)[0].attribute[0])
    assert scale == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("k_layout", ["transpose", "bsnh", "pretransposed"])
def test_key_layouts(k_layout):
    result = assert_fused_and_equal(attention_model(k_layout=k_layout))
    transposes = [n for n in result.model.graph.node if n.op_type == "Transpose"]
    # K already [B, N, T, H] needs no transpose; the other layouts need exactly one.
    assert len(transposes) == (0 if k_layout == "transpose" else 1)


@pytest.mark.parametrize("mask", ["additive", "keep", "keep_finite", "drop", "padding"])
def test_mask_kinds(mask):
    kind = {"padding": "additive", "keep_finite": "keep"}.get(mask, mask)
    result = assert_fused_and_equal(attention_model(mask=mask), mask=kind)
    assert len(attention_nodes(result.model)[0].input) == 4


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_mask_of_lower_rank_is_made_4d(rank):
    result = assert_fused_and_equal(attention_model(mask="additive", mask_rank=rank))
    mask_input = attention_nodes(result.model)[0].input[3]
    inferred = onnx.shape_inference.infer_shapes(result.model)
    shapes = {v.name: v.type.tensor_type.shape for v in inferred.graph.value_info}
    assert len(shapes[mask_input].dim) == 4


def test_fully_masked_rows_stay_uniform_like_the_original():
    # Hugging Face masks with the lowest float; a query row whose keys are all masked gets a
    # uniform softmax in the original, and must in the fused model too.
    model = attention_model(mask="additive")
    feeds = random_inputs(model)
    feeds["mask"][1, 0, 0, :] = np.finfo(np.float32).min
    result = onnx_fuse.fuse(model, check=True, inputs=feeds)
    assert result.report["counts"] == {"attention": 1}
    np.testing.assert_allclose(run(result.model, feeds), run(model, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["expand", "tile"])
def test_grouped_head_repetition_is_removed(how):
    result = assert_fused_and_equal(attention_model(heads=4, kv_heads=2, repeat=how), kv_heads=2)
    assert not {"Expand", "Tile"} & {n.op_type for n in result.model.graph.node}


def test_head_repetition_that_is_not_grouped_is_kept():
    # Tiling the whole head axis pairs query head h with K/V head h % 2, not h // 2: the
    # Attention op's grouping would be wrong, so the repeated K/V are kept as they are.
    result = assert_fused_and_equal(attention_model(heads=4, kv_heads=2, repeat="tile_heads"),
                                    kv_heads=4)
    assert "Tile" in {n.op_type for n in result.model.graph.node}


@pytest.mark.parametrize("mask", [None, "additive"])
def test_softcap_before_the_mask(mask):
    result = assert_fused_and_equal(attention_model(softcap=0.5, mask=mask), softcap=0.5)
    assert "Tanh" not in {n.op_type for n in result.model.graph.node}


def test_tanh_with_unequal_scales_is_not_a_softcap():
    model = attention_model(softcap=0.5)
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and n.input[0].startswith("t")
               and any(p.op_type == "Tanh" and p.output[0] == n.input[0] for p in model.graph.node))
    init = next(i for i in model.graph.initializer if i.name == mul.input[1])
    init.CopyFrom(onnx.numpy_helper.from_array(np.array(0.7, np.float32), init.name))
    result = onnx_fuse.fuse(model, check=True, inputs=random_inputs(model))
    assert result.report["counts"] == {}
    assert "not a softcap" in result.report["unfused"][0]["reason"]


@pytest.mark.parametrize("reshape", ["minus_one", "seq"])
@pytest.mark.parametrize("mask", [None, "shared"])
def test_3d_attention_is_fused_on_the_4d_tensors(reshape, mask):
    model = flat_attention_model(reshape=reshape, mask=mask)
    result = assert_fused_and_equal(model, q_heads=4, head_size=8)
    assert attention_nodes(result.model)[0].input[0] == "q"  # the 4-D query itself


def test_3d_attention_with_a_per_head_mask_is_left_alone():
    model = flat_attention_model(mask="per_head")
    result = onnx_fuse.fuse(model, check=True, inputs=random_inputs(model, {"BN": 8}))
    assert result.report["counts"] == {}
    assert "varies over batch*heads" in result.report["unfused"][0]["reason"]


def test_float16_attention_with_a_float32_softmax_and_product():
    model = float16_upcast_attention_model()
    feeds = random_inputs(model)
    result = onnx_fuse.fuse(model, check=True, inputs=feeds)
    assert result.report["counts"] == {"attention": 1}, result.report["unfused"]
    (node,) = attention_nodes(result.model)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["softmax_precision"] == onnx.TensorProto.FLOAT  # the softmax stays float32
    assert node.input[2] == "v"  # V in its own float16, not cast up
    np.testing.assert_allclose(run(result.model, feeds).astype(np.float32),
                               run(model, feeds).astype(np.float32), rtol=1e-2, atol=1e-2)


def test_casts_around_softmax():
    assert_fused_and_equal(attention_model(casts=True, mask="additive"))


def test_single_kv_head_broadcast_is_multi_query():
    # MatMul broadcasting one K/V head over all query heads is multi-query attention.
    assert_fused_and_equal(attention_model(kv_heads=1), kv_heads=1, q_heads=4)


def test_opset_17_is_raised_to_23():
    result = assert_fused_and_equal(attention_model(opset=17, mask="additive"))
    assert result.report["opset"] == {"from": 17, "to": 23}
    assert {o.version for o in result.model.opset_import if o.domain == ""} == {23}


def test_fused_node_records_its_rule():
    result = assert_fused_and_equal(attention_model())
    node = attention_nodes(result.model)[0]
    assert {p.key: p.value for p in node.metadata_props}["onnx_fuse.rule"] == "attention"


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(probs_as_output=True), "also used by a graph output"),
        (dict(softmax_axis=2), "not the last axis"),
    ],
)
def test_near_misses_are_left_alone_with_a_reason(kwargs, reason):
    model = attention_model(**kwargs)
    result = onnx_fuse.fuse(model, check=True, inputs=random_inputs(model))
    assert result.report["counts"] == {}
    assert not result.changed
    assert result.model is not None and not attention_nodes(result.model)
    (miss,) = result.report["unfused"]
    assert miss["pattern"] == "attention" and reason in miss["reason"]
    assert miss["anchor"].startswith("Softmax")


def test_nothing_to_fuse_passes_through_unchanged():
    model = attention_model(softmax_axis=2, opset=17)
    result = onnx_fuse.fuse(model)
    assert result.model.SerializeToString() == model.SerializeToString()
    assert result.report["opset"] == {"from": 17, "to": 17}


def test_learned_sinks_are_recognized_and_left_unfused_with_the_reason():
    """GPT-OSS's sinks cannot be expressed by ONNX Attention: the core is matched, its spec
    carries the sink logits, and the onnx target refuses it, saying why."""
    model = attention_model(sinks="gpt-oss")
    result = onnx_fuse.fuse(model, check=False)
    assert result.report["counts"] == {} and not result.changed
    (miss,) = result.report["unfused"]
    assert miss["pattern"] == "attention" and "cannot express learned attention sinks" in miss["reason"]


def test_a_sliced_softmax_that_keeps_the_extra_column_is_not_attention_with_sinks():
    model = attention_model(sinks="keep_sink")
    (miss,) = onnx_fuse.fuse(model, check=False).report["unfused"]
    assert "does not drop exactly the one sink column" in miss["reason"], miss


def test_the_spec_of_an_attention_with_sinks(monkeypatch):
    """What a target that takes sinks receives: the [1, heads, 1, 1] logits, and zero output for
    rows whose keys are all hidden (the sink takes all the weight)."""
    from onnx_fuse.graph import Graph
    from onnx_fuse.pattern import match
    from onnx_fuse.patterns.attention import RULES

    rule = RULES[0]
    graph = Graph(onnx.shape_inference.infer_shapes(attention_model(sinks="gpt-oss", mask="keep")))
    (softmax,) = graph.nodes_of("Softmax")
    found, why = match(rule.pattern, graph, rule.root(graph, softmax))
    spec = rule.describe(graph, found)
    assert tuple(spec.sinks.shape) == (1, 4, 1, 1) and spec.empty_row_output == "zero"


def test_an_moe_router_softmax_is_not_attention_and_stays_as_it_was():
    model = router_and_attention_model()
    result = onnx_fuse.fuse(model, inputs=random_inputs(model, {"S": 3}))
    assert result.report["counts"] == {"attention": 1}
    assert result.report["unfused"] == [] and result.report["check"]["passed"]
    softmax = [n for n in result.model.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1 and softmax[0].output[0] in {i for n in result.model.graph.node
                                                             if n.op_type == "TopK" for i in n.input}


def if_attention_model():
    """An If whose branches each hold an attention core over the outer scope's Q, K, V (as
    optimum's merged decoders switch between a first step and a cached step)."""
    from onnx import TensorProto, helper

    def branch(name, scale):
        g = attention_model(scale_on="scores")
        body = g.graph
        for node in body.node:  # the branch reads the outer q, k, v; its constants are its own
            node.name = f"{name}/{node.name}"
        for init in body.initializer:
            if init.data_type == TensorProto.FLOAT and init.dims == []:
                init.CopyFrom(onnx.numpy_helper.from_array(np.array(scale, np.float32), init.name))
        result = helper.make_tensor_value_info(body.output[0].name, TensorProto.FLOAT, ["B", 4, "S", 8])
        return helper.make_graph(list(body.node), name, [], [result], list(body.initializer))

    then_branch, else_branch = branch("then", 0.25), branch("else", 0.5)
    for node in else_branch.node:  # distinct tensor names in the two scopes
        node.output[:] = [f"else_{o}" for o in node.output]
        node.input[:] = [i if i in ("q", "k", "v") or i.startswith("c") else f"else_{i}" for i in node.input]
    else_branch.output[0].name = f"else_{else_branch.output[0].name}"
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 4, "S" if n == "q" else "T", 8])
              for n in ("q", "k", "v")]
    inputs.append(helper.make_tensor_value_info("first_step", TensorProto.BOOL, []))
    node = helper.make_node("If", ["first_step"], ["out"], then_branch=then_branch, else_branch=else_branch)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 4, "S", 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def test_attention_inside_if_branches_fuses_in_each_branch():
    model = if_attention_model()
    without_flag = onnx.ModelProto()
    without_flag.CopyFrom(model)
    without_flag.graph.input.pop()
    feeds = random_inputs(without_flag)
    result = onnx_fuse.fuse(model, inputs={**feeds, "first_step": np.array(True)})
    assert result.report["counts"] == {"attention": 2} and result.report["check"]["passed"]
    (if_node,) = result.model.graph.node
    for branch in if_node.attribute:
        assert [n.op_type for n in branch.g.node].count("Attention") == 1
        assert "Softmax" not in [n.op_type for n in branch.g.node]
    for first_step in (True, False):  # each branch computes what it did
        case = {**feeds, "first_step": np.array(first_step)}
        fused = ort.InferenceSession(result.model.SerializeToString()).run(None, case)[0]
        original = ort.InferenceSession(model.SerializeToString()).run(None, case)[0]
        np.testing.assert_allclose(fused, original, rtol=1e-5, atol=1e-5)
