"""Local equivalence: a subgraph cut out of the model and run on its own, so that what a rule
matched can be compared with what the chosen target emits in its place, on inputs the rule
generates.

- `Cut`: the nodes that compute some tensors from boundary tensors (the roles: x and the positions
  of a RoPE, the cache and the update of a KV write) and constants. Tensors it reads only through
  Shape or Size become inputs of their own (`shape_leaves`), fed with any values of the right
  shape. `signature` is equal for cuts that compute the same function, which lets a rule verify
  each distinct subgraph once per pass (rewrite.once).
- `emitted`: what a target emits for a spec, alone in a model whose inputs are the spec's boundary
  tensors.
- `session` / `run`: onnxruntime on the CPU, external data found in the model's own directory,
  failures as one-line Rejects. Mask classification (masks.py) runs its programs through them too.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields, replace
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from . import runtime
from .errors import first_line
from .export import export
from .graph import Graph, Node, Tensor, onnx_dtype
from .rewrite import Reject, Rewrite
from .widen import has_bfloat16, widened, widened_inputs

_SMALL = 4096  # constants up to this many elements are compared by value in signatures
_IR_VERSION = 10  # what onnxruntime reads with opsets up to 24


class Cut:
    """The nodes computing `outputs` from the tensors in `roles` (id -> role name) and constants.

    opaque:   nodes whose output is taken as the identity of their first input (a Slice that only
              bounds the rows of a table read by Gathers: the whole table is evaluated).
    limit:    the most tensors the cut may hold (a larger subgraph is not checked locally).
    what:     how Reject messages name the subgraph.
    """

    def __init__(self, graph: Graph, outputs: list[Tensor], roles: dict[int, str], *,
                 opaque: Callable[[Node], bool] | None = None,
                 limit: int = 400, what: str = "the subgraph"):
        self.graph, self.outputs, self.roles = graph, outputs, roles
        self.what = what
        self._opaque = opaque or (lambda node: False)
        self.nodes: list[Node] = []  # producers before consumers
        self.opaque_nodes: list[Node] = []
        self.constants: list[gs.Constant] = []
        self.shape_leaves: list[Tensor] = []
        self._computed = self._collect(limit)
        self._signatures: dict[int, tuple] = {}
        self.depends_on_roles: dict[int, bool] = {}  # id(tensor) -> its values depend on a role
        self.signature = tuple(self._signature(t) for t in outputs)

    def producer(self, tensor: Tensor) -> Node | None:
        return self.graph.producer(tensor)

    def _is_constant(self, tensor: Tensor) -> bool:
        return is_constant(self.graph, tensor)

    def _collect(self, limit: int) -> set[int]:
        """Every tensor the outputs' values are computed from (inputs of Shape are not)."""
        reached, stack = set(), list(self.outputs)
        while stack:
            tensor = stack.pop()
            if id(tensor) in reached or id(tensor) in self.roles or self._is_constant(tensor):
                continue
            reached.add(id(tensor))
            node = self.producer(tensor)
            if node is None:
                raise Reject(f"{self.what} reads '{tensor.name}', which it cannot be checked without")
            if len(reached) > limit or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                raise Reject(f"{self.what} is too large or has control flow")
            if node.op in ("Shape", "Size"):
                continue
            if self._opaque(node):
                self.opaque_nodes.append(node)
                stack.append(node.inputs[0])
            else:
                stack.extend(t for t in node.inputs if t.name)
        return reached

    def _signature(self, tensor: Tensor) -> tuple:
        key = id(tensor)
        if key in self._signatures:
            return self._signatures[key]
        node = self.producer(tensor)
        on_roles = False
        if key in self.roles:
            signature, on_roles = ("role", self.roles[key]), True
        elif not tensor.name:
            signature = ("none",)
        elif isinstance(tensor, gs.Constant):
            value = self.graph.value(tensor) if _size(tensor) <= _SMALL else None
            signature = value_signature(value) if value is not None else ("initializer", tensor.name)
            if all(c is not tensor for c in self.constants):
                self.constants.append(tensor)
        elif node is not None and node.op == "Constant":
            signature = value_signature(_constant_node_value(node))
            self._place(node)
        elif key not in self._computed:  # read only through Shape
            if all(t is not tensor for t in self.shape_leaves):
                self.shape_leaves.append(tensor)
            signature = ("shape of", tensor.name)
        else:
            inputs = node.inputs[:1] if any(n is node for n in self.opaque_nodes) else node.inputs
            signature = (node.op, node.domain or "", node.outputs.index(tensor), _attrs(node),
                         tuple(self._signature(t) for t in inputs))
            on_roles = node.op not in ("Shape", "Size") and any(
                self.depends_on_roles.get(id(t), False) for t in inputs)
            self._place(node)
        self._signatures[key], self.depends_on_roles[key] = signature, on_roles
        return signature

    def _place(self, node) -> None:
        if all(n is not node for n in self.nodes):
            self.nodes.append(node)  # after its inputs' producers: a topological order

    def model(self, inputs: list[Tensor], outputs: list[Tensor] | None = None) -> onnx.ModelProto:
        """The cut as a model: `inputs` (roles and shape leaves) in, `outputs` (default: the
        cut's) out, element types as in the graph, dims left open."""
        outputs = self.outputs if outputs is None else outputs
        protos = [_identity_of_first_input(n) if n in self.opaque_nodes else node_proto(n)
                  for n in self.nodes]
        initializers = [OnnxExporter.export_tensor_proto(c) for c in self.constants]
        values = [onnx.helper.make_tensor_value_info(t.name, onnx_dtype(t) or onnx.TensorProto.FLOAT,
                                                     _open_dims(self.graph.shape(t)))
                  for t in inputs]
        results = [onnx.helper.make_tensor_value_info(t.name, onnx_dtype(t) or 0, None) for t in outputs]
        graph = onnx.helper.make_graph(protos, "cut", values, results, initializers)
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.graph.opsets.items()]
        model = onnx.helper.make_model(graph, opset_imports=opsets)
        model.ir_version = _IR_VERSION
        return model

    def session(self, inputs: list[Tensor], outputs: list[Tensor] | None = None):
        return session(self.model(inputs, outputs), self.graph.base_dir, self.what)


def emitted(graph: Graph, spec, target, inputs: list[Tensor], outputs: list[Tensor]) -> onnx.ModelProto:
    """The nodes `target` emits for `spec`, alone in a model: `inputs` in, `outputs` out (tensors
    of `graph` that the spec names; the spec is rebound to the model's copies of them)."""
    values = [onnx.helper.make_tensor_value_info(t.name, onnx_dtype(t), _open_dims(graph.shape(t)))
              for t in inputs]
    results = [onnx.helper.make_tensor_value_info(t.name, onnx_dtype(t), None) for t in outputs]
    opset = max(target.floor_opset, getattr(spec, "min_opset", 0))
    opsets = [onnx.helper.make_opsetid("", opset)] + [onnx.helper.make_opsetid(d, v)
                                                      for d, v in target.domains.items()]
    alone = Graph(onnx.helper.make_model(onnx.helper.make_graph([], "emitted", values, results),
                                         opset_imports=opsets))
    by_name = alone.gs.tensors()

    def rebind(value):
        if isinstance(value, gs.Tensor):
            return by_name.get(value.name, value)
        if isinstance(value, (list, tuple)):
            return type(value)(rebind(v) for v in value)
        return value

    rebound = {f.name: rebind(getattr(spec, f.name)) for f in fields(spec)}
    rewrite = Rewrite(alone, "check")
    target.emit(replace(spec, **rebound), rewrite)
    rewrite.apply()
    model = export(alone, onnx.helper.make_model(onnx.helper.make_graph([], "emitted", [], []),
                                                 opset_imports=opsets), target.domains)
    model.ir_version = _IR_VERSION
    return model


def session(model: onnx.ModelProto | bytes, base_dir: str | None, what: str = "the subgraph",
            error: type[Exception] = Reject):
    """An onnxruntime session for a cut; `error` (a Reject) if onnxruntime does not load it.
    A bfloat16 cut runs widened to float32 (onnxruntime's CPU provider has no bfloat16 kernels
    for most ops): its bfloat16 feeds are widened, its outputs come back as float32."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    widen = has_bfloat16(proto)
    try:
        data = widened(proto, base_dir).SerializeToString() if widen else (
            model if isinstance(model, bytes) else model.SerializeToString())
        opened = runtime.session(data, base_dir)
    except Exception as exc:  # onnxruntime's own exception types are not importable portably
        raise error(f"{what} does not load in onnxruntime: {first_line(exc, 200)}") from None
    return _WidenedSession(opened) if widen else opened


class _WidenedSession:
    """A session of a cut widened from bfloat16 (widen.py) that takes the cut's own feeds."""

    def __init__(self, inner):
        self.inner = inner

    def get_inputs(self):
        return self.inner.get_inputs()

    def get_outputs(self):
        return self.inner.get_outputs()

    def run(self, names, feeds: dict) -> list[np.ndarray]:
        return self.inner.run(names, widened_inputs(feeds))


def run(session, feeds: dict, what: str = "the subgraph") -> list[np.ndarray]:
    """Run a session on the feeds it declares (others are ignored); Reject if it fails."""
    declared = {i.name for i in session.get_inputs()}
    try:
        return session.run(None, {k: v for k, v in feeds.items() if k in declared})
    except Exception as error:
        raise Reject(f"{what} does not run on its own: {first_line(error, 200)}")


def value_signature(value: np.ndarray) -> tuple:
    return ("const", str(value.dtype), value.shape, hashlib.sha1(value.tobytes()).hexdigest())


def is_constant(graph: Graph, tensor: Tensor) -> bool:
    node = graph.producer(tensor)
    return isinstance(tensor, gs.Constant) or node is not None and node.op == "Constant"


def node_proto(node: Node) -> onnx.NodeProto:
    return OnnxExporter.export_node(node)


def _identity_of_first_input(node: Node) -> onnx.NodeProto:
    """An opaque node (see Cut) stands for its first input."""
    return onnx.helper.make_node("Identity", [node.inputs[0].name], [node.outputs[0].name])


def _attrs(node) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in node.attrs.items()))


def _constant_node_value(node) -> np.ndarray:
    value = node.attrs.get("value")
    if value is not None:
        return np.asarray(value.values)
    (key, value), = node.attrs.items()
    return np.asarray(value, dtype=np.float32 if "float" in key else np.int64)


def _size(tensor: gs.Constant) -> int:
    return int(np.prod(tensor.shape, dtype=np.int64))


def _open_dims(shape: tuple | None) -> list | None:
    return None if shape is None else [None] * len(shape)
