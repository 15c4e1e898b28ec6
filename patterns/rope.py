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
    """Concat(-x2, x1) of the two halves of x, cut by two Slices or by one Split."""
    half = either(op.Slice(x), op.Split(x, name="split"))
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
    x, output = m["x"], m["partial" if "partial" in m.captures else "sum"].outputs[0]
    shape, dtype = graph.shape(x), onnx_dtype(x)
    if shape is None or len(shape) not in (3, 4):
        raise Reject(f"x has rank {None if shape is None else len(shape)}, not 3 or 4")
    if not isinstance(shape[-1], int):
        raise Reject("the head size is not static")
    if dtype not in _TOLERANCE:
        raise Reject(f"x is {onnx.TensorProto.DataType.Name(dtype or 0)}, not a float type this can verify")
    interleaved = "flatten" in m.captures

    tables = _tables(graph, m["cos"], m["sin"])
    cos, sin = tables.cos, tables.sin
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or rotary_dim > shape[-1] or ("partial" in m.captures) == (rotary_dim == shape[-1]):
        raise Reject(f"the tables have {rotary_dim} channels for a head of {shape[-1]}")
    layout = _layout(len(shape), len(shape) - tables.rank + tables.axis)
    cos_cache, sin_cache = (_halve(t, interleaved, name) for t, name in ((cos, "cos"), (sin, "sin")))
    _require_rotation(cos_cache, sin_cache, max(1e-3, _TOLERANCE[dtype]))
    if dtype != onnx_dtype(m["cos"]) or dtype != onnx_dtype(m["sin"]):
        raise Reject("cos/sin are not of x's type")

    return RotarySpec(
        input=x, output=output, positions=tables.positions, cos_cache=cos_cache,
        sin_cache=sin_cache, cache_key=(tables.key, interleaved), interleaved=interleaved,
        rotary_dim=rotary_dim, head_size=shape[-1], layout=layout, dtype=dtype,
    )


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


def _require_rotation(cos: np.ndarray, sin: np.ndarray, tolerance: float) -> None:
    """cos = a·cos θ and sin = a·sin θ with θ = 0 at position 0 (a: the attention scaling)."""
    scale = float(np.abs(cos[0]).max(initial=0.0))
    if scale == 0 and np.any(sin[0]):
        raise Reject("cos and sin are swapped: x is multiplied by a table that is 0 at position 0")
    radius = cos.astype(np.float64) ** 2 + sin.astype(np.float64) ** 2
    if scale == 0 or np.any(sin[0]) or not np.allclose(radius, scale ** 2, rtol=tolerance, atol=tolerance):
        raise Reject("the cos/sin tables are not cos θ and sin θ of one angle per position")


# --- the tables, as functions of the positions -----------------------------------------------

@dataclass
class _Tables:
    positions: Tensor  # the integer tensor the tables are computed from
    cos: np.ndarray  # [max_positions, rotary_dim]: cos as multiplied with x, one row a position
    sin: np.ndarray
    rank: int  # rank of cos as multiplied with x
    axis: int  # its axis along which the positions run
    key: tuple  # equal for tables computed the same way from the same positions


def _tables(graph: Graph, cos: Tensor, sin: Tensor) -> _Tables:
    """Evaluate cos and sin for positions 0 .. max_positions-1 in onnxruntime, once per distinct
    computation (every layer multiplies by the same tables, unsqueezed per layer)."""
    positions = _positions(graph, [cos, sin])
    cut = Cut(graph, [cos, sin], {id(positions): "positions"},
              opaque=lambda node: _bounds_table(graph, node), what="the cos/sin subgraph")
    if cut.shape_leaves:
        raise Reject(f"the cos/sin tables depend on the shape of '{cut.shape_leaves[0].name}'")
    key = (cut.signature, graph.shape(positions), graph.options.max_positions)
    found = once(graph, ("rope tables", key), lambda: _evaluate_tables(graph, cut, positions))
    return replace(found, positions=positions, key=key)


def _evaluate_tables(graph: Graph, cut: Cut, positions: Tensor) -> _Tables:
    rank = graph.rank(positions)
    if rank not in (1, 2) or positions.shape is None:
        raise Reject(f"the positions '{positions.name}' have rank {rank}, not [seq] or [batch, seq]")
    lookups = _lookups(cut)
    tables = cut.session([positions], cut.outputs + [table for table, _ in lookups])
    bound = None
    if lookups:  # a table the graph gathers from bounds the positions
        shapes = [t.shape for t in run(tables, {positions.name: np.zeros([1] * rank, np_dtype(positions))})[2:]]
        bound = min(shape[axis] for shape, (_, axis) in zip(shapes, lookups))
    max_positions = _max_positions(graph.options.max_positions, bound)
    index = np.arange(max_positions, dtype=np_dtype(positions)).reshape([1] * (rank - 1) + [-1])
    cos, sin = run(tables, {positions.name: index})[:2]
    if cos.shape != sin.shape:
        raise Reject("cos and sin have different shapes")
    along = [a for a, d in enumerate(cos.shape[:-1]) if d == max_positions]
    if len(along) != 1 or cos.size != max_positions * cos.shape[-1]:
        raise Reject(f"cos computed for {max_positions} positions has shape {cos.shape}, not one row per position")
    flat = (max_positions, cos.shape[-1])
    return _Tables(positions, cos.reshape(flat), sin.reshape(flat), cos.ndim, along[0], ())


def _lookups(cut: Cut) -> list[tuple[Tensor, int]]:
    """(table, axis) of each Gather by the positions from a table that does not depend on them."""
    return [(node.inputs[0], node.attrs.get("batch_dims" if node.op == "GatherND" else "axis", 0))
            for node in cut.nodes if node.op in ("Gather", "GatherND", "GatherElements")
            and not cut.depends_on_roles[id(node.inputs[0])] and cut.depends_on_roles[id(node.inputs[1])]]


def _max_positions(asked: int | None, bound: int | None) -> int:
    """How many positions the caches hold: `asked` (Options.max_positions, --max-positions), which
    may not exceed a table the graph gathers from; else that table's rows. Tables computed from
    the positions with nothing bounding them are not guessed at: the RoPE is not fused."""
    if asked is None:
        if bound is None:
            raise Reject("max_positions is unknown: cos/sin are computed from the positions, no "
                         "table bounds them; set it (--max-positions N)")
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
    if len(found) != 1:
        names = ", ".join(f"'{t.name}'" for t in found) or "none"
        raise Reject(f"cos/sin must be functions of one integer position tensor; found {names}")
    return found[0]


# --- numerical verification ------------------------------------------------------------------

# bfloat16 subgraphs are verified widened to float32 (verify.session), with float32's tolerance.
_TOLERANCE = {onnx.TensorProto.FLOAT: 1e-4, onnx.TensorProto.FLOAT16: 1e-2, onnx.TensorProto.DOUBLE: 1e-8,
              onnx.TensorProto.BFLOAT16: 1e-4}
_BATCH, _SEQ_LENGTHS, _HEADS = 2, (1, 5), 3


def verify_rope(graph: Graph, m: Match, spec: RotarySpec, target) -> None:
    """Run the matched subgraph and what the target emits for `spec` on the same random x and
    positions (including 0 and max_positions - 1); once per distinct subgraph and x shape."""
    rotated = next(t for t in m["rotated_sin"].inputs if t is not m["sin"])
    channels = next(t for t in m["x_cos"].inputs if t is not m["cos"])
    watched = [spec.output, rotated] + ([channels, m["partial"].inputs[1]] if "partial" in m.captures else [])
    cut = Cut(graph, watched, {id(spec.input): "x", id(spec.positions): "positions"},
              opaque=lambda node: _bounds_table(graph, node), what="the rotation subgraph")
    static = tuple(d if isinstance(d, int) else None for d in graph.shape(spec.input))
    key = ("verified", cut.signature, static, spec.cache_key, spec.interleaved, target.name)
    once(graph, ("rope check", key), lambda: _compare(graph, cut, spec, target))


def _compare(graph: Graph, cut: Cut, spec: RotarySpec, target) -> None:
    x, positions = spec.input, spec.positions
    original = cut.session([x, positions] + cut.shape_leaves)
    replacement = session(emitted(graph, spec, target, [x, positions], [spec.output]), graph.base_dir,
                          f"what target {target.name} emits")
    rng = np.random.default_rng(0)
    tolerance = _TOLERANCE[spec.dtype]
    for seq in _SEQ_LENGTHS:
        dims, sizes = _x_dims(graph, spec, seq)
        feeds = {x.name: rng.standard_normal(dims).astype(np_dtype(x)),
                 positions.name: _random_positions(rng, graph, positions, dims[0], seq, spec.max_positions)}
        for leaf in cut.shape_leaves:
            feeds[leaf.name] = np.zeros(_dims(graph.shape(leaf), sizes, seq), np_dtype(leaf))
        y, rotated, *parts = run(original, feeds)
        head = feeds[x.name].astype(np.float64)
        if parts and not (np.array_equal(parts[0], head[..., :spec.rotary_dim])
                          and np.array_equal(parts[1], head[..., spec.rotary_dim:])):
            raise Reject(f"the rotated and passed parts are not x[..., :{spec.rotary_dim}] and "
                         f"x[..., {spec.rotary_dim}:]")
        _require_rotate(rotated, head[..., :spec.rotary_dim], spec.interleaved, tolerance)
        expected = run(replacement, feeds)[0]
        if not np.allclose(y, expected, rtol=tolerance, atol=tolerance):
            error = float(np.max(np.abs(y.astype(np.float64) - expected)))
            raise Reject(f"what target {target.name} emits differs from the matched subgraph by "
                         f"{error:.3g} (sequence length {seq})")


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
    )
]
