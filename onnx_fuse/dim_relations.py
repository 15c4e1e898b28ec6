"""Relations between a model's input dims that its graph implies and its declared shapes may not
state: transformers' exporter names the mask [s43, s53] apart from the ids and the caches it must
agree with, optimum's merged decoder declares the mask as long as the new tokens although its
cached branch needs past + new, TorchScript leaves head counts symbolic.

Each input dim gets a symbol of its own, its slot (input name, axis), whatever name the export
gave it. One forward pass carries the shapes, and the values of small integer tensors (the shape
vectors exporters compute with Shape, Gather, Concat), as linear expressions of the slots, and
records what the ops require: the dims a broadcast or a MatMul meets are equal, so are Concat's
other axes, a Reshape's target is the shape. Solving those equations once the checker has sized
the roles it knows (batch, new tokens, past) sizes the rest (a mask: past + new; a cache's heads:
a Reshape's constant). An input concatenated with other entries along an axis is a growing cache:
its length along that axis is the past.

The pass reads structure only and is linear in the graph; what it finds is a first guess for the
checker, whose run of the reference must still accept it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

Slot = tuple[str, int]  # (graph input name, axis)

_SMALL = 16  # integer tensors up to this many elements have their values tracked
_HUGE = 2**31 - 1  # a Slice end at least this large means "to the end"


class Lin:
    """A linear expression sum(coef · slot) + const with integer coefficients."""

    __slots__ = ("terms", "const")

    def __init__(self, terms: dict | None = None, const: int = 0):
        self.terms = {k: v for k, v in (terms or {}).items() if v}
        self.const = int(const)

    @staticmethod
    def of(slot: Slot) -> Lin:
        return Lin({slot: 1})

    def __add__(self, other: Lin) -> Lin:
        terms = dict(self.terms)
        for k, v in other.terms.items():
            terms[k] = terms.get(k, 0) + v
        return Lin(terms, self.const + other.const)

    def __sub__(self, other: Lin) -> Lin:
        return self + other.scaled(-1)

    def scaled(self, factor: int) -> Lin:
        return Lin({k: v * factor for k, v in self.terms.items()}, self.const * factor)

    def is_const(self, value: int | None = None) -> bool:
        return not self.terms and (value is None or self.const == value)

    def __eq__(self, other) -> bool:
        return isinstance(other, Lin) and self.terms == other.terms and self.const == other.const

    def __hash__(self) -> int:
        return hash((frozenset(self.terms.items()), self.const))

    def __repr__(self) -> str:
        parts = [f"{v}*{k[0]}[{k[1]}]" for k, v in self.terms.items()]
        return " + ".join(parts + ([str(self.const)] if self.const or not parts else []))


def const(value: int) -> Lin:
    return Lin(const=value)


@dataclass
class DimFacts:
    """What the graph says about its input dims."""

    equations: list[Lin] = field(default_factory=list)  # each expression is 0
    growing: set[Slot] = field(default_factory=set)  # inputs concatenated with new entries
    read: set[str] = field(default_factory=set)  # the graph inputs the walked nodes read

    def solve(self, known: dict[Slot, int]) -> dict[Slot, int]:
        """Sizes of the slots the equations determine once `known` are given (positive integers
        only); an equation that contradicts what is known already is ignored."""
        values, pending, progress = dict(known), list(self.equations), True
        while progress:
            progress, left = False, []
            for equation in pending:
                found = _solve_one(equation, values)
                if found is None:
                    left.append(equation)
                elif found:
                    values[found[0]] = found[1]
                    progress = True
            pending = left
        return {slot: v for slot, v in values.items() if slot not in known}


def _solve_one(equation: Lin, values: dict[Slot, int]):
    """(slot, size) when exactly one slot is unknown; False when none is (settled or
    contradicted) or the size would not be a positive integer; None when several are."""
    unknown = [(k, c) for k, c in equation.terms.items() if k not in values]
    if len(unknown) != 1:
        return False if not unknown else None
    rest = equation.const + sum(c * values[k] for k, c in equation.terms.items() if k in values)
    slot, coef = unknown[0]
    size = Fraction(-rest, coef)
    return (slot, int(size)) if size.denominator == 1 and size > 0 else False


def find_relations(model: onnx.ModelProto, branches: dict[str, bool] | None = None) -> DimFacts:
    """The relations of `model`'s input dims. `branches` gives the values of boolean inputs that
    are If conditions: only the branch each selects is read (the other may need other sizes);
    an If on anything else is not looked into."""
    walk = _Walk(model.graph, branches or {})
    walk.nodes(model.graph)
    return walk.facts


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple | None]:
    """Every tensor's dims as the walk finds them (Lin or None each; None: rank unknown)."""
    walk = _Walk(model.graph, {})
    walk.nodes(model.graph)
    return {name: shape for name, (shape, _) in walk.info.items()}


Dims = tuple  # of Lin | None
_NONE = (None, None)


class _Walk:
    """The forward pass: per tensor (shape, value), each a tuple of Lin | None or None."""

    def __init__(self, graph: onnx.GraphProto, branches: dict[str, bool]):
        self.branches = branches
        self.facts = DimFacts()
        self.seen: set[Lin] = set()  # equations recorded (each layer repeats its own)
        self.info: dict[str, tuple] = {}
        self.origin: dict[str, str] = {}  # tensor -> the graph input it is a cast/copy of
        self.inferred = {v.name: v for v in graph.value_info}
        initialized = {t.name for t in graph.initializer}
        self.constants(graph)
        for value in graph.input:
            if value.name not in initialized:
                self.origin[value.name] = value.name
                self.info[value.name] = (_input_dims(value), None)

    def constants(self, graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            self.info[tensor.name] = _constant_info(numpy_helper.to_array(tensor)
                                                    if _loadable(tensor) else None, tensor.dims)

    def nodes(self, graph: onnx.GraphProto) -> None:
        for node in graph.node:
            self.node(node)

    def node(self, node: onnx.NodeProto) -> None:
        ins = [self.info.get(name, _NONE) if name else _NONE for name in node.input]
        self.facts.read.update(self.origin[name] for name in node.input if name in self.origin)
        if node.op_type in ("Identity", "Cast") and node.input[0] in self.origin:
            self.origin[node.output[0]] = self.origin[node.input[0]]
        handler = _HANDLERS.get(node.op_type)
        try:
            outs = handler(self, node, ins) if handler else None
        except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError):
            outs = None
        for index, name in enumerate(node.output):
            info = outs[index] if outs is not None and index < len(outs) else None
            self.info[name] = info if info is not None else (self._inferred(name), None)

    def equal(self, a: Lin | None, b: Lin | None) -> None:
        """Two dims an op needs equal (a 1 may broadcast instead)."""
        if a is None or b is None or a.is_const(1) or b.is_const(1):
            return
        difference = a - b
        if difference.terms and difference not in self.seen:
            self.seen.add(difference)
            self.facts.equations.append(difference)

    def broadcast(self, shapes: list) -> Dims | None:
        if any(s is None for s in shapes):
            return None
        rank = max((len(s) for s in shapes), default=0)
        padded = [(const(1),) * (rank - len(s)) + tuple(s) for s in shapes]
        out = []
        for dims in zip(*padded):
            real = [d for d in dims if d is None or not d.is_const(1)]  # a 1 broadcasts
            for other in real[1:]:
                self.equal(real[0], other)
            known = [d for d in real if d is not None]
            out.append(known[0] if known else None if real else const(1))
        return tuple(out)

    def _inferred(self, name: str) -> Dims | None:
        """Shape inference's static dims, for ops the walk does not follow."""
        value = self.inferred.get(name)
        if value is None or not value.type.tensor_type.HasField("shape"):
            return None
        return tuple(const(d.dim_value) if d.HasField("dim_value") else None
                     for d in value.type.tensor_type.shape.dim)


def _loadable(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location != onnx.TensorProto.EXTERNAL and math.prod(tensor.dims) <= _SMALL


def _input_dims(value: onnx.ValueInfoProto) -> Dims | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    return tuple(_declared(d, (value.name, axis))
                 for axis, d in enumerate(value.type.tensor_type.shape.dim))


def _declared(dim, slot: Slot) -> Lin:
    """An input dim: its size when static (also a size written as a string: '2'), else its slot."""
    if dim.HasField("dim_value"):
        return const(dim.dim_value)
    if dim.dim_param.strip().isdigit():
        return const(int(dim.dim_param))
    return Lin.of(slot)


def _constant_info(array: np.ndarray | None, dims) -> tuple:
    shape = tuple(const(int(d)) for d in dims)
    if array is None or array.dtype.kind not in "iu":
        return shape, None
    return shape, tuple(const(int(v)) for v in array.reshape(-1))


# --- helpers for the handlers ------------------------------------------------------------------

def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _ints(info: tuple) -> list[int] | None:
    """A tracked value whose entries are all constants."""
    value = info[1]
    if value is None or any(v is None or not v.is_const() for v in value):
        return None
    return [v.const for v in value]


def _axes(node: onnx.NodeProto, ins: list, index: int = 1) -> list[int] | None:
    if len(ins) > index:
        return _ints(ins[index])
    return _attr(node, "axes")


def _vector(shape: Dims | None, value) -> tuple:
    """Info of a 1-D tracked value."""
    return ((const(len(value)),) if shape is None else shape), value


def _elementwise(op: Callable, a: tuple | None, b: tuple | None) -> tuple | None:
    """A tracked value op(a, b) with numpy-style broadcasting of length-1 operands."""
    if a is None or b is None or len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
    out = tuple(None if x is None or y is None else op(x, y) for x, y in zip(a, b))
    return None if any(v is None for v in out) else out


def _mul(x: Lin, y: Lin) -> Lin | None:
    if x.is_const():
        return y.scaled(x.const)
    return x.scaled(y.const) if y.is_const() else None


def _div(x: Lin, y: Lin) -> Lin | None:
    if not y.is_const() or y.const == 0:
        return None
    if any(v % y.const for v in x.terms.values()) or x.const % y.const:
        return None
    return Lin({k: v // y.const for k, v in x.terms.items()}, x.const // y.const)


# --- handlers: (walk, node, inputs' infos) -> outputs' infos -----------------------------------

def _same(walk, node, ins):
    return [(ins[0][0], None)] * len(node.output)


def _copy(walk, node, ins):
    return [ins[0]]


def _neg(walk, node, ins):
    value = ins[0][1]
    return [(ins[0][0], None if value is None else tuple(v.scaled(-1) for v in value))]


_ARITHMETIC = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": _mul, "Div": _div}


def _broadcasting(walk, node, ins):
    shape = walk.broadcast([s for s, _ in ins])
    op = _ARITHMETIC.get(node.op_type)
    value = _elementwise(op, ins[0][1], ins[1][1]) if op and len(ins) == 2 else None
    return [(shape, value)]


def _concat(walk, node, ins):
    shapes = [s for s, _ in ins]
    ranks = {len(s) for s in shapes if s is not None}
    value = None
    if all(v is not None for _, v in ins) and ranks <= {0, 1}:
        value = tuple(x for _, v in ins for x in v)
    if len(ranks) != 1 or not min(ranks):
        return [(None, value)]
    rank = ranks.pop()
    axis = _attr(node, "axis") % rank
    _note_growing(walk, node, axis)
    if any(s is None for s in shapes):
        return [(None, value)]
    for i in range(rank):
        if i != axis:
            for other in shapes[1:]:
                walk.equal(shapes[0][i], other[i])
    joined = [s[axis] for s in shapes]
    total = None if None in joined else sum(joined[1:], joined[0])
    return [(tuple(total if i == axis else shapes[0][i] for i in range(rank)), value)]


def _note_growing(walk, node, axis: int) -> None:
    """Concat(input, other, ...) along `axis`: the input is a cache that grows along it."""
    for name in node.input:
        if name in walk.origin and len(node.input) > 1:
            walk.facts.growing.add((walk.origin[name], axis))


def _shape(walk, node, ins):
    shape = ins[0][0]
    if shape is None:
        return None
    part = shape[slice(_attr(node, "start", 0), _attr(node, "end", None))]
    return [_vector(None, None if None in part else tuple(part))]


def _gather(walk, node, ins):
    (data, values), (indices, _) = ins[0], ins[1]
    axis = _attr(node, "axis", 0)
    shape = None
    if data is not None and indices is not None:
        axis %= len(data)
        shape = tuple(data[:axis]) + tuple(indices) + tuple(data[axis + 1:])
    picked = _ints(ins[1])
    value = None
    if values is not None and picked is not None and axis == 0:
        value = tuple(values[i] for i in picked)
    return [(shape, value)]


def _slice(walk, node, ins):
    data, values = ins[0]
    starts, axes, steps = _ints(ins[1]), _slice_input(ins, 3), _slice_input(ins, 4)
    ends = ins[2][1]
    if starts is None or ends is None or data is None:
        return None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    out = list(data)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= len(data)
        out[axis] = _sliced(data[axis], start, end, step)
    value = None
    if values is not None and len(data) == 1 and all(e is not None and e.is_const() for e in ends):
        value = values[slice(starts[0], min(ends[0].const, _HUGE), steps[0])]
    return [(tuple(out), value)]


def _slice_input(ins: list, index: int) -> list[int] | None:
    return _ints(ins[index]) if len(ins) > index and ins[index] != _NONE else None


def _sliced(dim: Lin | None, start: int, end: Lin | None, step: int) -> Lin | None:
    """The length of dim[start:end:step], assuming (as exports do) that a bound within the dim."""
    if dim is not None and dim.is_const() and end is not None and end.is_const():
        return const(len(range(*slice(start, end.const, step).indices(dim.const))))
    if step != 1 or end is None:
        return None
    if end.is_const() and end.const >= _HUGE:
        return None if dim is None else (dim - const(start) if start >= 0 else const(-start))
    if start < 0:
        return None
    if end.is_const() and end.const < 0:
        return None if dim is None else dim + end - const(start)
    return end - const(start)


def _unsqueeze(walk, node, ins):
    shape, value = ins[0]
    axes = _axes(node, ins)
    if shape is None or axes is None:
        return [(None, value)]
    rank = len(shape) + len(axes)
    out = list(shape)
    for axis in sorted(a % rank for a in axes):
        out.insert(axis, const(1))
    return [(tuple(out), value)]


def _squeeze(walk, node, ins):
    shape, value = ins[0]
    axes = _axes(node, ins)
    if shape is None:
        return [(None, value)]
    if axes is None:
        drop = {i for i, d in enumerate(shape) if d is not None and d.is_const(1)}
    else:
        drop = {a % len(shape) for a in axes}
    return [(tuple(d for i, d in enumerate(shape) if i not in drop), value)]


def _reshape(walk, node, ins):
    (source, value), target = ins[0], ins[1][1]
    if target is None:
        return None
    allow_zero = _attr(node, "allowzero", 0)
    out = [source[i] if source is not None and d is not None and d.is_const(0) and not allow_zero
           else None if d is None or d.is_const() and d.const < 0 else d for i, d in enumerate(target)]
    minus = [i for i, d in enumerate(target) if d is not None and d.is_const(-1)]
    if minus and source is not None:
        out[minus[0]] = _inferred_dim(list(source), [d for i, d in enumerate(out) if i != minus[0]])
    return [(tuple(out), value if len(out) <= 1 else None)]


def _inferred_dim(source: list, known: list) -> Lin | None:
    """A Reshape's -1: the source's volume over the other target dims, equal dims cancelling."""
    if None in source or None in known:
        return None
    rest = list(source)
    for dim in known:
        if not dim.is_const():
            if dim not in rest:
                return None
            rest.remove(dim)
    symbolic = [d for d in rest if not d.is_const()]
    numerator = int(np.prod([d.const for d in rest if d.is_const()], dtype=np.int64))
    denominator = int(np.prod([d.const for d in known if d.is_const()], dtype=np.int64))
    if not denominator or numerator % denominator:
        return None
    if not symbolic:
        return const(numerator // denominator)
    return symbolic[0].scaled(numerator // denominator) if len(symbolic) == 1 else None


def _flatten(walk, node, ins):
    shape = ins[0][0]
    if shape is None:
        return None
    axis = _attr(node, "axis", 1) % (len(shape) + 1)
    return [((_product(shape[:axis]), _product(shape[axis:])), None)]


def _product(dims) -> Lin | None:
    """The product of dims when at most one of them is not a constant."""
    if None in dims or sum(not d.is_const() for d in dims) > 1:
        return None
    scale = int(np.prod([d.const for d in dims if d.is_const()], dtype=np.int64))
    symbolic = [d for d in dims if not d.is_const()]
    return symbolic[0].scaled(scale) if symbolic else const(scale)


def _equal(walk, node, ins):
    """Equal on tracked values, where it is decided: TorchScript's Where(Equal(shape, -1), 1,
    shape) around an Expand's target."""
    shape = walk.broadcast([ins[0][0], ins[1][0]])
    return [(shape, _elementwise(_same_value, ins[0][1], ins[1][1]))]


def _same_value(x: Lin, y: Lin) -> Lin | None:
    difference = x - y
    if difference.is_const():
        return const(int(difference.const == 0))
    return const(0) if _positive(difference) or _positive(difference.scaled(-1)) else None


def _positive(x: Lin) -> bool:
    """Dims are at least 1: so is an expression in them with positive coefficients whose
    smallest value (every dim 1) is positive."""
    return all(v > 0 for v in x.terms.values()) and sum(x.terms.values()) + x.const > 0


def _where(walk, node, ins):
    shape = walk.broadcast([s for s, _ in ins])
    return [(shape, _pick(*(info[1] for info in ins)))]


def _pick(choose, a, b) -> tuple | None:
    """Where on tracked values whose condition is decided everywhere."""
    if choose is None or a is None or b is None or any(c is None or not c.is_const() for c in choose):
        return None
    n = max(len(choose), len(a), len(b))
    if any(len(v) not in (1, n) for v in (choose, a, b)):
        return None
    choose, a, b = (v * n if len(v) == 1 else v for v in (choose, a, b))
    return tuple(x if c.const else y for c, x, y in zip(choose, a, b))


def _expand(walk, node, ins):
    target = ins[1][1]
    return None if target is None else [(walk.broadcast([ins[0][0], target]), None)]


def _constant_of_shape(walk, node, ins):
    return None if ins[0][1] is None else [(tuple(ins[0][1]), None)]


def _range(walk, node, ins):
    start, limit, delta = (info[1][0] if info[1] else None for info in ins[:3])
    if start is None or limit is None or delta is None or not delta.is_const(1):
        return None
    return [((limit - start,), None)]


def _matmul(walk, node, ins):
    a, b = ins[0][0], ins[1][0]
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return None
    walk.equal(a[-1], b[-2])
    batch = walk.broadcast([a[:-2], b[:-2]])
    return [(batch + (a[-2], b[-1]), None)]


def _transpose(walk, node, ins):
    shape = ins[0][0]
    if shape is None:
        return None
    perm = _attr(node, "perm") or list(reversed(range(len(shape))))
    return [(tuple(shape[p] for p in perm), None)]


def _split(walk, node, ins):
    shape = ins[0][0]
    axis = _attr(node, "axis", 0)
    sizes = _ints(ins[1]) if len(ins) > 1 and ins[1] != _NONE else _attr(node, "split")
    if shape is None or sizes is None:
        return None
    axis %= len(shape)
    return [(tuple(const(n) if i == axis else d for i, d in enumerate(shape)), None) for n in sizes]


def _reduce(walk, node, ins):
    shape = ins[0][0]
    axes = _axes(node, ins) if node.op_type not in ("ArgMax", "ArgMin") else [_attr(node, "axis", 0)]
    if shape is None:
        return None
    if not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            return [(shape, None)]
        axes = range(len(shape))
    reduced = {a % len(shape) for a in axes}
    keep = _attr(node, "keepdims", 1)
    return [(tuple(const(1) if i in reduced else d for i, d in enumerate(shape)
                   if keep or i not in reduced), None)]


def _attention(walk, node, ins):
    """ONNX Attention (opset 23) on 4-D Q, K, V: the mask broadcasts to [B, Nq, S, past + T]."""
    q, k, v = (ins[i][0] for i in range(3))
    if q is None or k is None or v is None or len(q) != 4 or len(k) != 4 or len(v) != 4:
        return None
    walk.equal(q[3], k[3])
    walk.equal(k[2], v[2])
    total = k[2]
    past = ins[4][0] if len(ins) > 4 else None
    if past is not None and total is not None:
        total = None if past[2] is None else past[2] + total
    if len(ins) > 3 and ins[3][0] is not None:
        walk.broadcast([ins[3][0], (q[0], q[1], q[2], total)])
    return [(q[:3] + (v[3],), None)]


def _if(walk, node, ins):
    """The branch a condition input selects, walked in place (it reads the outer tensors)."""
    condition = walk.origin.get(node.input[0])
    if condition not in walk.branches:
        return None
    branch = _attr(node, "then_branch" if walk.branches[condition] else "else_branch")
    walk.constants(branch)
    walk.nodes(branch)
    return [walk.info.get(out.name, _NONE) for out in branch.output]


_SAME_SHAPE = ("Abs Sqrt Reciprocal Exp Log Tanh Sigmoid Relu Gelu Erf Sin Cos Not IsNaN IsInf "
               "Softmax LogSoftmax Dropout LayerNormalization RMSNormalization "
               "SimplifiedLayerNormalization RotaryEmbedding Floor Ceil Round Sign LeakyRelu Elu "
               "Softplus Clip CumSum Trilu BitwiseNot HardSwish ScatterND ScatterElements").split()
_BROADCASTING = ("Add Sub Mul Div Pow Mod Max Min Where Equal Less LessOrEqual Greater "
                 "GreaterOrEqual And Or Xor BitwiseAnd BitwiseOr BitwiseXor PRelu Sum Mean").split()
_REDUCING = ("ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL2 ReduceLogSumExp "
             "ReduceSumSquare ArgMax ArgMin").split()

_HANDLERS: dict[str, Callable] = {
    **{op: _same for op in _SAME_SHAPE}, **{op: _broadcasting for op in _BROADCASTING},
    **{op: _reduce for op in _REDUCING},
    "Identity": _copy, "Cast": _copy, "CastLike": _copy, "Neg": _neg, "Concat": _concat,
    "Shape": _shape, "Gather": _gather, "Slice": _slice, "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze, "Reshape": _reshape, "Expand": _expand,
    "ConstantOfShape": _constant_of_shape, "Range": _range, "MatMul": _matmul,
    "Transpose": _transpose, "Split": _split, "Flatten": _flatten, "Equal": _equal, "Where": _where, "Attention": _attention, "If": _if,
    "Constant": lambda walk, node, ins: [_constant_node_info(node)],
}


def _constant_node_info(node: onnx.NodeProto) -> tuple:
    attribute = node.attribute[0]
    if attribute.name == "value":
        tensor = attribute.t
        return _constant_info(numpy_helper.to_array(tensor) if _loadable(tensor) else None, tensor.dims)
    value = np.asarray(onnx.helper.get_attribute_value(attribute))
    if attribute.name in ("value_int", "value_ints"):
        return _constant_info(value.astype(np.int64), value.shape)
    return tuple(const(int(d)) for d in value.shape), None
