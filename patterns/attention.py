"""Attention cores: softmax(scale · Q Kᵀ ⊕ mask) V.

Who writes it which way:
- Hugging Face eager attention (TorchScript and dynamo exports): MatMul(Q, Transpose(K)), the
  scale as Mul (or Div by sqrt(d) in GPT-2 and BERT) on the scores, the mask added, Softmax
  (with a Cast to float32 and back in some models), MatMul with V.
- torch's scaled_dot_product_attention as the TorchScript exporter (symbolic_opset14) and the
  dynamo exporter (torchlib) decompose it: Q and Kᵀ each multiplied by sqrt(scale), a boolean
  mask turned into Where(mask, 0, -inf) and added, and Where(IsNaN(p), 0, p) after the softmax.
  The dynamo exporter transposes K as a 3-D [B*N, T, H] tensor between two Reshapes.
- Older code masks in place: Where(mask, scores, min) or Where(pad, min, scores).
The scale may sit on the scores, on Q, on K before or after the transpose, or on both Q and K;
all found factors multiply into Attention's `scale`.
- Quantized models (NVIDIA ModelOpt) put a QuantizeLinear → DequantizeLinear pair on each operand
  of both products (patterns/quantization.py); the pairs become the spec's `quant`.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fuse.graph import Graph, Node, Tensor, dim_product, onnx_dtype
from onnx_fuse.pattern import Match, const, either, match, maybe, op, var
from onnx_fuse.rewrite import Reject, Rule
from onnx_fuse.masks import classify_mask_spec
from onnx_fuse.specs import HIDDEN_AT_OR_BELOW, AttentionSpec, MaskSpec

from .quantization import describe_quantization, operand, quantized


def _uniform(value: np.ndarray) -> bool:
    """A float constant with one value (bfloat16 too: ml_dtypes' types are not numpy floats)."""
    flat = np.asarray(value).reshape(-1)
    floating = flat.dtype.kind == "f" or flat.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
    return flat.size > 0 and floating and bool(np.all(flat == flat[0]))


def scaled(x, name: str):
    """x, x · c or x / c for a scalar constant c, captured as `name` or `name`_div."""
    return either(
        op.Mul(x, const(name, _uniform), commutative=True),
        op.Div(x, const(name + "_div", _uniform)),
        x,
    )


key_transposed = either(
    op.Transpose(scaled(var("k"), "k_scale"), name="k_transpose"),
    scaled(op.Transpose(var("k"), name="k_transpose"), "kt_scale"),
    scaled(var("k_t"), "kt_scale"),  # K already laid out as [B, N, H, S]
)
query = operand(scaled(var("q"), "q_scale"), var("q"), "q")
key = operand(key_transposed, either(op.Transpose(var("k"), name="k_transpose"), var("k_t")), "k")
qk_product = quantized(op.MatMul(query, key, name="qk"), "qk_product")
scores = scaled(qk_product, "score_scale")


def casts(x, name: str):
    """x behind up to two Casts (float32 softmax, then `.to(dtype)`), the first captured."""
    return maybe("Cast", maybe("Cast", x), name=name)


# Gemma 2's logit softcapping, c · tanh(s / c), between the scale and the mask.
capped = either(
    op.Mul(op.Tanh(either(op.Div(scores, const("cap", _uniform)),
                          op.Mul(scores, const("cap_inverse", _uniform), commutative=True))),
           const("cap_out", _uniform), commutative=True, name="softcap"),
    scores,
)
scores_any_dtype = quantized(casts(capped, "scores_cast"), "scaled_scores")
# An additive bias (T5's relative positions, ALiBi) may come as its own Add before the mask.
biased_scores = either(op.Add(scores_any_dtype, var("bias"), commutative=True, name="bias_op"),
                       scores_any_dtype)
masked_scores = either(
    op.Add(biased_scores, var("mask"), commutative=True, name="mask_op"),
    op.Where(var("keep"), scores_any_dtype, const("keep_fill", _uniform), name="mask_op"),
    op.Where(var("drop"), const("drop_fill", _uniform), scores_any_dtype, name="mask_op"),
    scores_any_dtype,
)
# GPT-OSS's learned attention sinks: one logit per head joins every row (Concat), the row's max
# is subtracted (a shift the softmax ignores), and the sink's column is sliced off after it.
sink_concat = op.Concat(masked_scores, op.Expand(var("sinks"), var("sinks_shape")), name="sink_concat")
with_sinks = either(op.Sub(sink_concat, op.ReduceMax(sink_concat, name="row_max"), name="shift"),
                    sink_concat)
softmax = op.Softmax(quantized(casts(either(with_sinks, masked_scores), "softmax_in_cast"), "masked_scores"),
                     name="softmax")
# torch's SDPA export zeroes the rows a mask hides entirely: Where(IsNaN(p), 0, p).
guarded = either(op.Where(op.IsNaN(softmax), const("nan_fill", lambda v: not np.any(v)), softmax,
                          name="nan_guard"), softmax)
probs = either(op.Slice(maybe("Cast", guarded), name="sink_drop"), guarded)
attention = op.MatMul(quantized(casts(probs, "softmax_out_cast"), "probs"), operand(var("v"), var("v"), "v"),
                      name="pv")

SCALE_CAPTURES = ("q_scale", "k_scale", "kt_scale", "score_scale")

# The dynamo exporter writes Kᵀ as a 3-D transpose: Reshape(Transpose(Reshape(K, [B*N, T, H]),
# [0, 2, 1]), [B, N, H, T]).
flat_transposed_key = op.Reshape(
    op.Transpose(op.Reshape(var("k"), var("flat_shape")), perm=[0, 2, 1]), var("unflat_shape"))

# Hugging Face's repeat_kv for grouped-query attention: each K/V head repeated `rep` times
# next to itself (query head h reads K/V head h // rep), as Unsqueeze at axis 2, Expand or
# Tile along it, and a Reshape merging it into the head axis.
head_axis_inserted = op.Unsqueeze(var("kv"), const("axis", lambda a: list(np.ravel(a)) == [2]))
repeated_heads = op.Reshape(
    either(op.Expand(head_axis_inserted, var("expanded_shape")),
           op.Tile(head_axis_inserted, const("tiles"))),
    var("merged_shape"))


def attention_output(graph: Graph, softmax: Node) -> Tensor:
    """From a Softmax anchor forward to the MatMul with V (through Casts, a NaN guard and the
    Slice that drops a sink column)."""
    frontier = [softmax.outputs[0]]
    for _ in range(7):
        following = []
        for tensor in frontier:
            for user in graph.consumers(tensor):
                if user.op == "MatMul" and user.inputs[0] is tensor:
                    return user.outputs[0]
                if user.op in ("Cast", "Where", "Slice", "QuantizeLinear", "DequantizeLinear"):
                    following.append(user.outputs[0])
        frontier = following
    raise Reject("the softmax output is not multiplied with V by a MatMul")


_SCORE_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Concat", "Tanh", "Reshape", "Transpose",
              "Expand", "ReduceMax"}


def is_attention_candidate(graph: Graph, softmax: Node) -> bool:
    """Whether a Softmax may be attention: it is not when its scores are a product with a weight
    (an MoE router's expert logits through Gemm or MatMul and TopK, a classifier head) and no
    MatMul of two computed tensors (Q and K) feeds it through pointwise score ops. Anything else
    is a candidate, fused or reported with its reason."""
    frontier, seen, weighted = [softmax.inputs[0]], set(), False
    for _ in range(8):  # breadth first: the scores' MatMul is a few pointwise ops away
        following = []
        for node in filter(None, map(graph.producer, frontier)):
            if id(node) in seen:
                continue
            seen.add(id(node))
            constant = any(isinstance(t, gs.Constant) or graph.value(t) is not None for t in node.inputs)
            if node.op == "MatMul" and not constant:
                return True
            weighted |= node.op in ("Gemm", "TopK") or node.op == "MatMul" and constant
            if node.op in _SCORE_OPS:
                data = node.inputs[:1] if node.op in ("Reshape", "Expand", "Transpose") else node.inputs
                following.extend(t for t in data if t.name)
        frontier = following
    return not weighted


def describe_attention(graph: Graph, m: Match) -> AttentionSpec:
    softmax: Node = m["softmax"]
    rank = graph.rank(softmax.inputs[0])
    if rank is None:
        raise Reject("the rank of the attention scores is unknown (no shape information)")
    axis = softmax.attrs.get("axis", -1)
    if axis not in (-1, rank - 1):
        raise Reject(f"Softmax over axis {axis}, not the last axis")
    _require_exclusive(graph, m)
    quant = describe_quantization(graph, m)

    q, v = m["q"], m["v"] if quant and quant.value else _behind_upcast(graph, m["v"], onnx_dtype(m["q"]))
    if "k" in m.captures:
        perm = m["k_transpose"].attrs.get("perm") or list(reversed(range(rank)))
        key, key_perm = m["k"], tuple(perm[i] for i in _swap_last_two(rank))
    else:
        key, key_perm = _key_behind_flat_transpose(graph, m["k_t"]), None
        if key is None:
            key, key_perm = m["k_t"], tuple(_swap_last_two(rank))
    if key_perm == tuple(range(rank)):
        key_perm = None
    ranks = {graph.rank(t) for t in (q, key, v)}
    flat = ranks == {3}
    if flat:  # [batch*heads, seq, head] from 4-D tensors: attend over those
        if key_perm is not None:
            raise Reject("3-D attention whose K is laid out [batch*heads, head, seq] from the start")
        q, key, v = (_unflattened(graph, t) for t in (q, key, v))
    elif ranks != {4}:
        raise Reject(f"Q/K/V ranks are {sorted(r for r in ranks if r)}; only 4-D [batch, heads, seq, head] is fused")

    q_shape = graph.shape(q)
    k_shape = graph.shape(key)
    k_shape = k_shape if key_perm is None else tuple(k_shape[i] for i in key_perm)
    v_shape = graph.shape(v)
    for what, a, b in (("batch", q_shape[0], k_shape[0]), ("batch", q_shape[0], v_shape[0]),
                       ("head size", q_shape[3], k_shape[3]), ("K/V heads", k_shape[1], v_shape[1]),
                       ("K/V length", k_shape[2], v_shape[2])):
        if _differ(a, b):
            raise Reject(f"Q/K/V {what} differ ({a} vs {b})")
    q_heads = q_shape[1]
    if key_perm is None:
        key, v = without_head_repetition(graph, key, v, q_heads)
        k_shape, v_shape = graph.shape(key), graph.shape(v)
    kv_heads = k_shape[1]
    if isinstance(q_heads, int) and isinstance(kv_heads, int) and q_heads % kv_heads:
        raise Reject(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")

    dtypes = {onnx_dtype(t) for t in (q, key, v)}
    if len(dtypes) != 1 or None in dtypes:
        raise Reject("Q, K and V do not share one known float type")
    dtype = dtypes.pop()
    softmax_dtype = onnx_dtype(softmax.inputs[0])

    scale = _scale(m)
    if not scale > 0:  # Attention's scale must be positive (onnxruntime and TensorRT reject others)
        raise Reject(f"the scores are scaled by {scale}, not a positive factor")
    mask = _mask(graph, m, dtype, softmax_dtype)
    if flat and mask is not None and any(
            len(shape) >= 3 and shape[-3] != 1
            for shape in (graph.shape(t) for t in (mask.tensor, mask.bias) if t is not None)):
        raise Reject("the mask of a 3-D attention varies over batch*heads; it is not split back")
    sinks = _sinks(graph, m, rank, q_heads)
    return AttentionSpec(
        query=q, key=key, key_perm=key_perm, value=v, output=m["pv"].outputs[0],
        scale=scale, softcap=_softcap(m), mask=mask, dtype=dtype,
        softmax_dtype=softmax_dtype if softmax_dtype != dtype else None, flat_output=flat,
        output_dtype=onnx_dtype(m["pv"].outputs[0]),
        empty_row_output="zero" if sinks is not None else _empty_row_output(m, mask),
        q_heads=q_heads, kv_heads=kv_heads, head_size=q_shape[3],
        value_head_size=v_shape[3] if _differ(v_shape[3], q_shape[3]) else None, sinks=sinks,
        quant=quant,
    )


def _sinks(graph: Graph, m: Match, rank: int, q_heads) -> Tensor | None:
    """The sink logits [1, Nq, 1, 1] (broadcast), proven to be one extra column per row that is
    dropped after the softmax; None without sinks. A Slice after the softmax without them, or
    with a Slice that keeps anything but the score columns, is not this attention."""
    if "sink_concat" not in m.captures:
        if "sink_drop" in m.captures:
            raise Reject("the softmax output is sliced before the product with V")
        return None
    concat, drop = m["sink_concat"], m.get("sink_drop")
    if concat.attrs.get("axis") not in (-1, rank - 1) or drop is None:
        raise Reject("an extra score column is not appended on the key axis and dropped after the softmax")
    sink_column = graph.shape(concat.inputs[1])
    bounds = [graph.value(t) if t.name else None for t in drop.inputs[1:5]]
    starts, ends = (None if b is None else np.ravel(b).tolist() for b in bounds[:2])
    axes = [rank - 1] if len(bounds) < 3 or bounds[2] is None else [a % rank for a in np.ravel(bounds[2])]
    steps = [1] if len(bounds) < 4 or bounds[3] is None else np.ravel(bounds[3]).tolist()
    keys = graph.shape(concat.inputs[0])[-1]
    if not (sink_column and sink_column[-1] == 1 and starts == [0] and axes == [rank - 1]
            and steps == [1] and ends is not None and (ends == [-1] or ends == [keys])):
        raise Reject("the sliced softmax does not drop exactly the one sink column")
    if "row_max" in m.captures:
        row_max = m["row_max"]
        axes_in = graph.value(row_max.inputs[1]) if len(row_max.inputs) > 1 else row_max.attrs.get("axes")
        if axes_in is None or [a % rank for a in np.ravel(axes_in)] != [rank - 1] or not row_max.attrs.get("keepdims", 1):
            raise Reject("the value subtracted before the softmax is not the row's maximum")
    sinks = m["sinks"]
    shape = graph.shape(sinks)
    if shape is None or len(shape) > rank or any(d != 1 for i, d in enumerate(shape[::-1]) if i != 2) \
            or len(shape) >= 3 and shape[-3] not in (1, q_heads):
        raise Reject(f"the sink logits have shape {shape}, not one per head [1, heads, 1, 1]")
    return sinks


def _behind_upcast(graph: Graph, value: Tensor, dtype: int | None) -> Tensor:
    """V before a Cast that raises it from Q's type for a float32 product (torch's SDPA export
    of a float16 model): Attention takes V in Q's type and runs the softmax in float32."""
    node = graph.producer(value)
    if onnx_dtype(value) != dtype and node is not None and node.op == "Cast" \
            and onnx_dtype(node.inputs[0]) == dtype:
        return node.inputs[0]
    return value


def _unflattened(graph: Graph, tensor: Tensor) -> Tensor:
    """The 4-D [B, N, S, H] tensor a 3-D [B*N, S, H] one was reshaped from, proven by the
    Reshape's target: H kept and either S kept or the first dim B*N."""
    node = graph.producer(tensor)
    source = node.inputs[0] if node is not None and node.op == "Reshape" else None
    if source is None or graph.rank(source) != 4:
        raise Reject(f"3-D attention input '{tensor.name}' is not a reshape of a 4-D "
                     "[batch, heads, seq, head] tensor: the head count is not provable")
    b, n, s, h = graph.shape(source)
    target = graph.dims(node.inputs[1])
    merges_batch_and_heads = target is not None and len(target) == 3 and target[2] == h and (
        (target[1] == s and s is not None) or (target[0] == dim_product(b, n) is not None))
    if not (isinstance(n, int) and merges_batch_and_heads):
        raise Reject(f"the reshape to 3-D '{tensor.name}' does not provably merge batch and heads")
    return source


def _key_behind_flat_transpose(graph: Graph, k_t: Tensor) -> Tensor | None:
    """K [B, N, T, H] if `k_t` is its transpose written through 3-D [B*N, T, H] reshapes."""
    found, _ = match(flat_transposed_key, graph, k_t)
    if found is None or graph.rank(found["k"]) != 4:
        return None
    b, n, t, h = graph.shape(found["k"])
    flat, unflat = graph.dims(found["flat_shape"]), graph.dims(found["unflat_shape"])
    if flat is None or unflat is None or len(flat) != 3 or len(unflat) != 4:
        return None
    # The reshapes may only merge and split the leading [B, N]; T and H stay whole.
    keeps_heads = isinstance(n, int) and unflat[1] == n
    keeps_head_size = isinstance(h, int) and flat[2] == h and unflat[2] == h
    if not (keeps_heads and keeps_head_size and flat[1] in (t, -1)):
        return None
    return found["k"]


def without_head_repetition(graph: Graph, key: Tensor, value: Tensor, q_heads) -> tuple:
    """K and V before GQA head repetition, when both are repeated the grouped way by the same
    factor; otherwise K and V unchanged (attention over repeated heads is still exact)."""
    sources = [_repetition_source(graph, t, q_heads) for t in (key, value)]
    if None in sources or sources[0][1] != sources[1][1]:
        return key, value
    return sources[0][0], sources[1][0]


def _repetition_source(graph: Graph, tensor: Tensor, q_heads) -> tuple[Tensor, int] | None:
    found, _ = match(repeated_heads, graph, tensor)
    if found is None or graph.rank(found["kv"]) != 4 or not isinstance(q_heads, int):
        return None
    _, kv_heads, _, head = graph.shape(found["kv"])
    if not isinstance(kv_heads, int) or not isinstance(head, int) or q_heads % kv_heads:
        return None
    rep = q_heads // kv_heads
    if "tiles" in found.captures:
        if list(np.ravel(found["tiles"])) != [1, 1, rep, 1, 1]:
            return None
    else:
        expanded = graph.dims(found["expanded_shape"])
        if expanded is None or len(expanded) != 5 or expanded[2] != rep or expanded[1] not in (1, kv_heads):
            return None
        # Expand may only grow the new axis: the others must be 1 or the source's own dims.
        source_dims = (graph.shape(found["kv"])[0], 1, graph.shape(found["kv"])[2], head)
        for target, own in zip([expanded[0]] + expanded[3:], [source_dims[0]] + list(source_dims[2:])):
            if target not in (1, None, own) and not isinstance(own, str) and not isinstance(target, str):
                return None
    merged = graph.dims(found["merged_shape"])
    if merged is None or len(merged) != 4 or merged[1] != q_heads or merged[3] not in (head, -1):
        return None
    return found["kv"], rep


def _swap_last_two(rank: int) -> list[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def _differ(a, b) -> bool:
    """Provably different dims (unknown dims are not)."""
    if a is None or b is None or a == b:
        return False
    return isinstance(a, int) and isinstance(b, int) or (a == 1 or b == 1)


def _scale(m: Match) -> float:
    scale = 1.0
    for name in SCALE_CAPTURES:
        if name in m.captures:
            scale *= float(np.asarray(m[name]).reshape(-1)[0])
        if name + "_div" in m.captures:
            scale /= float(np.asarray(m[name + "_div"]).reshape(-1)[0])
    return scale


def _softcap(m: Match) -> float:
    if "softcap" not in m.captures:
        return 0.0
    first = lambda name: float(np.ravel(m[name])[0])  # noqa: E731
    cap = first("cap") if "cap" in m.captures else 1.0 / first("cap_inverse")
    if not np.isclose(cap, first("cap_out"), rtol=1e-6) or cap <= 0:
        raise Reject(f"tanh is scaled by {first('cap_out')} after dividing by {cap}: not a softcap")
    return cap


def _require_exclusive(graph: Graph, m: Match) -> None:
    """Scores and probabilities must feed nothing but the attention (output_attentions would)."""
    inside = {id(n) for n in m.nodes}
    tensor = m["qk"].outputs[0]
    while True:
        users = graph.consumers(tensor)
        outsiders = [u for u in users if id(u) not in inside]
        if outsiders or graph.is_graph_output(tensor):
            used_by = f"{outsiders[0].op} '{outsiders[0].name}'" if outsiders else "a graph output"
            raise Reject(f"intermediate '{tensor.name}' is also used by {used_by}")
        nxt = users[0]
        if nxt is m["pv"]:
            return
        tensor = nxt.outputs[0]


def _mask(graph: Graph, m: Match, dtype: int, softmax_dtype: int | None) -> MaskSpec | None:
    scores_shape = graph.shape(m["qk"].outputs[0])
    if "mask" in m.captures:
        tensor = m["mask"]
        if onnx_dtype(tensor) not in (dtype, softmax_dtype):
            raise Reject("the additive mask's type is neither Q's nor the softmax's")
        bias = m.get("bias")
        if bias is not None and onnx_dtype(bias) != dtype:
            raise Reject("the additive bias's type differs from Q's")
        spec = MaskSpec("additive", tensor, bias=bias)
    elif "keep" in m.captures or "drop" in m.captures:
        kind = "keep" if "keep" in m.captures else "drop"
        fill = float(np.asarray(m[f"{kind}_fill"]).reshape(-1)[0])
        if not fill <= HIDDEN_AT_OR_BELOW:
            raise Reject(f"Where fills masked scores with {fill}, not a large negative value")
        tensor = m[kind]
        if onnx_dtype(tensor) != 9:  # BOOL
            raise Reject("the Where condition is not boolean")
        spec = MaskSpec(kind, tensor, fill)
    else:
        return None
    for term in (spec.tensor, spec.bias):
        shape = None if term is None else graph.shape(term)
        if term is not None and (shape is None or len(shape) > 4):
            raise Reject("the mask's rank is unknown or above 4")
        if shape is not None and scores_shape is not None:
            for mask_dim, score_dim in zip(reversed(shape), reversed(scores_shape)):
                if isinstance(mask_dim, int) and mask_dim > 1 and score_dim == 1:
                    raise Reject("the mask broadcasts the scores to a larger shape")
    spec.klass = classify_mask_spec(graph, spec, query_len=m["q"], key_len=m["v"])
    return spec


def _empty_row_output(m: Match, mask: MaskSpec | None) -> str:
    """What the original gives a query row whose keys are all hidden (see AttentionSpec)."""
    if mask is None:
        return "mean"
    if mask.kind == "additive":
        minus_inf = mask.bias is None and mask.klass is not None and mask.klass.hides_with_minus_inf
    else:
        minus_inf = mask.fill == -np.inf
    if not minus_inf:
        return "mean"
    return "zero" if "nan_guard" in m.captures else "nan"


RULES = [
    Rule(
        name="attention",
        anchor="Softmax",
        pattern=attention,
        root=attention_output,
        describe=describe_attention,
        candidate=is_attention_candidate,
    )
]
