"""The static TensorRT parser contract check on emitted fused ops."""

import os

import onnx
import pytest
from onnx import TensorProto, helper

import onnx_fuse
from onnx_fuse.trt_contract import causal_form_problems, check_model

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")


def attention_node_model(dtype=TensorProto.FLOAT16, mask_dtype=TensorProto.BOOL, mask_rank=4,
                         extra_inputs=(), **attrs):
    q = helper.make_tensor_value_info("q", dtype, [2, 4, 3, 8])
    k = helper.make_tensor_value_info("k", dtype, [2, 2, 5, 8])
    v = helper.make_tensor_value_info("v", dtype, [2, 2, 5, 8])
    m = helper.make_tensor_value_info("m", mask_dtype, [2, 1, 3, 5][4 - mask_rank:])
    inputs = [q, k, v, m] + [helper.make_tensor_value_info(n, dtype, [2, 2, 4, 8]) for n in extra_inputs]
    node = helper.make_node("Attention", ["q", "k", "v", "m", *extra_inputs], ["o"], name="att", **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("o", dtype, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])


def problems(model):
    (entry,) = check_model(model)
    assert entry["op"] == "Attention" and entry["node"] == "att"
    return entry["problems"]


def test_fp16_gqa_attention_with_boolean_mask_meets_the_contract():
    assert problems(attention_node_model()) == []


@pytest.mark.parametrize("kwargs, expected", [
    (dict(softcap=30.0), "softcap"),
    (dict(softmax_precision=1), "softmax_precision"),
    (dict(is_causal=1), "is_causal and a mask"),
    (dict(mask_rank=2), "rank differs"),
    (dict(mask_dtype=TensorProto.FLOAT), "neither boolean"),
    (dict(dtype=TensorProto.FLOAT, mask_dtype=TensorProto.FLOAT), "no fused MHA kernel for float"),
    (dict(extra_inputs=("pk", "pv")), "past_key"),
])
def test_each_contract_violation_is_named(kwargs, expected):
    found = problems(attention_node_model(**kwargs))
    assert any(expected in p for p in found), found


def test_fused_committed_models_meet_the_parser_contract_except_precision():
    # The committed models are float32, which only has decomposed kernels; apart from that
    # (and Gemma 2's softcap, which the parser rejects) every emitted node must be accepted.
    for name in ["llama-gqa_decode_sdpa_dynamo.onnx", "bert_encoder_eager_torchscript.onnx",
                 "gemma2_prefill_eager_dynamo.onnx", "gptj_prefill_eager_torchscript.onnx"]:
        result = onnx_fuse.fuse(os.path.join(MODELS, name), check=False)
        entries = check_model(result.model)
        assert entries and result.report["tensorrt"] == entries
        for entry in entries:
            rest = [p for p in entry["problems"] if "no fused MHA kernel for float" not in p]
            if name.startswith("gemma2"):
                rest = [p for p in rest if "softcap" not in p]
            assert rest == [], (name, entry)
        # Each fusion in the report carries the problems of the nodes it added.
        for fused in result.report["fused"]:
            assert fused["nodes"]
            if fused["rule"] == "attention":
                assert any("no fused MHA kernel" in p for p in fused["tensorrt"])
                assert any("softcap" in p for p in fused["tensorrt"]) == name.startswith("gemma2")


def test_primitive_trt_target_writes_the_causal_form_tensorrt_exploits():
    from onnx_fuse.trt_contract import causal_form_problems

    path = os.path.join(MODELS, "llama-gqa_prefill_sdpa_torchscript.onnx")
    before = causal_form_problems(onnx.load(path))
    assert before and all(e["problems"] for e in before)  # the export itself is not in that form
    result = onnx_fuse.fuse(path, target="primitive-trt", check=True)
    assert result.report["counts"]["attention"] == 2 and result.report["check"]["passed"]
    after = causal_form_problems(result.model)
    assert len(after) == 2 and all(e["problems"] == [] for e in after), after
    assert "Attention" not in {n.op_type for n in result.model.graph.node}


@pytest.mark.parametrize("name", ["llama-gqa_prefill_eager_torchscript.onnx",
                                  "gpt2_prefill_sdpa_dynamo.onnx",
                                  "mistral-swa_decode_eager_dynamo.onnx",
                                  "gemma2_prefill_eager_torchscript.onnx"])  # softcap too
def test_primitive_trt_keeps_fully_masked_rows_as_the_original(name):
    # Eager and dynamo-SDPA exports average V over a fully masked (left-padded) query row.
    result = onnx_fuse.fuse(os.path.join(MODELS, name), target="primitive-trt", check=True)
    assert result.report["counts"]["attention"] == 2 and result.report["check"]["passed"]
    assert all(e["problems"] == [] for e in causal_form_problems(result.model))


@pytest.mark.parametrize("name, reason", [
    ("bert_encoder_eager_dynamo.onnx", "causal attention only"),
])
def test_primitive_trt_target_refuses_what_it_cannot_keep_exact(name, reason):
    result = onnx_fuse.fuse(os.path.join(MODELS, name), target="primitive-trt", check=True)
    assert result.report["counts"].get("attention", 0) == 0 and not result.changed
    misses = [u for u in result.report["unfused"] if u["pattern"] == "attention"]
    assert misses and all(reason in u["reason"] for u in misses)
