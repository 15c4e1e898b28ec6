"""`--kv-cache static` on every kind of decode model: the constructs issue 10 names, each converted
and checked over decode steps or refused with a reason that names it, and checks that fail when
the conversion is off (a window one slot off, a per-row switch taken over the batch).

The growing-cache exports of models/ are in test_kv_cache.py (test_growing_caches_become_static);
here: hand-built decoders for constructs no committed export isolates, the cross-attention
decoders, the already-static caches, optimum's merged decoder, the window and LongRoPE checks.
"""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fuse
from onnx_fuse import kv_static
from onnx_fuse.check import ModelRef
from onnx_fuse.errors import BadInput, CheckFailed
from graphs import GraphBuilder

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
VOCAB, WIDTH, N = 16, 4, 24


def decoder(*, past_copied=False, positions="embedding", hidden_states=False):
    """One layer, one head: a decode step whose past key is read besides its Concat (its Shape
    gives the positions, the causal mask and the key count of a Reshape), as TorchScript writes it.

    past_copied: the Concat reads the past through an Identity. positions: "embedding" (a learned
    table, Gather of the [S] positions) or "scaled" (the [S] positions times 0.1 added to the
    embedding: a reader with no batch axis). hidden_states: an encoder input [B, E, 4] whose mean
    is added to the embedding (passed through)."""
    g, rng = GraphBuilder(), np.random.default_rng(0)
    weight = lambda *shape: g.const(rng.standard_normal(shape) * 0.5)  # noqa: E731
    ids = g.input("input_ids", INT64, ["batch", "seq"])
    mask = g.input("attention_mask", INT64, ["batch", "total"])
    past_k = g.input("past_key", FLOAT, ["batch", 1, "past", WIDTH])
    past_v = g.input("past_value", FLOAT, ["batch", 1, "past", WIDTH])
    zero = g.const([0], np.int64)
    past_len = g.op("Squeeze", g.op("Shape", past_k, start=2, end=3), zero)
    seq = g.op("Squeeze", g.op("Shape", ids, start=1, end=2), zero)
    pos = g.op("Range", past_len, g.op("Add", past_len, seq), g.const(1, np.int64))  # [S]
    x = g.op("Gather", weight(VOCAB, WIDTH), ids)
    if positions == "embedding":
        x = g.op("Add", x, g.op("Gather", weight(32, WIDTH), pos))
    else:
        scaled = g.op("Mul", g.op("Cast", pos, to=FLOAT), g.const(0.1))
        x = g.op("Add", x, g.op("Unsqueeze", scaled, g.const([1], np.int64)))
    if hidden_states:
        states = g.input("encoder_hidden_states", FLOAT, ["batch", "encoder_sequence", WIDTH])
        x = g.op("Add", x, g.op("ReduceMean", states, axes=[1], keepdims=1))
    h = g.op("Unsqueeze", x, g.const([1], np.int64))  # [B, 1, S, 4]
    q, k, v = (g.op("MatMul", h, weight(WIDTH, WIDTH)) for _ in range(3))
    keys = g.op("Concat", g.op("Identity", past_k) if past_copied else past_k, k, axis=2)
    values = g.op("Concat", past_v, v, axis=2)
    # a Reshape to past + S keys (dynamo writes the key count so)
    count = g.op("Unsqueeze", g.op("Add", past_len, seq), zero)
    keys_again = g.op("Reshape", keys, g.op("Concat", g.op("Shape", keys, end=2), count,
                                            g.const([WIDTH], np.int64), axis=0))
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", keys_again, perm=[0, 1, 3, 2])), g.const(0.5))
    key_pos = g.op("Range", g.const(0, np.int64), g.op("Squeeze", g.op("Shape", mask, start=1, end=2), zero),
                   g.const(1, np.int64))
    causal = g.op("LessOrEqual", g.op("Unsqueeze", key_pos, zero), g.op("Unsqueeze", pos, g.const([1], np.int64)))
    padded = g.op("Cast", g.op("Unsqueeze", mask, g.const([1, 2], np.int64)), to=TensorProto.BOOL)
    additive = g.op("Where", g.op("And", causal, padded), g.const(0.0), g.const(np.finfo(np.float32).min))
    probs = g.op("Softmax", g.op("Add", scores, additive), axis=-1)
    out = g.op("Squeeze", g.op("MatMul", probs, values), g.const([1], np.int64))
    logits = g.op("MatMul", out, weight(WIDTH, VOCAB))
    renamed = {keys: "present_key", values: "present_value", logits: "logits"}
    for node in g.nodes:
        node.output[:] = [renamed.get(o, o) for o in node.output]
        node.input[:] = [renamed.get(i, i) for i in node.input]
    outputs = [helper.make_tensor_value_info("logits", FLOAT, ["batch", "seq", VOCAB])] + [
        helper.make_tensor_value_info(name, FLOAT, ["batch", 1, "past + seq", WIDTH])
        for name in ("present_key", "present_value")]
    graph = helper.make_graph(g.nodes, "decoder", g.inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_past_read_besides_its_concat_converts():
    """The past is copied before its Concat and its Shape is read for the positions, the mask and
    a Reshape to past + S keys: the cache is still found, the Reshape reads N - S + S = N."""
    result = onnx_fuse.fuse(decoder(past_copied=True), kv_cache="static", max_cache_len=N)
    section = result.report["kv_cache"]
    assert result.report["check"]["passed"], result.report["check"]["message"]
    assert section["pairs"] == {"present_key": "past_key", "present_value": "past_value"}
    assert section["past_lengths"] and section["positions"] == [section["positions"][0]]
    assert section["positions"][0].startswith("Gather")
    kinds = [n.op_type for n in result.model.graph.node]
    assert kinds.count("TensorScatter") == 2 and kinds.count("Attention") == 1


def test_without_the_past_length_reexpressed_the_reshape_breaks(monkeypatch):
    """The Reshape to past + S keys needs the past length N - S: left as N it fails the check."""
    monkeypatch.setattr(kv_static._Conversion, "reexpress_past_lengths", lambda self: [])
    with pytest.raises(CheckFailed, match="failed to run"):
        onnx_fuse.fuse(decoder(), kv_cache="static", max_cache_len=N)


def test_positions_without_a_batch_axis_are_refused_by_their_reader():
    with pytest.raises(BadInput, match=r"positions without a batch axis \(\[S\]\) feed Cast"):
        onnx_fuse.fuse(decoder(positions="scaled"), kv_cache="static", max_cache_len=N)


def test_an_encoder_input_passes_through():
    result = onnx_fuse.fuse(decoder(hidden_states=True), kv_cache="static", max_cache_len=N)
    assert result.report["check"]["passed"], result.report["check"]["message"]
    assert result.report["kv_cache"]["passed_through"] == ["encoder_hidden_states"]
    assert [i.name for i in result.model.graph.input][-2:] == ["encoder_hidden_states", "write_position"]


CROSS = sorted(n for n in MANIFEST if MANIFEST[n]["kind"] == "decode_cross")


@pytest.mark.parametrize("name", CROSS)
def test_cross_attention_decoders_convert_their_self_attention_only(name):
    truth = MANIFEST[name]
    result = onnx_fuse.fuse(os.path.join(MODELS, name), kv_cache="static", max_cache_len=N)
    report, model = result.report, result.model
    assert report["check"]["passed"], report["check"]["message"]
    layers = report["kv_cache"]["layers"]
    assert sum(layer["cross"] for layer in layers) == truth["cross_attention_cores"]
    assert sum(not layer["cross"] for layer in layers) == truth["attention_cores"] - truth["cross_attention_cores"]
    assert [n.op_type for n in model.graph.node].count("TensorScatter") == truth["kv_cache_writes"]
    cross = {layer["attention"] for layer in layers if layer["cross"]}
    for node in (n for n in model.graph.node if n.name in cross):  # masks as they were
        assert len(node.input) < 4 or not node.input[3].startswith("kv_static/")
    has_mask = "attention_mask" in truth["inputs"]
    assert ("left_padded" in report["check"]["scenarios"]) == has_mask
    assert report["kv_cache"]["attention_mask"].startswith("attention_mask" if has_mask else "none")
    others = {i for i in truth["inputs"] if i.startswith("encoder")}
    assert set(report["kv_cache"]["passed_through"]) == others


STATIC = sorted(n for n in MANIFEST if MANIFEST[n]["kind"] == "decode_static")


@pytest.mark.parametrize("name", STATIC)
def test_already_static_caches_are_accepted(name):
    truth = MANIFEST[name]
    original = onnx.load(os.path.join(MODELS, name))
    result = onnx_fuse.fuse(os.path.join(MODELS, name), kv_cache="static", max_cache_len=truth["cache_len"])
    report, model = result.report, result.model
    assert report["check"]["passed"] and list(report["check"]["scenarios"]) == ["static"]
    assert report["check"]["steps"] >= 9
    assert report["kv_cache"]["already_static"] and report["kv_cache"]["write_position"] == "cache_position"
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("TensorScatter") == truth["kv_cache_writes"]
    assert "ScatterND" not in kinds and "ScatterElements" not in kinds
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]


def test_already_static_caches_keep_their_length():
    name = STATIC[0]
    with pytest.raises(BadInput, match=f"already fixed at {MANIFEST[name]['cache_len']} slots"):
        onnx_fuse.fuse(os.path.join(MODELS, name), kv_cache="static", max_cache_len=64)


def test_optimum_merged_decoder_is_refused_for_its_if():
    with pytest.raises(BadInput, match="inside If/Loop bodies"):
        onnx_fuse.fuse(os.path.join(MODELS, "optimum-llama_decode-merged_sdpa_optimum.onnx"),
                       kv_cache="static", max_cache_len=N)


def test_learned_sinks_are_refused_under_target_onnx():
    with pytest.raises(BadInput, match="cannot express learned attention sinks"):
        onnx_fuse.fuse(os.path.join(MODELS, "gpt-oss_decode_eager_dynamo.onnx"), kv_cache="static",
                       max_cache_len=N)


def test_a_cache_longer_than_the_position_table_is_refused():
    with pytest.raises(BadInput, match="is more than the model supports"):
        onnx_fuse.fuse(os.path.join(MODELS, "whisper-dec_decode-cross_eager_dynamo.onnx"),
                       kv_cache="static", max_cache_len=64)


def with_window(model, window):
    """The converted model with its window constant (the first visible slot) set to `window`."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    (tensor,) = [t for t in changed.graph.initializer if t.name.startswith("kv_static/window")]
    tensor.CopyFrom(numpy_helper.from_array(np.array(window, np.int64), tensor.name))
    return changed


@pytest.mark.parametrize("name", ["mistral-swcache_decode_sdpa_dynamo.onnx",
                                  "mistral-swcache_decode_sdpa_torchscript.onnx"])
def test_the_check_fails_when_the_window_is_one_slot_off(name):
    """HF's sliding-window cache becomes a linear cache with the window in the mask: the check
    drives W + 2 steps past a past of W - 1 and more, so a window one slot wider or narrower (the
    oldest slot kept one too many or too few: a ring buffer's off-by-one) fails it."""
    path, truth = os.path.join(MODELS, name), MANIFEST[name]
    converted = onnx_fuse.fuse(path, kv_cache="static", max_cache_len=N, check=False).model
    original = onnx.load(path)
    layout = kv_static.find_layout(original)
    assert [c.keep for c in layout.caches] == [truth["sliding_window"] - 1] * 4
    right = kv_static.check_static(ModelRef(original, MODELS), ModelRef(converted, MODELS), layout, N,
                                   steps=truth["sliding_window"] + 2)
    assert right["passed"], right["message"]
    for window in (truth["sliding_window"] - 1, truth["sliding_window"] + 1):
        wrong = kv_static.check_static(ModelRef(original, MODELS), ModelRef(with_window(converted, window), MODELS),
                                       layout, N, steps=truth["sliding_window"] + 2)
        assert not wrong["passed"] and "differs" in wrong["message"], (window, wrong["message"])


def test_longrope_switch_is_taken_per_row(monkeypatch):
    """LongRoPE picks its frequencies by the longest position; the check's rows cross the switch
    at different steps, so taking it over the batch (one switch for both rows) fails."""
    path = os.path.join(MODELS, "phi3-longrope_decode_eager_dynamo.onnx")
    result = onnx_fuse.fuse(path, kv_cache="static", max_cache_len=N)
    assert result.report["check"]["passed"]
    assert any(p.endswith("(per row)") for p in result.report["kv_cache"]["positions"])

    def over_the_batch(self, reduction, use):
        reduction.inputs[use.index] = self._query_as(reduction.inputs[use.index].dtype)

    monkeypatch.setattr(kv_static._Conversion, "_per_row", over_the_batch)
    with pytest.raises(CheckFailed, match="ragged step"):
        onnx_fuse.fuse(path, kv_cache="static", max_cache_len=N)
