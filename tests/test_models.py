"""The committed real exports: every attention core is fused, and the fused model agrees with
the original in onnxruntime on inputs that respect the model (batch 2, a left-padded row, a
non-empty KV cache for decode models)."""

import json
import os

import numpy as np
import onnx
import pytest

import onnx_fuse
from onnx_fuse.check import ModelRef, check_equivalent, synthesize_inputs

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
    # No flags: every RoPE application fuses (computed cos/sin where nothing bounds positions).
    assert report["counts"].get("rope", 0) == truth["rope_applications"], report["unfused"]
    assert report["check"]["passed"], report["check"]["message"]
    assert set(report["check"]["outputs"]) == set(truth["outputs"])
    assert ops(result.model).count("Attention") == truth["attention_cores"]
    assert "Softmax" not in ops(result.model)
    attention = [f for f in report["fused"] if f["rule"] == "attention"]
    for fused in attention:
        assert fused["head_size"] == truth["head_size"]
        assert fused["q_heads"] == truth["q_heads"]
        assert fused["kv_heads"] == truth["kv_heads"]  # GQA head repetition removed
        if truth.get("scale_applied_to") == "query":  # Whisper scales q_proj's output itself
            assert fused["scale"] == pytest.approx(1.0)
        else:
            assert fused["scale"] == pytest.approx(truth["attention_scale"], rel=1e-6)
    onnx.checker.check_model(result.model)
    classes = {f["mask_class"] for f in attention}
    if truth.get("sliding_window"):
        windows = {f["window"] for f in attention if f["mask_class"] == "sliding_window"}
        assert windows == {truth["sliding_window"]}
    if truth["kind"] == "decode":
        # Queries aligned to the end of the cache: never Attention's (upper-left) is_causal.
        assert not any(f["is_causal"] for f in attention)
        assert "causal_upper_left" not in classes


def test_checking_catches_an_ignored_sliding_window():
    """The checker's inputs are longer than the window, so a model that ignores it fails."""
    name = next(n for n in sorted(MANIFEST) if MANIFEST[n].get("sliding_window")
                and MANIFEST[n]["kind"] == "decode")
    window = MANIFEST[name]["sliding_window"]
    original = onnx.load(os.path.join(MODELS, name))
    widened = onnx.ModelProto()
    widened.CopyFrom(original)
    # The window width is the integer constant the mask subtracts before comparing positions.
    readers = {}
    for node in widened.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    compares = {"Greater", "Less", "GreaterOrEqual", "LessOrEqual"}

    def offsets_a_comparison(name):
        return any(n.op_type in ("Sub", "Add") and any(r.op_type in compares
                   for r in readers.get(n.output[0], [])) for n in readers.get(name, []))

    constants = list(widened.graph.initializer) + [
        n.attribute[0].t for n in widened.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")]
    outputs = {id(n.attribute[0].t): n.output[0] for n in widened.graph.node
               if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")}
    changed = 0
    for tensor in constants:
        value = onnx.numpy_helper.to_array(tensor)
        name = outputs.get(id(tensor), tensor.name)
        if (value.dtype.kind == "i" and value.size == 1 and int(value.reshape(-1)[0]) == window
                and offsets_a_comparison(name)):
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.full_like(value, 10_000), tensor.name))
            changed += 1
    assert changed
    outcome = check_equivalent(ModelRef(original, MODELS), ModelRef(widened, MODELS))
    assert not outcome.passed and "logits" in outcome.message


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
