"""What the TensorRT contract rules read of a model, and what they say.

`Facts` indexes a model once (types from shape inference, producers, consumers, graph inputs and
outputs, constants, local functions) so that every rule is a few lookups. A rule returns
`Finding`s; the checker gathers them into one `Verdict` per node TensorRT maps to a transformer
layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

# TensorRT versions the rules know, oldest first; rules say from which one a feature exists.
VERSIONS = ("10.15", "10.16", "11")

# How bad a finding is: the parser rejects the node ("parse"), the engine build fails ("build"),
# or it builds without the fused kernel or mask skipping the layer is for ("kernel").
PARSE, BUILD, KERNEL = "parse", "build", "kernel"

# Types with fused MHA kernels (the FP16/BF16/FP8 columns of the seed's MHA fusion tables).
FUSED_MHA_TYPES = {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN}


def at_least(version: str, since: str) -> bool:
    """Whether TensorRT `version` ("10.16") is `since` ("10.15") or later."""
    def key(v: str) -> tuple[int, ...]:
        parts = tuple(int(p) for p in v.split("."))
        return parts + (0,) * (3 - len(parts))
    return key(version) >= key(since)


def type_name(elem_type: int | None) -> str:
    return TensorProto.DataType.Name(elem_type or 0).lower()


@dataclass(frozen=True)
class Finding:
    rule: str  # which rule: "version", "rank", "dtype", "inputs", "attribute", "indices", ...
    message: str
    breaks: str  # PARSE, BUILD or KERNEL

    def to_json(self) -> dict:
        return {"rule": self.rule, "breaks": self.breaks, "message": self.message}


@dataclass
class Verdict:
    """What TensorRT does with one node (or one primitive attention, named by its Softmax)."""

    node: str
    op: str
    layer: str  # the TensorRT layer it becomes ("IAttention", "plugin", "MHA fusion", ...)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts that are no problem (a needed flag)

    @property
    def parses(self) -> bool:
        return not any(f.breaks == PARSE for f in self.findings)

    @property
    def builds(self) -> bool:
        return not any(f.breaks in (PARSE, BUILD) for f in self.findings)

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "layer": self.layer, "parses": self.parses,
                "builds": self.builds, "fused_kernel": not self.findings,
                "findings": [f.to_json() for f in self.findings], "notes": list(self.notes)}


def _scopes(graph: onnx.GraphProto):
    """The graph, then the bodies of its control-flow nodes (recursively)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for body in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _scopes(body)


class Facts:
    """A model indexed for the rules."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        scopes = list(_scopes(_inferred(model).graph))  # the graph and its If/Loop/Scan bodies
        self.types = {v.name: v.type.tensor_type for scope in scopes for v in
                      [*scope.value_info, *scope.input, *scope.output]}
        self.nodes = [node for scope in _scopes(graph) for node in scope.node]
        self.constants: dict[str, TensorProto] = {}
        for tensor in (t for scope in _scopes(graph) for t in scope.initializer):
            self.types[tensor.name] = _initializer_type(tensor)
            self.constants[tensor.name] = tensor
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
                self.constants[node.output[0]] = node.attribute[0].t
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_inputs = {v.name: v for v in graph.input if v.name not in self.constants}
        self.graph_outputs = {v.name for v in graph.output}
        self.function_names = {f.name for f in model.functions}

    def rank(self, name: str) -> int | None:
        t = self.types.get(name)
        return len(t.shape.dim) if t is not None and t.HasField("shape") else None

    def elem(self, name: str) -> int | None:
        t = self.types.get(name)
        return t.elem_type if t is not None and t.elem_type else None

    def dims(self, name: str) -> list | None:
        """Dims as ints, symbol names or None; None if the rank is unknown."""
        t = self.types.get(name)
        if t is None or not t.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else onnx.numpy_helper.to_array(tensor)


def attributes(node: onnx.NodeProto) -> dict:
    """Attribute name -> (value, ONNX attribute type name)."""
    return {a.name: (onnx.helper.get_attribute_value(a), onnx.AttributeProto.AttributeType.Name(a.type))
            for a in node.attribute}


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort: rules on unknown types say nothing
        return model


def _initializer_type(tensor: TensorProto) -> onnx.TypeProto.Tensor:
    value = onnx.TypeProto.Tensor(elem_type=tensor.data_type)
    for dim in tensor.dims:
        value.shape.dim.add().dim_value = dim
    return value
