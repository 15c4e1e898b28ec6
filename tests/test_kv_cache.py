"""KV-cache writes into fixed-size caches → TensorScatter (opset 24, axis -2, linear).

Hand-built graphs for both ways exporters write HF StaticCache's index_copy_ (TorchScript:
ScatterElements over expanded positions; dynamo: ScatterND between transposes), near-misses that
must stay unfused with a reason, how the pass raises the opset to what fuses, and the committed
StaticCache models (every write fused, attention still fused, interface unchanged, check passing).
"""

import importlib
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_fuse
from onnx_fuse.check import ModelRef, synthesize_inputs
from onnx_fuse.opset import OpsetError
from graphs import GraphBuilder

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
STATIC = sorted(n for n in MANIFEST if MANIFEST[n]["kind"] == "decode_static")
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
CACHE_LEN, HEADS, HEAD = 16, 2, 8


def ops(model):
    return [n.op_type for n in model.graph.node]


def write_model(form="elements", positions="input", axis=2, axes=None, reduction=None,
                update_layout="bnsh", opset=17, seq="seq"):
    """present = past with `new` written at the positions along axis 2, as one exporter writes it.

    positions: "input" (a graph input, like cache_position), "range" (Range(start, start + S, 1)
    from a scalar input), "constant" ([3, 4, 5]), "gaps" ([3, 5, 7]), "doubled" (2 · input)."""
    g = GraphBuilder()
    past = g.input("past", FLOAT, ["batch", HEADS, CACHE_LEN, HEAD])
    if positions in ("constant", "gaps"):
        seq = 3
    new_shape = ["batch", HEADS, seq, HEAD] if update_layout == "bnsh" else ["batch", seq, HEADS, HEAD]
    new = g.input("new", FLOAT, new_shape)
    if positions == "input":
        pos = g.input("cache_position", INT64, [seq])
    elif positions == "range":
        start = g.input("start", INT64, [])
        length = g.op("Squeeze", g.op("Shape", new, start=2, end=3), g.const([0], np.int64))
        pos = g.op("Range", start, g.op("Add", start, length), g.const(1, np.int64))
    elif positions == "constant":
        pos = g.const([3, 4, 5], np.int64)
    elif positions == "gaps":
        pos = g.const([3, 5, 7], np.int64)
    else:
        pos = g.op("Mul", g.input("cache_position", INT64, [seq]), g.const([2], np.int64))
    extra = {} if reduction is None else {"reduction": reduction}
    if form == "elements":
        index = g.op("Unsqueeze", pos, g.const(axes or [0, 1, 3], np.int64))
        index = g.op("Expand", index, g.op("Shape", new))
        out = g.op("ScatterElements", past, index, new, axis=axis, **extra)
    else:
        past_t = g.op("Transpose", past, perm=[2, 0, 1, 3])
        # dynamo merges V's head transpose into the one before the scatter: [B, S, N, H] → [S, B, N, H]
        new_t = g.op("Transpose", new, perm=[2, 0, 1, 3] if update_layout == "bnsh" else [1, 0, 2, 3])
        index = g.op("Unsqueeze", pos, g.const(axes or [1], np.int64))
        out = g.op("Transpose", g.op("ScatterND", past_t, index, new_t, **extra), perm=[1, 2, 0, 3])
    g.nodes[-1].output[0] = "present"  # the updated cache is a graph output
    g.outputs = [helper.make_tensor_value_info("present", FLOAT, ["batch", HEADS, CACHE_LEN, HEAD])]
    graph = helper.make_graph(g.nodes, "g", g.inputs, g.outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("form, positions, update_layout", [
    ("elements", "input", "bnsh"),
    ("nd", "input", "bnsh"),
    ("nd", "input", "bsnh"),
    ("elements", "range", "bnsh"),
    ("nd", "range", "bnsh"),
    ("elements", "constant", "bnsh"),
    ("nd", "constant", "bsnh"),
])
def test_each_spelling_fuses_to_one_tensor_scatter(form, positions, update_layout):
    result = onnx_fuse.fuse(write_model(form, positions, update_layout=update_layout))
    report = result.report
    assert report["counts"] == {"kv_cache": 1}, report["unfused"]
    assert report["check"]["passed"], report["check"]["message"]
    assert report["opset"] == {"from": 17, "to": 24}
    kinds = ops(result.model)
    assert kinds.count("TensorScatter") == 1
    assert "ScatterElements" not in kinds and "ScatterND" not in kinds
    (scatter,) = [n for n in result.model.graph.node if n.op_type == "TensorScatter"]
    attrs = {a.name: helper.get_attribute_value(a) for a in scatter.attribute}
    assert attrs == {"axis": -2, "mode": b"linear"}
    (fused,) = report["fused"]
    assert fused["form"] == ("scatter_elements" if form == "elements" else "scatter_nd")
    assert fused["contiguous"] == {"input": "assumed: the input is arange(p, p + S)",
                                   "range": "proven (range)", "constant": "proven (constant)"}[positions]
    (entry,) = [e for e in report["tensorrt"] if e["op"] == "TensorScatter"]
    assert entry["problems"] == []
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("form, kwargs, reason", [
    ("elements", dict(axis=1, axes=[0, 2, 3]), "writes along axis 1"),
    ("elements", dict(axes=[0, 1, 2]), "do not run along the written axis"),
    ("elements", dict(reduction="add"), "reduces"),
    ("nd", dict(reduction="add"), "reduces"),
    ("elements", dict(positions="gaps"), "not contiguous"),
    ("nd", dict(positions="gaps"), "not contiguous"),
    ("elements", dict(positions="doubled"), "computed by Mul"),
])
def test_near_misses_stay_unfused_with_a_reason(form, kwargs, reason):
    report = onnx_fuse.fuse(write_model(form, **kwargs)).report
    assert report["counts"] == {}
    reasons = [u["reason"] for u in report["unfused"] if u["pattern"] == "kv_cache"]
    assert reasons and any(reason in r for r in reasons), reasons


def test_the_numerical_proof_rejects_a_wrong_emission(monkeypatch):
    """A TensorScatter that writes one slot too late is caught by the run of the write subgraph."""
    kv_cache = importlib.import_module("onnx_fuse.patterns.kv_cache")
    right = kv_cache.emit_kv_cache_write

    def off_by_one(spec, rw):
        right(spec, rw)
        scatter = rw._nodes[-1]
        start = rw.op("Add", [scatter[1][2], rw.const("one", np.array([1], np.int64))])
        rw._nodes[-1] = (scatter[0], [scatter[1][0], scatter[1][1], start], *scatter[2:])

    monkeypatch.setattr(kv_cache, "emit_kv_cache_write", off_by_one)
    report = onnx_fuse.fuse(write_model("elements"), check=False).report
    assert report["counts"] == {}
    (miss,) = [u for u in report["unfused"] if u["pattern"] == "kv_cache"]
    assert "TensorScatter" in miss["reason"], miss


def test_opset_is_raised_to_what_fuses(monkeypatch):
    """Attention alone needs 23, TensorScatter 24; a model that cannot reach 24 keeps its
    writes (with the reason) and still fuses attention at 23."""
    name = "llama-static_decode-static_eager_torchscript.onnx"
    fuse_module = importlib.import_module("onnx_fuse.fuse")
    convert = fuse_module.raise_opset

    def refuse_24(model, version):
        if version >= 24:
            raise OpsetError("no adapter (test)")
        return convert(model, version)

    monkeypatch.setattr(fuse_module, "raise_opset", refuse_24)
    report = onnx_fuse.fuse(os.path.join(MODELS, name)).report
    assert report["counts"] == {"attention": 2}
    assert report["opset"] == {"from": 17, "to": 23}
    assert report["check"]["passed"]
    blocked = [u for u in report["unfused"] if u["pattern"] == "kv_cache"
               and u["reason"].startswith("needs opset 24: cannot raise the opset from 17 to 24")]
    assert len(blocked) == MANIFEST[name]["kv_cache_writes"], report["unfused"]


def test_checker_positions_for_a_static_cache_are_a_valid_arange():
    model = onnx.load(os.path.join(MODELS, STATIC[0]))
    inputs = synthesize_inputs(ModelRef(model, MODELS))
    positions, seq = inputs["cache_position"], inputs["input_ids"].shape[1]
    past = int(positions[0])
    assert past > 0 and past + seq <= MANIFEST[STATIC[0]]["cache_len"]
    assert positions.tolist() == list(range(past, past + seq))


def interface(model):
    def describe(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]) for v in values]
    return describe(model.graph.input), describe(model.graph.output)


@pytest.mark.parametrize("name", STATIC)
def test_committed_static_cache_models(name):
    truth = MANIFEST[name]
    original = onnx.load(os.path.join(MODELS, name))
    result = onnx_fuse.fuse(os.path.join(MODELS, name))
    report, model = result.report, result.model
    assert report["counts"]["kv_cache"] == truth["kv_cache_writes"], report["unfused"]
    assert report["counts"]["attention"] == truth["attention_cores"]
    assert report["check"]["passed"], report["check"]["message"]
    assert set(report["check"]["outputs"]) == set(truth["outputs"])
    assert report["opset"]["to"] == 24
    kinds = ops(model)
    assert kinds.count("TensorScatter") == truth["kv_cache_writes"]
    assert kinds.count("Attention") == truth["attention_cores"]
    assert "ScatterND" not in kinds and "ScatterElements" not in kinds
    assert interface(model) == interface(original)
    scatters = [n for n in model.graph.node if n.op_type == "TensorScatter"]
    # each write reads a cache input and produces its present output; one shared write index
    assert sorted(n.input[0] for n in scatters) == sorted(i for i in truth["inputs"] if "past" in i)
    assert sorted(n.output[0] for n in scatters) == sorted(o for o in truth["outputs"] if "present" in o)
    assert len({n.input[2] for n in scatters}) == 1
    for fused in (f for f in report["fused"] if f["rule"] == "kv_cache"):
        assert fused["cache_len"] == truth["cache_len"] and fused["positions"] == "cache_position"
        assert fused["contiguous"].startswith("assumed")
    assert all(e["problems"] == [] for e in report["tensorrt"] if e["op"] == "TensorScatter")
    onnx.checker.check_model(model, full_check=True)
