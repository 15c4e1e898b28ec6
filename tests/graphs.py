"""Hand-built graphs for edge cases: attention written every way exporters write it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """A tiny helper to write ONNX graphs as a sequence of ops."""

    def __init__(self):
        self.nodes, self.inputs, self.outputs, self.initializers = [], [], [], []
        self._n = 0

    def input(self, name, dtype, shape):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, value, dtype=np.float32):
        name = f"c{self._n}"
        self._n += 1
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, *inputs, **attrs):
        name = f"t{self._n}"
        self._n += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=f"n{self._n}", **attrs))
        return name

    def model(self, output, opset=23, dtype=TensorProto.FLOAT):
        self.outputs = [helper.make_tensor_value_info(output, dtype, None)]
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10
        return model


def repeat_heads(g, x, kv_heads, rep, how):
    """GQA head repetition as exporters write it; "tile_heads" repeats the whole head axis
    (head h reads K/V head h % kv_heads), which is not the grouped layout."""
    if how == "tile_heads":
        return g.op("Tile", x, g.const([1, rep, 1, 1], np.int64))
    wide = g.op("Unsqueeze", x, g.const([2], np.int64))
    if how == "expand":
        wide = g.op("Expand", wide, g.const([1, 1, rep, 1, 1], np.int64))
    else:
        wide = g.op("Tile", wide, g.const([1, 1, rep, 1, 1], np.int64))
    shape = g.op("Concat", g.op("Shape", x, end=1), g.const([kv_heads * rep], np.int64),
                 g.op("Shape", x, start=2), axis=0)
    return g.op("Reshape", wide, shape)


def attention_model(*, scale_on="scores", scale_op="Mul", k_layout="transpose", mask=None,
                    casts=False, heads=4, kv_heads=4, head=8, opset=23, mask_rank=4,
                    probs_as_output=False, softmax_axis=-1, repeat=None, softcap=None, sinks=None):
    """softmax(scale Q Kᵀ + mask) V with Q [B, heads, S, head] and K/V [B, kv_heads, T, head].

    scale_on: "scores", "q", "k" (before the transpose), "kt" (after), "both" (sqrt on Q and Kᵀ),
    "none". repeat: GQA head repetition of K and V ("expand", "tile", "tile_heads"). k_layout: "transpose" (K input [B,N,T,H], Transpose perm 0,1,3,2), "bsnh" (K input
    [B,T,N,H], one Transpose perm 0,2,3,1), "pretransposed" (K input already [B,N,H,T]).
    mask: None, "additive", "keep" (Where(m, s, -inf)), "keep_finite" (finfo.min fill),
    "drop" (Where(pad, min, s)), "padding" (additive [B,1,1,T]).
    sinks: None, "gpt-oss" (a learned logit per head appended to every row, the row max
    subtracted, the column sliced off after the softmax), or "keep_sink" (the same, but the slice
    keeps the sink column and drops the first key: not attention with sinks).
    """
    g = GraphBuilder()
    scale = 1 / np.sqrt(head)
    q = g.input("q", TensorProto.FLOAT, ["B", heads, "S", head])
    if k_layout == "transpose":
        k = g.input("k", TensorProto.FLOAT, ["B", kv_heads, "T", head])
    elif k_layout == "bsnh":
        k = g.input("k", TensorProto.FLOAT, ["B", "T", kv_heads, head])
    else:
        k = g.input("k", TensorProto.FLOAT, ["B", kv_heads, head, "T"])
    v = g.input("v", TensorProto.FLOAT, ["B", kv_heads, "T", head])
    if repeat is not None:
        k = repeat_heads(g, k, kv_heads, heads // kv_heads, repeat)
        v = repeat_heads(g, v, kv_heads, heads // kv_heads, repeat)

    def apply(x, factor):
        if scale_op == "Mul":
            return g.op("Mul", x, g.const(factor))
        return g.op("Div", x, g.const(1 / factor))

    if scale_on == "q":
        q = apply(q, scale)
    if scale_on == "both":
        q = apply(q, np.sqrt(scale))
    if scale_on == "k":
        k = apply(k, scale)
    if k_layout == "transpose":
        kt = g.op("Transpose", k, perm=[0, 1, 3, 2])
    elif k_layout == "bsnh":
        kt = g.op("Transpose", k, perm=[0, 2, 3, 1])
    else:
        kt = k
    if scale_on == "kt":
        kt = apply(kt, scale)
    if scale_on == "both":
        kt = apply(kt, np.sqrt(scale))
    s = g.op("MatMul", q, kt)
    if scale_on == "scores":
        s = apply(s, scale)
    if softcap is not None:
        s = g.op("Mul", g.op("Tanh", g.op("Div", s, g.const(softcap))), g.const(softcap))
    if casts:
        s = g.op("Cast", s, to=TensorProto.FLOAT)
    if mask == "additive":
        shape = ["B", 1, "S", "T"][4 - mask_rank:]
        s = g.op("Add", s, g.input("mask", TensorProto.FLOAT, shape))
    elif mask == "padding":
        s = g.op("Add", g.input("mask", TensorProto.FLOAT, ["B", 1, 1, "T"]), s)
    elif mask in ("keep", "keep_finite"):
        fill = -np.inf if mask == "keep" else np.finfo(np.float32).min
        s = g.op("Where", g.input("mask", TensorProto.BOOL, ["B", 1, "S", "T"]), s, g.const(fill))
    elif mask == "drop":
        fill = np.finfo(np.float32).min
        s = g.op("Where", g.input("mask", TensorProto.BOOL, ["B", 1, "S", "T"]), g.const(fill), s)
    if sinks is not None:
        logits = g.const(np.linspace(-1, 1, heads).reshape(1, heads, 1, 1))
        column = g.op("Concat", g.op("Shape", q, end=3), g.const([1], np.int64), axis=0)
        s = g.op("Concat", s, g.op("Expand", logits, column), axis=-1)
        s = g.op("Sub", s, g.op("ReduceMax", s, g.const([-1], np.int64), keepdims=1))
    p = g.op("Softmax", s, axis=softmax_axis)
    if casts:
        p = g.op("Cast", p, to=TensorProto.FLOAT)
    if sinks == "gpt-oss":
        p = g.op("Slice", p, g.const([0], np.int64), g.const([-1], np.int64), g.const([-1], np.int64))
    elif sinks == "keep_sink":
        p = g.op("Slice", p, g.const([1], np.int64), g.const([2**62], np.int64), g.const([-1], np.int64))
    out = g.op("MatMul", p, v)
    model = g.model(out, opset=opset)
    if probs_as_output:
        model.graph.output.append(helper.make_tensor_value_info(p, TensorProto.FLOAT, None))
    return model


def random_inputs(model: onnx.ModelProto, sizes=None, seed=0):
    """Inputs for hand-built graphs: symbolic dims from `sizes`, masks with one padded key."""
    sizes = {"B": 2, "S": 3, "T": 5, **(sizes or {})}
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param]
                for d in value.type.tensor_type.shape.dim]
        elem_type = value.type.tensor_type.elem_type
        if elem_type == TensorProto.BOOL:
            keep = np.ones(dims, dtype=bool)
            keep[..., 0] = False  # every row keeps at least one key
            keep[0] = True
            feeds[value.name] = keep
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(
                onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    return feeds


def flat_attention_model(*, heads=4, head=8, reshape="minus_one", mask=None):
    """Attention over [B*heads, S, head] tensors reshaped from 4-D ones (older Hugging Face
    BART/Whisper code): reshape "minus_one" is view(B*heads, -1, head), "seq" keeps S by name."""
    g = GraphBuilder()
    q4, k4, v4 = (g.input(n, TensorProto.FLOAT, ["B", heads, "S" if n == "q" else "T", head])
                  for n in ("q", "k", "v"))

    def flat(x):
        if reshape == "minus_one":
            batch_heads = g.op("Mul", g.op("Shape", x, end=1), g.const([heads], np.int64))
            shape = g.op("Concat", batch_heads, g.const([-1, head], np.int64), axis=0)
        else:  # [-1, S, head] with S read off the tensor
            shape = g.op("Concat", g.const([-1], np.int64), g.op("Shape", x, start=2), axis=0)
        return g.op("Reshape", x, shape)

    q, k, v = flat(q4), flat(k4), flat(v4)
    s = g.op("MatMul", g.op("Mul", q, g.const(1 / np.sqrt(head))), g.op("Transpose", k, perm=[0, 2, 1]))
    if mask == "shared":
        s = g.op("Add", s, g.input("mask", TensorProto.FLOAT, [1, "S", "T"]))
    elif mask == "per_head":
        s = g.op("Add", s, g.input("mask", TensorProto.FLOAT, ["BN", "S", "T"]))
    out = g.op("MatMul", g.op("Softmax", s, axis=-1), v)
    return g.model(out)


def float16_upcast_attention_model(*, heads=4, head=8):
    """torch's SDPA as the TorchScript exporter writes it for a float16 model: the scores are
    cast to float32 for the mask and softmax, V is cast up for the product, and the result is
    cast back down to float16."""
    g = GraphBuilder()
    q, k, v = (g.input(n, TensorProto.FLOAT16, ["B", heads, "S" if n == "q" else "T", head])
               for n in ("q", "k", "v"))
    root = np.sqrt(1 / np.sqrt(head))
    q = g.op("Mul", q, g.const(root, np.float16))
    kt = g.op("Mul", g.op("Transpose", k, perm=[0, 1, 3, 2]), g.const(root, np.float16))
    scores = g.op("Cast", g.op("MatMul", q, kt), to=TensorProto.FLOAT)
    masked = g.op("Add", scores, g.input("mask", TensorProto.FLOAT, ["B", 1, "S", "T"]))
    probs = g.op("Softmax", masked, axis=-1)
    out = g.op("MatMul", probs, g.op("Cast", v, to=TensorProto.FLOAT))
    return g.model(g.op("Cast", out, to=TensorProto.FLOAT16), dtype=TensorProto.FLOAT16)


def router_and_attention_model(*, heads=4, head=8, experts=4):
    """An attention layer and an MoE router over its output: softmax(x W_router) then TopK, the
    router's expert weights scaling the output (as Qwen3-MoE and GPT-OSS write them)."""
    g = GraphBuilder()
    q, k, v = (g.input(n, TensorProto.FLOAT, ["B", heads, "S", head]) for n in ("q", "k", "v"))
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(head ** -0.5))
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # [B, N, S, H]
    hidden = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, heads * head], np.int64))
    router = np.random.default_rng(3).standard_normal((heads * head, experts)).astype(np.float32)
    weights = g.op("Softmax", g.op("MatMul", hidden, g.const(router)), axis=-1)
    name = f"t{len(g.nodes)}_topk"
    g.nodes.append(helper.make_node("TopK", [weights, g.const([2], np.int64)], [name, name + "_i"], axis=-1))
    scale = g.op("ReduceSum", name, g.const([-1], np.int64), keepdims=1)
    return g.model(g.op("Mul", hidden, scale))
