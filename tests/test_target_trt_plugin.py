"""Target trt-plugin: FusedAttention, FusedRotary and FusedKVWrite (plugin_ops.py) with their
function bodies, which the check runs in onnxruntime.

Hand-built graphs first, one per mask class and attention feature the target says differently
(each attribute is then changed in the written model, and the check is seen to fail), RoPE in
both forms and the cache write; then every committed model, what TensorRT 10.15's parser rules
say of the output (lint), the command line, and that onnx_fuse.trt_plugins registers a plugin
for every op the target writes, as the target writes it.
"""

import inspect
import json
import os
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnx_fuse
from fake_tensorrt import fake_trt  # noqa: F401 (the fixture)
from graphs import attention_model, random_inputs
from onnx_fuse import cli, lint, plugin_ops
from onnx_fuse.check import ModelRef, check_equivalent
from onnx_fuse.specs import KVCacheWriteSpec, RotarySpec
from onnx_fuse.targets import trt_plugin
from onnx_fuse.targets.trt_plugin import TrtPluginTarget
# Builders of other test modules, reused rather than written again.
from test_kv_cache import write_model
from test_rope import feeds_for, rope_model
from test_target_trt11 import cached_attention_model, cached_inputs

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
TARGET = "trt-plugin"
STANDARD_FUSED_OPS = {"Attention", "RotaryEmbedding", "TensorScatter"}


def plugin_nodes(model, op=None):
    """The target's nodes, those in If/Loop/Scan bodies included."""
    found, graphs = [], [model.graph]
    while graphs:
        graph = graphs.pop()
        found += [n for n in graph.node if n.domain == plugin_ops.DOMAIN and op in (None, n.op_type)]
        graphs.extend(a.g for n in graph.node for a in n.attribute if a.HasField("g"))
    return found


def attrs_of(node):
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def with_attribute(model, op, **changes):
    """A copy of `model` whose `op` nodes have attributes changed."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for node in plugin_nodes(changed, op):
        for attribute in node.attribute:
            if attribute.name in changes:
                attribute.CopyFrom(helper.make_attribute(attribute.name, changes[attribute.name]))
    return changed


def ort_session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def agrees(original, changed, inputs):
    return check_equivalent(ModelRef(original, None), ModelRef(changed, None), inputs).passed


# --------------------------------------------------------------------------- attention

# (graph, sizes) -> what FusedAttention is given, and a change of it the check must catch.
MASK_CASES = {
    "prefill causal": (dict(past=False), 5, 0, dict(causal=1, window=0, use_key_mask=0), dict(causal=0)),
    "decode causal": (dict(past=True), 1, 4, dict(causal=2, window=0, use_key_mask=0), dict(causal=1)),
    "chunk causal": (dict(past=True), 3, 4, dict(causal=2, window=0, use_key_mask=0), dict(causal=1)),
    "window": (dict(past=True, window=3), 3, 4, dict(causal=2, window=3, use_key_mask=0), dict(window=4)),
    "window too narrow": (dict(past=True, window=3), 3, 4, dict(causal=2, window=3, use_key_mask=0),
                          dict(window=2)),
    "padding": (dict(past=True, padding=True), 3, 4, dict(causal=2, window=0, use_key_mask=1),
                dict(use_key_mask=0)),
    # (a past of 2: the two padded keys lie inside the window)
    "window and padding": (dict(past=True, window=3, padding=True), 3, 2,
                           dict(causal=2, window=3, use_key_mask=1), dict(use_key_mask=0)),
}


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_each_mask_class_is_said_by_attributes_and_each_is_needed(case):
    graph, seq, past, expected, wrong = MASK_CASES[case]
    model = cached_attention_model(**graph)
    inputs = cached_inputs(model, seq, past)
    result = onnx_fuse.fuse(model, target=TARGET, inputs=inputs)
    assert result.report["counts"] == {"attention": 1} and result.report["check"]["passed"]
    (node,) = plugin_nodes(result.proto, "FusedAttention")
    attrs = attrs_of(node)
    assert {k: attrs[k] for k in expected} == expected
    assert attrs["plugin_namespace"] == "onnx_fuse" and attrs["plugin_version"] == "1"
    # K and V go in as the graph has them: the GQA repetition is gone.
    assert node.input[1] != node.input[2] and "Expand" not in [n.op_type for n in result.proto.graph.node
                                                              if n.output[0] in node.input[1:3]]
    assert not agrees(model, with_attribute(result.proto, "FusedAttention", **wrong), inputs)


def test_the_key_mask_is_what_the_graph_masks_with():
    """[B, Skv] int32: the padded input's rows, read off the graph's own mask; a key mask that
    lets the padded keys through fails the check."""
    model = cached_attention_model(past=True, padding=True)
    inputs = cached_inputs(model, 3, 4)
    result = onnx_fuse.fuse(model, target=TARGET, inputs=inputs)
    (node,) = plugin_nodes(result.proto, "FusedAttention")
    probe = onnx.ModelProto()
    probe.CopyFrom(result.proto)
    probe.graph.output.append(helper.make_tensor_value_info(node.input[3], TensorProto.INT32, None))
    key_mask = ort_session(probe).run([node.input[3]], inputs)[0]
    np.testing.assert_array_equal(key_mask, inputs["attention_mask"])
    all_valid = onnx.ModelProto()
    all_valid.CopyFrom(result.proto)
    all_valid.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((2, 7), np.int32), "all_valid"))
    plugin_nodes(all_valid, "FusedAttention")[0].input[3] = "all_valid"
    assert not agrees(model, all_valid, inputs)


def test_sinks_are_the_ops_input_per_query_head():
    model = attention_model(sinks="gpt-oss")
    inputs = random_inputs(model)
    result = onnx_fuse.fuse(model, target=TARGET, inputs=inputs)
    assert result.report["counts"] == {"attention": 1} and result.report["check"]["passed"]
    (node,) = plugin_nodes(result.proto, "FusedAttention")
    (reshape,) = [n for n in result.proto.graph.node if n.output[0] == node.input[4]]
    assert reshape.op_type == "Reshape"  # [1, Nq, 1, 1] -> [Nq]
    no_sinks = onnx.ModelProto()
    no_sinks.CopyFrom(result.proto)
    minus_inf = helper.make_tensor("minus_inf", TensorProto.FLOAT, [4], [-np.inf] * 4)
    no_sinks.graph.initializer.append(minus_inf)
    plugin_nodes(no_sinks, "FusedAttention")[0].input[4] = "minus_inf"
    assert not agrees(model, no_sinks, inputs)


def test_attention_without_sinks_gets_minus_infinity():
    model = attention_model(repeat="expand", kv_heads=2)
    result = onnx_fuse.fuse(model, target=TARGET, inputs=random_inputs(model))
    (node,) = plugin_nodes(result.proto, "FusedAttention")
    (sinks,) = [t for t in result.proto.graph.initializer if t.name == node.input[4]]
    values = onnx.numpy_helper.to_array(sinks)
    assert values.shape == (4,) and values.dtype == np.float32 and np.all(np.isneginf(values))


def test_softcap_is_an_attribute():
    model = attention_model(softcap=3.0)
    inputs = random_inputs(model)
    result = onnx_fuse.fuse(model, target=TARGET, inputs=inputs)
    (node,) = plugin_nodes(result.proto, "FusedAttention")
    assert attrs_of(node)["softcap"] == pytest.approx(3.0)
    assert not agrees(model, with_attribute(result.proto, "FusedAttention", softcap=0.0), inputs)


def pooled_padded_prefill(fill):
    """Causal + padding prefill whose left-padded row has a query that sees no key, masked with
    `fill`, and pooled over heads and tokens (so the padded rows count in the check)."""
    model = cached_attention_model(past=False, padding=True)
    for tensor in model.graph.initializer:
        value = onnx.numpy_helper.to_array(tensor)
        if value.dtype == np.float32 and value.size == 1 and np.isneginf(value).all():
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.full_like(value, fill), tensor.name))
    out = model.graph.output[0].name
    axes = helper.make_tensor("pool_axes", TensorProto.INT64, [2], [1, 2])
    model.graph.initializer.append(axes)
    model.graph.node.append(helper.make_node("ReduceSum", [out, "pool_axes"], ["pooled"], keepdims=0))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None))
    return model


def test_a_row_that_sees_no_key_gets_what_the_original_gave():
    """A finite fill makes the original's softmax uniform there (the mean of V): masked_row 1,
    and 0 in its place fails the check. With -inf the original row is NaN (undefined): zeros."""
    finite = pooled_padded_prefill(np.finfo(np.float32).min)
    inputs = cached_inputs(finite, 5, 0)
    result = onnx_fuse.fuse(finite, target=TARGET, inputs=inputs)
    assert result.report["fused"][0]["mask_class"] == "causal_padding" and result.report["check"]["passed"]
    assert attrs_of(plugin_nodes(result.proto, "FusedAttention")[0])["masked_row"] == 1
    assert not agrees(finite, with_attribute(result.proto, "FusedAttention", masked_row=0), inputs)
    minus_inf = cached_attention_model(past=False, padding=True)
    result = onnx_fuse.fuse(minus_inf, target=TARGET, check=False)
    assert attrs_of(plugin_nodes(result.proto, "FusedAttention")[0])["masked_row"] == 0


@pytest.mark.parametrize("mask", ["additive", "keep"])
def test_a_mask_it_cannot_say_is_refused_with_the_reason(mask):
    model = attention_model(mask=mask)  # the mask is a graph input: any values at all
    result = onnx_fuse.fuse(model, target=TARGET, inputs=random_inputs(model))
    assert result.report["counts"] == {} and not result.changed
    (refused,) = result.report["unfused"]
    assert "arbitrary" in refused["reason"]


# --------------------------------------------------------------------------- RoPE, KV write


@pytest.mark.parametrize("kwargs", [dict(), dict(layout="bsnh"), dict(layout="3d"), dict(interleaved="strided"),
                                    dict(rotary_dim=8), dict(positions="range")])
@pytest.mark.parametrize("max_positions", [None, 64])
def test_rope_in_both_forms(kwargs, max_positions):
    """The table form (bounded positions) takes the caches and position ids; the computed form
    (nothing bounds them) a table of one row per token, read at b * S + s: proven on positions
    far beyond any table."""
    model = rope_model(layers=2, **kwargs)
    feeds = feeds_for(model, limit=60_000 if max_positions is None else max_positions)
    result = onnx_fuse.fuse(model, target=TARGET, inputs=feeds, max_positions=max_positions)
    assert result.report["counts"] == {"rope": 4}, result.report["unfused"]
    assert result.report["check"]["passed"]
    forms = {f["form"] for f in result.report["fused"]}
    assert forms == {"computed" if max_positions is None else "table"}
    nodes = plugin_nodes(result.proto, "FusedRotary")
    assert len(nodes) == 4 and len({tuple(n.input[1:3]) for n in nodes}) == 1  # tables shared
    expected_dim = 0 if kwargs.get("rotary_dim", 16) == 16 else kwargs["rotary_dim"]
    assert {attrs_of(n)["rotary_dim"] for n in nodes} == {expected_dim}
    assert {attrs_of(n)["interleaved"] for n in nodes} == {int("interleaved" in kwargs)}
    assert not STANDARD_FUSED_OPS & {n.op_type for n in result.proto.graph.node}


def test_a_wrong_rotation_is_caught_by_the_rules_verification(monkeypatch):
    def pairs_swapped(spec, x, rw, outputs):
        return trt_plugin.fused_rotary(replace(spec, interleaved=not spec.interleaved), x, rw, outputs)

    monkeypatch.setitem(TrtPluginTarget.emitters, RotarySpec,
                        lambda spec, rw: trt_plugin.emit_rotary(spec, rw, rotation=pairs_swapped))
    result = onnx_fuse.fuse(rope_model(), target=TARGET, check=False)
    assert result.report["counts"] == {}
    reasons = [u["reason"] for u in result.report["unfused"]]
    assert reasons and all("differs from the matched subgraph" in r for r in reasons), reasons


@pytest.mark.parametrize("form, positions, update_layout", [
    ("elements", "input", "bnsh"), ("nd", "input", "bsnh"), ("elements", "range", "bnsh"),
    ("nd", "constant", "bsnh")])
def test_cache_writes_are_in_place_writes_at_the_models_opset(form, positions, update_layout):
    result = onnx_fuse.fuse(write_model(form, positions, update_layout=update_layout), target=TARGET)
    report = result.report
    assert report["counts"] == {"kv_cache": 1} and report["check"]["passed"]
    assert report["opset"] == {"from": 17, "to": 18}  # no TensorScatter: no opset 24
    (node,) = plugin_nodes(result.proto, "FusedKVWrite")
    assert node.output[0] == "present" and node.input[0] == "past"  # the cache pair TensorRT aliases
    assert report["tensorrt"] == [{"node": node.name, "op": "onnx_fuse.trt::FusedKVWrite", "problems": []}]
    onnx.checker.check_model(result.proto, full_check=True)


def test_a_write_one_slot_late_is_caught_by_the_rules_verification(monkeypatch):
    right = TrtPluginTarget.emitters[KVCacheWriteSpec]

    def one_late(spec, rw):
        right(spec, rw)
        write = rw.nodes[-1]
        later = rw.op("Add", [write.inputs[2], rw.const("one", np.array([1], np.int64))])
        rw.nodes[-1], rw.nodes[-2] = rw.nodes[-2], rw.nodes[-1]
        write.inputs[2] = later

    monkeypatch.setitem(TrtPluginTarget.emitters, KVCacheWriteSpec, one_late)
    report = onnx_fuse.fuse(write_model("elements"), target=TARGET, check=False).report
    assert report["counts"] == {}
    assert "differs from the matched write" in report["unfused"][0]["reason"]


# --------------------------------------------------------------------------- committed models


def runnable(truth) -> bool:
    return truth.get("ort_cpu_runs", True) is not False or truth.get("dtype") == "bfloat16"


def mask_is_plain(truth) -> bool:
    """The manifest's word that every core's mask is causal (+ a window) and/or padding, and
    computed from the positions by an exporter the mask classifier evaluates at any size: no
    position bias (T5), no local bidirectional window (ModernBERT), no StaticCache masks (they
    read cache_position), no sliding caches, no mask sized by transformers' or optimum's
    exporter."""
    return not (truth.get("position_bias") or truth.get("local_attention") or truth.get("cache")
                in ("static", "sliding_window") or truth["kind"] == "decode_static"
                or truth["exporter"] not in ("torchscript", "dynamo"))


# Exports the engine matches nothing of, for any target: the candidates are reported with why.
NOT_MATCHED = {
    "cohere_prefill_eager_torchscript.onnx": "its softmax runs over axis 2 and its RoPE cut does not "
                                             "run alone (TorchScript's shapes)",
}


def refused_by_the_target(entry) -> bool:
    return entry["reason"].startswith("FusedAttention")


@pytest.mark.parametrize("name", [n for n in sorted(MANIFEST) if runnable(MANIFEST[n])])
def test_every_committed_model_fuses_and_checks_through_the_bodies(name):
    """Every core fuses (sinks too) where the manifest says its mask is plain; elsewhere a core
    may be refused, saying the op cannot take its mask. Every candidate is reported, every RoPE
    application fuses, every op has its body, no standard fused op is written, the opset is never
    raised past the model's (18 at least), and the written nodes meet TensorRT 10.15's parser
    rules and the ops' contract."""
    truth = MANIFEST[name]
    source = onnx.load(os.path.join(MODELS, name), load_external_data=False)
    written = [n.op_type for n in source.graph.node]
    result = onnx_fuse.fuse(os.path.join(MODELS, name), target=TARGET)
    report = result.report
    assert report["check"] is None or report["check"]["passed"], report["check"]["message"]
    candidates = [u for u in report["unfused"] if u["pattern"] == "attention"]
    refused = [u for u in candidates if refused_by_the_target(u)]
    fused = report["counts"].get("attention", 0)
    assert fused + len(candidates) >= truth["attention_cores"]  # the exporter's Attention ops too
    if name in NOT_MATCHED:
        assert not result.changed and candidates and not refused
        return
    assert all("bias" in u["reason"] or "arbitrary" in u["reason"] for u in refused), refused
    if mask_is_plain(truth):
        assert fused == truth["attention_cores"] and not candidates
    expected_rope = truth["rope_applications"] - written.count("RotaryEmbedding")
    assert report["counts"].get("rope", 0) == expected_rope, report["unfused"]
    if not result.changed:
        return
    model = result.proto
    assert len(plugin_nodes(model, "FusedAttention")) == fused
    assert not STANDARD_FUSED_OPS & {n.op_type for n in model.graph.node} - set(written)
    left = [u for u in candidates if u["anchor"].startswith("Attention ")]  # the exporter's, refused
    assert [n.op_type for n in model.graph.node].count("Attention") == len(left)
    used = {n.op_type for n in plugin_nodes(model)}
    assert {f.name for f in model.functions if f.domain == plugin_ops.DOMAIN} == used
    assert report["opset"]["to"] == max(18, report["opset"]["from"])
    if truth.get("attention_sinks"):
        assert fused and not any(n.input[4].startswith("no_sinks") for n in plugin_nodes(model, "FusedAttention"))
    findings = [(v.node, f.message) for v in lint.verdicts(model, "10.15")
                if v.op.startswith(plugin_ops.DOMAIN + "::") for f in v.findings]
    assert not findings
    onnx.checker.check_model(model)


def test_an_output_without_primitive_attention_lints_clean():
    result = onnx_fuse.fuse(os.path.join(MODELS, "mistral-swa_decode_sdpa_dynamo.onnx"), target=TARGET)
    report = lint.lint(result.proto, "10.15")
    assert report["clean"] and report["layers"] == 6  # 2 attention, 4 RoPE


# --------------------------------------------------------------------------- command line, plugins


def test_the_command_writes_and_lint_passes(tmp_path, capfd):
    out = tmp_path / "fused.onnx"
    source = os.path.join(MODELS, "qwen2-gqa_decode_sdpa_dynamo.onnx")
    assert cli.main(["fuse", source, "-o", str(out), "--target", TARGET]) == 0
    model = onnx.load(str(out))
    assert len(plugin_nodes(model, "FusedAttention")) == 2 and len(plugin_nodes(model, "FusedRotary")) == 4
    assert cli.main(["lint", str(out), "--trt", "10.15"]) == 0
    capfd.readouterr()


def test_the_plugins_take_every_node_the_target_writes(fake_trt):
    """Each op type written has a plugin (name, inputs in order, attribute names and types) with
    AOT and JIT implementations; each node's attributes are exactly the plugin's fields."""
    registry, _ = fake_trt
    models = ["gpt-oss_decode_eager_dynamo.onnx", "llama-static_decode-static_sdpa_dynamo.onnx"]
    nodes = [n for name in models for n in plugin_nodes(onnx_fuse.fuse(
        os.path.join(MODELS, name), target=TARGET, check=False).proto)]
    assert {n.op_type for n in nodes} == set(plugin_ops.OPS)

    for node in nodes:
        plugin = registry[f"onnx_fuse::{node.op_type}"]
        assert {"register", "aot_impl", "impl", "autotune"} <= set(plugin)
        params = inspect.signature(plugin["register"]).parameters
        spec = plugin_ops.OPS[node.op_type]
        assert len(node.input) == len(spec.inputs) == len(params) - len(spec.attrs)
        fields = {k: v for k, v in attrs_of(node).items() if k not in ("plugin_namespace", "plugin_version")}
        assert set(fields) == set(params) - {n.lower() for n in spec.inputs}
        for key, value in fields.items():
            assert isinstance(value, params[key].annotation), key


# --------------------------------------------------------------------------- --kv-cache static

from onnx_fuse.targets.trt_plugin_static import TrtPluginStaticForm  # noqa: E402

GROWING = sorted(n for n in MANIFEST if MANIFEST[n]["kind"] == "decode")
CACHE_LEN = 16


def static(name):
    return onnx_fuse.fuse(os.path.join(MODELS, name), target=TARGET, kv_cache="static",
                          max_cache_len=CACHE_LEN)


@pytest.mark.parametrize("name", GROWING)
def test_growing_caches_become_in_place_writes_and_attention_over_the_slots(name):
    """FusedKVWrite at write_position writes each present output in place of its input;
    FusedAttention reads every slot with kv_lengths and the slot mask (holes included: both
    scenarios of the multi-step check), its window kept; the written nodes lint clean."""
    truth = MANIFEST[name]
    result = static(name)
    check = result.report["check"]
    assert check["passed"] and list(check["scenarios"]) == ["ragged", "left_padded"], check["message"]
    model = result.proto
    attention, writes = plugin_nodes(model, "FusedAttention"), plugin_nodes(model, "FusedKVWrite")
    assert len(attention) == truth["attention_cores"] and len(writes) == truth["kv_cache_writes"]
    pairs = result.report["kv_cache"]["pairs"]
    assert {n.output[0]: n.input[0] for n in writes} == pairs and {n.input[2] for n in writes} == {"write_position"}
    layers = truth.get("sliding_window_layers", [])
    windows = [truth["sliding_window"] if i in layers else 0 for i in range(truth["layers"])]
    assert [(attrs_of(n)["causal"], attrs_of(n)["use_key_mask"], attrs_of(n)["window"]) for n in attention] \
        == [(2, 1, w) for w in windows]
    source = {n.op_type for n in onnx.load(os.path.join(MODELS, name)).graph.node}
    assert not STANDARD_FUSED_OPS & ({n.op_type for n in model.graph.node} - source)  # none of ours
    problems = [e for e in result.report["tensorrt"] if e["problems"]]
    assert not problems, problems


def test_lengths_that_leave_this_steps_token_out_fail_the_static_check(monkeypatch):
    def short(self, conversion):
        return conversion.node("Cast", [conversion.write], {"to": TensorProto.INT32}, np.int32)

    monkeypatch.setattr(TrtPluginStaticForm, "_kv_lengths", short)
    with pytest.raises(onnx_fuse.CheckFailed):
        static("llama-gqa_decode_eager_dynamo.onnx")


def test_without_the_slot_mask_the_left_padded_scenario_fails(monkeypatch):
    remask = TrtPluginStaticForm.remask

    def unmasked(self, conversion, attention, window):
        remask(self, conversion, attention, window)
        attention.attrs["use_key_mask"] = 0

    monkeypatch.setattr(TrtPluginStaticForm, "remask", unmasked)
    with pytest.raises(onnx_fuse.CheckFailed, match="left-padded"):
        static("qwen2-gqa_decode_sdpa_dynamo.onnx")
