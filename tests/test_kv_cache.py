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
        g.op("ScatterElements", past, index, new, axis=axis, **extra)
    else:
        past_t = g.op("Transpose", past, perm=[2, 0, 1, 3])
        # dynamo merges V's head transpose into the one before the scatter: [B, S, N, H] → [S, B, N, H]
        new_t = g.op("Transpose", new, perm=[2, 0, 1, 3] if update_layout == "bnsh" else [1, 0, 2, 3])
        index = g.op("Unsqueeze", pos, g.const(axes or [1], np.int64))
        g.op("Transpose", g.op("ScatterND", past_t, index, new_t, **extra), perm=[1, 2, 0, 3])
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
    """A TensorScatter that writes one slot too late is caught by the run of the write subgraph
    against what the target emits."""
    from onnx_fuse.specs import KVCacheWriteSpec
    from onnx_fuse.targets.onnx import OnnxTarget

    right = OnnxTarget.emitters[KVCacheWriteSpec]

    def off_by_one(spec, rw):
        right(spec, rw)
        scatter = rw.nodes[-1]
        start = rw.op("Add", [scatter.inputs[2], rw.const("one", np.array([1], np.int64))])
        rw.nodes[-1], rw.nodes[-2] = rw.nodes[-2], rw.nodes[-1]  # the Add goes first
        scatter.inputs[2] = start

    monkeypatch.setitem(OnnxTarget.emitters, KVCacheWriteSpec, off_by_one)
    report = onnx_fuse.fuse(write_model("elements"), check=False).report
    assert report["counts"] == {}
    (miss,) = [u for u in report["unfused"] if u["pattern"] == "kv_cache"]
    assert "differs from the matched write" in miss["reason"], miss


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
    assert report["counts"] == {"attention": 2, "rope": MANIFEST[name]["rope_applications"]}
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


# --------------------------------------------------------------------------- part B: --kv-cache static

from onnx_fuse import cli  # noqa: E402
from onnx_fuse.check import ModelRef as _Ref  # noqa: E402
from onnx_fuse.errors import BadInput  # noqa: E402
from onnx_fuse.kv_static import check_static, find_layout  # noqa: E402

GROWING = sorted(n for n in MANIFEST if MANIFEST[n]["kind"] == "decode")
MAX_CACHE_LEN = 24


def cache_outputs(model):
    """The original's present caches: its 4-D outputs."""
    return sorted(o.name for o in model.graph.output if len(o.type.tensor_type.shape.dim) == 4)


@pytest.mark.parametrize("name", GROWING)
def test_growing_caches_become_static(name):
    truth = MANIFEST[name]
    original = onnx.load(os.path.join(MODELS, name))
    if truth.get("attention_sinks"):  # ONNX Attention cannot express them: the cores stay unfused
        with pytest.raises(BadInput, match="attention sinks"):
            onnx_fuse.fuse(os.path.join(MODELS, name), kv_cache="static", max_cache_len=MAX_CACHE_LEN)
        return
    result = onnx_fuse.fuse(os.path.join(MODELS, name), kv_cache="static", max_cache_len=MAX_CACHE_LEN)
    report, model = result.report, result.model
    check = report["check"]
    assert check["passed"], check["message"]
    window = truth.get("sliding_window") if truth.get("sliding_window_layers") else None
    assert check["steps"] - 1 >= max(8, (window or 0) + 2) and check["chunk"] > 1
    # the pass fused what the exporter did not write as Attention itself, and checked it
    by_the_pass = truth["attention_cores"] - truth.get("native_attention_ops", 0)
    assert report["counts"].get("attention", 0) == by_the_pass
    if by_the_pass:
        assert check["fused"]["passed"]
    assert set(check["outputs"]) == set(truth["outputs"])
    assert report["counts"]["kv_cache"] == truth["kv_cache_writes"]
    kinds = ops(model)
    assert kinds.count("TensorScatter") == truth["kv_cache_writes"]
    assert kinds.count("Attention") == truth["attention_cores"]
    assert kinds.count("Softmax") == (truth.get("moe") or {}).get("router_softmax", 0)  # routers only
    # the interface: the same inputs plus write_position [B]; caches and the mask over N slots
    inputs, outputs = interface(model)
    before_inputs, before_outputs = interface(original)
    assert [i[0] for i in inputs] == [i[0] for i in before_inputs] + ["write_position"]
    assert [o[0] for o in outputs] == [o[0] for o in before_outputs]
    shapes = {n: s for n, _, s in inputs + outputs}
    assert shapes["write_position"] == [shapes["input_ids"][0]]
    assert shapes["attention_mask"] == [shapes["input_ids"][0], MAX_CACHE_LEN]
    pairs = json.loads({p.key: p.value for p in model.metadata_props}["onnx_fuse.kv_cache.pairs"])
    assert pairs == report["kv_cache"]["pairs"]
    assert sorted(pairs) == cache_outputs(original)
    for present, past in pairs.items():
        assert shapes[past] == shapes[present] and shapes[past][2] == MAX_CACHE_LEN
    scatters = {n.output[0]: n for n in model.graph.node if n.op_type == "TensorScatter"}
    assert {p: scatters[p].input[0] for p in pairs} == pairs  # each written in place of its input
    assert {n.input[2] for n in scatters.values()} == {"write_position"}
    forms = {c["form"] for c in report["kv_cache"]["caches"]}
    assert forms == ({"window"} if truth.get("cache") == "sliding_window" else {"concat"})
    for node in (n for n in model.graph.node if n.op_type == "Attention"):
        assert len(node.input) == 4  # no past_key / past_value / nonpad_kv_seqlen
    windows = [layer["window"] for layer in report["kv_cache"]["layers"]]
    layers = truth.get("sliding_window_layers", [])
    assert windows == [truth["sliding_window"] if i in layers else None for i in range(truth["layers"])]
    problems = [e for e in report["tensorrt"] if e["op"] in ("TensorScatter", "RotaryEmbedding")]
    assert all(e["problems"] == [] for e in problems), problems
    onnx.checker.check_model(model, full_check=True)


def test_the_multi_step_check_fails_when_a_write_is_off_by_one():
    name = "llama-gqa_decode_eager_dynamo.onnx"
    path = os.path.join(MODELS, name)
    converted = onnx_fuse.fuse(path, kv_cache="static", max_cache_len=MAX_CACHE_LEN, check=False).model
    original = onnx.load(path)
    layout = find_layout(original)
    assert check_static(_Ref(original, MODELS), _Ref(converted, MODELS), layout, MAX_CACHE_LEN)["passed"]
    broken = onnx.ModelProto()
    broken.CopyFrom(converted)
    broken.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "one_more"))
    broken.graph.node.insert(0, helper.make_node("Add", ["write_position", "one_more"], ["late"]))
    for node in broken.graph.node:
        if node.op_type == "TensorScatter":
            node.input[2] = "late"
    outcome = check_static(_Ref(original, MODELS), _Ref(broken, MODELS), layout, MAX_CACHE_LEN)
    assert not outcome["passed"] and "differs" in outcome["message"], outcome["message"]


def growing_on_axis_3():
    """A cache that grows along its last axis ([B, N, H, T], keys kept transposed)."""
    g = GraphBuilder()
    past = g.input("past_key", FLOAT, ["batch", 2, 8, "past"])
    new = g.input("new_key", FLOAT, ["batch", 2, 8, 1])
    g.nodes.append(helper.make_node("Concat", [past, new], ["present_key"], name="grow", axis=3))
    g.outputs = [helper.make_tensor_value_info("present_key", FLOAT, ["batch", 2, 8, "total"])]
    graph = helper.make_graph(g.nodes, "g", g.inputs, g.outputs, g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case, expected", [
    ("small", "is smaller than the model needs"),
    ("large", "is more than the model supports"),
    ("no_cache", "no recognisable KV cache"),
    ("axis_3", "grows its cache along axis 3"),
])
def test_static_conversion_errors_exit_2_and_write_nothing(case, expected, tmp_path, capsys):
    source = {"small": "gpt2_decode_eager_dynamo.onnx", "large": "gpt2_decode_eager_dynamo.onnx",
              "no_cache": "gpt2_prefill_eager_dynamo.onnx"}.get(case)
    if source is None:
        source = tmp_path / "axis3.onnx"
        onnx.save(growing_on_axis_3(), source)
    else:
        source = os.path.join(MODELS, source)
    length = {"small": "5", "large": "500"}.get(case, "32")
    out = tmp_path / "out.onnx"
    code = cli.main(["fuse", str(source), "-o", str(out), "--kv-cache", "static",
                     "--max-cache-len", length, "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and not (tmp_path / "r.json").exists()
    assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_static_conversion_from_the_command_line(tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = cli.main(["fuse", os.path.join(MODELS, "qwen2-gqa_decode_eager_torchscript.onnx"), "-o",
                     str(out), "--kv-cache", "static", "--max-cache-len", "16", "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    written = json.load(open(report))
    assert written["check"]["passed"] and written["kv_cache"]["max_cache_len"] == 16
    assert written["kv_cache"]["pairs"]["present.1.value"] == "past_key_values.1.value"
    model = onnx.load(out)
    assert {p.key for p in model.metadata_props} >= {"onnx_fuse.kv_cache.pairs", "onnx_fuse.kv_cache.max_cache_len"}
