"""Graph access for rules: producers, consumers, shapes, and values folded from constants.

The graph itself is an onnx-graphsurgeon graph; this wrapper adds the indexes and facts the
matcher needs, each computed once so that a pass over the graph stays linear.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

Tensor = gs.Tensor
Node = gs.Node

# Constants larger than this are never loaded to match a rule (weights stay on disk).
MAX_FOLD_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class Options:
    """What the user told the pass that the graph cannot (rules read them from Graph.options)."""

    max_positions: int | None = None  # positions RoPE caches must cover (--max-positions)
    # Whether the result will be checked in onnxruntime (CPU): a target refuses ops that only
    # another execution provider implements unless the user turned the check off.
    check: bool = True


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference on a copy, as the pass runs it; rules that need shapes it cannot find say
    so."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is best effort: a model it cannot type still loads
        return model


class Graph:
    """The model being rewritten."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | None = None,
                 options: Options = Options()):
        self.base_dir = base_dir  # where the model's external data files are, if known
        self.options = options
        self.opsets = {o.domain or "": o.version for o in model.opset_import}
        self.proto = model  # what the graph was imported from (the checker's dim relations read it)
        self.gs = gs.import_onnx(model)
        self._by_op: dict[str, list[Node]] | None = None
        self._values: dict[int, np.ndarray | None] = {}
        self._fresh = FreshNames(model.graph)
        # Every node, those of If/Loop/Scan bodies too, and the graph each belongs to.
        self.owner: dict[int, gs.Graph] = {}
        self.all_nodes: list[Node] = []
        self._collect(self.gs)
        scopes = [self.gs, *{id(g): g for g in self.owner.values()}.values()]
        self._output_ids = {id(t) for scope in scopes for t in scope.outputs}
        self.fused_by: dict[str, str] = {}  # name of each node a rule created -> rule name
        self.shared: dict = {}  # tensors rewrites compute once and reuse (see Rewrite.shared)
        self.memo: dict = {}  # verifications rules make once per pass (see rewrite.once)
        # model-local functions the emitted nodes call ((domain, name) -> FunctionProto)
        self.functions: dict[tuple[str, str], onnx.FunctionProto] = {}
        self._shapes: dict[int, tuple] = {}
        self._refine_shapes()

    # --- structure -------------------------------------------------------------------------

    def _collect(self, graph: gs.Graph) -> None:
        """Index `graph`'s nodes and, after each control-flow node, its bodies' (recursively)."""
        for node in graph.nodes:
            self.owner[id(node)] = graph
            self.all_nodes.append(node)
            for body in subgraphs(node):
                self._collect(body)

    def nodes_of(self, op_type: str) -> list[Node]:
        """Nodes of one op type in graph order, those inside If/Loop/Scan bodies included (the
        index is built once per pass)."""
        if self._by_op is None:
            self._by_op = defaultdict(list)
            for node in self.all_nodes:
                self._by_op[node.op].append(node)
        return list(self._by_op.get(op_type, ()))

    def owner_of(self, node: Node) -> gs.Graph:
        """The graph (the model's, or an If/Loop/Scan body) a node belongs to."""
        return self.owner.get(id(node), self.gs)

    @staticmethod
    def producer(tensor: Tensor) -> Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def consumers(tensor: Tensor) -> list[Node]:
        return list(tensor.outputs)

    def is_graph_output(self, tensor: Tensor) -> bool:
        return id(tensor) in self._output_ids

    def fresh_name(self, prefix: str) -> str:
        return self._fresh(prefix)

    def release_name(self, name: str) -> None:
        """Give back a name fresh_name returned that ended up unused (a discarded rewrite)."""
        self._fresh.release(name)

    # --- types and shapes ------------------------------------------------------------------

    def shape(self, tensor: Tensor) -> tuple | None:
        """Dims as ints (static), strings (symbolic) or None (unknown); None if rank unknown.
        Shape inference's answer, with dims it left symbolic filled in from the graph's own
        constants (e.g. the head count in a Reshape whose target shape is computed)."""
        refined = self._shapes.get(id(tensor))
        if refined is not None:
            return refined
        return None if tensor.shape is None else tuple(tensor.shape)

    def rank(self, tensor: Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def _refine_shapes(self) -> None:
        """One forward pass in graph order: static dims that shape inference missed."""
        for node in self.all_nodes:
            if node.op not in _DERIVED or len(node.outputs) != 1 and node.op != "Split":
                continue
            if all(o.shape is not None and all(isinstance(d, int) for d in o.shape) for o in node.outputs):
                continue  # fully static already: nothing to fill in
            try:
                derived = _split_shapes(self, node) if node.op == "Split" else [_derive_shape(self, node)]
            except (ValueError, TypeError, IndexError, KeyError, AttributeError):
                derived = None
            for out, shape in zip(node.outputs, derived or []):
                if shape is None:
                    continue
                if out.shape is not None:
                    if len(out.shape) != len(shape):
                        continue
                    shape = [_merge_dim(i, d) for i, d in zip(out.shape, shape)]
                self._shapes[id(out)] = tuple(shape)


    # --- constant values -------------------------------------------------------------------

    def value(self, tensor: Tensor) -> np.ndarray | None:
        """The tensor's value if it follows from constants and static shapes alone, else None."""
        key = id(tensor)
        if key not in self._values:
            self._values[key] = None  # guards against cycles in malformed graphs
            try:
                value = self._fold(tensor)
            except (ValueError, TypeError, IndexError, KeyError, RecursionError, ZeroDivisionError):
                value = None
            if value is not None and value.size > MAX_FOLD_ELEMENTS:
                value = None
            self._values[key] = value
        return self._values[key]

    def dims(self, tensor: Tensor) -> list[int | str | None] | None:
        """A 1-D int tensor's elements where known (symbolic dims by name): shape vectors built
        from partly dynamic shapes."""
        value = self.value(tensor)
        if value is not None:
            return [int(v) for v in value.reshape(-1)]
        node = self.producer(tensor)
        if node is None:
            return None
        if node.op == "Shape":
            shape = self.shape(node.inputs[0])
            if shape is None:
                return None
            start = node.attrs.get("start", 0)
            end = node.attrs.get("end", len(shape))
            return list(shape[slice(start, end)])
        if node.op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
            return self.dims(node.inputs[0])  # scalars and 1-D vectors keep their elements
        if node.op == "ConstantOfShape":
            length = self.dims(node.inputs[0])
            fill = node.attrs.get("value")
            fill = int(np.ravel(fill.values)[0]) if fill is not None else 0
            return None if length is None or len(length) != 1 or not isinstance(length[0], int) \
                else [fill] * length[0]
        if node.op == "Equal":
            a, b = (self.dims(t) for t in node.inputs)
            if a is None or b is None:
                return None
            a, b = (x * len(b) if len(x) == 1 else x for x in (a, b)) if len(a) != len(b) else (a, b)
            return [_dim_equal(x, y) for x, y in zip(a, b)]
        if node.op == "Where":
            c, a, b = (self.dims(t) for t in node.inputs)
            if c is None or a is None or b is None:
                return None
            n = max(len(c), len(a), len(b))
            c, a, b = (x * n if len(x) == 1 else x for x in (c, a, b))
            return [None if ci is None else (ai if ci else bi) for ci, ai, bi in zip(c, a, b)]
        if node.op in ("Mul", "Add", "Sub") and all(self.dims(t) for t in node.inputs):
            a, b = (self.dims(t) for t in node.inputs)
            if len(a) == len(b) or 1 in (len(a), len(b)):
                fn = {"Mul": operator.mul, "Add": operator.add, "Sub": operator.sub}[node.op]
                n = max(len(a), len(b))
                a, b = a * n if len(a) == 1 else a, b * n if len(b) == 1 else b
                if node.op == "Mul":  # symbolic products stay comparable: "batch*4"
                    return [dim_product(x, y) for x, y in zip(a, b)]
                return [fn(x, y) if isinstance(x, int) and isinstance(y, int) else None
                        for x, y in zip(a, b)]
        if node.op == "Concat":
            parts = [self.dims(t) for t in node.inputs]
            return None if any(p is None for p in parts) else [d for p in parts for d in p]
        if node.op in ("Gather", "Slice") and node.inputs[0].shape is not None:
            source = self.dims(node.inputs[0])
            if source is None:
                return None
            index = np.arange(len(source))
            try:
                picked = _FOLDERS[node.op](node, [index] + [self.value(t) for t in node.inputs[1:]])
                return [source[int(i)] for i in np.asarray(picked).reshape(-1)]
            except (ValueError, TypeError, IndexError, AttributeError):
                return None
        return None

    def _constant_value(self, tensor: gs.Constant) -> np.ndarray | None:
        """A small constant's value; one stored in external data is read from the model's
        directory (None where that is unknown or unreadable), never relative to the cwd."""
        proto = getattr(tensor._values, "tensor", None)  # graphsurgeon's LazyValues
        if isinstance(proto, onnx.TensorProto) and proto.data_location == onnx.TensorProto.EXTERNAL:
            if self.base_dir is None:
                return None
            from onnx.numpy_helper import to_array

            copy = onnx.TensorProto()
            copy.CopyFrom(proto)  # reading external data fills the tensor in: not the model's
            try:
                return to_array(copy, self.base_dir)
            except Exception:  # a missing or short file, a checker error: not foldable
                return None
        return np.asarray(tensor.values)

    def _fold(self, tensor: Tensor) -> np.ndarray | None:
        if isinstance(tensor, gs.Constant):
            if int(np.prod(tensor.shape, dtype=np.int64)) > MAX_FOLD_ELEMENTS:
                return None
            return self._constant_value(tensor)
        node = self.producer(tensor)
        if node is None or len(node.outputs) != 1:
            return None
        if node.op == "Constant":
            return _constant_node_value(node)
        if node.op in ("Shape", "Gather", "Slice", "Concat") and _is_int_vector(tensor):
            dims = self.dims(tensor)
            if dims is not None and all(isinstance(d, int) for d in dims):
                return np.array(dims, dtype=np.int64)
            if node.op == "Shape":
                return None
        folder = _FOLDERS.get(node.op)
        if folder is None:
            return None
        inputs = []
        for t in node.inputs:
            if t.name == "":  # omitted optional input
                inputs.append(None)
                continue
            v = self.value(t)
            if v is None:
                return None
            inputs.append(v)
        return np.asarray(folder(node, inputs))


def subgraphs(node: Node) -> list[gs.Graph]:
    """The bodies a control-flow node carries (If's branches, Loop's and Scan's body)."""
    found = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if isinstance(v, gs.Graph))
    return found


class FreshNames:
    """Node and tensor names a model does not use yet, made from a prefix."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {t.name for t in graph.initializer}
        self.used.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])
        for node in graph.node:
            self.used.update([node.name, *node.input, *node.output])

    def __call__(self, prefix: str) -> str:
        name, i = prefix, 0
        while name in self.used:
            i += 1
            name = f"{prefix}_{i}"
        self.used.add(name)
        return name

    def release(self, name: str) -> None:
        self.used.discard(name)


_SAME_SHAPE = {"Cast", "Neg", "Sqrt", "Relu", "Softmax", "Identity", "Tanh", "Sigmoid", "Exp",
               "Erf", "Not", "IsNaN", "IsInf", "Reciprocal", "CastLike", "Abs", "Log", "Sin", "Cos",
               "ScatterND", "ScatterElements"}  # a scatter's output is shaped like its data
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "And", "Or", "Equal", "Less",
              "LessOrEqual", "Greater", "GreaterOrEqual", "Where", "Xor", "Mod"}
_DERIVED = _SAME_SHAPE | _BROADCAST | {"Transpose", "MatMul", "Reshape", "Expand", "Slice", "Concat",
                                       "Split", "Squeeze", "Unsqueeze", "ConstantOfShape"}
# (see _derive_shape, _split_shapes)


def _merge_dim(inferred, derived):
    """Shape inference's dim unless it is not static and the graph's constants say it is."""
    if isinstance(inferred, int) or not isinstance(derived, int) and inferred is not None:
        return inferred
    return derived


def broadcast_shape(shapes: list[tuple]) -> tuple:
    """The numpy-style broadcast of shapes whose dims may be symbolic or unknown."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        big = [d for d in dims if isinstance(d, int) and d != 1]
        if big:
            out.append(big[0])
        elif all(d == 1 for d in dims):
            out.append(1)
        else:
            out.append(next(d for d in dims if d != 1))
    return tuple(out)


def _inferred_dim(source: list, known: list) -> int | None:
    """The -1 of a Reshape: the source volume over the known target dims, symbols cancelling."""
    if None in source or None in known:
        return None
    symbols = sorted(str(d) for d in source if not isinstance(d, int))
    if symbols != sorted(str(d) for d in known if not isinstance(d, int)):
        return None
    numerator = int(np.prod([d for d in source if isinstance(d, int)], dtype=np.int64))
    denominator = int(np.prod([d for d in known if isinstance(d, int)], dtype=np.int64))
    if denominator <= 0 or numerator % denominator:
        return None
    return numerator // denominator


def _derive_shape(graph: Graph, node: Node) -> tuple | None:
    """An output shape from the input shapes and the constant operands, for the ops that carry
    head counts and head sizes through exported attention."""
    shapes = [graph.shape(t) if t.name else None for t in node.inputs]
    if node.op in _SAME_SHAPE:
        return shapes[0]
    if node.op in _BROADCAST:
        return None if any(s is None for s in shapes) else broadcast_shape(shapes)
    if node.op == "Transpose" and shapes[0] is not None:
        perm = node.attrs.get("perm") or list(reversed(range(len(shapes[0]))))
        return tuple(shapes[0][p] for p in perm)
    if node.op == "MatMul" and shapes[0] is not None and shapes[1] is not None:
        a, b = shapes
        if len(a) >= 2 and len(b) >= 2:
            return broadcast_shape([a[:-2], b[:-2]]) + (a[-2], b[-1])
        return None
    if node.op == "Reshape":
        target = graph.dims(node.inputs[1])
        if target is None:
            return None
        source = shapes[0]
        allow_zero = node.attrs.get("allowzero", 0)
        out = []
        for i, d in enumerate(target):
            if d == 0 and not allow_zero:
                out.append(source[i] if source is not None and i < len(source) else None)
            else:
                out.append(None if d is None or isinstance(d, int) and d < 0 else d)
        if -1 in target and source is not None:
            out[target.index(-1)] = _inferred_dim(list(source), [d for d in out if d is not None])
        return tuple(out)
    if node.op == "Expand" and shapes[0] is not None:
        target = graph.dims(node.inputs[1])
        return None if target is None else broadcast_shape([shapes[0], tuple(target)])
    if node.op == "Concat" and shapes and all(s is not None for s in shapes):
        rank = len(shapes[0])
        if any(len(s) != rank for s in shapes):
            return None
        axis = node.attrs["axis"] % rank
        joined = [d[axis] for d in shapes]
        out = [next((d[i] for d in shapes if isinstance(d[i], int)), shapes[0][i]) for i in range(rank)]
        out[axis] = sum(joined) if all(isinstance(d, int) for d in joined) else None
        return tuple(out)
    if node.op == "Slice" and shapes[0] is not None and len(node.inputs) >= 3:
        return _sliced_shape(graph, node, shapes[0])
    if node.op in ("Squeeze", "Unsqueeze") and shapes[0] is not None:
        return _squeezed_shape(graph, node, shapes[0])
    if node.op == "ConstantOfShape":
        dims = graph.dims(node.inputs[0])
        return None if dims is None else tuple(None if isinstance(d, int) and d < 0 else d for d in dims)
    return None


def _squeezed_shape(graph: Graph, node: Node, shape: tuple) -> tuple | None:
    """Squeeze / Unsqueeze with constant axes (an input from opset 13, an attribute before)."""
    axes = graph.value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else node.attrs.get("axes")
    if axes is None:
        return None
    axes = [int(a) for a in np.ravel(axes)]
    if node.op == "Squeeze":
        dropped = {a % len(shape) for a in axes}
        if any(shape[a] not in (1, None) for a in dropped):
            return None
        return tuple(d for i, d in enumerate(shape) if i not in dropped)
    rank = len(shape) + len(axes)
    inserted = {a % rank for a in axes}
    rest = iter(shape)
    return tuple(1 if i in inserted else next(rest) for i in range(rank))


def _split_shapes(graph: Graph, node: Node) -> list[tuple | None]:
    """Each Split output's dims: the input's, the split axis cut by the sizes (or evenly)."""
    shape = graph.shape(node.inputs[0])
    if shape is None:
        return []
    axis = node.attrs.get("axis", 0) % len(shape)
    sizes = graph.value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else node.attrs.get("split")
    parts = len(node.outputs)
    if sizes is None:
        sizes = [shape[axis] // parts] * parts if isinstance(shape[axis], int) and shape[axis] % parts == 0 \
            else [None] * parts
    return [tuple(shape[:axis]) + (None if size is None else int(size),) + tuple(shape[axis + 1:])
            for size in np.ravel(sizes)] if len(np.ravel(sizes)) == parts else []


def _sliced_shape(graph: Graph, node: Node, shape: tuple) -> tuple | None:
    """A Slice's output dims: static where the sliced dim and the bounds are (e.g. the rotated
    channels of a partial RoPE, cut from a head whose size shape inference lost)."""
    bounds = [graph.value(t) if t.name else None for t in node.inputs[1:5]]
    if any(b is None for b, t in zip(bounds, node.inputs[1:5]) if t.name):
        return None
    starts, ends = (np.asarray(b).reshape(-1) for b in bounds[:2])
    axes = range(len(starts)) if len(bounds) < 3 or bounds[2] is None else np.asarray(bounds[2]).reshape(-1)
    steps = [1] * len(starts) if len(bounds) < 4 or bounds[3] is None else np.asarray(bounds[3]).reshape(-1)
    out = list(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % len(shape)
        dim = shape[axis]
        out[axis] = len(range(*slice(int(start), int(end), int(step)).indices(dim))) if isinstance(dim, int) else None
    return tuple(out)


def onnx_dtype(tensor: Tensor) -> int | None:
    """The tensor's ONNX element type (graphsurgeon stores numpy dtypes, or the ONNX enum for
    types numpy lacks)."""
    dtype = tensor.dtype
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return getattr(dtype, "onnx_type", None)


def dim_product(*dims) -> int | str | None:
    """The product of dims, symbolic ones as a canonical string ("batch*4"); None if any is
    unknown."""
    number, symbols = 1, []
    for d in dims:
        if d is None or isinstance(d, bool):
            return None
        if isinstance(d, (int, np.integer)):
            number *= int(d)
        else:
            for factor in str(d).split("*"):
                if factor.strip().lstrip("-").isdigit():
                    number *= int(factor)
                else:
                    symbols.append(factor.strip())
    if not symbols:
        return number
    return "*".join(sorted(symbols) + ([str(number)] if number != 1 else []))


def is_integer(tensor: Tensor) -> bool:
    """The tensor's element type is known and an integer type."""
    dtype = onnx_dtype(tensor)  # graphsurgeon keeps types numpy lacks (bfloat16) as ONNX enums
    return dtype is not None and np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(dtype), np.integer)


def np_dtype(tensor: Tensor):
    """The tensor's element type as a numpy dtype."""
    return onnx.helper.tensor_dtype_to_np_dtype(onnx_dtype(tensor))


def _dim_equal(a, b) -> bool | None:
    """Equality of two dims where known; a dim is never negative, so it never equals -1."""
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return bool(a == b)
    if isinstance(a, str) and a == b:
        return True
    if isinstance(a, (int, np.integer)) and a < 0 or isinstance(b, (int, np.integer)) and b < 0:
        return False
    return None


def _is_int_vector(tensor: Tensor) -> bool:
    return (
        tensor.shape is not None
        and len(tensor.shape) <= 1
        and is_integer(tensor)
    )


def _constant_node_value(node: Node) -> np.ndarray | None:
    for key, value in node.attrs.items():
        if key == "value":
            return np.asarray(value.values)
        if key in ("value_float", "value_int"):
            return np.array(value, dtype=np.float32 if key == "value_float" else np.int64)
        if key in ("value_floats", "value_ints"):
            return np.array(value, dtype=np.float32 if key == "value_floats" else np.int64)
    return None


def _np_dtype(onnx_type: int):
    return onnx.helper.tensor_dtype_to_np_dtype(onnx_type)


def _axes(node: Node, inputs: list, index: int = 1):
    if len(inputs) > index and inputs[index] is not None:
        return [int(a) for a in np.asarray(inputs[index]).reshape(-1)]
    return node.attrs.get("axes")


def _slice(node: Node, x: list):
    data = x[0]
    starts, ends = np.asarray(x[1]).reshape(-1), np.asarray(x[2]).reshape(-1)
    axes = np.asarray(x[3]).reshape(-1) if len(x) > 3 and x[3] is not None else range(len(starts))
    steps = np.asarray(x[4]).reshape(-1) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis)] = slice(*slice(int(start), int(end), int(step)).indices(data.shape[int(axis)]))
    return data[tuple(index)]


def _reshape(node: Node, x: list):
    shape = [int(d) for d in x[1]]
    if not node.attrs.get("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x[0].reshape(shape)


def _int_div(a, b):
    if np.issubdtype(np.asarray(a).dtype, np.integer):
        return (np.trunc(np.asarray(a) / np.asarray(b))).astype(np.asarray(a).dtype)
    return np.asarray(a) / np.asarray(b)


def _constant_of_shape(node: Node, x: list):
    fill = node.attrs.get("value")
    fill = np.asarray(fill.values).reshape(-1) if fill is not None else np.zeros(1, np.float32)
    return np.full([int(d) for d in x[0]], fill[0], dtype=fill.dtype)


_FOLDERS: dict[str, Callable[[Node, list], np.ndarray]] = {
    "Identity": lambda n, x: x[0],
    "Cast": lambda n, x: x[0].astype(_np_dtype(n.attrs["to"])),
    "Sqrt": lambda n, x: np.sqrt(x[0]),
    "Reciprocal": lambda n, x: np.reciprocal(x[0]),
    "Neg": lambda n, x: np.negative(x[0]),
    "Add": lambda n, x: np.add(x[0], x[1]),
    "Sub": lambda n, x: np.subtract(x[0], x[1]),
    "Mul": lambda n, x: np.multiply(x[0], x[1]),
    "Div": lambda n, x: _int_div(x[0], x[1]),
    "Pow": lambda n, x: np.power(x[0], x[1]).astype(x[0].dtype),
    "Unsqueeze": lambda n, x: np.expand_dims(
        x[0], [a % (x[0].ndim + len(_axes(n, x))) for a in _axes(n, x)]
    ),
    "Squeeze": lambda n, x: np.squeeze(x[0], axis=tuple(_axes(n, x)) if _axes(n, x) else None),
    "Reshape": _reshape,
    "Concat": lambda n, x: np.concatenate(x, axis=n.attrs["axis"]),
    "Gather": lambda n, x: np.take(x[0], x[1], axis=n.attrs.get("axis", 0)),
    "Slice": _slice,
    "Range": lambda n, x: np.arange(x[0], x[1], x[2]).astype(np.asarray(x[0]).dtype),
    "ConstantOfShape": _constant_of_shape,
    "Expand": lambda n, x: x[0] * np.ones([int(d) for d in x[1]], dtype=x[0].dtype),
    "Equal": lambda n, x: np.equal(x[0], x[1]),
    "Where": lambda n, x: np.where(x[0], x[1], x[2]),
    "Not": lambda n, x: np.logical_not(x[0]),
}
