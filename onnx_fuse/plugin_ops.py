"""The custom ops of target trt-plugin: their contract as data, their ONNX function bodies, and
helpers that make their nodes.

Three ops in domain `onnx_fuse.trt`, each node carrying `plugin_namespace` = "onnx_fuse" and
`plugin_version` = "1" (STRING), so TensorRT's parser binds it to the plugin of that name
registered by onnx_fuse.trt_plugins. Their names collide with no built-in importer
(`Attention`, `RotaryEmbedding`, `TensorScatter`, `TRT_*` are looked up by op_type whatever
the domain). Every attribute is an int, float or string, as TensorRT passes them to plugins.
Every input is required (a plugin has a fixed input count); the neutral values say how to feed
an input an emitter has nothing for.

`function(name)` builds the op's model-local FunctionProto in standard ONNX ops (opset 18 to
24, default 23): onnxruntime runs a model through it, and TensorRT inlines it where the plugin
is not registered. The bodies compute in float32 and return the input's type.

FusedAttention(Q [B, Nq, Sq, H], K [B, Nkv, Skv, H], V [B, Nkv, Skv, Hv],
               key_mask [B, Skv] bool or int (1 = valid; [1, 1] when use_key_mask = 0),
               sinks [Nq] float (-inf = none), kv_lengths int32 [B] (Skv = all))
    -> Y [B, Nq, Sq, Hv], Q's type.
  Query head h reads KV head h // (Nq / Nkv) (GQA/MQA). For batch b let L = clamp(kv_lengths[b],
  0, Skv). Key j is valid iff j < L and (use_key_mask = 0 or key_mask[b, j] != 0). Query i
  sits at position p = i (causal 1, upper-left) or p = L - Sq + i (causal 2, lower-right:
  the queries are the last Sq of the L valid slots, i.e. aligned to kv_lengths, not to Skv).
  Key j is visible iff valid and, when causal != 0, j <= p and, when window > 0,
  j > p - window (Hugging Face's sliding window; window needs causal != 0).
  s_j = scale * q . k_j, then softcap * tanh(s_j / softcap) when softcap > 0. Y = softmax over
  the visible keys plus the sink logit sinks[h] (which joins the denominator only) applied
  to V. A row with no visible key and no sink gives zeros (masked_row 0) or the mean of V
  over all Skv keys (masked_row 1: what a softmax over finite-min masked scores gives).
FusedRotary(x [B, N, S, H], cos_cache [P, R/2], sin_cache [P, R/2] (x's type),
            position_ids int64 [B, S]) -> y like x.
  R = rotary_dim (0: H), R/2 = cos_cache's second dim. Rotate-half (interleaved 0) pairs
  x[k] with x[k + R/2]; interleaved 1 pairs x[2k] with x[2k+1]; with c, s = cache[pos][k]:
  (a, b) -> (a c - b s, b c + a s). x[R:] passes through. Positions must lie in [0, P).
  Out of place; a plugin that runs in place declares its output aliased to x (every
  element is read before its row is written).
FusedKVWrite(cache [B, N, L, H], update [B, N, S, H], write_indices int32 or int64 [B])
    -> present like cache.
  present = cache with update[b, :, t] at slot write_indices[b] + t; slots outside [0, L)
  are dropped (TensorRT's KV-cache update drops them too). The plugin's output aliases the
  cache: the application binds both to one buffer, and only the written slots are touched.
"""
from dataclasses import dataclass

from onnx import AttributeProto, TensorProto, helper

DOMAIN = "onnx_fuse.trt"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "onnx_fuse"
PLUGIN_VERSION = "1"
OPSETS = range(18, 25)


@dataclass(frozen=True)
class Attr:
    name: str
    kind: type
    default: object


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple
    outputs: tuple
    attrs: tuple

    def attr_names(self):
        return [a.name for a in self.attrs] + ["plugin_namespace", "plugin_version"]


ATTENTION = OpSpec(
    "FusedAttention", ("Q", "K", "V", "key_mask", "sinks", "kv_lengths"), ("Y",),
    (Attr("scale", float, None), Attr("causal", int, 0), Attr("window", int, 0),
     Attr("softcap", float, 0.0), Attr("masked_row", int, 0), Attr("use_key_mask", int, 1)))
ROPE = OpSpec("FusedRotary", ("x", "cos_cache", "sin_cache", "position_ids"), ("y",),
              (Attr("interleaved", int, 0), Attr("rotary_dim", int, 0)))
KV_WRITE = OpSpec("FusedKVWrite", ("cache", "update", "write_indices"), ("present",), ())
OPS = {op.name: op for op in (ATTENTION, ROPE, KV_WRITE)}


# ---------------------------------------------------------------- nodes

def make_node(op_name, inputs, outputs, name=None, **attrs):
    """A node of one of the ops, every attribute set (defaults filled in) and checked."""
    spec = OPS[op_name]
    if len(inputs) != len(spec.inputs) or not all(inputs):
        raise ValueError(f"{op_name} takes {len(spec.inputs)} inputs {spec.inputs}")
    unknown = set(attrs) - {a.name for a in spec.attrs}
    if unknown:
        raise ValueError(f"{op_name} has no attribute {sorted(unknown)}")
    values = {a.name: attrs.get(a.name, a.default) for a in spec.attrs}
    _validate(op_name, values)
    values = {a.name: a.kind(values[a.name]) for a in spec.attrs}
    return helper.make_node(op_name, list(inputs), list(outputs), name=name, domain=DOMAIN,
                            plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
                            **values)


def attributes(op_name, **attrs) -> dict:
    """The attributes a node of the op gets (make_node's: checked, defaults filled in, the plugin
    binding included), as a graphsurgeon node takes them."""
    node = make_node(op_name, ["_"] * len(OPS[op_name].inputs), ["_"], **attrs)
    found = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in found.items()}


def _validate(op_name, v):
    if op_name == ATTENTION.name:
        if v["scale"] is None or not v["scale"] > 0:
            raise ValueError("scale must be > 0")
        if v["causal"] not in (0, 1, 2) or v["masked_row"] not in (0, 1):
            raise ValueError("causal is 0, 1 or 2; masked_row 0 or 1")
        if v["window"] < 0 or (v["window"] and not v["causal"]):
            raise ValueError("window is >= 0 and needs causal 1 or 2")
        if v["softcap"] < 0 or v["use_key_mask"] not in (0, 1):
            raise ValueError("softcap is >= 0; use_key_mask 0 or 1")
    if op_name == ROPE.name and (v["interleaved"] not in (0, 1) or v["rotary_dim"] < 0
                                 or v["rotary_dim"] % 2):
        raise ValueError("interleaved is 0 or 1; rotary_dim even and >= 0")


def attention_node(q, k, v, key_mask, sinks, kv_lengths, y, *, scale, causal=0, window=0,
                   softcap=0.0, masked_row=0, use_key_mask=1, name=None):
    return make_node(ATTENTION.name, [q, k, v, key_mask, sinks, kv_lengths], [y], name,
                     scale=scale, causal=causal, window=window, softcap=softcap,
                     masked_row=masked_row, use_key_mask=use_key_mask)


def rope_node(x, cos_cache, sin_cache, position_ids, y, *, interleaved=0, rotary_dim=0,
              name=None):
    return make_node(ROPE.name, [x, cos_cache, sin_cache, position_ids], [y], name,
                     interleaved=interleaved, rotary_dim=rotary_dim)


def kv_write_node(cache, update, write_indices, present, name=None):
    return make_node(KV_WRITE.name, [cache, update, write_indices], [present], name)


def functions_for(graph, opset=23):
    """The FunctionProtos a graph's nodes of these ops need, in a fixed order."""
    used = {n.op_type for n in graph.node if n.domain == DOMAIN}
    return [function(name, opset) for name in OPS if name in used]


def opset_imports(opset=23):
    return [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]


# ---------------------------------------------------------------- function bodies

class _Body:
    """Accumulates a function body; op() returns the output name of the node it adds."""

    def __init__(self, prefix):
        self.nodes = []
        self.prefix = prefix

    def op(self, op_type, *inputs, name=None, **attrs):
        out = f"{self.prefix}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def out(self, op_type, output, *inputs, **attrs):
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attrs))

    def const(self, value, dtype=TensorProto.INT64):
        arr = value if isinstance(value, list) else [value]
        shape = [len(arr)] if isinstance(value, list) else []
        return self.op("Constant", value=helper.make_tensor("v", dtype, shape, arr))

    def attr(self, name, kind):
        """A scalar Constant holding the function's attribute `name` (int64 or float)."""
        ref = AttributeProto()
        ref.name = "value_int" if kind is int else "value_float"
        ref.type = AttributeProto.INT if kind is int else AttributeProto.FLOAT
        ref.ref_attr_name = name
        node = helper.make_node("Constant", [], [f"{self.prefix}_{len(self.nodes)}"])
        node.attribute.append(ref)
        self.nodes.append(node)
        return node.output[0]

    def flag(self, name):
        """Attribute `name` != 0, as a bool scalar."""
        return self.op("Cast", self.attr(name, int), to=TensorProto.BOOL)

    def dim(self, tensor, axis):
        """Dimension `axis` of `tensor` as a 1-element int64 tensor."""
        return self.op("Shape", tensor, start=axis, end=axis + 1)

    def scalar(self, one_element):
        return self.op("Squeeze", one_element, self.const([0]))


def function(name, opset=23):
    """The model-local function of op `name`, its body at ONNX opset `opset` (18..24)."""
    if opset not in OPSETS:
        raise ValueError(f"function bodies are built for opsets {OPSETS.start}..{OPSETS.stop - 1}")
    spec = OPS[name]
    body = _Body(name)
    {ATTENTION.name: _attention_body, ROPE.name: _rope_body, KV_WRITE.name: _kv_write_body}[
        name](body)
    return helper.make_function(DOMAIN, name, list(spec.inputs), list(spec.outputs), body.nodes,
                                [helper.make_opsetid("", opset)], spec.attr_names())


def _attention_body(f):
    FLOAT = TensorProto.FLOAT
    q, k, v = (f.op("Cast", t, to=FLOAT) for t in ("Q", "K", "V"))
    # [B, Nkv, group, Sq, H]: each KV head against its group of query heads, no repeat.
    q5 = f.op("Reshape", q, f.op("Concat", f.op("Shape", "K", start=0, end=2), f.const([-1]),
                                 f.op("Shape", "Q", start=2, end=4), axis=0))
    k5, v5 = f.op("Unsqueeze", k, f.const([2])), f.op("Unsqueeze", v, f.const([2]))
    s = f.op("Mul", f.op("MatMul", q5, f.op("Transpose", k5, perm=[0, 1, 2, 4, 3])),
             f.attr("scale", float))
    cap = f.attr("softcap", float)
    capped = f.op("Mul", f.op("Tanh", f.op("Div", s, cap)), cap)
    s = f.op("Where", f.op("Greater", cap, f.const(0.0, FLOAT)), capped, s)
    vis = _visible(f)
    s = f.op("Where", vis, s, f.const(float("-inf"), FLOAT))
    sink = f.op("Reshape", f.op("Cast", "sinks", to=FLOAT),
                f.op("Concat", f.const([1]), f.dim("K", 1), f.const([-1, 1, 1]), axis=0))
    m = f.op("Max", f.op("ReduceMax", s, f.const([-1]), keepdims=1), sink)
    m = f.op("Where", f.op("IsInf", m), f.const(0.0, FLOAT), m)
    e = f.op("Exp", f.op("Sub", s, m))
    den = f.op("Add", f.op("ReduceSum", e, f.const([-1]), keepdims=1),
               f.op("Exp", f.op("Sub", sink, m)))
    empty = f.op("Equal", den, f.const(0.0, FLOAT))
    out = f.op("Div", f.op("MatMul", e, v5), f.op("Where", empty, f.const(1.0, FLOAT), den))
    mean_v = f.op("Mul", f.op("ReduceMean", v5, f.const([3]), keepdims=1),
                  f.op("Cast", f.attr("masked_row", int), to=FLOAT))
    out = f.op("Where", empty, mean_v, out)
    out = f.op("Reshape", out, f.op("Concat", f.op("Shape", "Q", start=0, end=3),
                                    f.dim("V", 3), axis=0))
    f.out("CastLike", "Y", out, "Q")


def _visible(f):
    """[B, 1, 1, Sq, Skv] bool: key j visible from query i (the op's definition)."""
    skv = f.dim("K", 2)
    sq = f.dim("Q", 2)
    zero, one = f.const(0), f.const(1)
    j = f.op("Range", zero, f.scalar(skv), one)
    i = f.op("Range", zero, f.scalar(sq), one)
    lengths = f.op("Min", f.op("Max", f.op("Cast", "kv_lengths", to=TensorProto.INT64), zero),
                   f.scalar(skv))
    causal, window = f.attr("causal", int), f.attr("window", int)
    lower_right = f.op("Cast", f.op("Equal", causal, f.const(2)), to=TensorProto.INT64)
    offset = f.op("Mul", f.op("Sub", lengths, f.scalar(sq)), lower_right)
    p = f.op("Add", f.op("Unsqueeze", offset, f.const([1])), f.op("Unsqueeze", i, f.const([0])))
    p = f.op("Unsqueeze", p, f.const([1, 2, 4]))
    in_length = f.op("Less", f.op("Unsqueeze", j, f.const([0])),
                     f.op("Unsqueeze", lengths, f.const([1])))
    marked = f.op("Or", f.op("Cast", "key_mask", to=TensorProto.BOOL),
                  f.op("Not", f.flag("use_key_mask")))
    valid = f.op("Unsqueeze", f.op("And", in_length, marked), f.const([1, 2, 3]))
    no_causal = f.op("Equal", causal, zero)
    causal_ok = f.op("Or", f.op("LessOrEqual", j, p), no_causal)
    no_window = f.op("Or", f.op("Equal", window, zero), no_causal)
    in_window = f.op("Greater", j, f.op("Sub", p, window), name="window_lower_bound")
    window_ok = f.op("Or", in_window, no_window)
    return f.op("And", f.op("And", valid, causal_ok), window_ok)


def _rope_body(f):
    FLOAT = TensorProto.FLOAT

    def table(name):
        rows = f.op("Cast", f.op("Gather", name, "position_ids", axis=0), to=FLOAT)
        return f.op("Unsqueeze", rows, f.const([1]))          # [B, 1, S, R/2]

    cos, sin = table("cos_cache"), table("sin_cache")
    x = f.op("Cast", "x", to=FLOAT)
    half = f.dim("cos_cache", 1)
    r = f.op("Mul", half, f.const([2]))
    axis = f.const([3])
    rot = f.op("Slice", x, f.const([0]), r, axis)
    rest = f.op("Slice", x, r, f.dim("x", 3), axis)

    def rotate(a, b):
        return (f.op("Sub", f.op("Mul", a, cos), f.op("Mul", b, sin)),
                f.op("Add", f.op("Mul", b, cos), f.op("Mul", a, sin)))

    halves = rotate(f.op("Slice", rot, f.const([0]), half, axis), f.op("Slice", rot, half, r, axis))
    rotated_half = f.op("Concat", *halves, axis=3)
    pairs = f.op("Reshape", rot, f.const([0, 0, 0, -1, 2]))
    last = f.const([4])
    evens = f.op("Squeeze", f.op("Slice", pairs, f.const([0]), f.const([1]), last), last)
    odds = f.op("Squeeze", f.op("Slice", pairs, f.const([1]), f.const([2]), last), last)
    o1, o2 = rotate(evens, odds)
    joined = f.op("Concat", f.op("Unsqueeze", o1, last), f.op("Unsqueeze", o2, last), axis=4)
    rotated_pairs = f.op("Reshape", joined, f.const([0, 0, 0, -1]))
    rotated = f.op("Where", f.flag("interleaved"), rotated_pairs, rotated_half)
    f.out("CastLike", "y", f.op("Concat", rotated, rest, axis=3), "x")


def _kv_write_body(f):
    """Functional form: each cache slot takes the update row that lands on it, if any."""
    length, steps = f.dim("cache", 2), f.dim("update", 2)
    zero = f.const(0)
    slots = f.op("Range", zero, f.scalar(length), f.const(1))
    start = f.op("Unsqueeze", f.op("Cast", "write_indices", to=TensorProto.INT64), f.const([1]))
    t = f.op("Sub", f.op("Unsqueeze", slots, f.const([0])), start)          # [B, L]
    written = f.op("And", f.op("GreaterOrEqual", t, zero), f.op("Less", t, steps))
    t = f.op("Max", f.op("Min", t, f.op("Sub", steps, f.const([1]))), zero)
    shape = f.op("Concat", f.op("Shape", "update", start=0, end=2), length, f.dim("update", 3),
                 axis=0)
    index = f.op("Expand", f.op("Unsqueeze", t, f.const([1, 3])), shape)
    rows = f.op("GatherElements", "update", index, axis=2)
    f.out("Where", "present", f.op("Unsqueeze", written, f.const([1, 3])), rows, "cache")

