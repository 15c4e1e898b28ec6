"""Repair of exporter-broken fused ops (repair.py): torch's opset-23 RotaryEmbedding with batch-1
cos/sin caches and no position ids. The repaired model must equal the original at batch 1 and,
at batch 2 with a padded row, equal row by row the original run on each row alone; it runs at
batch 2 after `fuse`, and the report lists every repair."""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_fuse
from onnx_fuse.check import ModelRef, run_model, synthesize_inputs
from onnx_fuse.errors import CheckFailed
from onnx_fuse.model_io import SourceModel
from onnx_fuse.proof import Prover
from onnx_fuse.repair import repair_model
from graphs import GraphBuilder

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
OPSET_23_ROPE = sorted(n for n in MANIFEST if MANIFEST[n].get("opset") == 23
                       and MANIFEST[n].get("ort_cpu_runs") == "batch 1 only")
HEADS, HEAD = 2, 8


def rope_model(batch_one_caches=True, position_ids=False) -> onnx.ModelProto:
    """y = RotaryEmbedding(x, cos, sin) with cos/sin computed from arange(S) as torch's opset-23
    exporter writes them: [1, S, 4] (batch_one_caches), or expanded to [B, S, 4]; or 2-D tables
    with position ids [B, S]."""
    g = GraphBuilder()
    x = g.input("x", TensorProto.FLOAT, ["batch", HEADS, "seq", HEAD])
    seq = g.op("Squeeze", g.op("Shape", x, start=2, end=3), g.const([0], np.int64))
    positions = g.op("Range", g.const(0, np.int64), seq, g.const(1, np.int64))
    angles = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=TensorProto.FLOAT),
                              g.const([1], np.int64)),
                  g.const(1.0 / 10000 ** (np.arange(0, HEAD, 2) / HEAD)))  # [S, 4]
    cos, sin = g.op("Cos", angles), g.op("Sin", angles)
    inputs = [x, cos, sin]
    if position_ids:
        inputs.append(g.op("Expand", g.op("Unsqueeze", positions, g.const([0], np.int64)),
                           g.op("Concat", g.op("Shape", x, end=1), g.op("Shape", x, start=2, end=3),
                                axis=0)))
    else:
        inputs[1:] = [g.op("Unsqueeze", t, g.const([0], np.int64)) for t in (cos, sin)]  # [1, S, 4]
        if not batch_one_caches:
            target = g.op("Concat", g.op("Shape", x, end=1), g.const([1, 1], np.int64), axis=0)
            inputs[1:] = [g.op("Expand", t, target) for t in inputs[1:]]
    y = g.op("RotaryEmbedding", *inputs)
    return g.model(y, opset=23)


def runs_at(model, batch) -> bool:
    ref = ModelRef(model)
    try:
        run_model(ref, synthesize_inputs(ref, batch=batch))
    except Exception:
        return False
    return True


def test_batch_one_caches_run_at_batch_one_only_and_are_repaired():
    model = rope_model()
    assert runs_at(model, 1) and not runs_at(model, 2)  # what torch's exporter gives
    result = onnx_fuse.fuse(model)
    (repair,) = result.report["repairs"]
    assert repair["op"] == "RotaryEmbedding" and "batch 1" in repair["problem"]
    assert "Expand" in repair["fix"]
    assert result.report["repair_check"]["passed"], result.report["repair_check"]["message"]
    assert "row by row" in result.report["repair_check"]["message"]
    assert result.changed and runs_at(result.model, 2)


def test_the_repaired_model_computes_the_broadcast_torch_meant():
    repaired, _ = repair_model(rope_model())
    expanded = rope_model(batch_one_caches=False)  # the caches broadcast over the batch by hand
    inputs = synthesize_inputs(ModelRef(repaired), batch=3)
    got = run_model(ModelRef(repaired), inputs)[repaired.graph.output[0].name]
    want = run_model(ModelRef(expanded), inputs)[expanded.graph.output[0].name]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kwargs", [dict(batch_one_caches=False), dict(position_ids=True)])
def test_valid_rotary_embeddings_are_left_alone(kwargs):
    model = rope_model(**kwargs)
    assert runs_at(model, 2)
    repaired, repairs = repair_model(model)
    assert repaired is model and repairs == []
    result = onnx_fuse.fuse(model)
    assert result.report["repairs"] == [] and not result.changed


def with_rows_bumped(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model's output plus 1 on every batch row but the first: equal at batch 1, not at 2."""
    bumped = onnx.ModelProto()
    bumped.CopyFrom(model)
    graph, out = bumped.graph, bumped.graph.output[0].name
    for node in graph.node:
        node.output[:] = [n + "_raw" if n == out else n for n in node.output]
    g = GraphBuilder()
    g._n = 10_000
    batch = g.op("Squeeze", g.op("Shape", "x", start=0, end=1), g.const([0], np.int64))
    rows = g.op("Cast", g.op("Range", g.const(0, np.int64), batch, g.const(1, np.int64)), to=TensorProto.FLOAT)
    bump = g.op("Reshape", g.op("Min", rows, g.const(1.0)), g.const([-1, 1, 1, 1], np.int64))
    g.nodes.append(helper.make_node("Add", [out + "_raw", bump], [out]))
    graph.node.extend(g.nodes)
    graph.initializer.extend(g.initializers)
    return bumped


def test_a_repair_wrong_on_other_rows_fails_the_row_by_row_check():
    original = rope_model()
    repaired, _ = repair_model(original)
    wrong = with_rows_bumped(repaired)
    prover = Prover(SourceModel(original, None), None)
    with pytest.raises(CheckFailed, match="repaired model does not match"):
        prover.require_repair(wrong)
    assert "row 1" in prover.last["message"]
    Prover(SourceModel(original, None), None).require_repair(repaired)  # the real one passes


@pytest.mark.parametrize("name", OPSET_23_ROPE)
def test_committed_opset_23_exports_run_at_batch_two_after_fuse(name):
    truth = MANIFEST[name]
    source = onnx.load(os.path.join(MODELS, name))
    assert not runs_at(source, 2)
    result = onnx_fuse.fuse(os.path.join(MODELS, name))
    report = result.report
    assert len(report["repairs"]) == truth["rope_applications"]
    assert report["repair_check"]["passed"], report["repair_check"]["message"]
    inputs = synthesize_inputs(ModelRef(result.model, MODELS))
    assert inputs["input_ids"].shape[0] == 2 and not inputs["attention_mask"].all()
    outputs = run_model(ModelRef(result.model, MODELS), inputs)
    assert outputs["logits"].shape[0] == 2
    if truth["attn_implementation"] == "eager":  # SDPA exports carry ONNX Attention already
        assert report["counts"].get("attention") == truth["attention_cores"]
        assert report["check"]["passed"], report["check"]["message"]


def test_the_command_says_what_it_repaired(capsys, tmp_path):
    from onnx_fuse import cli

    name = os.path.join(MODELS, OPSET_23_ROPE[0])
    assert cli.main(["inspect", name]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  repairs ")]
    assert len(listed) == MANIFEST[OPSET_23_ROPE[0]]["rope_applications"]
    assert cli.main(["fuse", name, "-o", str(tmp_path / "out.onnx")]) == 0
    assert "repaired 4 exporter-written node(s)" in capsys.readouterr().out
    assert runs_at(onnx.load(tmp_path / "out.onnx"), 2)
