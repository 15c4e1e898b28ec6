"""The committed real exports: every attention core is fused, and the fused model agrees with
the original in onnxruntime on inputs that respect the model (batch 2, a left-padded row, a
non-empty KV cache for decode models)."""

import json
import os

import onnx
import pytest

import onnx_fuse
from onnx_fuse.check import ModelRef, synthesize_inputs

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]


def ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_attention_core_fuses_and_checks(name):
    truth = MANIFEST[name]
    result = onnx_fuse.fuse(os.path.join(MODELS, name), check=True)
    report = result.report
    assert report["counts"].get("attention", 0) == truth["attention_cores"], report["unfused"]
    assert report["check"]["passed"], report["check"]["message"]
    assert set(report["check"]["outputs"]) == set(truth["outputs"])
    assert ops(result.model).count("Attention") == truth["attention_cores"]
    assert "Softmax" not in ops(result.model)
    for fused in report["fused"]:
        assert fused["head_size"] == truth["head_size"]
        assert fused["q_heads"] == truth["q_heads"]
        assert fused["kv_heads"] == truth["kv_heads"]  # GQA head repetition removed
        assert fused["scale"] == pytest.approx(truth["attention_scale"], rel=1e-6)
    onnx.checker.check_model(result.model)


@pytest.mark.parametrize("name", [n for n in sorted(MANIFEST) if MANIFEST[n]["kind"] != "encoder"
                                  or "attention_mask" in MANIFEST[n]["inputs"]][:4])
def test_checker_inputs_have_padding_and_batch_two(name):
    model = onnx.load(os.path.join(MODELS, name))
    inputs = synthesize_inputs(ModelRef(model, MODELS))
    mask = inputs["attention_mask"]
    assert mask.shape[0] == 2
    assert mask[0].all() and not mask[1].all() and mask[1].any()
    if MANIFEST[name]["kind"] == "decode":
        past = [v for k, v in inputs.items() if v.ndim == 4]
        assert past and all(p.shape[2] > 0 for p in past)
