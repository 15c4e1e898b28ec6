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
    """Every node's op type, those inside If/Loop/Scan bodies included."""
    found, graphs = [], [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            found.append(node.op_type)
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
    return found


# What onnx-fuse cannot do yet on some exports, each with the reason: the test expects these to
# fail and fails when one starts passing (strict), so the list only ever shrinks.
KNOWN_GAPS: dict[str, list[str]] = {}
GAP = {name: reason for reason, names in KNOWN_GAPS.items() for name in names}


def runnable(truth) -> bool:
    """onnxruntime's CPU provider runs the export as written (bfloat16 files are checked widened)."""
    return truth.get("ort_cpu_runs", True) is not False or truth.get("dtype") == "bfloat16"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=GAP[n], strict=True))
                                  if n in GAP else n for n in sorted(MANIFEST) if runnable(MANIFEST[n])])
def test_every_attention_core_fuses_and_checks(name):
    """Every attention core fuses except those with learned sinks, which ONNX Attention cannot
    express (left unfused, saying why), and those the exporter already wrote as Attention;
    every RoPE application fuses; the check passes."""
    truth = MANIFEST[name]
    source = ops(onnx.load(os.path.join(MODELS, name)))
    result = onnx_fuse.fuse(os.path.join(MODELS, name), check=True)
    report = result.report
    native = source.count("Attention")  # what the exporter wrote as Attention itself
    sinks = truth["attention_cores"] if truth.get("attention_sinks") else 0
    assert report["counts"].get("attention", 0) == truth["attention_cores"] - native - sinks, report["unfused"]
    unfused = [u for u in report["unfused"] if u["pattern"] == "attention"]
    assert len(unfused) == sinks and all("attention sinks" in u["reason"] for u in unfused), unfused
    # No flags: every RoPE application fuses (computed cos/sin where nothing bounds positions).
    expected_rope = truth["rope_applications"] - source.count("RotaryEmbedding")
    assert report["counts"].get("rope", 0) == expected_rope, report["unfused"]
    assert report["check"] is None or report["check"]["passed"], report["check"]["message"]
    if report["check"] is not None:
        assert set(report["check"]["outputs"]) == set(truth["outputs"])
    assert ops(result.proto).count("Attention") == truth["attention_cores"] - sinks
    routers = (truth.get("moe") or {}).get("router_softmax", 0)
    assert ops(result.proto).count("Softmax") == routers + sinks  # an MoE router is not attention
    attention = [f for f in report["fused"] if f["rule"] == "attention"]
    # the scale as a constant of the model's type: float16 and bfloat16 round it
    scale_tolerance = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}[truth.get("dtype", "float32")]
    for fused in attention:
        assert fused["head_size"] == truth["head_size"]
        assert fused["q_heads"] == truth["q_heads"]
        assert fused["kv_heads"] == truth["kv_heads"]  # GQA head repetition removed
        assert fused.get("value_head_size") == truth.get("v_head_size")
        if truth.get("scale_applied_to") == "query":  # Whisper scales q_proj's output itself
            assert fused["scale"] == pytest.approx(1.0)
        else:
            assert fused["scale"] == pytest.approx(truth["attention_scale"], rel=scale_tolerance)
    onnx.checker.check_model(result.proto)
    classes = {f["mask_class"] for f in attention}
    if truth.get("sliding_window") and not sinks:
        windows = {f["window"] for f in attention if f["mask_class"] == "sliding_window"}
        assert windows <= {truth["sliding_window"]}  # a window found is the model's
        if truth.get("exporter", "torchscript") in ("torchscript", "dynamo") and truth.get("cache") != "sliding_window":
            assert windows == {truth["sliding_window"]}  # masks computed from the positions alone
    if truth["kind"] == "decode":
        # Queries aligned to the end of the cache: never Attention's (upper-left) is_causal.
        assert not any(f["is_causal"] for f in attention)
        assert "causal_upper_left" not in classes


@pytest.mark.parametrize("name", [n for n in sorted(MANIFEST) if not runnable(MANIFEST[n])])
def test_an_export_onnxruntime_cannot_run_is_never_changed_unchecked(name):
    """An exporter bug that onnxruntime cannot run at any size (the manifest says which): with
    the check on, a rewrite is refused with the line saying the model does not run, or nothing
    fuses and the model passes through unchanged, every candidate reported."""
    assert MANIFEST[name]["known_exporter_bugs"], "only known exporter bugs are expected here"
    try:
        result = onnx_fuse.fuse(os.path.join(MODELS, name), check=True)
    except onnx_fuse.BadInput as refused:
        assert "run" in str(refused)
        return
    assert not result.changed and result.report["unfused"]


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
