"""Target trt11: TRT_Attention / TRT_KVCacheUpdate and their function bodies.

The bodies are what the check runs in place of TensorRT, so they are tested first against a
numpy reference of the documented semantics; then hand-built graphs with every mask class the
target treats differently, every committed model, the options and `--kv-cache static`. Each
check is also seen to fail: a body aligned the other way, a padding mask dropped, lengths off by
one, holes in the valid slots.
"""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnx_fuse
from graphs import GraphBuilder, float16_upcast_attention_model, random_inputs, repeat_heads
from onnx_fuse import cli, kv_static
from onnx_fuse.check import ModelRef
from onnx_fuse.errors import BadInput, CheckFailed
from onnx_fuse.specs import AttentionSpec
from onnx_fuse.targets import trt11, trt11_functions
from onnx_fuse.targets.trt11_static import Trt11StaticForm
from onnx_fuse.trt_contract import causal_form_problems
from onnx_fuse.trt_schema import DOMAIN, MULTIDEVICE_PREVIEW_FLAG

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def attrs_of(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def causal_kind(node):
    return attrs_of(node).get("causal_kind", b"none").decode()


def has_mask(node):
    return len(node.input) > 3 and bool(node.input[3])


def trt_nodes(model, op="TRT_Attention"):
    """The model's nodes of `op`, those inside If/Loop/Scan bodies included."""
    found, graphs = [], [model.graph]
    while graphs:
        graph = graphs.pop()
        found += [n for n in graph.node if n.op_type == op]
        graphs.extend(a.g for n in graph.node for a in n.attribute if a.HasField("g"))
    return found


# --------------------------------------------------------------------------- function bodies

B, NQ, NKV, H = 2, 4, 2, 8


def trt_attention_model(sq, skv, attrs, mask=None, lengths=False, dtype=F32):
    """One TRT_Attention node and its function body: Q, K, V (and a mask, kv_lengths) in."""
    values = [helper.make_tensor_value_info("q", dtype, [B, NQ, sq, H]),
              helper.make_tensor_value_info("k", dtype, [B, NKV, skv, H]),
              helper.make_tensor_value_info("v", dtype, [B, NKV, skv, H])]
    inputs = ["q", "k", "v"]
    if mask is not None:
        values.append(helper.make_tensor_value_info("m", mask, [B, 1, sq, skv]))
        inputs.append("m")
    if lengths:
        values.append(helper.make_tensor_value_info("L", TensorProto.INT32, [B]))
        inputs += [""] * (5 - len(inputs)) + ["L"]
    node = helper.make_node("TRT_Attention", inputs, ["y"], domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], "g", values, [helper.make_tensor_value_info("y", dtype, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)],
                              functions=[trt11_functions.attention_function(23)])
    model.ir_version = 10
    return model


def reference(q, k, v, visible=None, additive=None):
    """softmax(Q Kᵀ masked) V in float64, K/V heads shared by groups of query heads."""
    k, v = (np.repeat(t.astype(np.float64), NQ // NKV, axis=1) for t in (k, v))
    scores = q.astype(np.float64) @ k.transpose(0, 1, 3, 2)
    if additive is not None:
        scores = scores + additive
    if visible is not None:
        scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def qkv(sq, skv, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in ([B, NQ, sq, H], [B, NKV, skv, H], [B, NKV, skv, H])]


def visibility(kind, sq, skv, lengths=None, end="kv_lengths"):
    """[B, 1, Sq, Skv]: the documented semantics, written out per row."""
    rows = []
    for b in range(B):
        valid = skv if lengths is None else int(lengths[b])
        i, j = np.arange(sq)[:, None], np.arange(skv)[None, :]
        last = valid if end == "kv_lengths" else skv
        causal = {"none": np.ones((sq, skv), bool), "upper_left": j <= i,
                  "lower_right": j <= i + last - sq}[kind]
        rows.append(causal & (j < valid))
    return np.stack(rows)[:, None]


@pytest.mark.parametrize("kind", ["none", "upper_left", "lower_right"])
@pytest.mark.parametrize("sq, skv", [(5, 5), (1, 6), (3, 7)])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_trt_attention_body_computes_causal_kinds_and_lengths(kind, sq, skv, with_lengths):
    q, k, v = qkv(sq, skv)
    # Row 0 shorter, but with a key for every query (a row that sees no key is undefined).
    lengths = np.array([max(sq, skv - 2), skv], np.int32) if with_lengths else None
    feeds = {"q": q, "k": k, "v": v, **({"L": lengths} if with_lengths else {})}
    attrs = {} if kind == "none" else {"causal_kind": kind}  # "none" is the default
    (got,) = session(trt_attention_model(sq, skv, attrs, lengths=with_lengths)).run(None, feeds)
    want = reference(q, k, v, visibility(kind, sq, skv, lengths))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_type", [TensorProto.BOOL, F32])
def test_trt_attention_body_applies_an_explicit_mask_alone(mask_type):
    q, k, v = qkv(3, 6)
    rng = np.random.default_rng(1)
    keep = rng.random((B, 1, 3, 6)) > 0.4
    keep[..., 0] = True
    mask = keep if mask_type == TensorProto.BOOL else np.where(keep, 0.0, -1e9).astype(np.float32)
    (got,) = session(trt_attention_model(3, 6, {}, mask=mask_type)).run(None, {"q": q, "k": k, "v": v, "m": mask})
    np.testing.assert_allclose(got, reference(q, k, v, keep), rtol=1e-5, atol=1e-5)


def test_trt_attention_body_in_float16():
    q, k, v = qkv(2, 5, np.float16)
    model = trt_attention_model(2, 5, {"causal_kind": "lower_right"}, dtype=F16)
    (got,) = session(model).run(None, {"q": q, "k": k, "v": v})
    np.testing.assert_allclose(got.astype(np.float64), reference(q, k, v, visibility("lower_right", 2, 5)),
                               rtol=1e-2, atol=1e-2)


def test_the_lower_right_alignment_is_one_choice_the_body_follows(monkeypatch):
    # With kv_lengths and more than one query, the two readings of "lower_right" differ; the body
    # computes whichever trt_schema.LOWER_RIGHT_ALIGNS_TO names (here flipped), and the reference
    # of the other reading fails against it.
    monkeypatch.setattr(trt11_functions, "LOWER_RIGHT_ALIGNS_TO", "padded")
    q, k, v = qkv(3, 7)
    lengths = np.array([4, 7], np.int32)
    model = trt_attention_model(3, 7, {"causal_kind": "lower_right"}, lengths=True)
    (got,) = session(model).run(None, {"q": q, "k": k, "v": v, "L": lengths})
    np.testing.assert_allclose(got, reference(q, k, v, visibility("lower_right", 3, 7, lengths, "padded")),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, reference(q, k, v, visibility("lower_right", 3, 7, lengths)), atol=1e-3)


def test_trt_kv_cache_update_body_writes_at_the_int32_indices():
    cache = helper.make_tensor_value_info("c", F32, [B, NKV, 8, H])
    update = helper.make_tensor_value_info("u", F32, [B, NKV, 2, H])
    indices = helper.make_tensor_value_info("i", TensorProto.INT32, [B])
    node = helper.make_node("TRT_KVCacheUpdate", ["c", "u", "i"], ["y"], domain=DOMAIN, mode="linear", axis=-2)
    graph = helper.make_graph([node], "g", [cache, update, indices], [helper.make_tensor_value_info("y", F32, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid(DOMAIN, 1)],
                              functions=[trt11_functions.kv_cache_update_function(24)])
    model.ir_version = 10
    rng = np.random.default_rng(0)
    c, u = rng.standard_normal((B, NKV, 8, H)).astype(np.float32), rng.standard_normal((B, NKV, 2, H)).astype(np.float32)
    at = np.array([0, 5], np.int32)
    (got,) = session(model).run(None, {"c": c, "u": u, "i": at})
    want = c.copy()
    for b, start in enumerate(at):
        want[b, :, start:start + 2] = u[b]
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- hand-built graphs


def cached_attention_model(*, past: bool, window=None, padding=False, heads=4, kv_heads=2, head=8,
                           projected=True):
    """Attention over [past, new] keys whose mask the graph computes from positions: causal
    (lower-right with a past), a sliding window, a 0/1 attention_mask input [batch, past + seq].
    `projected`: Q/K/V come in as [batch, seq, features] and are split into heads, as after the
    projections of a real export; otherwise they are 4-D inputs."""
    g = GraphBuilder()

    def heads_of(name, count):
        if not projected:
            return g.input(name, F32, ["batch", count, "seq", head])
        x = g.input(name, F32, ["batch", "seq", count * head])
        x = g.op("Reshape", x, g.const([0, 0, count, head], np.int64))
        return g.op("Transpose", x, perm=[0, 2, 1, 3])

    q, k, v = heads_of("q", heads), heads_of("k", kv_heads), heads_of("v", kv_heads)
    start = g.const(0, np.int64)
    if past:
        k = g.op("Concat", g.input("past_k", F32, ["batch", kv_heads, "past", head]), k, axis=2)
        v = g.op("Concat", g.input("past_v", F32, ["batch", kv_heads, "past", head]), v, axis=2)
        start = g.op("Gather", g.op("Shape", "past_k"), g.const(2, np.int64), axis=0)
    seq = g.op("Gather", g.op("Shape", q), g.const(2, np.int64), axis=0)
    total = g.op("Gather", g.op("Shape", k), g.const(2, np.int64), axis=0)
    one = g.const(1, np.int64)
    rows = g.op("Unsqueeze", g.op("Range", start, g.op("Add", start, seq), one), g.const([1], np.int64))
    cols = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), total, one), g.const([0], np.int64))
    keep = g.op("LessOrEqual", cols, rows)
    if window is not None:
        keep = g.op("And", keep, g.op("Greater", cols, g.op("Sub", rows, g.const(window, np.int64))))
    keep = g.op("Unsqueeze", keep, g.const([0, 1], np.int64))
    if padding:
        valid = g.op("Cast", g.input("attention_mask", TensorProto.INT64, ["batch", "total"]),
                     to=TensorProto.BOOL)
        keep = g.op("And", keep, g.op("Unsqueeze", valid, g.const([1, 2], np.int64)))
    mask = g.op("Where", keep, g.const(0.0), g.const(-np.inf))
    k, v = (repeat_heads(g, t, kv_heads, heads // kv_heads, "expand") for t in (k, v))
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(1 / np.sqrt(head)))
    out = g.op("MatMul", g.op("Softmax", g.op("Add", scores, mask), axis=-1), v)
    return g.model(out)


def cached_inputs(model, seq, past, seed=0):
    rng = np.random.default_rng(seed)
    dims = {"batch": 2, "seq": seq, "past": past, "total": past + seq}
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value or dims[d.dim_param] for d in value.type.tensor_type.shape.dim]
        if value.name == "attention_mask":
            mask = np.ones(shape, np.int64)
            mask[1, :2] = 0  # a left-padded row
            feeds[value.name] = mask
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("past, seq, expected", [(False, 5, "upper_left"), (True, 1, "lower_right"),
                                                 (True, 3, "lower_right")])
def test_causal_masks_become_a_causal_kind_without_a_mask(past, seq, expected):
    model = cached_attention_model(past=past)
    result = onnx_fuse.fuse(model, target="trt11", inputs=cached_inputs(model, seq, 4 if past else 0))
    assert result.report["counts"] == {"attention": 1} and result.report["check"]["passed"]
    (node,) = trt_nodes(result.model)
    assert causal_kind(node) == expected and not has_mask(node)
    assert len(node.input) == 3  # no lengths either: nothing is padded


@pytest.mark.parametrize("window, padding", [(3, False), (None, True), (3, True)])
def test_windows_and_padding_keep_the_mask_with_the_causal_part_in_it(window, padding):
    model = cached_attention_model(past=True, window=window, padding=padding)
    result = onnx_fuse.fuse(model, target="trt11", inputs=cached_inputs(model, 3, 4))
    assert result.report["counts"] == {"attention": 1} and result.report["check"]["passed"]
    (node,) = trt_nodes(result.model)
    assert causal_kind(node) == "none" and has_mask(node)


def test_a_mask_evaluated_where_a_length_is_zero_is_still_classified():
    # 4-D Q/K/V inputs look like caches to the mask classifier, which then evaluates the mask at
    # a query length of 0; that used to raise (ValueError in masks._window) for every target.
    model = cached_attention_model(past=False, projected=False)
    result = onnx_fuse.fuse(model, target="trt11", inputs=cached_inputs(model, 5, 0))
    assert result.report["fused"][0]["mask_class"] == "causal_upper_left"
    assert result.report["check"]["passed"]


def test_dropping_a_padding_mask_for_the_causal_kind_fails_the_check(monkeypatch):
    # kv_lengths/causal_kind cannot say which keys a left-padded attention_mask hides: a target
    # that used lower_right there would be wrong, and the check says so.
    monkeypatch.setattr(trt11, "_masking", lambda spec, rw, compute: ("lower_right", None))
    model = cached_attention_model(past=True, padding=True)
    with pytest.raises(CheckFailed):
        onnx_fuse.fuse(model, target="trt11", inputs=cached_inputs(model, 1, 4))


def test_q_is_scaled_before_the_op_and_the_node_is_in_the_trt_domain():
    model = cached_attention_model(past=True)
    result = onnx_fuse.fuse(model, target="trt11", inputs=cached_inputs(model, 1, 4))
    (node,) = trt_nodes(result.model)
    scale = next(n for n in result.model.graph.node if node.input[0] in n.output)
    assert scale.op_type == "Mul" and node.domain == DOMAIN
    assert ("trt", 1) in [(o.domain, o.version) for o in result.model.opset_import]
    assert [(f.domain, f.name) for f in result.model.functions] == [(DOMAIN, "TRT_Attention")]
    onnx.checker.check_model(result.model)


def test_a_float32_softmax_over_float16_inputs_runs_the_op_in_float32():
    model = float16_upcast_attention_model()
    feeds = random_inputs(model)
    result = onnx_fuse.fuse(model, target="trt11", inputs=feeds)
    assert result.report["check"]["passed"]
    (node,) = trt_nodes(result.model)
    producers = {o: n for n in result.model.graph.node for o in n.output}
    assert all(producers[name].op_type in ("Cast", "Mul") for name in node.input[:3])
    assert next(n for n in result.model.graph.node if node.output[0] in n.input).op_type == "Cast"


# --------------------------------------------------------------------------- options


def float16_model():
    g = GraphBuilder()
    q, k, v = (g.input(n, F16, ["B", 4, "S", 8]) for n in "qkv")
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(0.35, np.float16))
    return g.model(g.op("MatMul", g.op("Softmax", scores, axis=-1), v), dtype=F16)


def test_cp_ranks_set_nb_rank_and_the_report_names_the_preview_flag():
    result = onnx_fuse.fuse(float16_model(), target="trt11", target_options={"cp_ranks": 2, "decomposable": True})
    (node,) = trt_nodes(result.model)
    assert attrs_of(node)["nb_rank"] == 2 and attrs_of(node)["TRT_decomposable"] == 1
    assert any(MULTIDEVICE_PREVIEW_FLAG in note for note in result.report["target_notes"])
    assert result.report["check"]["passed"]


def test_cp_ranks_refuse_float32_attention_with_the_reason():
    path = os.path.join(MODELS, "llama-gqa_prefill_eager_dynamo.onnx")
    report = onnx_fuse.fuse(path, target="trt11", check=False, apply=False,
                            target_options={"cp_ranks": 4}).report
    reasons = {u["reason"] for u in report["unfused"] if u["pattern"] == "attention"}
    assert "attention" not in report["counts"] and len(reasons) == 1
    assert "FP16 or BF16" in reasons.pop()


@pytest.mark.parametrize("target, options, message", [
    ("trt11", {"cp_ranks": 0}, "--cp-ranks must be a positive"),
    ("trt11", {"heads": 2}, "takes no option heads"),
    ("onnx", {"cp_ranks": 2}, "target onnx takes no option cp_ranks"),
])
def test_bad_target_options_are_bad_input(target, options, message):
    with pytest.raises(BadInput, match=message):
        onnx_fuse.fuse(float16_model(), target=target, target_options=options)


def test_the_command_takes_the_options_and_prints_the_flag(tmp_path, capfd):
    source, output = tmp_path / "fp16.onnx", tmp_path / "out.onnx"
    onnx.save(float16_model(), source)
    argv = ["fuse", str(source), "-o", str(output), "--cp-ranks", "2", "--decomposable"]
    assert cli.main(argv + ["--target", "trt11"]) == 0
    assert MULTIDEVICE_PREVIEW_FLAG in capfd.readouterr().out
    (node,) = trt_nodes(onnx.load(output))
    assert attrs_of(node)["nb_rank"] == 2 and attrs_of(node)["TRT_decomposable"] == 1
    os.unlink(output)
    assert cli.main(argv) == 2  # target onnx has no such options
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "takes no option cp_ranks, decomposable" in err
    assert not output.exists()


# --------------------------------------------------------------------------- committed models


def expected_form(spec: AttentionSpec) -> tuple[str, bool]:
    """(causal_kind, mask input present) the issue asks for, by proven mask class: a causal kind
    where the mask is causal and nothing else, an explicit mask for anything more (a window,
    padding, an arbitrary mask, a bias such as T5's relative positions)."""
    if spec.mask is None or spec.mask.klass.kind == "none" and spec.mask.bias is None:
        return "none", False
    kinds = {"causal_upper_left": "upper_left", "causal_lower_right": "lower_right"}
    if spec.mask.bias is None and spec.mask.klass.kind in kinds:
        return kinds[spec.mask.klass.kind], False
    return "none", True


def runs_as_written(truth) -> bool:
    """onnxruntime runs the export (bfloat16 ones widened); an exporter bug may stop it."""
    return truth.get("ort_cpu_runs", True) is not False or truth.get("dtype") == "bfloat16"


def source_ops(name) -> list[str]:
    """The export's own op types, those of If/Loop/Scan bodies included."""
    found, graphs = [], [onnx.load(os.path.join(MODELS, name)).graph]
    while graphs:
        graph = graphs.pop()
        found += [n.op_type for n in graph.node]
        graphs.extend(a.g for n in graph.node for a in n.attribute if a.HasField("g"))
    return found


@pytest.mark.parametrize("name", [n for n in sorted(MANIFEST) if runs_as_written(MANIFEST[n])])
def test_every_committed_model_fuses_for_trt11_and_checks_through_the_bodies(name):
    """Every core becomes TRT_Attention but those with learned sinks (refused, saying why); the
    exporter's own ONNX Attention is rewritten like a primitive core, and none is left."""
    truth = MANIFEST[name]
    ops = source_ops(name)
    result = onnx_fuse.fuse(os.path.join(MODELS, name), target="trt11", max_positions=64)
    counts = result.report["counts"]
    assert result.report["check"] is None or result.report["check"]["passed"], result.report["check"]["message"]
    sinks = truth["attention_cores"] if truth.get("attention_sinks") else 0
    expected = truth["attention_cores"] - sinks
    assert counts.get("attention", 0) == expected, result.report["unfused"]
    assert ops.count("Attention") == truth.get("native_attention_ops", 0)
    assert [n.op_type for n in result.proto.graph.node].count("Attention") == 0
    refused = [u["reason"] for u in result.report["unfused"] if u["pattern"] == "attention"]
    assert len(refused) == sinks and all("sinks" in r for r in refused)
    assert counts.get("rope", 0) == truth["rope_applications"] - ops.count("RotaryEmbedding")
    assert counts.get("kv_cache", 0) == truth["kv_cache_writes"] * (truth["kind"] == "decode_static")
    assert counts.get("kv_cache", 0) == len(trt_nodes(result.proto, "TRT_KVCacheUpdate"))
    nodes = {n.name: n for n in trt_nodes(result.proto)}
    for fusion, spec in result.specs(AttentionSpec):
        (node,) = [nodes[n] for n in fusion.nodes if n in nodes] or [None]
        if spec.softcap:  # no softcap in TRT_Attention: the primitive causal form
            assert node is None
            continue
        assert (causal_kind(node), has_mask(node)) == expected_form(spec), fusion.anchor
    if truth["arch"] == "gemma2":
        assert all(e["problems"] == [] for e in causal_form_problems(result.model))


def test_static_cache_models_write_with_int32_indices():
    result = onnx_fuse.fuse(os.path.join(MODELS, "llama-static_decode-static_sdpa_dynamo.onnx"),
                            target="trt11", max_positions=64)
    writes = trt_nodes(result.model, "TRT_KVCacheUpdate")
    assert len(writes) == 4 and result.report["check"]["passed"]
    types = {v.name: v.type.tensor_type.elem_type for v in
             onnx.shape_inference.infer_shapes(result.model).graph.value_info}
    assert {types[w.input[2]] for w in writes} == {TensorProto.INT32}
    assert all(e["problems"] == [] for e in result.report["tensorrt"] if e["op"] == "TRT_KVCacheUpdate")


# --------------------------------------------------------------------------- --kv-cache static

DECODE = sorted(n for n, t in MANIFEST.items() if t["kind"] == "decode")


@pytest.mark.parametrize("name", [n for n in DECODE if MANIFEST[n]["arch"] != "gemma2"])
def test_static_caches_need_no_mask_except_for_a_window(name):
    truth = MANIFEST[name]
    path = os.path.join(MODELS, name)
    if truth.get("attention_sinks"):  # TRT_Attention cannot express sinks
        with pytest.raises(BadInput, match="attention sinks"):
            onnx_fuse.fuse(path, target="trt11", kv_cache="static", max_cache_len=16)
        return
    result = onnx_fuse.fuse(path, target="trt11", kv_cache="static", max_cache_len=16)
    assert result.report["check"]["passed"], result.report["check"]["message"]
    assert list(result.report["check"]["scenarios"]) == ["ragged"]
    attention, writes = trt_nodes(result.model), trt_nodes(result.model, "TRT_KVCacheUpdate")
    assert len(attention) == truth["attention_cores"] and len(writes) == 2 * len(attention)
    windows = {layer["attention"]: layer["window"] for layer in result.report["kv_cache"]["layers"]}
    windowed = set(truth.get("sliding_window_layers", []))
    assert [windows[n.name] for n in attention] == \
        [truth["sliding_window"] if i in windowed else None for i in range(truth["layers"])]
    for node in attention:
        if windows[node.name] is not None:  # no window attribute in TensorRT: an explicit mask
            assert (causal_kind(node), has_mask(node)) == ("none", True)
        else:
            assert (causal_kind(node), has_mask(node), bool(node.input[5])) == ("lower_right", False, True)
    assert all(e["problems"] == [] for e in result.report["tensorrt"] if e["op"] == "TRT_KVCacheUpdate")


def test_gemma2_softcap_attention_cannot_go_static():
    path = os.path.join(MODELS, "gemma2_decode_eager_dynamo.onnx")
    with pytest.raises(BadInput, match="not every attention core was fused into TRT_Attention"):
        onnx_fuse.fuse(path, target="trt11", kv_cache="static", max_cache_len=16)


def static_llama():
    path = os.path.join(MODELS, "llama-gqa_decode_eager_dynamo.onnx")
    return path, onnx_fuse.fuse(path, target="trt11", kv_cache="static", max_cache_len=16)


def test_holes_in_the_valid_slots_are_what_lengths_cannot_say():
    # The standard form's left-padded scenario (row 1's first slots invalid) fails for trt11's
    # lengths: which is why its form declares the ragged (prefix) scenario only.
    path, result = static_llama()
    layout = kv_static.find_layout(onnx.load(path))
    outcome = kv_static.check_static(ModelRef(onnx.load(path), MODELS), ModelRef(result.model, MODELS),
                                     layout, 16, scenarios=("ragged", "left_padded"))
    assert not outcome["passed"] and "left-padded" in outcome["message"]


def test_lengths_off_by_one_fail_the_static_check(monkeypatch):
    def short(self, conversion):  # write_position: this step's own token left out
        return conversion.node("Cast", [conversion.write], {"to": TensorProto.INT32}, np.int32)

    monkeypatch.setattr(Trt11StaticForm, "_kv_lengths", short)
    with pytest.raises(CheckFailed):
        static_llama()


@pytest.mark.parametrize("name", ["qwen2-gqa_prefill_sdpa_torchscript.onnx", "llama-gqa_prefill_sdpa_torchscript.onnx"])
def test_every_layer_reads_one_normalized_mask(name):
    """Layer 1's mask program reads a shape through layer 0's TRT_Attention, so it carries that
    op's function body; the same mask must still be recognised as the same program and
    normalized once for every layer (a program carrying functions it does not call split it)."""
    model = onnx_fuse.fuse(os.path.join(MODELS, name), target="trt11").proto
    producer = {o: n for n in model.graph.node for o in n.output}
    masks = set()
    for node in trt_nodes(model):
        mask = producer[node.input[3]]
        masks.add(mask.input[0] if mask.op_type == "Expand" else mask.output[0])
    assert len(trt_nodes(model)) == MANIFEST[name]["attention_cores"] and len(masks) == 1
