"""Rotary position embeddings (RoPE): y = x·cos + rotate(x)·sin over the first rotary_dim channels
of each head, the other channels passed through; rewritten to ONNX RotaryEmbedding (opset 23).

Who writes it which way (transformers 5 exported by torch 2.13, and older Hugging Face code):
- Llama, Qwen2, Mistral, Gemma 2 (TorchScript and dynamo): rotate_half(x) = Concat(-x2, x1) of the
  halves x1, x2 taken by two Slices, applied after the head transpose ([batch, heads, seq, head]).
  cos/sin are computed in the graph: positions · inv_freq (a broadcasting Mul; a MatMul in
  older code), Concat(freqs, freqs), Cos/Sin, times the attention scaling, Cast. The positions
  are an arange over the new tokens (plus the past length), or the position_ids input.
- Phi-3 and GPT-NeoX (partial_rotary_factor): the same on x[..., :rotary_dim], with
  x[..., rotary_dim:] concatenated back unchanged. torch.split writes halves or parts as Split.
- GPT-J (rotate_every_two, interleaved): the even and odd channels by strided Slices, stacked as
  (-x_odd, x_even) with Unsqueeze + Concat and flattened by a Reshape; sin/cos gathered from the
  constant embed_positions table (Gather, or GatherND from dynamo) and repeat_interleave'd;
  partial, and applied before the head transpose ([batch, seq, heads, head]). Code that views x
  as pairs [..., head/2, 2] takes the channels with Gather or Slice instead.
- Older Hugging Face code gathers from constant cos_cached/sin_cached tables sliced to the
  sequence length: cos_cached[:seq_len][position_ids].

The rule anchors at the Neg that every rotation has. A match is fused only when the tables it
multiplies by are a rotation of the positions (halves or pairs repeating the same angles, cos
and sin in their places) and the matched subgraph, run in onnxruntime on random input at
several lengths and positions up to max_positions, equals what the target emits in its place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from onnx_fuse.graph import Graph, Node, Tensor, is_integer, np_dtype, onnx_dtype
from onnx_fuse.pattern import Match, either, maybe, op, var
from onnx_fuse.rewrite import Reject, Rule, once
from onnx_fuse.specs import RotarySpec
from onnx_fuse.verify import Cut, emitted, is_constant, run, session

# --- pattern ---------------------------------------------------------------------------------

def signed(x):
    """x or -x: which operand of the rotation carries the minus is checked on the numbers."""
    return either(op.Neg(x, name="neg"), x)


def rotate_half(x):
    """Concat(-x2, x1) of the two halves of x, cut by two Slices or by one Split (of x, or of x
    behind a Cast to its own type, as ModernBERT's TorchScript export writes it)."""
    source = maybe("Cast", x, name="x_cast")  # both halves read the one Cast: a DAG
    half = either(op.Slice(source), op.Split(source, name="split"))
    return op.Concat(signed(half), signed(half), name="rotate")


def rotate_pairs(x):
    """flatten(stack(-x_odd, x_even)): GPT-J's rotate_every_two. The channels are strided Slices
    of x, or Gather/Slice of x viewed as pairs [..., head/2, 2]."""
    pairs = op.Reshape(x, name="pairs")
    channels = either(op.Slice(x), op.Gather(pairs), op.Slice(pairs))
    stacked = op.Concat(maybe("Unsqueeze", signed(channels)), maybe("Unsqueeze", signed(channels)),
                        name="rotate")
    return op.Reshape(stacked, ops=("Flatten",), name="flatten")


def rotation(x):
    """x·cos + rotate(x)·sin; the sum and both products may be written in either order."""
    return op.Add(op.Mul(x, var("cos"), commutative=True, name="x_cos"),
                  op.Mul(either(rotate_half(x), rotate_pairs(x)), var("sin"), commutative=True,
                         name="rotated_sin"),
                  commutative=True, name="sum")


# Partial rotary: Concat(rotation(x[..., :rotary_dim]), x[..., rotary_dim:]).
channels_of_x = either(op.Slice(var("x"), name="rotated_part"), op.Split(var("x"), name="parts"))
passed = either(op.Slice(var("x")), op.Split(var("x"), name="parts"))
rope = either(op.Concat(rotation(channels_of_x), passed, name="partial"), rotation(var("x")))


# The rotation as a complex multiplication (GPT-OSS, DeepSeek-V3): (x1·c − x2·s, x2·c + x1·s),
# with c and s one angle per pair; no Neg, so its own rule anchors at the Sub. The two parts may
# sit inside a longer Concat (TorchScript merges MLA's cat(q_nope, cat(real, imag))).
complex_rope = op.Concat(
    op.Sub(op.Mul(var("x1"), var("cos"), commutative=True), op.Mul(var("x2"), var("sin"), commutative=True),
           name="real"),
    op.Add(op.Mul(var("x2"), var("cos"), commutative=True), op.Mul(var("x1"), var("sin"), commutative=True),
           commutative=True, name="imag"),
    name="rotate", run=True)


def complex_rotation_output(graph: Graph, sub: Node) -> Tensor:
    users = graph.consumers(sub.outputs[0])
    if len(users) != 1 or users[0].op != "Concat" or not _on_last_axis(graph, users[0]):
        raise Reject("the Sub does not feed a Concat of the real and imaginary parts")
    return users[0].outputs[0]


def is_complex_rotation(graph: Graph, sub: Node) -> bool:
    """A Sub of two products that a Concat takes: anything else (the many other Subs of a model)
    is not a candidate."""
    users = graph.consumers(sub.outputs[0])
    products = all((p := graph.producer(t)) is not None and p.op == "Mul" for t in sub.inputs)
    return products and len(users) == 1 and users[0].op == "Concat"


def rotation_output(graph: Graph, neg: Node) -> Tensor:
    """From the Neg forward to the sum x·cos + rotate(x)·sin, and on to the Concat that appends
    the channels a partial rotary passes through."""
    tensor = neg.outputs[0]
    for _ in range(5):  # Neg, Unsqueeze, Concat, Reshape, Mul: then the Add
        users = [u for u in graph.consumers(tensor) if u.op not in ("Shape", "Size")]
        if len(users) != 1:
            break
        tensor = users[0].outputs[0]
        if users[0].op == "Add":
            after = graph.consumers(tensor)
            if (len(after) == 1 and after[0].op == "Concat" and after[0].inputs[0] is tensor
                    and _on_last_axis(graph, after[0])):
                return after[0].outputs[0]
            return tensor
    raise Reject("the Neg does not feed a sum x·cos + rotate(x)·sin")


def _on_last_axis(graph: Graph, concat: Node) -> bool:
    axis, rank = concat.attrs.get("axis"), graph.rank(concat.outputs[0])
    return axis == -1 or rank is not None and axis == rank - 1


# --- describe: structure, tables, numbers ----------------------------------------------------

def describe_rope(graph: Graph, m: Match) -> RotarySpec:
    output = m["partial" if "partial" in m.captures else "sum"].outputs[0]
    return _rotary_spec(graph, m["x"], output, m["cos"], m["sin"], interleaved="flatten" in m.captures,
                        partial="partial" in m.captures)


def describe_complex_rope(graph: Graph, m: Match) -> RotarySpec:
    """(x1·c − x2·s, x2·c + x1·s) with x1, x2 the two halves of x, or its even and odd channels
    (the output then holds the rotated even channels, then the odd: rotate-half RoPE of x with
    its channels de-interleaved)."""
    x, order = _pair_source(graph, m["x1"], m["x2"])
    concat, start = m["rotate"], m["rotate:start"]
    spec = _rotary_spec(graph, x, concat.outputs[0], m["cos"], m["sin"], interleaved=False,
                        partial=False, halved=True, deinterleave=order == "strided")
    if len(concat.inputs) > 2:
        spec.around = (list(concat.inputs[:start]), list(concat.inputs[start + 2:]))
    return spec


def _rotary_spec(graph: Graph, x: Tensor, output: Tensor, cos_t: Tensor, sin_t: Tensor, *,
                 interleaved: bool, partial: bool, halved: bool = False,
                 deinterleave: bool = False) -> RotarySpec:
    """The spec of a rotation of x by the tables cos_t/sin_t, its tables evaluated and proven
    to rotate pairs of channels. halved: the tables hold one angle per pair already."""
    shape, dtype = graph.shape(x), onnx_dtype(x)
    if shape is None or len(shape) not in (3, 4):
        raise Reject(f"x has rank {None if shape is None else len(shape)}, not 3 or 4")
    if not isinstance(shape[-1], int):
        raise Reject("the head size is not static")
    if dtype not in _TOLERANCE:
        raise Reject(f"x is {onnx.TensorProto.DataType.Name(dtype or 0)}, not a float type this can verify")
    tables = _tables(graph, cos_t, sin_t)
    channels = tables.samples[0][0].shape[-1]
    rotary_dim = 2 * channels if halved else channels
    if rotary_dim % 2 or rotary_dim > shape[-1] or partial == (rotary_dim == shape[-1]):
        raise Reject(f"the tables have {channels} channels for a head of {shape[-1]}")
    layout = _layout(len(shape), len(shape) - tables.rank + tables.axis)
    tolerance = max(1e-3, _TOLERANCE[dtype])
    pairs = once(graph, ("rope pairs", tables.key, interleaved, halved, tolerance),
                 lambda: _rotating_pairs(tables, interleaved, halved, tolerance))
    if dtype != onnx_dtype(cos_t) or dtype != onnx_dtype(sin_t):
        raise Reject("cos/sin are not of x's type")
    table = tables.form == "table"
    return RotarySpec(
        input=x, output=output, positions=tables.positions,
        cos_cache=pairs[0][0] if table else None, sin_cache=pairs[0][1] if table else None,
        cache_key=(tables.key, interleaved, halved), interleaved=interleaved,
        rotary_dim=rotary_dim, head_size=shape[-1], layout=layout, dtype=dtype,
        form=tables.form, form_reason=tables.reason,
        cos=None if table else cos_t, sin=None if table else sin_t,
        table_rank=tables.rank, tables_halved=halved, deinterleave=deinterleave,
    )


def _rotating_pairs(tables: _Tables, interleaved: bool, halved: bool,
                    tolerance: float) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """The tables' samples as one angle per pair of channels, proven to rotate (once per table
    computation: every layer multiplies by the same tables)."""
    pairs = tables.samples if halved else [
        (_halve(cos, interleaved, "cos"), _halve(sin, interleaved, "sin"), first) for cos, sin, first in tables.samples]
    for cos, sin, first in pairs:
        _require_rotation(cos, sin, tolerance, starts_at_zero=first == 0)
    return pairs


def _pair_source(graph: Graph, x1: Tensor, x2: Tensor) -> tuple[Tensor, str]:
    """x and how x1, x2 are cut from it: "halves" (x[..., :d/2], x[..., d/2:] by two Slices or
    one Split) or "strided" (x[..., 0::2], x[..., 1::2])."""
    a, b = graph.producer(x1), graph.producer(x2)
    if a is None or b is None or a.op not in ("Slice", "Split") or b.op not in ("Slice", "Split") \
            or a.inputs[0] is not b.inputs[0]:
        raise Reject("the rotated parts are not two slices of one tensor")
    x = a.inputs[0]
    head = (graph.shape(x) or [None])[-1]
    if not isinstance(head, int):
        raise Reject("the head size is not static")
    if a.op == "Split":
        ok = a is b and a.outputs.index(x1) == 0 and a.outputs.index(x2) == 1 and len(a.outputs) == 2 \
            and a.attrs.get("axis", 0) in (-1, len(graph.shape(x)) - 1) and _split_even(graph, a, head)
        if not ok:
            raise Reject("the Split does not cut x's last axis into two equal halves")
        return x, "halves"
    cuts = [_cut(graph, node, len(graph.shape(x)), head) for node in (a, b)]
    if cuts == [(0, head // 2, 1), (head // 2, head, 1)]:
        return x, "halves"
    if cuts == [(0, head, 2), (1, head, 2)]:
        return x, "strided"
    raise Reject(f"the rotated parts are x[{cuts[0]}] and x[{cuts[1]}], not halves or even/odd channels")


def _split_even(graph: Graph, split: Node, head: int) -> bool:
    sizes = graph.value(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1].name else None
    return (sizes is None and head % 2 == 0) or sizes is not None and list(np.ravel(sizes)) == [head // 2] * 2


def _cut(graph: Graph, node: Node, rank: int, head: int) -> tuple | None:
    """(start, end, step) of a Slice along x's last axis, clamped to the head; None otherwise."""
    bounds = [graph.value(t) if t.name else None for t in node.inputs[1:5]]
    if len(bounds) < 2 or bounds[0] is None or bounds[1] is None:
        return None
    axes = [rank - 1] if len(bounds) < 3 or bounds[2] is None else [a % rank for a in np.ravel(bounds[2])]
    steps = [1] if len(bounds) < 4 or bounds[3] is None else np.ravel(bounds[3]).tolist()
    if axes != [rank - 1] or len(steps) != 1:
        return None
    start, end, step = slice(int(np.ravel(bounds[0])[0]), int(np.ravel(bounds[1])[0]), int(steps[0])).indices(head)
    return start, end if step == 1 else head, step


def _layout(rank: int, seq_axis: int) -> str:
    """Where the positions run in x: seq after the heads (4-D, transposed), before them, or 3-D."""
    layouts = {(4, 2): "bnsh", (4, 1): "bsnh", (3, 1): "bsh"}
    if (rank, seq_axis) not in layouts:
        raise Reject(f"the positions run along axis {seq_axis} of a {rank}-D x, not its sequence axis")
    return layouts[rank, seq_axis]


def _halve(table: np.ndarray, interleaved: bool, name: str) -> np.ndarray:
    """RotaryEmbedding's cache: one angle per pair of channels. The table repeats each angle for
    both channels of a pair: in two halves (rotate_half), or in adjacent channels (interleaved)."""
    first, second = (table[:, 0::2], table[:, 1::2]) if interleaved else np.split(table, 2, axis=-1)
    if not np.allclose(first, second, rtol=1e-6, atol=1e-6):
        how = "even and odd channels" if interleaved else "two halves"
        raise Reject(f"the {name} table's {how} differ: it does not rotate pairs of channels")
    return np.ascontiguousarray(first)


def _require_rotation(cos: np.ndarray, sin: np.ndarray, tolerance: float, starts_at_zero: bool) -> None:
    """cos = a·cos θ and sin = a·sin θ, the same radius a (the attention scaling) everywhere, with
    θ = 0 at position 0 when the rows start there."""
    radius = cos.astype(np.float64) ** 2 + sin.astype(np.float64) ** 2
    scale = float(np.sqrt(radius.max(initial=0.0)))
    if starts_at_zero:
        scale = float(np.abs(cos[0]).max(initial=0.0))
        if scale == 0 and np.any(sin[0]):
            raise Reject("cos and sin are swapped: x is multiplied by a table that is 0 at position 0")
        if np.any(sin[0]):
            scale = 0.0
    if scale == 0 or not np.allclose(radius, scale ** 2, rtol=tolerance, atol=tolerance):
        raise Reject("the cos/sin tables are not cos θ and sin θ of one angle per position")


# --- the tables, as functions of the positions -----------------------------------------------

@dataclass
class _Tables:
    """cos and sin as functions of the positions, and the form RotaryEmbedding takes them in.

    form "table":    rows 0 .. max_positions-1 are the caches, indexed by the position ids
                     (a table the graph gathers from bounds the positions, or --max-positions).
    form "computed": nothing bounds the positions, or a row depends on the other positions (a
                     switch on the sequence length, as LongRoPE's): RotaryEmbedding takes the
                     graph's own cos/sin per token, [batch, seq, rotary_dim / 2], and no ids.
    """

    positions: Tensor  # the integer tensor the tables are computed from
    # (cos, sin, first position) rows evaluated, [positions, rotary_dim] as multiplied with x; the
    # first entry is the cache of the table form, all of them the proof that the tables rotate
    samples: list[tuple[np.ndarray, np.ndarray, int]]
    rank: int  # rank of cos as multiplied with x
    axis: int  # its axis along which the positions run
    key: tuple  # equal for tables computed the same way from the same positions
    form: str
    reason: str  # why this form


def _tables(graph: Graph, cos: Tensor, sin: Tensor) -> _Tables:
    """Evaluate cos and sin in onnxruntime, once per distinct computation (every layer multiplies
    by the same tables, unsqueezed per layer)."""
    positions = _positions(graph, [cos, sin])
    cut = Cut(graph, [cos, sin], {id(positions): "positions"},
              opaque=lambda node: _bounds_table(graph, node), what="the cos/sin subgraph")
    if cut.shape_leaves:
        raise Reject(f"the cos/sin tables depend on the shape of '{cut.shape_leaves[0].name}'")
    key = (cut.signature, graph.shape(positions), graph.options.max_positions)
    found = once(graph, ("rope tables", key), lambda: _evaluate_tables(graph, cut, positions))
    return replace(found, positions=positions, key=key)


# Position ranges the computed form is proven at: short and long sequences from 0 (a switch on
# the length shows), and a stretch of large positions.
_COMPUTED_SAMPLES = ((0, 17), (0, 4096), (65_000, 65_017))


def _evaluate_tables(graph: Graph, cut: Cut, positions: Tensor) -> _Tables:
    rank = graph.rank(positions)
    if rank not in (1, 2) or positions.shape is None:
        raise Reject(f"the positions '{positions.name}' have rank {rank}, not [seq] or [batch, seq]")
    lookups = _lookups(cut)
    tables = cut.session([positions], cut.outputs + [table for table, _ in lookups])

    def rows(first: int, count: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        index = np.arange(first, first + count, dtype=np_dtype(positions)).reshape([1] * (rank - 1) + [-1])
        return _one_row_per_position(*run(tables, {positions.name: index})[:2], count)

    bound = None
    if lookups:  # a table the graph gathers from bounds the positions
        shapes = [t.shape for t in run(tables, {positions.name: np.zeros([1] * rank, np_dtype(positions))})[2:]]
        bound = min(shape[axis] for shape, (_, axis) in zip(shapes, lookups))
    count = _max_positions(graph.options.max_positions, bound)
    if count is not None:
        cos, sin, ndim, axis = rows(0, count)
        if _per_position(rows, cos, sin, count):
            why = "a table the graph gathers from bounds the positions" if graph.options.max_positions is None \
                else "--max-positions bounds the positions"
            return _Tables(positions, [(cos, sin, 0)], ndim, axis, (), "table", why)
        why = "a position's cos/sin depend on the other positions (a switch on the sequence length)"
    else:
        why = "nothing bounds the positions: cos/sin stay computed in the graph, per token"
    samples = [rows(first, count) for first, count in _COMPUTED_SAMPLES]
    return _Tables(positions, [(c, s, first) for (c, s, _, _), (first, _) in zip(samples, _COMPUTED_SAMPLES)],
                   samples[0][2], samples[0][3], (), "computed", why)


def _per_position(rows, cos: np.ndarray, sin: np.ndarray, count: int) -> bool:
    """The table's rows are what each position gets alone and in a short prefix: cos/sin are a
    function of the position, not of the sequence (LongRoPE switches factors on its length)."""
    probes = [(p, 1) for p in sorted({0, 1, count // 2, count - 1}) if p < count]
    probes.append((0, min(count, _COMPUTED_SAMPLES[0][1])))
    for first, length in probes:
        got_cos, got_sin = rows(first, length)[:2]
        want = slice(first, first + length)
        if not (np.allclose(got_cos, cos[want], rtol=1e-6, atol=1e-6)
                and np.allclose(got_sin, sin[want], rtol=1e-6, atol=1e-6)):
            return False
    return True


def _one_row_per_position(cos: np.ndarray, sin: np.ndarray, count: int):
    """cos/sin evaluated for `count` positions as [count, channels], with their rank and the axis
    along which the positions ran."""
    if cos.shape != sin.shape:
        raise Reject("cos and sin have different shapes")
    if count == 1 and cos.size == cos.shape[-1]:  # a single position: the axis does not show
        return cos.reshape(1, -1), sin.reshape(1, -1), cos.ndim, None
    along = [a for a, d in enumerate(cos.shape[:-1]) if d == count]
    if len(along) != 1 or cos.size != count * cos.shape[-1]:
        raise Reject(f"cos computed for {count} positions has shape {cos.shape}, not one row per position")
    flat = (count, cos.shape[-1])
    return cos.reshape(flat), sin.reshape(flat), cos.ndim, along[0]


def _lookups(cut: Cut) -> list[tuple[Tensor, int]]:
    """(table, axis) of each Gather by the positions from a table that does not depend on them."""
    return [(node.inputs[0], node.attrs.get("batch_dims" if node.op == "GatherND" else "axis", 0))
            for node in cut.nodes if node.op in ("Gather", "GatherND", "GatherElements")
            and not cut.depends_on_roles[id(node.inputs[0])] and cut.depends_on_roles[id(node.inputs[1])]]


def _max_positions(asked: int | None, bound: int | None) -> int | None:
    """How many positions the caches hold: `asked` (Options.max_positions, --max-positions), which
    may not exceed a table the graph gathers from; else that table's rows; None when nothing
    bounds them (never guessed: the tables then stay computed in the graph)."""
    if asked is None:
        return bound
    if bound is not None and asked > bound:
        raise Reject(f"max_positions {asked} exceeds the {bound} positions of the graph's table")
    return asked


# Ops whose inputs after the first are shapes, axes or bounds rather than data.
_DATA_IN_FIRST_INPUT = {"Reshape", "Expand", "Tile", "Slice", "Unsqueeze", "Squeeze", "Split", "Pad",
                        "Transpose", "Flatten", "Cast", "Identity"}
_REARRANGING = {"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Cast", "Expand"}


def _positions(graph: Graph, tables: list[Tensor]) -> Tensor:
    """The integer tensor cos and sin are functions of: walking back along data (not shapes) to
    the first non-constant integer tensor, then back through Unsqueeze/Reshape/Cast to the
    positions as the graph computes them (an arange, arange + past, or the position_ids input)."""
    found, stack, seen = [], list(tables), set()
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen or is_constant(graph, tensor) or is_integer(tensor) and graph.value(tensor) is not None:
            continue  # a constant, or an integer one computed (arange(max_positions) of a table)
        seen.add(id(tensor))
        node = graph.producer(tensor)
        if is_integer(tensor):
            while (node is not None and node.op in _REARRANGING and is_integer(node.inputs[0])
                   and all(is_constant(graph, t) for t in node.inputs[1:])):
                tensor, node = node.inputs[0], graph.producer(node.inputs[0])
            if all(t is not tensor for t in found):
                found.append(tensor)
        elif node is None:
            raise Reject(f"cos/sin depend on '{tensor.name}', not only on positions")
        elif node.op not in ("Shape", "Size"):
            stack.extend(node.inputs[:1] if node.op in _DATA_IN_FIRST_INPUT else node.inputs)
    found = [t for t in found if not any(_derived_from(graph, t, other) for other in found if other is not t)]
    if len(found) != 1:
        names = ", ".join(f"'{t.name}'" for t in found) or "none"
        raise Reject(f"cos/sin must be functions of one integer position tensor; found {names}")
    return found[0]


def _derived_from(graph: Graph, tensor: Tensor, source: Tensor, limit: int = 64) -> bool:
    """`tensor`'s values are computed from `source` (LongRoPE's max(positions) + 1 is a function
    of the positions: the positions are the one source of both)."""
    stack, seen = [tensor], set()
    while stack and len(seen) < limit:
        t = stack.pop()
        if t is source:
            return True
        node = graph.producer(t)
        if id(t) in seen or node is None or node.op in ("Shape", "Size"):
            continue
        seen.add(id(t))
        stack.extend(i for i in node.inputs if i.name)
    return False


# --- numerical verification ------------------------------------------------------------------

# bfloat16 subgraphs are verified widened to float32 (verify.session), with float32's tolerance.
_TOLERANCE = {onnx.TensorProto.FLOAT: 1e-4, onnx.TensorProto.FLOAT16: 1e-2, onnx.TensorProto.DOUBLE: 1e-8,
              onnx.TensorProto.BFLOAT16: 1e-4}
_BATCH, _SEQ_LENGTHS, _HEADS = 2, (1, 5), 3


def verify_rope(graph: Graph, m: Match, spec: RotarySpec, target) -> None:
    """Run the matched subgraph and what the target emits for `spec` on the same random x and
    positions (including 0 and max_positions - 1); once per distinct subgraph and x shape. The
    rotate(x) the Neg rule matched and a partial rotary's parts are checked on the way, so that a
    wrong sign or a wrong cut gets its own reason."""
    watched = [spec.output]
    if "rotated_sin" in m.captures:
        watched.append(next(t for t in m["rotated_sin"].inputs if t is not m["sin"]))
        if "partial" in m.captures:
            watched += [next(t for t in m["x_cos"].inputs if t is not m["cos"]), m["partial"].inputs[1]]
    tables = [spec.cos, spec.sin] if spec.form == "computed" else []
    roles = {id(spec.input): "x", id(spec.positions): "positions"}
    roles.update({id(t): f"around {i}" for i, t in enumerate(_around(spec))})
    cut = Cut(graph, watched + tables, roles, opaque=lambda node: _bounds_table(graph, node),
              what="the rotation subgraph")
    static = tuple(d if isinstance(d, int) else None for d in graph.shape(spec.input))
    key = ("verified", cut.signature, static, spec.cache_key, spec.interleaved, spec.form, target.name)
    once(graph, ("rope check", key), lambda: _compare(graph, cut, spec, target, len(tables)))


# Positions the computed form is checked at (it has no table to bound them).
_COMPUTED_LIMIT = 4096


def _compare(graph: Graph, cut: Cut, spec: RotarySpec, target, tables: int) -> None:
    """The matched subgraph and what the target emits on the same x and positions; the computed
    form's replacement gets the cos/sin the graph computes for them."""
    x, positions = spec.input, spec.positions
    around = _around(spec)
    original = cut.session([x, positions] + around + cut.shape_leaves)
    inputs = [x] + ([spec.cos, spec.sin] if tables else [positions]) + around
    replacement = session(emitted(graph, spec, target, inputs, [spec.output]), graph.base_dir,
                          f"what target {target.name} emits")
    rng = np.random.default_rng(0)
    tolerance = _TOLERANCE[spec.dtype]
    for seq in _SEQ_LENGTHS:
        dims, sizes = _x_dims(graph, spec, seq)
        limit = spec.max_positions or _COMPUTED_LIMIT
        feeds = {x.name: rng.standard_normal(dims).astype(np_dtype(x)),
                 positions.name: _random_positions(rng, graph, positions, dims[0], seq, limit)}
        for leaf in cut.shape_leaves:
            feeds[leaf.name] = np.zeros(_dims(graph.shape(leaf), sizes, seq), np_dtype(leaf))
        for part in around:  # what the Concat holding the rotation puts around it
            feeds[part.name] = rng.standard_normal(_dims(graph.shape(part), sizes, seq)).astype(np_dtype(part))
        y, *parts = run(original, feeds)
        if tables:
            parts, (feeds[spec.cos.name], feeds[spec.sin.name]) = parts[:-2], parts[-2:]
        _require_parts(parts, feeds[x.name].astype(np.float64), spec, tolerance)
        expected = run(replacement, feeds)[0]
        if not np.allclose(y, expected, rtol=tolerance, atol=tolerance):
            error = float(np.max(np.abs(y.astype(np.float64) - expected)))
            raise Reject(f"what target {target.name} emits differs from the matched subgraph by "
                         f"{error:.3g} (sequence length {seq})")


def _around(spec: RotarySpec) -> list[Tensor]:
    return [t for side in spec.around for t in side] if spec.around else []


def _require_parts(parts: list, head: np.ndarray, spec: RotarySpec, tolerance: float) -> None:
    """rotate(x) and a partial rotary's parts (the Neg rule's intermediates) are what they
    should be, when they were watched."""
    if not parts:
        return
    rotated, cuts = parts[0], parts[1:]
    if cuts and not (np.array_equal(cuts[0], head[..., :spec.rotary_dim])
                     and np.array_equal(cuts[1], head[..., spec.rotary_dim:])):
        raise Reject(f"the rotated and passed parts are not x[..., :{spec.rotary_dim}] and "
                     f"x[..., {spec.rotary_dim}:]")
    _require_rotate(rotated, head[..., :spec.rotary_dim], spec.interleaved, tolerance)


def _require_rotate(rotated: np.ndarray, x: np.ndarray, interleaved: bool, tolerance: float) -> None:
    """rotate(x) must be rotate_half(x) = (-x2, x1), or (-x1, x0, -x3, x2, ...) when interleaved."""
    if interleaved:
        expected = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
        name = "(-x[1::2], x[0::2]) interleaved"
    else:
        half = x.shape[-1] // 2
        expected = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        name = f"(-x[{half}:], x[:{half}])"
    if rotated.shape != expected.shape:
        raise Reject(f"rotate(x) has shape {rotated.shape}, not x's {expected.shape}")
    if np.allclose(rotated, expected, rtol=tolerance, atol=tolerance):
        return
    if np.allclose(rotated, -expected, rtol=tolerance, atol=tolerance):
        raise Reject(f"wrong sign: rotate(x) is -{name}, the minus is on the wrong half")
    raise Reject(f"mismatched halves: rotate(x) is not {name} of the {x.shape[-1]} rotated channels")


def _x_dims(graph: Graph, spec: RotarySpec, seq: int) -> tuple[list[int], dict]:
    """x's dims for the check, by axis (batch, heads, seq), and the values its symbols take."""
    shape = graph.shape(spec.input)
    seq_axis = {"bnsh": 2, "bsnh": 1, "bsh": 1}[spec.layout]
    dims = [d if isinstance(d, int) else seq if axis == seq_axis else _BATCH if axis == 0 else _HEADS
            for axis, d in enumerate(shape)]
    return dims, {d: v for d, v in zip(shape, dims) if isinstance(d, str)}


def _dims(shape: tuple | None, sizes: dict, default: int) -> list[int]:
    """Dims of a tensor whose shape alone is read: x's symbols as in x, others `default`."""
    if shape is None or None in shape:
        raise Reject(f"cannot make an input of shape {shape} for the check")
    return [d if isinstance(d, int) else sizes.get(d, default) for d in shape]


def _random_positions(rng, graph: Graph, positions: Tensor, batch: int, seq: int, limit: int) -> np.ndarray:
    """Positions in [0, limit), the first 0 and the last limit - 1 (the caches' last row)."""
    shape = graph.shape(positions)
    dims = [seq] if len(shape) == 1 else [1 if shape[0] == 1 else batch, seq]
    values = rng.integers(0, limit, size=dims).reshape(-1)
    values[0], values[-1] = (0, limit - 1) if values.size > 1 else (limit - 1, limit - 1)
    return values.reshape(dims).astype(np_dtype(positions))


# --- subgraphs run on their own --------------------------------------------------------------

def _bounds_table(graph: Graph, node: Node) -> bool:
    """table[:n] (start 0, step 1, n computed) that only Gathers along the same axis read: it
    bounds the valid positions, the values gathered are the table's."""
    if node.op != "Slice" or len(node.inputs) < 3 or graph.value(node.inputs[2]) is not None:
        return False
    starts, axes, steps = (graph.value(node.inputs[i]) if len(node.inputs) > i and node.inputs[i].name
                           else default for i, default in ((1, None), (3, np.zeros(1)), (4, np.ones(1))))
    if starts is None or axes is None or steps is None or np.any(starts) or np.any(steps != 1) or axes.size != 1:
        return False
    users = graph.consumers(node.outputs[0])
    return bool(users) and all(u.op == "Gather" and u.inputs[0] is node.outputs[0]
                               and u.attrs.get("axis", 0) == int(axes.reshape(-1)[0]) for u in users)


RULES = [
    Rule(
        name="rope",
        anchor="Neg",
        pattern=rope,
        root=rotation_output,
        describe=describe_rope,
        verify=verify_rope,
    ),
    Rule(
        name="rope",
        anchor="Sub",
        pattern=complex_rope,
        root=complex_rotation_output,
        describe=describe_complex_rope,
        verify=verify_rope,
        candidate=is_complex_rotation,
    ),
]
