"""A mask's ancestor subgraph cut out of the model as a small runnable ONNX program.

`extract` walks the mask's ancestors and writes them as a model whose inputs are the graph inputs
it reads. Shape(x) (and Size(x)) needs only x's shape: when x is a graph input, or its dims are
symbols (or expressions) of graph input dims, the shape is fed as an input of the program (a
ShapeFeed); otherwise x is computed from its own ancestors, with heavy embedding tables replaced
by zero stand-ins (a Gather's shape does not depend on the table's values), or, behind other heavy
weights, found by ONNX shape inference at each size. The whole model never runs and heavy weights
are never loaded. Programs are cached per mask tensor; identical subgraphs get equal fingerprints.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from .errors import first_line
from .dims import dim_symbols, eval_dim
from .graph import Graph, Tensor, onnx_dtype
from .verify import node_proto, session

# Initializer elements a mask program may carry to compute the shape of an intermediate whose
# shape shape inference left symbolic (e.g. embeddings behind a Reshape). Heavier tables that are
# only gathered from are replaced by zero stand-ins (the values do not matter for a shape); any
# other heavy weight makes the program find the shape by ONNX shape inference at each size.
WEIGHT_BUDGET = 1 << 22
# Rows of the zero stand-in for a heavy table that is only gathered from to compute a shape.
STAND_IN_ROWS = 2048
# A Shape's input is computed (rather than its shape inferred) only if it takes at most this
# many nodes.
TRIAL_NODES = 2000

_CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
           "Bernoulli"}

_PROGRAM_CACHE: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()
_SHAPE_ROUTES: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()  # see _Walk._shape_of


# --------------------------------------------------------------------------- the program


@dataclass
class Program:
    """The mask's subgraph as a model with one output, the mask."""

    problem: str | None = None  # why it cannot be evaluated (the other fields may be partial)
    model_bytes: bytes = b""
    fingerprint: str = ""  # equal for identical subgraphs (canonical names) with equal feeds
    inputs: list = field(default_factory=list)  # graph inputs fed to the program (gs tensors)
    shape_feeds: list[ShapeFeed] = field(default_factory=list)
    value_inputs: list[str] = field(default_factory=list)  # graph inputs read by value
    shape_inputs: list[str] = field(default_factory=list)  # the others, read only by shape
    int_constants: list[int] = field(default_factory=list)  # hints of a window width
    dtype: int | None = None  # the mask's element type
    session: object = None  # onnxruntime session, opened by session_of


@dataclass
class ShapeFeed:
    """An input of the program standing for Shape(x)[start:end] (or Size(x)) of a graph tensor."""

    name: str  # input name in the program
    dims: list  # x's dims (ints, symbols, expressions) when known symbolically
    start: int | None
    end: int | None
    size: bool  # Size(x): the product
    infer: "ShapeInference | None" = None  # dims found by shape inference at each size


@dataclass
class ShapeInference:
    """x's ancestors without their weights, shape-inferred at concrete input sizes."""

    model: onnx.ModelProto
    target: str
    inputs: list[tuple[str, list]]  # graph inputs: name, dims


class Unsupported(Exception):
    """The mask subgraph cannot be extracted or run; the message says why."""


def extract(graph: Graph, mask: Tensor, model) -> Program:
    """The mask's program, cached per mask tensor. model: the ModelProto, if at hand (its IR
    version and local functions are reused)."""
    cache = _PROGRAM_CACHE.setdefault(graph, {})
    hit = cache.get(id(mask))
    if hit is not None and hit[0] is mask:
        return hit[1]
    program = _build(graph, mask, model)
    cache[id(mask)] = (mask, program)
    return program


def session_of(program: Program):
    """The program's onnxruntime session; raises Unsupported if onnxruntime rejects it."""
    if program.session is None:
        program.session = session(program.model_bytes, None, "the mask subgraph", error=Unsupported)
    return program.session


def shape_feed_values(program: Program, values: dict[str, int]) -> dict[str, np.ndarray]:
    """The values of the program's shape feeds at one assignment of the input dims' symbols."""
    feeds = {}
    for f in program.shape_feeds:
        dims = _inferred_dims(f.infer, values) if f.infer is not None else \
            [d if isinstance(d, int) else eval_dim(d, values) for d in f.dims]
        if f.size:
            feeds[f.name] = np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
        else:
            feeds[f.name] = np.array(dims[slice(f.start, f.end)], dtype=np.int64)
    return feeds


# --------------------------------------------------------------------------- graph input dims


def input_dims(t: Tensor) -> list:
    """A graph input's dims; an unknown dim becomes a symbol of its own, and a size written as a
    string ('8': transformers' exporter) is that size (as in onnx_fuse.check)."""
    return [f"?{t.name}:{axis}" if d is None else int(d) if isinstance(d, str) and d.isdigit() else d
            for axis, d in enumerate(t.shape or ())]


def input_symbols(graph: Graph) -> dict[str, list[str]]:
    """symbol -> names of the graph inputs whose dims name it."""
    found: dict[str, list[str]] = {}
    for t in graph.gs.inputs:
        for d in input_dims(t):
            if isinstance(d, str):
                for s in dim_symbols(d):
                    found.setdefault(s, []).append(t.name)
    return found


def resolvable(dims, symbols: dict) -> bool:
    """Every dim is known and expressed in `symbols` (see input_symbols)."""
    if dims is None:
        return False
    for d in dims:
        if d is None:
            return False
        if isinstance(d, str) and not all(s in symbols for s in dim_symbols(d)):
            return False
    return True


def input_named(graph: Graph, name: str) -> Tensor:
    return next(t for t in graph.gs.inputs if t.name == name)


# --------------------------------------------------------------------------- the walk


class _Walk:
    """Ancestors of the mask, stopping at Shape/Size nodes (see _build)."""

    def __init__(self, graph: Graph, limit: int | None = None):
        self.graph = graph
        self.limit = limit  # at most this many nodes (a trial walk gives up past it)
        self.nodes: dict[int, gs.Node] = {}
        self.value_seen: dict[int, gs.Node] = {}  # nodes walked in value context
        self.order: list[gs.Node] = []  # post-order: producers before consumers
        self.value_inputs: dict[str, Tensor] = {}
        self.shape_inputs: dict[str, Tensor] = {}
        self.constants: dict[int, gs.Constant] = {}
        self.shape_feeds: dict[int, gs.Node] = {}  # Shape/Size nodes whose output is fed
        self.inferred: set[int] = set()  # those of them whose shape needs shape inference
        self.symbols = input_symbols(graph)
        self.budget = 0  # elements of the light constants walked
        self.value_constants: set[int] = set()  # constants whose values the mask needs
        self.shrink: set[int] = set()  # heavy tables computed only for a shape: stand-ins

    def visit(self, root: Tensor, shape_only: bool) -> None:
        """Post-order DFS from `root`. shape_only: the values found are only needed for a shape.
        A node first met in a shape-only walk is walked again when its value turns out to be
        needed, so that the graph inputs under it count as read by value."""
        seen = self.nodes if shape_only else self.value_seen
        stack = [(root, False)]
        while stack:
            tensor, expanded = stack.pop()
            if isinstance(tensor, gs.Constant):
                if id(tensor) not in self.constants:
                    self.constants[id(tensor)] = tensor
                    if not _is_heavy(tensor):
                        self.budget += _constant_size(tensor)
                if not shape_only:
                    self.value_constants.add(id(tensor))
                continue
            node = tensor.inputs[0] if tensor.inputs else None
            if node is None:
                if not any(tensor is t for t in self.graph.gs.inputs):
                    raise Unsupported(f"the mask depends on '{tensor.name}', which nothing computes")
                (self.shape_inputs if shape_only else self.value_inputs)[tensor.name] = tensor
                continue
            if id(node) in seen:
                continue
            if expanded:
                if id(node) not in self.nodes:
                    self.nodes[id(node)] = node
                    self.order.append(node)
                    if self.limit is not None and len(self.nodes) > self.limit:
                        raise Unsupported("too large to compute for a shape")
                seen[id(node)] = node
                continue
            if node.op in _CONTROL_FLOW or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                raise Unsupported(f"the mask subgraph contains control flow ({node.op} '{node.name}')")
            if node.op in _RANDOM:
                raise Unsupported(f"the mask subgraph is random ({node.op} '{node.name}')")
            if node.op in ("Shape", "Size") and not (node.domain or ""):
                if id(node) not in self.nodes and id(node) not in self.shape_feeds:
                    self._shape_of(node)
                continue
            stack.append((tensor, True))
            for t in node.inputs:
                if t.name:
                    stack.append((t, False))

    def _shape_of(self, node: gs.Node) -> None:
        """Decide how the program gets Shape/Size(x): keep the node (x a constant, or x cheap
        to compute), or feed its value (x's dims known symbolically, or found by inference)."""
        x = node.inputs[0]
        if isinstance(x, gs.Constant):
            self.nodes[id(node)] = node  # Shape of a constant: keep the node and the constant
            self.order.append(node)
            self.constants[id(x)] = x
            return
        if not x.inputs:  # a graph input: its declared dims at the size driven
            self.shape_feeds[id(node)] = node
            self.shape_inputs.setdefault(x.name, x)
            return
        dims = self.graph.shape(x)
        if resolvable(dims, self.symbols):
            self.shape_feeds[id(node)] = node
            for d in dims:
                if isinstance(d, str):
                    for s in dim_symbols(d):
                        for name in self.symbols[s]:
                            self.shape_inputs.setdefault(name, input_named(self.graph, name))
            return
        # Compute x itself when that is cheap; otherwise infer its shape without the weights.
        # The verdict is kept per tensor: a deep activation's shape is asked for by many Shape
        # nodes, and walking its ancestors again each time made this quadratic.
        verdicts = _SHAPE_ROUTES.setdefault(self.graph, {})
        if id(x) not in verdicts:
            trial = _Walk(self.graph, limit=TRIAL_NODES)
            try:
                trial.visit(x, shape_only=True)
                heavy = [c for c in trial.constants.values() if _is_heavy(c)]
                cheap = trial.budget <= WEIGHT_BUDGET and \
                    all(_only_gathered(c, trial.nodes) for c in heavy)
            except Unsupported:
                cheap, heavy = False, []
                trial.value_inputs, trial.shape_inputs = _all_inputs(self.graph), {}
            verdicts[id(x)] = (cheap, heavy, {**trial.value_inputs, **trial.shape_inputs})
        cheap, heavy, inputs = verdicts[id(x)]
        if cheap:
            # x's values do not matter, only its shape: a heavy table that is only gathered from
            # becomes a zero stand-in with fewer rows (a Gather's shape does not depend on them).
            self.shrink.update(id(c) for c in heavy)
            self.visit(x, shape_only=True)
            self.nodes[id(node)] = node
            self.order.append(node)
            return
        self.inferred.add(id(node))
        self.shape_feeds[id(node)] = node
        for name, t in inputs.items():
            self.shape_inputs.setdefault(name, t)


def _constant_size(t: gs.Constant) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) if t.shape is not None else 0


def _is_heavy(t: gs.Constant) -> bool:
    values = t._values
    external = isinstance(values, gs.ir.tensor.LazyValues) and \
        values.tensor.data_location == TensorProto.EXTERNAL
    return external or _constant_size(t) > WEIGHT_BUDGET


def _all_inputs(graph: Graph) -> dict[str, Tensor]:
    """Every graph input: what an activation whose ancestry is too large to walk may read."""
    return {t.name: t for t in graph.gs.inputs}


def _only_gathered(c: gs.Constant, nodes: dict) -> bool:
    """Every use of `c` among `nodes` is as the table of a Gather along axis 0."""
    users = [n for n in c.outputs if id(n) in nodes]
    return all(n.op == "Gather" and n.inputs[0] is c and n.attrs.get("axis", 0) == 0
               and (c.shape or [0])[0] > 0 for n in users)


# --------------------------------------------------------------------------- writing the program


def _build(graph: Graph, mask: Tensor, model) -> Program:
    """The mask program; a program whose `problem` says why it cannot be evaluated keeps the
    dependencies found up to there."""
    walk, program = _Walk(graph), Program()
    try:
        if isinstance(mask, gs.Constant):
            walk.constants[id(mask)] = mask
        else:
            walk.visit(mask, shape_only=False)
        program.dtype = onnx_dtype(mask)
        if program.dtype is None:
            raise Unsupported(f"the mask '{mask.name}' has no known element type")
        if not mask.inputs and not isinstance(mask, gs.Constant):
            raise Unsupported(f"the mask is the graph input '{mask.name}': its values are the caller's")
        _emit(graph, mask, model, walk, program)
    except Unsupported as e:
        program.problem = str(e)
    program.value_inputs = list(walk.value_inputs)
    program.shape_inputs = [n for n in walk.shape_inputs if n not in walk.value_inputs]
    return program


def _emit(graph: Graph, mask: Tensor, model, walk: _Walk, program: Program) -> None:
    """Write the walked subgraph as a model (program.model_bytes and its feeds)."""
    writer = _Writer(graph, walk)
    for c in walk.constants.values():
        writer.constant(c)
    nodes = [writer.node(n) for n in walk.order if id(n) not in walk.shape_feeds]
    feeds = [_shape_feed(graph, n, writer.name_of(n.outputs[0], "shape"), id(n) in walk.inferred)
             for n in walk.shape_feeds.values()]
    out_name = writer.names.get(id(mask)) or writer.name_of(mask, "t")
    if not isinstance(mask, gs.Constant) and out_name not in [o for n in nodes for o in n.output] \
            and out_name not in [f.name for f in feeds]:
        raise Unsupported("internal: the mask tensor was not reached")
    graph_inputs = [helper.make_tensor_value_info(t.name, onnx_dtype(t),
                                                  [d if isinstance(d, int) else None for d in (t.shape or [])])
                    for t in writer.inputs]
    graph_inputs += [helper.make_tensor_value_info(f.name, TensorProto.INT64, None if f.size else [None])
                     for f in feeds]
    outputs = [helper.make_tensor_value_info(out_name, program.dtype, None)]
    if out_name in [f.name for f in feeds] or isinstance(mask, gs.Constant) and not nodes:
        # A graph output may not be an input or an initializer: pass it through an Identity.
        nodes.append(helper.make_node("Identity", [out_name], ["mask_out"]))
        outputs = [helper.make_tensor_value_info("mask_out", program.dtype, None)]
    program.model_bytes = _model(graph, model, helper.make_graph(
        nodes, "mask", graph_inputs, outputs, writer.initializers)).SerializeToString()
    program.inputs, program.shape_feeds = writer.inputs, feeds
    program.int_constants = sorted(writer.int_constants)
    program.fingerprint = _fingerprint(program.model_bytes, feeds)


class _Writer:
    """The walked nodes and constants as protos with canonical names, so that identical
    subgraphs (a mask each layer recomputes) serialize identically and share one evaluation."""

    def __init__(self, graph: Graph, walk: _Walk):
        self.walk = walk
        wanted = {**walk.value_inputs, **walk.shape_inputs}
        self.inputs = [t for t in graph.gs.inputs if t.name in wanted]
        self.names: dict[int, str] = {id(t): t.name for t in self.inputs}
        self.initializers: list[onnx.TensorProto] = []
        self.int_constants: set[int] = set()
        self._constants: set[int] = set()

    def name_of(self, t: Tensor, prefix: str) -> str:
        if id(t) not in self.names:
            self.names[id(t)] = f"{prefix}{len(self.names)}"
        return self.names[id(t)]

    def constant(self, c: gs.Constant) -> None:
        if id(c) in self._constants:
            return
        self._constants.add(id(c))
        shrink = id(c) in self.walk.shrink and id(c) not in self.walk.value_constants
        proto = _stand_in(c) if shrink else _constant_proto(c)
        proto.name = self.name_of(c, "c")
        self.initializers.append(proto)
        _collect_ints(c, self.int_constants)

    def node(self, node: gs.Node) -> onnx.NodeProto:
        proto = onnx.NodeProto()
        proto.CopyFrom(node_proto(node))
        proto.name = ""
        del proto.input[:]
        del proto.output[:]
        for t in node.inputs:
            if not t.name:
                proto.input.append("")
                continue
            if isinstance(t, gs.Constant):
                self.constant(t)
            proto.input.append(self.name_of(t, "t"))
        proto.output.extend(self.name_of(t, "t") for t in node.outputs)
        if node.op == "Constant":
            _collect_node_ints(node, self.int_constants)
        return proto


def _model(graph: Graph, model, body: onnx.GraphProto) -> onnx.ModelProto:
    called = _called_functions(graph, model, body)
    domains = dict(graph.opsets)
    for domain, _ in called:
        domains.setdefault(domain, 1)
    opsets = [helper.make_opsetid(domain, version) for domain, version in domains.items()]
    sub = helper.make_model(body, opset_imports=opsets)
    sub.ir_version = max(helper.find_min_ir_version_for(opsets, True), 8,
                         model.ir_version if model is not None else 0)
    sub.functions.extend(called.values())
    return sub


def _called_functions(graph: Graph, model, body: onnx.GraphProto) -> dict:
    """The local functions the program's nodes call, directly or through another function: the
    model's own, and those of ops this pass has already written (a later layer's mask may read a
    shape through an earlier fused layer). Only those, so that identical programs stay identical
    bytes (and share one evaluation) whatever the pass has written elsewhere."""
    known = {(f.domain, f.name): f for f in (model.functions if model is not None else ())}
    for key, proto in graph.functions.items():
        known.setdefault(key, proto)
    called: dict = {}
    pending = [(n.domain, n.op_type) for n in body.node]
    while pending:
        key = pending.pop()
        if key in known and key not in called:
            called[key] = known[key]
            pending.extend((n.domain, n.op_type) for n in known[key].node)
    return called


def _fingerprint(model_bytes: bytes, feeds: list[ShapeFeed]) -> str:
    digest = hashlib.sha1(model_bytes)
    for f in feeds:
        digest.update(repr((f.name, f.dims, f.start, f.end, f.size)).encode())
        if f.infer is not None:
            digest.update(f.infer.target.encode() + f.infer.model.SerializeToString())
    return digest.hexdigest()


def _constant_proto(c: gs.Constant) -> onnx.TensorProto:
    values = c._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        if values.tensor.data_location == TensorProto.EXTERNAL:
            raise Unsupported(f"the mask subgraph needs '{c.name}', stored outside the model")
        proto = onnx.TensorProto()
        proto.CopyFrom(values.tensor)
        return proto
    return numpy_helper.from_array(np.asarray(c.values), c.name)


def _stand_in(c: gs.Constant) -> onnx.TensorProto:
    """Zeros shaped like `c` with at most STAND_IN_ROWS rows, of c's element type."""
    values = c._values
    elem = values.tensor.data_type if isinstance(values, gs.ir.tensor.LazyValues) else onnx_dtype(c)
    dims = [min(int(c.shape[0]), STAND_IN_ROWS), *[int(d) for d in c.shape[1:]]]
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize
    proto = onnx.TensorProto()
    proto.dims.extend(dims)
    proto.data_type = elem
    proto.raw_data = bytes(int(np.prod(dims, dtype=np.int64)) * itemsize)
    return proto


def _collect_ints(c: gs.Constant, found: set[int]) -> None:
    """Add the small integers of `c` (3 <= |v| < 2**20) to `found`: candidate window widths."""
    if _constant_size(c) <= 64:
        try:
            _small_ints(c.values, found)
        except Exception:  # values of an exotic type: no hint from it
            pass


def _collect_node_ints(node: gs.Node, found: set[int]) -> None:
    for key, value in node.attrs.items():
        if isinstance(value, gs.Constant):
            _collect_ints(value, found)
        elif key in ("value_int", "value_ints"):
            _small_ints(np.array(value, dtype=np.int64), found)


def _small_ints(values, found: set[int]) -> None:
    array = np.asarray(values)
    if array.size > 64 or array.dtype.kind not in "iu":
        return
    for v in array.reshape(-1).tolist():
        if 2 < abs(v) < (1 << 20):
            found.add(abs(int(v)))


# --------------------------------------------------------------------------- shape feeds


def _shape_feed(graph: Graph, node: gs.Node, name: str, infer: bool) -> ShapeFeed:
    x = node.inputs[0]
    size = node.op == "Size"
    start, end = (None, None) if size else (node.attrs.get("start"), node.attrs.get("end"))
    if not infer:
        dims = input_dims(x) if not x.inputs else list(graph.shape(x))
        return ShapeFeed(name, dims, start, end, size)
    return ShapeFeed(name, [], start, end, size, infer=_shape_inference(graph, x))


def _shape_inference(graph: Graph, x: Tensor) -> ShapeInference:
    """x's ancestors as a model whose weights are typed inputs without data (small constants
    stay, since shape inference propagates their values)."""
    seen, stack = set(), [x]
    initializers, extra_inputs = {}, {}
    graph_inputs = {}
    while stack:
        t = stack.pop()
        if isinstance(t, gs.Constant):
            if _is_heavy(t):
                extra_inputs[t.name] = helper.make_tensor_value_info(t.name, onnx_dtype(t), list(t.shape))
            else:
                initializers[t.name] = _constant_proto(t)
                initializers[t.name].name = t.name
            continue
        node = t.inputs[0] if t.inputs else None
        if node is None:
            graph_inputs[t.name] = t
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op in _CONTROL_FLOW:
            raise Unsupported(f"the shape of '{x.name}' passes through control flow")
        stack.extend(i for i in node.inputs if i.name)
    order = [n for n in graph.gs.nodes if id(n) in seen]  # graph order is topological
    protos = [node_proto(n) for n in order]
    inputs = [(t.name, input_dims(t)) for t in graph.gs.inputs if t.name in graph_inputs]
    value_infos = [helper.make_tensor_value_info(n, onnx_dtype(graph_inputs[n]), None) for n, _ in inputs]
    g = helper.make_graph(protos, "shape", value_infos + list(extra_inputs.values()),
                          [helper.make_tensor_value_info(x.name, onnx_dtype(x) or TensorProto.FLOAT, None)],
                          list(initializers.values()))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in graph.opsets.items()])
    return ShapeInference(model, x.name, inputs)


def _inferred_dims(inference: ShapeInference, values: dict[str, int]) -> list[int]:
    """The target's dims, shape-inferred with the graph inputs at one size assignment."""
    model = onnx.ModelProto()
    model.CopyFrom(inference.model)
    for vi in model.graph.input:
        dims = dict(inference.inputs).get(vi.name)
        if dims is None:
            continue
        concrete = [d if isinstance(d, int) else eval_dim(d, values) for d in dims]
        vi.CopyFrom(helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, concrete))
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.name == inference.target:
            dims = vi.type.tensor_type.shape.dim
            if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
                return [d.dim_value for d in dims]
    raise Unsupported(f"shape inference does not find the shape of '{inference.target}'")
