"""Repair of fused ops that exporters write invalid, before anything is matched.

torch.onnx's dynamo exporter at opset 23 writes `RotaryEmbedding` without position ids and with
cos/sin caches computed from the [1, S] positions: [1, S, rotary_dim/2]. The op takes such caches
as [batch, S, rotary_dim/2]; onnxruntime rejects any batch but 1 ("cos_cache and sin_cache are
expected to have the same shape as input x"), so the export runs at batch 1 only (the torch model
broadcast the caches over the batch). The repair expands each such cache to the batch of x, once
per cache (all layers read the same one): `Expand(cache, Concat(Shape(x)[0:1], [1, 1]))`, which
is what the broadcast meant.

The repaired model is proven in proof.py (Prover.require_repair): equal to the original at batch
1, the only size the original runs at, and, at batch 2 with a padded row, equal row by row to the
original run on each row alone, so every exporter-written op (the SDPA exports' `Attention`
too) is shown to treat each batch row as it does alone. The repaired model is then the source
the fusion pass rewrites and checks against.

Reads structure only (shapes from dim_relations' walk) and is linear in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .dim_relations import tensor_shapes

_PREFIX = "onnx_fuse_repair"


@dataclass
class Repair:
    """One exporter-written node made valid."""

    node: str
    op: str
    problem: str
    fix: str

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "problem": self.problem, "fix": self.fix}


def repair_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Repair]]:
    """The model with its exporter-broken ops made valid, and what was repaired; the model
    itself (not a copy) when nothing needs it."""
    if not any(n.op_type == "RotaryEmbedding" and not n.domain for n in model.graph.node):
        return model, []
    shapes = tensor_shapes(model)
    broken = {i for i, n in enumerate(model.graph.node) if _batch_one_caches(n, shapes)}
    if not broken:
        return model, []
    repaired = onnx.ModelProto()
    repaired.CopyFrom(model)
    return repaired, _expand_caches(repaired.graph, broken)


def _batch_one_caches(node: onnx.NodeProto, shapes: dict) -> bool:
    """RotaryEmbedding without position ids whose 3-D caches have batch 1 while x's batch is
    not known to be 1."""
    if node.op_type != "RotaryEmbedding" or node.domain or len(node.input) < 3:
        return False
    if len(node.input) > 3 and node.input[3]:
        return False
    x, cos, sin = (shapes.get(name) for name in node.input[:3])
    if x is None or x[0] is None or x[0].is_const(1):
        return False
    return any(c is not None and len(c) == 3 and c[0] is not None and c[0].is_const(1) for c in (cos, sin))


def _expand_caches(graph: onnx.GraphProto, broken: set[int]) -> list[Repair]:
    """Rebuild the node list with the caches of the nodes at the `broken` positions expanded to
    x's batch (one Expand per cache, placed before its first reader)."""
    names = _Names(graph)
    expanded: dict[str, str] = {}
    nodes, repairs = [], []
    for index, original in enumerate(graph.node):
        node = onnx.NodeProto()
        node.CopyFrom(original)
        if index in broken:
            for slot in (1, 2):
                cache = node.input[slot]
                if cache not in expanded:
                    expanded[cache], added = _expand_to_batch(cache, node.input[0], names)
                    nodes.extend(added)
                node.input[slot] = expanded[cache]
            repairs.append(Repair(node.name, node.op_type, _BATCH_ONE, _EXPANDED))
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    return repairs


_BATCH_ONE = ("cos/sin caches of batch 1 ([1, S, rotary_dim/2]) and no position ids: RotaryEmbedding "
              "takes them as [batch, S, rotary_dim/2] (onnxruntime rejects batch > 1)")
_EXPANDED = "caches expanded to the batch of x (Expand to [batch, 1, 1])"


def _expand_to_batch(cache: str, x: str, names: _Names) -> tuple[str, list[onnx.NodeProto]]:
    batch, ones, target, out = (names.fresh(f"{cache}/{part}") for part in
                                ("batch", "ones", "shape", "expanded"))
    nodes = [
        helper.make_node("Shape", [x], [batch], name=names.fresh("Shape"), start=0, end=1),
        helper.make_node("Constant", [], [ones], name=names.fresh("Constant"),
                         value=numpy_helper.from_array(np.ones(2, np.int64))),
        helper.make_node("Concat", [batch, ones], [target], name=names.fresh("Concat"), axis=0),
        helper.make_node("Expand", [cache, target], [out], name=names.fresh("Expand")),
    ]
    return out, nodes


class _Names:
    """Tensor and node names not yet used in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {name for n in graph.node for name in (*n.input, *n.output, n.name)}
        self.used |= {v.name for v in (*graph.input, *graph.output, *graph.initializer)}

    def fresh(self, stem: str) -> str:
        name, count = f"{_PREFIX}/{stem}", 0
        while name in self.used:
            count += 1
            name = f"{_PREFIX}/{stem}_{count}"
        self.used.add(name)
        return name
