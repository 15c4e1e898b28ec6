"""Mask classification by proof: hand-built mask subgraphs written every way exporters write them,
near-misses that must be called arbitrary, and the committed real exports."""

import json
import os
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphs import GraphBuilder
from onnx_fuse import mask_program, masks
from onnx_fuse.check import ModelRef, synthesize_inputs
from onnx_fuse.widen import has_bfloat16, widened, widened_inputs
from onnx_fuse.graph import Graph, onnx_dtype
from onnx_fuse.masks import (classify_mask, depends_on_padding, evaluate_mask, mask_dependencies,
                             padding_input)

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]

I64, F32, BOOL = TensorProto.INT64, TensorProto.FLOAT, TensorProto.BOOL
MIN = float(np.finfo(np.float32).min)


class MaskBuilder(GraphBuilder):
    """Graph inputs as a decoder export has them (input_ids [batch, seq], optional KV cache
    [batch, 2, past, 8], optional attention_mask [batch, past + seq]) and the index arithmetic
    the exporters emit for masks."""

    def __init__(self, past=False, padding=False, vocab=None, seq="seq"):
        super().__init__()
        self.ids = self.input("input_ids", I64, ["batch", seq])
        if vocab:  # token ids index an embedding table, as in every real model
            self.embeds = self.op("Gather", self.const(np.zeros((vocab, 8)), np.float32), self.ids)
        self.past = self.input("past_key", F32, ["batch", 2, "past", 8]) if past else None
        if padding:
            self.am = self.input("attention_mask", I64, ["batch", "total" if past else seq])

    def dim(self, tensor, axis):
        """A scalar int64: Gather(Shape(tensor), axis)."""
        return self.op("Gather", self.op("Shape", tensor), self.const(axis, np.int64), axis=0)

    def lengths(self):
        s = self.dim(self.ids, 1)
        p = self.dim(self.past, 2) if self.past else self.const(0, np.int64)
        return s, p, self.op("Add", p, s)

    def positions(self, aligned=True):
        """Query positions [S, 1] (after the past when aligned) and key positions [1, T]."""
        s, p, t = self.lengths()
        one, zero = self.const(1, np.int64), self.const(0, np.int64)
        q = self.op("Range", p if aligned else zero, self.op("Add", p, s) if aligned else s, one)
        k = self.op("Range", zero, t, one)
        return (self.op("Unsqueeze", q, self.const([1], np.int64)),
                self.op("Unsqueeze", k, self.const([0], np.int64)))

    def to4d(self, x):
        """[S, T] -> [1, 1, S, T]."""
        return self.op("Unsqueeze", x, self.const([0, 1], np.int64))

    def causal(self, aligned=True):
        q, k = self.positions(aligned)
        return self.to4d(self.op("LessOrEqual", k, q))

    def pad(self):
        """[B, 1, 1, T] boolean: attention_mask == 1."""
        return self.op("Unsqueeze", self.op("Cast", self.am, to=BOOL), self.const([1, 2], np.int64))

    def additive(self, keep, fill=-np.inf):
        return self.op("Where", keep, self.const(0.0), self.const(fill))

    def build(self, out, dtype=F32):
        return self.model(out, opset=17, dtype=dtype), out


def classify(model_and_mask, **kw):
    model, name = model_and_mask
    graph = Graph(onnx.shape_inference.infer_shapes(model, data_prop=True))
    return classify_mask(graph, graph.gs.tensors()[name], **kw)


def graph_and_mask(model_and_mask):
    model, name = model_and_mask
    graph = Graph(onnx.shape_inference.infer_shapes(model, data_prop=True))
    return graph, graph.gs.tensors()[name]


# --------------------------------------------------------------------------- causal


@pytest.mark.parametrize("compare", ["k<=q", "q>=k", "k<q+1", "q+1>k"])
@pytest.mark.parametrize("form", ["bool", "where_inf", "where_min"])
def test_range_comparisons_are_causal_upper_left_without_cache(compare, form):
    b = MaskBuilder()
    q, k = b.positions()
    q1 = b.op("Add", q, b.const(1, np.int64))
    cond = {"k<=q": lambda: b.op("LessOrEqual", k, q), "q>=k": lambda: b.op("GreaterOrEqual", q, k),
            "k<q+1": lambda: b.op("Less", k, q1), "q+1>k": lambda: b.op("Greater", q1, k)}[compare]()
    keep = b.to4d(cond)
    if form == "bool":
        c = classify(b.build(keep, BOOL))
    else:
        c = classify(b.build(b.additive(keep, -np.inf if form == "where_inf" else MIN)))
    assert (c.kind, c.alignment, c.padding, c.window) == ("causal_upper_left", "upper_left", False, None)
    assert c.causal and not c.empty_rows
    assert all(q == k for _, q, k in c.sizes) and any(q > 1 for _, q, _ in c.sizes)


def test_rank_2_float16_mask():
    """A [S, T] mask (broadcast over batch and heads) in float16 filled with float16's minimum."""
    b = MaskBuilder(past=True)
    q, k = b.positions()
    out = b.op("Where", b.op("LessOrEqual", k, q), b.const(0.0, np.float16),
               b.const(np.finfo(np.float16).min, np.float16))
    c = classify(b.build(out, TensorProto.FLOAT16))
    assert (c.kind, c.alignment) == ("causal_lower_right", "lower_right")


def test_causal_with_cache_is_lower_right():
    b = MaskBuilder(past=True)
    c = classify(b.build(b.additive(b.causal())))
    assert (c.kind, c.alignment) == ("causal_lower_right", "lower_right")
    # proven with an empty and a non-empty cache, one and several queries
    assert any(k > q for _, q, k in c.sizes) and any(k == q > 1 for _, q, k in c.sizes)
    assert any(q == 1 for _, q, _ in c.sizes)


def test_causal_with_cache_but_queries_from_zero_is_upper_left():
    b = MaskBuilder(past=True)
    c = classify(b.build(b.additive(b.causal(aligned=False))))
    assert (c.kind, c.alignment) == ("causal_upper_left", "upper_left")


def test_trilu_on_constant_of_shape():
    b = MaskBuilder()
    s, _, _ = b.lengths()
    ss = b.op("Concat", b.op("Unsqueeze", s, b.const([0], np.int64)),
              b.op("Unsqueeze", s, b.const([0], np.int64)), axis=0)
    # torch.ones(S, S).tril() as bool, and torch.full((S, S), min).triu(1) as additive
    ones = b.op("ConstantOfShape", ss, value=helper.make_tensor("v", F32, [1], [1.0]))
    keep = b.to4d(b.op("Cast", b.op("Trilu", ones, upper=0), to=BOOL))
    assert classify(b.build(keep, BOOL)).kind == "causal_upper_left"
    full = b.op("ConstantOfShape", ss, value=helper.make_tensor("v", F32, [1], [MIN]))
    additive = b.to4d(b.op("Trilu", full, b.const(1, np.int64), upper=1))
    assert classify(b.build(additive)).kind == "causal_upper_left"


def test_trilu_shifted_by_the_past_is_lower_right():
    b = MaskBuilder(past=True)
    s, p, t = b.lengths()
    st = b.op("Concat", b.op("Unsqueeze", s, b.const([0], np.int64)),
              b.op("Unsqueeze", t, b.const([0], np.int64)), axis=0)
    full = b.op("ConstantOfShape", st, value=helper.make_tensor("v", F32, [1], [MIN]))
    additive = b.to4d(b.op("Trilu", full, b.op("Add", p, b.const(1, np.int64)), upper=1))
    c = classify(b.build(additive))
    assert (c.kind, c.alignment) == ("causal_lower_right", "lower_right")


def test_gpt2_legacy_buffer_sliced_by_sizes_is_lower_right():
    """bias = tril(ones(32, 32)) stored in the model, sliced [past:past+S, :past+S]."""
    b = MaskBuilder(past=True)
    s, p, t = b.lengths()
    buffer = b.const(np.tril(np.ones((1, 1, 32, 32))).astype(bool), bool)
    unsq = lambda x: b.op("Unsqueeze", x, b.const([0], np.int64))  # noqa: E731
    rows = b.op("Slice", buffer, unsq(p), unsq(t), b.const([2], np.int64))
    keep = b.op("Slice", rows, b.const([0], np.int64), unsq(t), b.const([3], np.int64))
    c = classify(b.build(b.additive(keep, MIN)))
    assert (c.kind, c.alignment) == ("causal_lower_right", "lower_right")


def test_expand_to_batch_keeps_the_class():
    b = MaskBuilder(past=True)
    s, p, t = b.lengths()
    unsq = lambda x: b.op("Unsqueeze", x, b.const([0], np.int64))  # noqa: E731
    shape = b.op("Concat", unsq(b.dim(b.ids, 0)), b.const([1], np.int64), unsq(s), unsq(t), axis=0)
    c = classify(b.build(b.op("Expand", b.additive(b.causal()), shape)))
    assert c.kind == "causal_lower_right"
    assert any(batch > 1 for batch, _, _ in c.sizes)


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("style", ["bert_10000", "where_min", "float_input"])
def test_padding_masks(style):
    b = MaskBuilder(padding=True)
    if style == "float_input":  # attention_mask given as float 0/1
        b.inputs[-1] = helper.make_tensor_value_info("attention_mask", F32, ["batch", "seq"])
    m = b.op("Cast", b.am, to=F32)
    if style in ("bert_10000", "float_input"):  # (1 - mask) * -10000, BERT's extended mask
        additive = b.op("Mul", b.op("Sub", b.const(1.0), m), b.const(-10000.0))
    else:
        additive = b.op("Where", b.op("Equal", b.am, b.const(0, np.int64)), b.const(MIN), b.const(0.0))
    out = b.op("Unsqueeze", additive, b.const([1, 2], np.int64))
    c = classify(b.build(out))
    assert (c.kind, c.padding, c.padding_input, c.alignment) == ("padding", True, "attention_mask", None)


def test_boolean_padding_input():
    b = MaskBuilder(past=True)
    b.am = b.input("attention_mask", BOOL, ["batch", "total"])
    keep = b.op("And", b.causal(), b.op("Unsqueeze", b.am, b.const([1, 2], np.int64)))
    c = classify(b.build(keep, BOOL))
    assert (c.kind, c.alignment, c.padding_input) == ("causal_padding", "lower_right", "attention_mask")


@pytest.mark.parametrize("combine", ["and", "min", "add_min", "drop_or_not"])
def test_causal_and_padding_combinations(combine):
    b = MaskBuilder(past=True, padding=True)
    causal, pad = b.causal(), b.pad()
    if combine == "and":
        out, dtype = b.op("And", causal, pad), BOOL
    elif combine == "min":
        out, dtype = b.op("Min", b.additive(causal, MIN), b.additive(pad, MIN)), F32
    elif combine == "add_min":  # min + min overflows to -inf: still hidden
        out, dtype = b.op("Add", b.additive(causal, MIN), b.additive(pad, MIN)), F32
    else:  # True = hidden, as Where(mask, min, scores) takes it
        out, dtype = b.op("Or", b.op("Not", causal), b.op("Not", pad)), BOOL
    c = classify(b.build(out, dtype), drop=combine == "drop_or_not")
    assert (c.kind, c.alignment, c.padding, c.padding_input) == \
        ("causal_padding", "lower_right", True, "attention_mask")
    assert c.empty_rows  # left-padded queries hide every key


def test_fixed_single_query_with_cache_is_padding():
    """A decode-only export (input_ids [batch, 1]): lower-right causal hides nothing, so causal +
    padding and padding are the same mask, and the simpler class is reported."""
    b = MaskBuilder(past=True, padding=True, seq=1)
    c = classify(b.build(b.op("And", b.causal(), b.pad()), BOOL))
    assert (c.kind, c.padding) == ("padding", True)
    assert all(q == 1 for _, q, _ in c.sizes)


# --------------------------------------------------------------------------- sliding windows


def sliding(b, width, aligned=True):
    """Hugging Face: kv_idx <= q_idx and kv_idx > q_idx - sliding_window."""
    q, k = b.positions(aligned)
    window = b.op("Greater", k, b.op("Sub", q, b.const(width, np.int64)))
    return b.to4d(b.op("And", b.op("LessOrEqual", k, q), window))


def test_sliding_window_lower_right_with_cache():
    b = MaskBuilder(past=True)
    c = classify(b.build(b.additive(sliding(b, 3))))
    assert (c.kind, c.alignment, c.window, c.padding) == ("sliding_window", "lower_right", 3, False)


def test_sliding_window_with_padding():
    b = MaskBuilder(past=True, padding=True)
    c = classify(b.build(b.op("And", sliding(b, 2), b.pad()), BOOL))
    assert (c.kind, c.window, c.padding, c.alignment) == ("sliding_window", 2, True, "lower_right")


def test_sliding_window_without_cache_is_upper_left():
    b = MaskBuilder()
    c = classify(b.build(b.additive(sliding(b, 4))))
    assert (c.kind, c.alignment, c.window) == ("sliding_window", "upper_left", 4)


def test_window_wider_than_the_base_sizes_is_found_by_the_probe():
    b = MaskBuilder(past=True)
    c = classify(b.build(b.additive(sliding(b, 40))))
    assert (c.kind, c.window) == ("sliding_window", 40)
    assert max(k for _, _, k in c.sizes) > 40


def test_wide_window_without_cache_is_found_by_the_probe():
    b = MaskBuilder()
    c = classify(b.build(b.additive(sliding(b, 30))))
    assert (c.kind, c.window, c.alignment) == ("sliding_window", 30, "upper_left")


# --------------------------------------------------------------------------- constants


def constant_mask(value, dtype=F32):
    b = GraphBuilder()
    c = b.const(value, np.float32 if dtype == F32 else bool)
    out = b.op("Identity", c)
    return b.model(out, opset=17, dtype=dtype), out


def test_baked_constant_triangle_is_causal_at_its_size():
    """A constant [1, 1, 4, 4] pins the scores to 4 x 4: the class is exact at the only size the
    model can run at (and the Attention that replaces it computes the same there)."""
    tri = np.where(np.tril(np.ones((1, 1, 4, 4))) > 0, 0.0, -np.inf)
    c = classify(constant_mask(tri))
    assert (c.kind, c.sizes) == ("causal_upper_left", ((1, 4, 4),))
    rect = np.where(np.tril(np.ones((2, 5)), k=3) > 0, 0.0, MIN)[None, None]  # 2 queries, 5 keys
    assert classify(constant_mask(rect)).kind == "causal_lower_right"


def test_constant_zero_mask_is_none_and_random_constant_is_arbitrary():
    assert classify(constant_mask(np.zeros((1, 1, 1, 7)))).kind == "none"
    rng = np.random.default_rng(0)
    c = classify(constant_mask(rng.random((1, 1, 6, 6)) < 0.5, BOOL))
    assert c.kind == "arbitrary" and "no template fits" in c.reason


def test_vit_style_zero_mask_expanded_to_the_batch_is_none():
    b = GraphBuilder()
    x = b.input("pixel_values", F32, ["batch", 3, 8, 8])
    shape = b.op("Concat", b.op("Shape", x, end=1), b.const([1, 5, 5], np.int64), axis=0)
    out = b.op("Expand", b.const(np.zeros((1, 1, 1, 1))), shape)
    c = classify((b.model(out, opset=17), out))
    assert (c.kind, c.padding) == ("none", False)
    assert {batch for batch, _, _ in c.sizes} >= {1, 3}


# --------------------------------------------------------------------------- near misses


@pytest.mark.parametrize("compare", ["k<q", "k<=q+1", "k>=q"])
def test_off_by_one_and_anti_causal_are_arbitrary(compare):
    b = MaskBuilder(past=True)
    q, k = b.positions()
    q1 = b.op("Add", q, b.const(1, np.int64))
    cond = {"k<q": lambda: b.op("Less", k, q), "k<=q+1": lambda: b.op("LessOrEqual", k, q1),
            "k>=q": lambda: b.op("GreaterOrEqual", k, q)}[compare]()
    c = classify(b.build(b.additive(b.to4d(cond))))
    assert c.kind == "arbitrary" and not c.causal
    assert "no template fits" in c.reason


def test_union_of_causal_and_padding_is_arbitrary():
    b = MaskBuilder(past=True, padding=True)
    out = b.op("Max", b.additive(b.causal(), MIN), b.additive(b.pad(), MIN))  # visible if either
    assert classify(b.build(out)).kind == "arbitrary"


def test_unmasking_fully_hidden_rows_is_arbitrary():
    """Old SDPA paths make rows that hide every key visible again; that is not causal + padding
    (those rows attend to padding), so it is not claimed."""
    b = MaskBuilder(past=True, padding=True)
    keep = b.op("And", b.causal(), b.pad())
    any_visible = b.op("Cast", b.op("ReduceMax", b.op("Cast", keep, to=I64), axes=[-1], keepdims=1),
                       to=BOOL)
    out = b.op("Or", keep, b.op("Not", any_visible))
    c = classify(b.build(out, BOOL))
    assert c.kind == "arbitrary" and "causal_padding" in c.reason


def test_additive_bias_is_not_a_mask():
    b = MaskBuilder()
    q, k = b.positions()
    slope = b.op("Mul", b.op("Cast", b.op("Sub", k, q), to=F32), b.const(0.5))  # ALiBi-like
    out = b.op("Where", b.op("LessOrEqual", k, q), slope, b.const(-np.inf))
    c = classify(b.build(b.to4d(out)))
    assert c.kind == "arbitrary" and "bias" in c.reason


def test_mask_given_as_a_graph_input_is_arbitrary():
    b = GraphBuilder()
    m = b.input("mask", F32, ["batch", 1, "seq", "seq"])
    out = b.op("Mul", m, b.const(1.0))
    c = classify((b.model(out, opset=17), out))
    assert c.kind == "arbitrary" and "'mask'" in c.reason
    graph, mask = graph_and_mask((b.model(m, opset=17), m))
    c = classify_mask(graph, mask)
    assert c.kind == "arbitrary" and "graph input" in c.reason
    assert [t.name for t in mask_dependencies(graph, mask)] == ["mask"]


def test_mask_from_token_id_values_is_arbitrary():
    """input_ids == pad_id: the values are token ids, not 0/1 flags, so no padding class holds."""
    b = MaskBuilder(vocab=16)
    keep = b.op("Unsqueeze", b.op("Not", b.op("Equal", b.ids, b.const(0, np.int64))),
                b.const([1, 2], np.int64))
    graph, mask = graph_and_mask(b.build(keep, BOOL))
    c = classify_mask(graph, mask)
    assert c.kind == "arbitrary" and "'input_ids'" in c.reason
    assert padding_input(graph, mask) is None


# --------------------------------------------------------------------------- API and costs


def test_dependencies_and_padding_input():
    b = MaskBuilder(past=True, padding=True, vocab=16)
    graph, mask = graph_and_mask(b.build(b.op("And", b.causal(), b.pad()), BOOL))
    assert [t.name for t in mask_dependencies(graph, mask)] == ["input_ids", "past_key", "attention_mask"]
    assert padding_input(graph, mask).name == "attention_mask" and depends_on_padding(graph, mask)

    b = MaskBuilder(past=True, padding=True)
    graph, mask = graph_and_mask(b.build(b.causal(), BOOL))
    assert [t.name for t in mask_dependencies(graph, mask)] == ["input_ids", "past_key"]
    assert padding_input(graph, mask) is None and not depends_on_padding(graph, mask)


def test_key_length_cross_check():
    b = MaskBuilder(past=True)
    graph, mask = graph_and_mask(b.build(b.additive(b.causal())))
    assert classify_mask(graph, mask, key_len="past + seq", query_len="seq").kind == "causal_lower_right"
    c = classify_mask(graph, mask, key_len="seq")
    assert c.kind == "arbitrary" and "key length" in c.reason


def test_classification_is_cached_per_tensor_and_shared_by_identical_subgraphs(monkeypatch):
    b = MaskBuilder(past=True, padding=True)
    keep = b.op("And", b.causal(), b.pad())
    layer0, layer1 = b.additive(keep, -np.inf), b.additive(keep, -np.inf)  # one per layer (SDPA)
    model = b.model(layer0, opset=17)
    model.graph.output.append(helper.make_tensor_value_info(layer1, F32, None))
    graph = Graph(onnx.shape_inference.infer_shapes(model, data_prop=True))
    calls = []
    real = masks._classify
    monkeypatch.setattr(masks, "_classify", lambda *a: calls.append(1) or real(*a))
    first = classify_mask(graph, graph.gs.tensors()[layer0])
    again = classify_mask(graph, graph.gs.tensors()[layer0])
    other = classify_mask(graph, graph.gs.tensors()[layer1])
    assert first is again is other and first.kind == "causal_padding"
    assert len(calls) == 1


def shape_of_embeddings_mask(project):
    """A causal mask sized by Shape(embeddings), where the embeddings sit behind a Reshape that
    leaves the batch dim unknown (as TorchScript exports of GPT-2 do), optionally projected."""
    b = MaskBuilder()
    flat = b.op("Reshape", b.ids, b.const([-1, 0], np.int64))
    hidden = b.op("Gather", b.const(np.ones((64, 8)), np.float32), flat)
    if project:
        hidden = b.op("MatMul", hidden, b.const(np.ones((8, 40)), np.float32))
    s = b.op("Gather", b.op("Shape", hidden), b.const(1, np.int64), axis=0)
    one, zero = b.const(1, np.int64), b.const(0, np.int64)
    q = b.op("Unsqueeze", b.op("Range", zero, s, one), b.const([1], np.int64))
    k = b.op("Unsqueeze", b.op("Range", zero, s, one), b.const([0], np.int64))
    model, name = b.build(b.additive(b.to4d(b.op("LessOrEqual", k, q))))
    graph = Graph(model)  # no shape inference: the intermediate's shape is unknown
    assert graph.shape(graph.gs.tensors()[hidden]) is None
    return graph, graph.gs.tensors()[name]


def program_of(graph, mask):
    return mask_program.extract(graph, mask, None)


def test_shape_of_an_intermediate_is_computed_from_its_ancestors():
    graph, mask = shape_of_embeddings_mask(project=False)
    assert classify_mask(graph, mask).kind == "causal_upper_left"
    tables = [t for t in onnx.load_from_string(program_of(graph, mask).model_bytes).graph.initializer
              if list(t.dims) == [64, 8]]
    assert len(tables) == 1 and onnx.numpy_helper.to_array(tables[0]).all()  # the real table


def test_heavy_gathered_table_becomes_a_zero_stand_in(monkeypatch):
    monkeypatch.setattr(mask_program, "WEIGHT_BUDGET", 16)
    monkeypatch.setattr(mask_program, "STAND_IN_ROWS", 8)
    graph, mask = shape_of_embeddings_mask(project=False)
    assert classify_mask(graph, mask).kind == "causal_upper_left"
    big = [t for t in onnx.load_from_string(program_of(graph, mask).model_bytes).graph.initializer
           if np.prod(t.dims) > 16]
    assert [list(t.dims) for t in big] == [[8, 8]]
    assert not onnx.numpy_helper.to_array(big[0]).any()


def test_other_heavy_weights_are_replaced_by_shape_inference(monkeypatch):
    monkeypatch.setattr(mask_program, "WEIGHT_BUDGET", 16)
    graph, mask = shape_of_embeddings_mask(project=True)
    assert classify_mask(graph, mask).kind == "causal_upper_left"
    program = program_of(graph, mask)
    assert any(f.infer is not None for f in program.shape_feeds)
    assert all(np.prod(t.dims) <= 16 for t in onnx.load_from_string(program.model_bytes).graph.initializer)


def test_real_export_with_heavy_embeddings(monkeypatch):
    """BERT (TorchScript) sizes its mask by Shape(LayerNorm(embeddings)), whose dims shape
    inference leaves unnamed: with the tables over budget it is still proven padding."""
    monkeypatch.setattr(mask_program, "WEIGHT_BUDGET", 1000)
    graph, model, found = model_masks("bert_encoder_eager_torchscript.onnx")
    c = masks.classify_mask_spec(graph, found[0])
    assert (c.kind, c.padding) == ("padding", True)
    program = onnx.load_from_string(mask_program.extract(graph, found[0].tensor, None).model_bytes)
    heavy = [t for t in program.graph.initializer if np.prod(t.dims) > 1000]
    assert heavy and all(not onnx.numpy_helper.to_array(t).any() for t in heavy)


# --------------------------------------------------------------------------- committed models


def model_masks(name):
    """(graph, model, masks) with, per attention core in graph (layer) order, the mask the
    attention rule found (a MaskSpec), or else the additive operand of the scores that no
    MatMul computes, or None."""
    from onnx_fuse.pattern import match
    from onnx_fuse.patterns.attention import RULES
    from onnx_fuse.rewrite import Reject

    model = onnx.load(os.path.join(MODELS, name))
    graph = Graph(onnx.shape_inference.infer_shapes(model, data_prop=True))
    rule, found = RULES[0], []
    for softmax in graph.nodes_of("Softmax"):
        if not rule.candidate(graph, softmax):  # an MoE router's softmax is not attention
            continue
        try:
            matched, _ = match(rule.pattern, graph, rule.root(graph, softmax))
            spec = rule.describe(graph, matched) if matched is not None else None
        except Reject:
            spec = None
        found.append(spec.mask if spec is not None else additive_operand(graph, softmax))
    return graph, model, found


def additive_operand(graph, softmax):
    x = softmax.inputs[0]
    while graph.producer(x) is not None and graph.producer(x).op == "Cast":
        x = graph.producer(x).inputs[0]
    add = graph.producer(x)
    if add is None or add.op != "Add":
        return None
    for operand in add.inputs:
        if not any(n.op == "MatMul" for n in ancestors(graph, operand)):
            return SimpleNamespace(kind="additive", tensor=operand)
    return None


def ancestors(graph, tensor):
    seen, stack = {}, [tensor]
    while stack:
        node = graph.producer(stack.pop())
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            stack.extend(t for t in node.inputs if t.name)
    return seen.values()


def expected_classes(truth):
    """Per attention core, (kind, alignment, window, padding) from the manifest, or None where
    the manifest does not pin it: sequence-to-sequence and cross-attention decoders mix kinds of
    cores, a merged decoder holds two models, a mask that reads a graph input besides the
    padding (transformers' exporter feeds its sliding window as an input) or cannot be sized
    from its own inputs (HF's sliding-window cache, whose past is shorter than the mask) is not
    a class, and an encoder's local window is symmetric, which no class describes."""
    cores = truth["attention_cores"] - (truth.get("native_attention_ops") or 0)
    types = truth.get("layer_types") or ["full_attention"] * cores
    if truth["kind"] in ("prefill", "decode") and truth["causal"]:
        alignment = "lower_right" if truth["kind"] == "decode" else "upper_left"
        if truth.get("exporter") == "transformers" or truth.get("cache") == "sliding_window":
            return [None] * cores
        return [("sliding_window", alignment, truth["sliding_window"], True)
                if t == "sliding_attention" else ("causal_padding", alignment, None, True)
                for t in types]
    if truth["kind"] == "encoder":
        padded = "attention_mask" in truth["inputs"]
        return [None if t == "sliding_attention" else
                ("padding", None, None, True) if padded else ("none", None, None, False)
                for t in types]
    return [None] * cores


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_committed_models_classify_as_the_manifest_says(name):
    truth = MANIFEST[name]
    graph, model, found = model_masks(name)
    classes = [None if m is None else masks.classify_mask_spec(graph, m, model=model) for m in found]
    found = [c for c in classes if c is not None]
    assert len(classes) == truth["attention_cores"] - (truth.get("native_attention_ops") or 0)
    if truth["kind"] == "decode_static":
        # the mask reads cache_position's values: not a class of its own yet, and never guessed
        assert found and all(c.kind == "arbitrary" and "'cache_position'" in c.reason for c in found)
        return
    if truth["kind"] == "seq2seq":
        # encoder self-attention and cross-attention are padding, decoder self-attention causal;
        # a mask that carries T5's position bias is not a mask at all
        assert found and all(c.kind in ("padding", "causal_upper_left") or "bias" in c.reason
                             for c in found), found
        return
    for c, expected in zip(classes, expected_classes(truth)):
        if expected is None:
            continue
        if c is None:  # no mask fused into the scores (encoders without a padding input)
            assert expected[0] == "none"
            continue
        assert (c.kind, c.alignment, c.window, c.padding) == expected, c
        if c.padding:
            assert c.padding_input == "attention_mask"
        if truth["causal"]:
            assert c.empty_rows  # exact: left-padded queries stay fully hidden (not unmasked)


def run_with_mask_outputs(model, tensors, inputs):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for t in tensors:
        probe.graph.output.append(helper.make_tensor_value_info(t.name, onnx_dtype(t), None))
    if has_bfloat16(probe):  # onnxruntime's CPU provider runs bfloat16 models widened
        probe, inputs = widened(probe, MODELS), widened_inputs(inputs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([t.name for t in tensors], inputs)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_classes_hold_on_the_full_model_at_other_sizes(name):
    """An independent check of every class claimed: the full model runs on the checker's own
    inputs (sizes the classifier did not use) with random 0/1 padding rows, and the mask tensor
    it computes equals the class's template."""
    if MANIFEST[name].get("known_exporter_bugs"):
        pytest.skip("the export does not run at the checker's sizes as written (an exporter bug)")
    graph, model, found = model_masks(name)
    claims = []
    for m in found:
        if m is not None:
            c = masks.classify_mask_spec(graph, m, model=model)
            if c.kind != "arbitrary":
                claims.append((m, c))
    if not claims:
        pytest.skip("no mask class claimed")
    runnable = widened(model, MODELS) if has_bfloat16(model) else model  # as onnxruntime runs bf16
    inputs = synthesize_inputs(ModelRef(runnable, MODELS), batch=3, seed=1)
    if "attention_mask" in inputs:
        rng = np.random.default_rng(7)
        pad = (rng.random(inputs["attention_mask"].shape) < 0.6).astype(inputs["attention_mask"].dtype)
        pad[:, -1] = 1
        pad[0] = 1
        inputs["attention_mask"] = pad
    outputs = run_with_mask_outputs(model, [m.tensor for m, _ in claims], inputs)
    for (spec, c), values in zip(claims, outputs):
        values = values.reshape((1,) * (4 - values.ndim) + values.shape)
        visible = masks.visibility(values, drop=spec.kind == "drop")
        query, key = visible.shape[2], visible.shape[3]
        expected = masks.template(c, query, key, inputs.get(c.padding_input) if c.padding else None)
        shape = np.broadcast_shapes(visible.shape, expected.shape)
        np.testing.assert_array_equal(np.broadcast_to(visible, shape), np.broadcast_to(expected, shape))


@pytest.mark.parametrize("name", [n for n in sorted(MANIFEST) if MANIFEST[n]["kind"] == "decode"
                                  or MANIFEST[n]["arch"] == "bert"][::3])
def test_mask_program_computes_what_the_model_computes(name):
    """The extracted program (shapes fed in place of the tensors behind them) agrees with the
    full model's own mask tensor on the same inputs."""
    if MANIFEST[name].get("known_exporter_bugs"):
        pytest.skip("the export does not run at the driver's sizes as written (an exporter bug)")
    graph, model, found = model_masks(name)
    mask = next(m.tensor for m in found if m is not None)
    for batch, query, past in [(3, 4, 3), (2, 1, 5)] if MANIFEST[name]["kind"] == "decode" else [(4, 6, 0)]:
        feeds, expected = evaluate_mask(graph, mask, batch, query, past)
        full = {}
        for value in model.graph.input:
            if value.name in feeds:
                full[value.name] = feeds[value.name]
            else:  # inputs the mask does not read: shaped like the driver's sizes
                dims = [batch if i == 0 else (past if "past" in value.name and i == 2 else
                        (query if d.dim_param == "sequence_length" else d.dim_value))
                        for i, d in enumerate(value.type.tensor_type.shape.dim)]
                full[value.name] = np.zeros(dims, dtype=helper.tensor_dtype_to_np_dtype(
                    value.type.tensor_type.elem_type))
        (actual,) = run_with_mask_outputs(model, [mask], full)
        np.testing.assert_array_equal(actual, expected)


def test_template_and_visibility():
    cls = masks.MaskClass("sliding_window", alignment="lower_right", window=2, padding=True)
    pad = np.array([[1, 1, 1, 1], [0, 1, 1, 1]])
    t = masks.template(cls, 2, 4, pad)
    assert t.shape == (2, 1, 2, 4)
    assert t[0, 0].astype(int).tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]
    assert masks.visibility(np.array([0.0, -np.inf, MIN, -1e4])).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="bias"):
        masks.visibility(np.array([0.0, -3.0]))
