"""What an attention mask computes, found by evaluating it: mask classification by proof.

A mask is whatever the attention scores are masked with: an additive float tensor (0 where a key
is visible, a large negative number or -inf where it is hidden) or a boolean tensor (True =
visible, or True = hidden for `drop` masks), broadcastable to [batch, heads, query, key].
`classify_mask` says which of a few exact families it belongs to, so that a target may emit
`is_causal`, a key padding mask, or keep the mask tensor as it is.

Names and op patterns decide nothing. The subgraph that computes the mask is cut out of the model
(its ancestors only, as a small program: see mask_program; the whole model never runs and heavy
weights are never loaded) and run in onnxruntime at several sizes (see BASE_SIZES: query length 1
and more, an empty and a non-empty KV cache when the model has one, batch 1 and more, and a 0/1
padding mask whose rows are padded differently). A class is reported only if its template
reproduces the evaluated mask exactly, every element, at every size.

This module holds the public API, the size driver (which graph input dims are the batch, query,
past and total lengths, the sizes evaluated and the feeds at each) and the template matching.

Classes (``MaskClass.kind``), with i the query row, j the key column, Sq/Skv their lengths and
c = i + offset the query's aligned position (offset Skv - Sq for "lower_right", 0 for
"upper_left"):

- ``none``: every key visible.
- ``padding``: key j visible from every query of batch row b iff attention_mask[b, j] == 1.
- ``causal_upper_left`` / ``causal_lower_right``: j <= c.
- ``causal_padding``: j <= c and attention_mask[b, j] == 1 (``alignment`` says which c).
- ``sliding_window``: c - window < j <= c (and the padding condition if ``padding``).
- ``arbitrary``: none of these; ``reason`` says why.

Upper-left and lower-right alignment coincide when the key length always equals the query length
(a model without a KV cache input): the class is then reported as upper-left, and is exact for
every size such a model runs at. (ONNX Attention's ``is_causal`` aligns to the cache it is given:
j <= i + past_sequence_length of its past_key input, so upper-left when K/V are passed whole
without past_key, lower-right relative to the total length when the cache is passed as past_key.)

Rows that hide every key (a left-padded query under causal + padding) are compared like any
other row: the template must hide them too; ``empty_rows`` says that such rows occur, because what
attention computes for them depends on the fill value (-inf gives NaN, a finite minimum a uniform
average), which the class does not describe.

Soundness limits, by construction: a property is checked at the sizes evaluated, not for all
sizes. A sliding window wider than every evaluated key length would look like plain causal, so the
driver adds a probe size longer than every integer constant of the mask subgraph (a window width
is such a constant) when that size is affordable. A mask computed from a constant of a fixed size
(a baked triangle [S, S]) is classified on its value: its shape pins the sizes the model can run
at, so the class holds at all of them.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from .errors import first_line
from .dims import dim_symbols, eval_dim
from .graph import Graph, Tensor, onnx_dtype
from .specs import HIDDEN_AT_OR_BELOW, MaskClass
from .mask_program import (Program, Unsupported, extract, input_dims, input_named, input_symbols,
                           resolvable, session_of, shape_feed_values)

# Largest mask (elements) the long probe may materialize.
PROBE_LIMIT = 1 << 25
# The image side given to symbolic image dims (as onnx_fuse.check does).
_IMAGE_SIDE = 224

# (batch, query length, past length) of the sizes every mask is evaluated at. Past lengths fall to
# 0 for models without a KV cache; fixed dims keep their value; duplicates are dropped. The key
# length is past + query. A 2-D padding input gets, per row: none, left padding of 1, left padding
# of about half, holes (every other key) (batch 1: left padding of 2).
BASE_SIZES = ((3, 5, 0), (3, 1, 6), (4, 4, 3), (2, 1, 0), (1, 6, 2))


def _arbitrary(reason: str) -> MaskClass:
    return MaskClass("arbitrary", reason=reason)


# --------------------------------------------------------------------------- public API

_CLASS_CACHE: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()


def classify_mask(graph: Graph, mask: Tensor, *, query_len=None, key_len=None, model=None,
                  drop: bool = False) -> MaskClass:
    """Classify `mask` (see MaskClass) by evaluating its subgraph at several sizes.

    query_len / key_len: optional, each a tensor laid out [..., length, head] (the attention's Q,
    and K or V) whose dim -2 is that length, or the dim itself (int or symbol). When given, the
    mask's query/key dims must equal them at every size where both are known.
    model: the ModelProto the graph was imported from, if at hand (its IR version is reused).
    drop: the boolean mask is True where a key is hidden (Where(mask, fill, scores)).

    Cached per mask tensor, and across mask tensors whose subgraphs are identical (a mask each
    layer recomputes from the same inputs costs one evaluation).
    """
    caches = _CLASS_CACHE.setdefault(graph, ({}, {}))
    by_tensor, by_program = caches
    key = (id(mask), _dim_key(graph, query_len), _dim_key(graph, key_len), drop)
    hit = by_tensor.get(key)
    if hit is not None and hit[0] is mask:
        return hit[1]
    program = extract(graph, mask, model)
    if program.problem is not None:
        result = _arbitrary(program.problem)
    else:
        fingerprint = (program.fingerprint, *key[1:])
        result = by_program.get(fingerprint)
        if result is None:
            result = _classify(graph, program, query_len, key_len, drop)
            program.session = None  # the session is not needed again: free it
            by_program[fingerprint] = result
    by_tensor[key] = (mask, result)
    return result


def classify_mask_spec(graph: Graph, spec, *, query_len=None, key_len=None, model=None) -> MaskClass:
    """classify_mask for a specs.MaskSpec ("additive", "keep" or "drop")."""
    return classify_mask(graph, spec.tensor, query_len=query_len, key_len=key_len, model=model,
                         drop=spec.kind == "drop")


def mask_identity(graph: Graph, mask: Tensor) -> str | None:
    """A key equal for masks that compute the same values from the same graph inputs (each
    layer of a TorchScript SDPA export recomputes one), None if the mask cannot be extracted."""
    program = extract(graph, mask, None)
    return program.fingerprint if program.problem is None else None


def mask_dependencies(graph: Graph, mask: Tensor) -> list[Tensor]:
    """The graph inputs the mask depends on, by value or by shape (directly, through Shape of an
    intermediate, or through the symbolic dims of one), in graph input order."""
    program = extract(graph, mask, None)
    names = set(program.value_inputs) | set(program.shape_inputs)
    return [t for t in graph.gs.inputs if t.name in names]


def mask_value_inputs(graph: Graph, mask: Tensor) -> list[Tensor]:
    """The graph inputs whose values (not only shapes) flow into the mask."""
    names = set(extract(graph, mask, None).value_inputs)
    return [t for t in graph.gs.inputs if t.name in names]


def evaluate_mask(graph: Graph, mask: Tensor, batch: int, query: int, past: int = 0):
    """The mask's values at one size, as classify_mask evaluates them: (feeds, values), where
    feeds are the graph inputs the mask program was given (padding rows as documented, zeros
    elsewhere) and values the raw mask. Raises ValueError when the mask cannot be evaluated."""
    program = extract(graph, mask, None)
    if program.problem is not None:
        raise ValueError(program.problem)
    roles = _roles(graph, program)
    errors = []
    for values in _assignments(roles, (batch, query, past)):
        try:
            feeds, _ = _feeds(program, roles, values)
            (out,) = session_of(program).run(None, feeds)
        except Exception as e:  # onnxruntime raises many types
            errors.append(e)
            continue
        names = {t.name for t in program.inputs}
        return {k: v for k, v in feeds.items() if k in names}, np.asarray(out)
    raise ValueError(f"the mask does not evaluate at batch {batch}, query {query}, past {past}: "
                     f"{first_line(errors[0]) if errors else 'no size assignment'}")


def padding_input(graph: Graph, mask: Tensor) -> Tensor | None:
    """The 2-D [batch, keys] graph input whose values the mask reads (the padding mask), if the
    mask reads the values of exactly one input and it is such a 2-D input, not token ids (the
    indices of a Gather from a constant table); else None. Whether
    the mask uses it as a 0/1 padding mask is what classify_mask proves (MaskClass.padding)."""
    program = extract(graph, mask, None)
    return None if program.problem is not None else _roles(graph, program).padding


def depends_on_padding(graph: Graph, mask: Tensor) -> bool:
    """True if the mask subgraph reads the values of a 2-D padding-mask input."""
    return padding_input(graph, mask) is not None


def visibility(values: np.ndarray, drop: bool = False) -> np.ndarray:
    """A mask's values as "key visible" booleans (additive: 0 visible, <= HIDDEN_AT_OR_BELOW
    hidden; boolean: True visible, or hidden for `drop`). Raises ValueError for values that are
    not a mask (a bias, NaN, integers)."""
    visible = _visible(np.asarray(values), drop)
    if isinstance(visible, str):
        raise ValueError(visible)
    return visible


def template(cls: MaskClass, query: int, key: int, padding: np.ndarray | None = None) -> np.ndarray:
    """The visibility a class promises: a boolean [B|1, 1, query, key] array (B from the 0/1
    `padding` rows [B, key], required when cls.padding)."""
    if cls.kind == "arbitrary":
        raise ValueError("an arbitrary mask promises nothing")
    i, j = np.arange(query)[:, None], np.arange(key)[None, :]
    keep = np.ones((query, key), dtype=bool)
    if cls.alignment is not None:
        c = i + (key - query if cls.alignment == "lower_right" else 0)
        keep = j <= c
        if cls.window is not None:
            keep &= j > c - cls.window
    keep = keep[None, None]
    if cls.padding:
        if padding is None:
            raise ValueError("the class depends on the padding mask: pass its rows")
        keep = keep & (np.asarray(padding) == 1)[:, None, None, :]
    return keep


# --------------------------------------------------------------------------- driving sizes


@dataclass
class _Roles:
    """What the graph input dims stand for, as the size driver gives them sizes."""

    batch: str | int | None = None
    seq: str | int | None = None
    past: str | None = None
    static_past: int | None = None  # a cache whose past length is fixed (HF's sliding-window cache)
    batches: set = field(default_factory=set)  # axis 0 of every input of rank 2 and more
    pasts: set = field(default_factory=set)  # the past axis of every cache
    fixed: dict = field(default_factory=dict)  # symbol -> size (images)
    padding: Tensor | None = None
    total: list = field(default_factory=list)  # symbols meaning past + seq
    free: list = field(default_factory=list)  # other symbols: (symbol, prefers total)
    # the graph's own relations between input dims (dim_relations), and each input dim's symbol
    facts: object = None
    symbol_of: dict = field(default_factory=dict)  # (input name, axis) -> symbol


def _simple(d) -> bool:
    return isinstance(d, str) and dim_symbols(d) == (d,)


_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_INDEX_PASSTHROUGH = {"Cast", "Unsqueeze", "Reshape", "Flatten", "Squeeze", "Identity"}
_TABLE_PASSTHROUGH = {"Cast", "Identity", "DequantizeLinear"}


def _indexes_a_table(tensor: Tensor) -> bool:
    """The input is (through shape-only ops) the indices of a Gather from a constant table:
    token ids, whose values are not 0/1 flags (as onnx_fuse.check tells ids from masks)."""
    pending, seen = [tensor], set()
    while pending:
        t = pending.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        for user in t.outputs:
            if user.op in _INDEX_PASSTHROUGH and user.inputs and user.inputs[0] is t:
                pending.extend(user.outputs[:1])
            elif user.op == "Gather" and len(user.inputs) > 1 and user.inputs[1] is t:
                table = user.inputs[0]
                while not isinstance(table, gs.Constant) and table.inputs and \
                        table.inputs[0].op in _TABLE_PASSTHROUGH:
                    table = table.inputs[0].inputs[0]
                if isinstance(table, gs.Constant):
                    return True
    return False


def _roles(graph: Graph, program: Program) -> _Roles:
    """Tell the batch, query, past and total-length symbols (and the padding input) apart."""
    roles = _Roles()
    inputs = list(graph.gs.inputs)
    padding = None
    if len(program.value_inputs) == 1:
        t = input_named(graph, program.value_inputs[0])
        if len(input_dims(t)) == 2 and not _indexes_a_table(t):
            padding = t
    roles.padding = padding
    for t in inputs:
        dims = input_dims(t)
        if len(dims) >= 2 and roles.batch is None and (_simple(dims[0]) or isinstance(dims[0], int)):
            roles.batch = dims[0]
        if len(dims) >= 2 and _simple(dims[0]):  # however each input names it (transformers' exporter)
            roles.batches.add(dims[0])
        is_float = onnx_dtype(t) in _FLOAT_TYPES
        if len(dims) == 4 and is_float:
            if isinstance(dims[1], int) and isinstance(dims[3], int) and _simple(dims[2]):
                roles.past = roles.past or dims[2]
                roles.pasts.add(dims[2])
            elif all(isinstance(d, int) for d in dims[1:]) and _concatenated(t):
                roles.static_past = dims[2]
            elif isinstance(dims[1], int) and _simple(dims[2]) and _simple(dims[3]):
                roles.fixed[dims[2]] = roles.fixed[dims[3]] = _IMAGE_SIDE
    # The query length: dim 1 of a 2-D or 3-D input that is not the padding mask.
    for t in inputs:
        dims = input_dims(t)
        if t is padding or len(dims) not in (2, 3):
            continue
        if (_simple(dims[1]) or isinstance(dims[1], int)) and dims[1] != roles.past:
            roles.seq = dims[1]
            break
    if padding is not None:
        width = input_dims(padding)[1]
        if roles.seq is None:
            roles.seq = width
        elif _simple(width) and width != roles.seq:
            roles.total.append(width)
    known = {roles.batch, roles.seq, roles.past, *roles.fixed, *roles.total, *roles.batches,
             *roles.pasts}
    roles.facts = _relations(graph)
    roles.symbol_of = {(t.name, axis): d for t in inputs for axis, d in enumerate(input_dims(t))
                       if _simple(d)}
    # Other symbols: a mask-like width (dim 1 of a 2-D input that is not token ids) is most
    # likely past + query; any other gets a size of its own first.
    widths = {input_dims(t)[1] for t in inputs
              if len(input_dims(t)) == 2 and not _indexes_a_table(t)}
    for t in inputs:
        for d in input_dims(t):
            if isinstance(d, str):
                for s in dim_symbols(d):
                    if s not in known and s not in [f for f, _ in roles.free]:
                        roles.free.append((s, d in widths or
                                           padding is not None and d in input_dims(padding)))
    return roles


def _concatenated(t: Tensor) -> bool:
    """A graph input some Concat reads (a cache that grows by Concat(past, new))."""
    return any(user.op == "Concat" for user in t.outputs)


def _sizes(roles: _Roles) -> list[tuple[int, int, int]]:
    """The base (batch, query, past) sizes (BASE_SIZES) as the roles allow them."""
    def pick(value, wanted):
        return value if isinstance(value, int) else wanted

    sizes = []
    for b, s, p in BASE_SIZES:
        s = pick(roles.seq, s) if roles.seq is not None else 1  # no length to vary
        p = roles.static_past if roles.static_past is not None else p if roles.past is not None else 0
        size = (pick(roles.batch, b), s, p)
        if size not in sizes:
            sizes.append(size)
    return sizes


def _probe(roles: _Roles, program: Program, sizes) -> tuple[int, int, int] | None:
    """One size longer than every integer constant of the mask subgraph (a window width would be
    one), when the roles let the length vary and the mask stays affordable."""
    longest = max(p + s for _, s, p in sizes)
    if not program.int_constants:
        return None
    need = max(program.int_constants) + 2
    if need <= longest:
        return None
    b = roles.batch if isinstance(roles.batch, int) else 1
    if roles.past is not None:
        s = roles.seq if isinstance(roles.seq, int) else 1
        size = (b, s, need)
        return size if b * s * (need + s) <= PROBE_LIMIT else None
    if isinstance(roles.seq, str):
        size = (b, need, 0)
        return size if b * need * need <= PROBE_LIMIT else None
    return None


def _assignments(roles: _Roles, size: tuple[int, int, int]):
    """Values of the input dims' symbols for one (batch, query, past) size: a few candidates,
    one per choice of size for the symbols whose role is unknown."""
    b, s, p = size
    values = dict(roles.fixed)
    values.update({sym: b for sym in roles.batches})  # a symbolic batch is among them
    if isinstance(roles.seq, str):
        values[roles.seq] = s
    if roles.past is not None:
        values.update({sym: p for sym in roles.pasts})
    for sym in roles.total:
        values[sym] = p + s
    values.update(_solved(roles, values))
    free = [(sym, total) for sym, total in roles.free if sym not in values]
    # A size of its own, so that a mix-up of two lengths shows (1 where the query is 1, so that
    # another sequence, e.g. a decoder's, is also evaluated at length 1).
    own = 1 if s == 1 else p + s + 3
    options = [([p + s, s, own] if total else [own, s, p + s]) for _, total in free]
    options = [list(dict.fromkeys(o)) for o in options]
    for combo in itertools.islice(itertools.product(*options), 8):
        yield {**values, **{sym: v for (sym, _), v in zip(free, combo)}}


_RELATIONS: "weakref.WeakKeyDictionary[Graph, object]" = weakref.WeakKeyDictionary()


def _relations(graph: Graph):
    """The graph's relations between its input dims (dim_relations), once per graph; None when
    they cannot be found."""
    if graph not in _RELATIONS:
        from .dim_relations import find_relations

        try:
            _RELATIONS[graph] = find_relations(graph.proto)
        except Exception:  # best effort: the roles alone still size the inputs
            _RELATIONS[graph] = None
    return _RELATIONS[graph]


def _solved(roles: _Roles, values: dict[str, int]) -> dict[str, int]:
    """Sizes of symbols the graph's equations give once the roles' are known (an export that
    names one dim differently in each input: transformers' own exporter)."""
    if roles.facts is None:
        return {}
    known = {slot: values[sym] for slot, sym in roles.symbol_of.items() if sym in values}
    found: dict[str, int] = {}
    for slot, size in roles.facts.solve(known).items():
        sym = roles.symbol_of.get(slot)
        if sym is not None and sym not in values and found.setdefault(sym, size) != size:
            found[sym] = None  # two sizes for one symbol: left to the candidates
    return {sym: size for sym, size in found.items() if size is not None}


def _padding_rows(batch: int, width: int) -> np.ndarray:
    """Row 0 unpadded, then left padding of 1 and of about half, then a row with holes; batch 1
    gets left padding of 2."""
    mask = np.ones((batch, width), dtype=np.int64)
    for r in range(batch):
        if batch == 1:
            mask[r, : min(2, width - 1)] = 0
        elif r % 4 == 1:
            mask[r, : min(1, width - 1)] = 0
        elif r % 4 == 2:
            mask[r, : min(max(2, width // 2), width - 1)] = 0
        elif r % 4 == 3:
            mask[r, 1 : width - 1 : 2] = 0
    return mask


def _feeds(program: Program, roles: _Roles, values: dict[str, int], pad: bool = True):
    """Inputs of the program at one size assignment. pad=False: the padding input all ones (the
    long probe looks for a window, which left padding could hide)."""
    feeds, padding = {}, None
    for t in program.inputs:
        shape = [d if isinstance(d, int) else eval_dim(d, values) for d in input_dims(t)]
        dtype = _np_dtype(onnx_dtype(t))
        if roles.padding is not None and t is roles.padding:
            padding = _padding_rows(shape[0], shape[1]) if pad else np.ones(shape, dtype=np.int64)
            feeds[t.name] = padding.astype(dtype)
        else:
            feeds[t.name] = np.zeros(shape, dtype=dtype)
    feeds.update(shape_feed_values(program, values))
    return feeds, padding


def _np_dtype(onnx_type: int):
    if onnx_type == TensorProto.BFLOAT16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return helper.tensor_dtype_to_np_dtype(onnx_type)


# --------------------------------------------------------------------------- classifying


@dataclass
class _Evaluation:
    size: tuple[int, int, int]  # (batch, query, past) driven
    visible: np.ndarray  # [B|1, N|1, Sq, Skv] boolean
    padding: np.ndarray | None  # [B, T] 0/1 as fed
    minus_inf: bool  # every hidden entry is an additive -inf


def _dim_key(graph: Graph, spec):
    """The length a query/key spec stands for, as far as classification can check it: a dim
    no graph input's symbols express (shape inference's own unknowns) checks nothing, so all
    such dims share one cache entry."""
    if spec is not None and not isinstance(spec, (int, str)):
        shape = graph.shape(spec)
        spec = None if not shape else shape[-2]
    if isinstance(spec, str) and not resolvable([spec], input_symbols(graph)):
        return None
    return spec


def _visible(values: np.ndarray, drop: bool) -> np.ndarray | str:
    """The boolean "key visible" array, or why the values are not a mask."""
    if values.dtype == np.bool_:
        return ~values if drop else values
    if values.dtype.kind != "f" and str(values.dtype) != "bfloat16":
        return f"the mask has element type {values.dtype}, neither float (additive) nor bool"
    if drop:
        return "a 'drop' mask must be boolean"
    v = values.astype(np.float64)
    if np.isnan(v).any():
        return "the additive mask holds NaN"
    visible = v == 0
    hidden = v <= HIDDEN_AT_OR_BELOW
    if not np.all(visible | hidden):
        bad = v[~(visible | hidden)].reshape(-1)[0]
        return (f"the additive mask holds {bad:g}, neither 0 nor a large negative value "
                f"(a bias, not a mask)")
    return visible


def _classify(graph: Graph, program: Program, query_len, key_len, drop: bool) -> MaskClass:
    roles = _roles(graph, program)
    value_inputs = program.value_inputs
    if value_inputs and roles.padding is None:
        names = ", ".join(f"'{n}'" for n in value_inputs)
        return _arbitrary(f"the mask reads the values of {names}, not of one 2-D padding mask")
    constant = not program.inputs and not program.shape_feeds
    sizes = [(0, 0, 0)] if constant else _sizes(roles)
    probe = None if constant else _probe(roles, program, sizes)
    evaluations, notes = [], []
    for size in sizes:
        result = _evaluate(graph, program, roles, size, drop, query_len, key_len, strict=True)
        if isinstance(result, str):  # every base size must evaluate, or nothing is proven
            return _arbitrary(result)
        evaluations.append(result)
    if probe is not None:
        result = _evaluate(graph, program, roles, probe, drop, query_len, key_len, strict=False)
        if isinstance(result, _Evaluation):
            evaluations.append(result)
        else:
            notes.append(f"the long probe (batch {probe[0]}, query {probe[1]}, past {probe[2]}) "
                         f"did not evaluate{': ' + result if result else ''}")
    elif program.int_constants and not constant and \
            max(program.int_constants) + 2 > max(p + s for _, s, p in sizes):
        notes.append(f"no long probe: a window as wide as the subgraph's largest integer constant "
                     f"({max(program.int_constants)}) would not show at the sizes evaluated")
    return _match(evaluations, roles, notes)


def _evaluate(graph, program, roles, size, drop, query_len, key_len, strict):
    """One evaluation, or why there is none (a string). A base size (strict) must evaluate to a
    mask of the sizes asked for; the probe (not strict) may fail, which leaves it out (None or a
    string: the mask cannot be computed that long, e.g. a baked buffer is shorter)."""
    try:
        session = session_of(program)
    except Unsupported as e:
        return str(e)
    error = None
    for values in _assignments(roles, size):
        try:
            feeds, padding = _feeds(program, roles, values, pad=strict)
            (out,) = session.run(None, feeds)
        except Unsupported as e:
            return str(e)
        except Exception as e:  # onnxruntime raises many types: try the next assignment
            error = e
            continue
        out = np.asarray(out)
        if out.ndim > 4:
            return f"the mask has rank {out.ndim}"
        out = out.reshape((1,) * (4 - out.ndim) + out.shape)
        visible = _visible(out, drop)
        if isinstance(visible, str):
            return visible
        _, s, p = size
        for what, spec, axis in (("query", query_len, 2), ("key", key_len, 3)):
            expected = _expected_dim(graph, spec, values)
            if expected is not None and out.shape[axis] not in (1, expected):
                return f"the mask's {what} dim is {out.shape[axis]} where the {what} length is {expected}"
        if not strict and roles.seq is not None:  # the probe must come out the size asked for
            if out.shape[2] not in (1, s) or out.shape[3] not in (1, p + s):
                return None
        if padding is not None and out.shape[0] not in (1, padding.shape[0]):
            return f"the mask's batch dim is {out.shape[0]}, the padding mask's {padding.shape[0]}"
        hidden = out[~visible] if out.dtype.kind == "f" else np.zeros(1)
        return _Evaluation(size, visible, padding, bool(np.all(np.isneginf(hidden))))
    return (f"the mask subgraph does not run at batch {size[0]}, query {size[1]}, past {size[2]}"
            + (f": {first_line(error)}" if error is not None else ""))


def _expected_dim(graph: Graph, spec, values: dict[str, int]) -> int | None:
    if spec is None:
        return None
    if isinstance(spec, int):
        return spec
    dim = spec if isinstance(spec, str) else None
    if dim is None:
        shape = graph.shape(spec)
        if not shape:
            return None
        dim = shape[-2]
    if isinstance(dim, int):
        return dim
    if not isinstance(dim, str):
        return None
    try:
        return eval_dim(dim, values)
    except Exception:  # a symbol the driver gave no size (e.g. unk__3): not checkable
        return None


def _match(evaluations: list[_Evaluation], roles: _Roles, notes: list[str]) -> MaskClass:
    """The first template that reproduces every evaluation."""
    pad_name = roles.padding.name if roles.padding is not None else None
    proven = tuple((e.visible.shape[0] if e.padding is None else e.padding.shape[0],
                    e.visible.shape[2], e.visible.shape[3]) for e in evaluations)
    note = "; ".join(["matched at (batch, query, key) sizes " + ", ".join(map(str, proven)), *notes])
    empty = any(bool((~e.visible).all(axis=-1).any()) for e in evaluations)

    def keys(e: _Evaluation) -> np.ndarray:
        """[B|1, 1, 1, Skv] padding visibility (all visible without a padding input)."""
        skv = e.visible.shape[3]
        if e.padding is None:
            return np.ones((1, 1, 1, skv), dtype=bool)
        if e.padding.shape[1] != skv:
            return None
        return (e.padding == 1)[:, None, None, :]

    minus_inf = all(e.minus_inf for e in evaluations)

    def make(kind, **kw):
        return MaskClass(kind, reason=note, empty_rows=empty, sizes=proven,
                         hides_with_minus_inf=minus_inf, **kw)

    if all(e.visible.all() for e in evaluations):
        return make("none")
    has_padding = roles.padding is not None and all(keys(e) is not None for e in evaluations)
    if has_padding and all(_equal(e.visible, keys(e)) for e in evaluations):
        return make("padding", padding=True, padding_input=pad_name)

    # Causal and sliding-window templates, both alignments, with and without padding.
    for use_padding in ([False, True] if has_padding else [False]):
        found = {}
        for alignment in ("upper_left", "lower_right"):
            window = _window(evaluations, alignment, use_padding, keys)
            if window is not None:
                found[alignment] = window
        if not found:
            continue
        # Both alignments fit only when no size had more keys than queries: report upper-left.
        alignment = "upper_left" if "upper_left" in found else "lower_right"
        lo, hi = found[alignment]
        pad = dict(padding=True, padding_input=pad_name) if use_padding else {}
        if hi is None:
            kind = "causal_padding" if use_padding else f"causal_{alignment}"
            return make(kind, alignment=alignment, **pad)
        if lo == hi:
            return make("sliding_window", alignment=alignment, window=lo, **pad)
        return _arbitrary(f"a sliding window whose width the sizes evaluated do not pin "
                          f"(between {lo} and {hi})")
    return _arbitrary(_closest(evaluations, keys))


def _equal(visible: np.ndarray, template: np.ndarray) -> bool:
    shape = np.broadcast_shapes(visible.shape, template.shape)
    return bool(np.array_equal(np.broadcast_to(visible, shape), np.broadcast_to(template, shape)))


def _window(evaluations, alignment: str, use_padding: bool, keys):
    """The window widths w (as an interval [lo, hi], hi None = unbounded, i.e. plain causal)
    for which "c - w < j <= c (and padding)" reproduces every evaluation; None if none does."""
    lo, hi = 1, None
    for e in evaluations:
        v = e.visible
        if v.size == 0:  # a size at which some length is 0: nothing to learn about the window
            continue
        sq, skv = v.shape[2], v.shape[3]
        offset = skv - sq if alignment == "lower_right" else 0
        i = np.arange(sq)[:, None]
        j = np.arange(skv)[None, :]
        causal = (j <= i + offset)[None, None]
        allowed = causal & (keys(e) if use_padding else True)  # [B?, 1, Sq, Skv]
        shape = np.broadcast_shapes(v.shape, allowed.shape)
        v, allowed = np.broadcast_to(v, shape), np.broadcast_to(allowed, shape)
        if np.any(v & ~allowed):
            return None
        # Within `allowed`, the visible keys must be the most recent ones. (argmax over booleans:
        # the probe's masks are large.)
        c = np.broadcast_to((i + offset)[None, None, :, 0], shape[:-1])
        cut = allowed & ~v
        any_cut = cut.any(axis=-1)
        last_hidden = np.where(any_cut, skv - 1 - np.argmax(cut[..., ::-1], axis=-1), -1)
        first_visible = np.where(v.any(axis=-1), np.argmax(v, axis=-1), skv)
        if np.any(last_hidden >= first_visible):
            return None
        any_visible = first_visible < skv
        any_hidden = last_hidden >= 0
        # visible ones need j > c - w: w >= c - first_visible + 1
        need_lo = np.where(any_visible, c - first_visible + 1, 1)
        lo = max(lo, int(need_lo.max()))
        # hidden allowed ones need j <= c - w: w <= c - last_hidden
        if np.any(any_hidden):
            bound = int(np.where(any_hidden, c - last_hidden, np.iinfo(np.int64).max).min())
            hi = bound if hi is None else min(hi, bound)
        if hi is not None and hi < lo:
            return None
    return lo, hi


def _closest(evaluations, keys) -> str:
    """Why nothing fit: the template that came nearest at the first size where one differs, and
    by how many positions."""
    best = None
    for e in evaluations:
        v = e.visible
        sq, skv = v.shape[2], v.shape[3]
        i = np.arange(sq)[:, None]
        j = np.arange(skv)[None, :]
        k = keys(e)
        templates = {
            "none": np.ones((1, 1, 1, 1), dtype=bool),
            "causal_upper_left": (j <= i)[None, None],
            "causal_lower_right": (j <= i + skv - sq)[None, None],
        }
        if k is not None and e.padding is not None:
            templates["padding"] = k
            templates["causal_padding (lower-right)"] = templates["causal_lower_right"] & k
        for name, t in templates.items():
            shape = np.broadcast_shapes(v.shape, t.shape)
            diff = int(np.sum(np.broadcast_to(v, shape) != np.broadcast_to(t, shape)))
            if diff and (best is None or diff < best[0]):
                b, q, p = e.size
                best = (diff, f"no template fits: nearest is {name}, which differs in {diff} of "
                              f"{int(np.prod(shape))} positions at batch {b}, query {q}, past {p}")
        if best is not None:
            return best[1]
    return "no template fits"
