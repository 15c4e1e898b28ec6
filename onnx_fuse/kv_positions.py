"""Where a decode model's positions go, found by evaluation, for `--kv-cache static`.

A decode step's positions are past_length + arange(S): the graph computes them from the past's
shape (TorchScript, dynamo) or the mask's length (Hugging Face's sliding-window cache). Over a
fixed cache they must be write_position[b] + t instead, per row. Every integer tensor of the fused
model that evaluates to past + arange(S) at two sizes (S = 1 and 3, key lengths reaching N - 1)
is a position tensor; tensors computed from the values of an input that passes through (a
position_ids input) keep that input's meaning and are not. Each reader of a position tensor that
does not itself compute one is a `Use` to re-point, whatever it is: RotaryEmbedding's position
input, a position-embedding Gather, the cos/sin computation of RoPE left in the graph, a Slice.

Reductions over the batch axis (ReduceMax / ReduceMin over every axis: LongRoPE's switch on the
longest position) are taken per row instead: the original computes them for one past length
shared by the batch, so each row of the converted model gets the value its own positions give,
shaped [B, 1, ..., 1] to the rank of the tensor where the result meets the positions again
(LongRoPE: the per-row frequencies times the row's positions). The multi-step check proves the
result with rows of different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from .check import ModelRef, run_session, runnable_as_float32, session_for
from .errors import BadInput
from .kv_layout import Layout
from .widen import has_bfloat16

_REDUCTIONS = ("ReduceMax", "ReduceMin")
_INTEGERS = {TensorProto.INT64, TensorProto.INT32}


@dataclass(frozen=True)
class Use:
    """One input of one node that reads positions."""

    node: str
    index: int
    kind: str  # "value": reads them as they are; "reduction": a reduction over the batch axis
    rank: int | None  # of the position tensor read
    meets_rank: int | None = None  # reductions: the rank their result meets the positions in


@dataclass
class Positions:
    uses: list[Use] = field(default_factory=list)
    tables: dict[str, int] = field(default_factory=dict)  # position-embedding table -> rows


def find_positions(model: onnx.ModelProto, layout: Layout, cache_len: int,
                   base_dir: str | None) -> Positions:
    """The position readers of the fused `model` (see the module docstring)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = {v.name: v.type.tensor_type for v in
              [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    constants = {t.name: list(t.dims) for t in model.graph.initializer}
    constants.update({n.output[0]: None for n in model.graph.node if n.op_type == "Constant"})
    kept = _from_passed_through(model, layout)
    candidates = [name for n in model.graph.node for name in n.output
                  if name in values and values[name].elem_type in _INTEGERS
                  and name not in constants and name not in kept]
    runs = _evaluate(model, layout, cache_len, base_dir, candidates)
    valued = {name for name in candidates
              if all(_is_positions(out.get(name), seq, past) for seq, past, out in runs)}
    return _uses(model, valued, values, constants, cache_len)


def _from_passed_through(model: onnx.ModelProto, layout: Layout) -> set[str]:
    """Tensors computed from the values (not only the shapes) of the inputs that pass through."""
    derived = set(layout.others)
    for n in model.graph.node:
        if n.op_type not in ("Shape", "Size") and any(i in derived for i in n.input):
            derived.update(n.output)
    return derived


def _uses(model: onnx.ModelProto, valued: set[str], values: dict, constants: dict,
          cache_len: int) -> Positions:
    found, consumers, reductions = Positions(), _consumers(model), []
    for name in sorted(valued):
        rank = _rank(values.get(name))
        for user, index in consumers.get(name, []):
            if user.op_type in ("Shape", "Size") or (user.output and all(o in valued for o in user.output)):
                continue  # shape only, or computes positions itself: its readers are the uses
            if user.op_type == "Gather" and index == 1 and user.input[0] in constants:
                rows = constants[user.input[0]]
                if rows is not None:
                    found.tables[user.input[0]] = rows[0]
            if user.op_type in _REDUCTIONS and _reduces_batch(user, model, rank):
                reductions.append((user, index, rank))
            else:
                found.uses.append(Use(user.name, index, "value", rank))
    if reductions:  # what the positions compute other than through these reductions
        cone = _descendants(list(valued), consumers, stop={user.name for user, _, _ in reductions})
        found.uses += [Use(user.name, index, "reduction", rank, _meeting_rank(user, cone, consumers, values))
                       for user, index, rank in reductions]
    for table, rows in found.tables.items():
        if cache_len > rows:
            raise BadInput(f"--max-cache-len {cache_len} exceeds the {rows} positions of the model's "
                           f"position table '{table}'")
    return found


def _reduces_batch(node: onnx.NodeProto, model: onnx.ModelProto, rank: int | None) -> bool:
    """Whether a reduction covers axis 0 of its input (every axis, when none are given)."""
    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = _constant_ints(model, node.input[1])
    if not axes:
        return True
    return rank is None or 0 in [a % rank for a in axes]


def _meeting_rank(reduction: onnx.NodeProto, cone: set[str], consumers: dict,
                  values: dict) -> int | None:
    """The rank of the first tensor of `cone` (computed from the positions, not through a
    reduction) that a descendant of the reduction's result is combined with; None if none is."""
    frontier, seen = list(reduction.output), set()
    while frontier:
        name = frontier.pop(0)
        for user, _ in consumers.get(name, []):
            if user.name in seen:
                continue
            seen.add(user.name)
            met = [i for i in user.input if i in cone]
            if met:
                return _rank(values.get(met[0]))
            frontier.extend(user.output)
    return None


def _descendants(names: list[str], consumers: dict, stop: set[str]) -> set[str]:
    """What `names` compute by value, not through the nodes named in `stop`."""
    found, pending = set(names), list(names)
    while pending:
        for user, _ in consumers.get(pending.pop(), []):
            if user.name in stop or user.op_type in ("Shape", "Size"):
                continue
            fresh = [o for o in user.output if o not in found]
            found.update(fresh)
            pending.extend(fresh)
    return found


def _consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    return consumers


def _rank(tensor_type) -> int | None:
    if tensor_type is None or not tensor_type.HasField("shape"):
        return None
    return len(tensor_type.shape.dim)


def _constant_ints(model: onnx.ModelProto, name: str) -> list[int] | None:
    for t in model.graph.initializer:
        if t.name == name:
            return [int(v) for v in onnx.numpy_helper.to_array(t).reshape(-1)]
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute[0].name == "value":
            return [int(v) for v in onnx.numpy_helper.to_array(n.attribute[0].t).reshape(-1)]
    return None


# --------------------------------------------------------------------------- evaluation


def _evaluate(model: onnx.ModelProto, layout: Layout, cache_len: int, base_dir: str | None,
              candidates: list[str]):
    """The candidates' values at the two probe sizes: [(seq, past, {name: value})]."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(candidates):
        if name not in existing:
            probe.graph.output.add().name = name
    ref = runnable_as_float32(ModelRef(probe, base_dir))
    widen = has_bfloat16(model)
    try:
        session = session_for(ref)  # once for both probe sizes
    except Exception as exc:  # onnxruntime raises many unrelated exception types
        raise BadInput(f"the fused model does not run: {' '.join(str(exc).split())[:200]}") from None
    runs, rng = [], np.random.default_rng(1)
    for seq, past in [(1, cache_len - 1), (3, max(1, cache_len - 4))]:
        feeds = probe_inputs(layout, 2, seq, past, rng, widen)
        try:
            runs.append((seq, past, run_session(session, feeds)))
        except Exception as exc:  # onnxruntime raises many unrelated exception types
            error = " ".join(str(exc).split())[:200]
            try:  # does it run with a short past? Then the cache is longer than the model allows
                run_session(session, probe_inputs(layout, 2, 1, 2, rng, widen))
            except Exception:
                raise BadInput(f"the fused model does not run: {error}") from None
            raise BadInput(f"--max-cache-len {cache_len} is more than the model supports: it does "
                           f"not run with {past + seq} positions ({error})") from None
    return runs


def probe_inputs(layout: Layout, batch: int, seq: int, past: int, rng, widen: bool = False) -> dict:
    """Inputs of the original interface at one size: a left-padded second row (2 slots) when the
    past allows; windowed caches hold their last `keep` tokens; passed-through inputs as the
    multi-step check feeds them (other_inputs)."""
    feeds = {layout.ids: rng.integers(0, layout.vocab, (batch, seq)).astype(layout.dtypes[layout.ids])}
    if layout.mask is not None:
        am = np.ones((batch, past + seq), dtype=np.int64)
        am[1, :min(2, past - 1) if past > 1 else 0] = 0
        feeds[layout.mask] = am.astype(layout.dtypes[layout.mask])
    for cache in layout.caches:
        held = past if cache.keep is None else min(past, cache.keep)
        feeds[cache.past] = rng.standard_normal((batch, cache.heads, held, cache.head_size)).astype(feed_dtype(layout.dtypes[cache.past], widen))
    starts = np.full(batch, past)
    feeds.update(other_inputs(layout, starts, seq, np.random.default_rng(2), widen))
    return feeds


def other_inputs(layout: Layout, starts: np.ndarray, seq: int, rng, widen: bool = False) -> dict:
    """The passed-through inputs for rows whose new tokens start at `starts` (their positions):
    positions start + arange(seq); hidden states random; other 0/1 masks with row 1 padded by
    one; other values 0. The same rng state gives the same values (fixed over the steps)."""
    batch, feeds = len(starts), {}
    for other in layout.others.values():
        shape = [_size(d, layout, batch, seq) for d in other.dims]
        dtype = feed_dtype(other.dtype, widen)
        if other.role == "positions":
            value = np.asarray(starts)[:, None] + np.arange(seq)[None, :]
            value = value[:1].reshape(shape) if len(shape) != 2 or shape[0] != batch else value
        elif other.role == "float":
            value = rng.standard_normal(shape)
        elif other.role == "mask":
            value = np.ones(shape)
            if batch > 1 and len(shape) == 2 and shape[1] > 1:
                value[1, 0] = 0
        else:
            value = np.zeros(shape)
        feeds[other.name] = np.asarray(value).astype(dtype)
    return feeds


def feed_dtype(dtype: np.dtype, widen: bool) -> np.dtype:
    """The type an input is fed in: bfloat16 as float32 when the models run widened."""
    return np.dtype(np.float32) if widen and str(dtype) == "bfloat16" else dtype


_OTHER_LENGTH = 5  # the size of a symbolic dim of a passed-through input (an encoder's length)


def _size(dim, layout: Layout, batch: int, seq: int) -> int:
    if isinstance(dim, int):
        return dim
    if dim == layout.batch_dim:
        return batch
    if dim == layout.seq_dim:
        return seq
    return _OTHER_LENGTH


def _is_positions(value, seq: int, past: int) -> bool:
    if value is None:
        return False
    value = np.asarray(value)
    if value.ndim not in (1, 2) or value.shape[-1] != seq or not np.issubdtype(value.dtype, np.integer):
        return False
    return bool(np.all(value.reshape(-1, seq) == np.arange(past, past + seq)))
