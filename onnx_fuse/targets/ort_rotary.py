"""RoPE for target "ort": com.microsoft.RotaryEmbedding, and its fold into GroupQueryAttention.

The contrib RotaryEmbedding takes x as [B, N, S, H] or [B, S, N·H] (with `num_heads`), position
ids as [B, S] (a [1, S] tensor fails at batch > 1), and caches [max_positions, rotary_dim / 2];
`rotary_embedding_dim` needs `num_heads` even for 4-D input.

The fold (OrtTarget.finish, after every rule ran): a GroupQueryAttention whose q and k are
rotated by RotaryEmbeddings sharing one cos/sin cache pair and one position tensor takes the
unrotated q and k with do_rotary=1, the caches and those positions as its position_ids, where
onnxruntime's CPU kernel takes rotary (head size and rotary_dim multiples of 16). Every GQA this
target writes has query_seqlens, with which the kernel rotates each row by its position_ids
exactly as RotaryEmbedding does (tests/test_target_ort.py runs both), so the fold holds for any
positions the model computes or reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..graph import Graph, Node, Tensor
from ..rewrite import Fused, PassResult, Reject, Rewrite
from ..specs import AttentionSpec, RotarySpec
from . import onnx as standard
from .ort_attention import GQA
from .ort_kernels import CONTRIB

ROTARY = "RotaryEmbedding"


def emit_rotary(spec: RotarySpec, rw: Rewrite) -> None:
    """RotaryEmbedding on [B, N, S, H] (x before the head transpose is transposed there and
    back) or, for a 3-D single head, on [B, S, H] as one head. Forms the contrib op has no input
    for (per-token cos/sin, channels to reorder or pass around it) get ONNX RotaryEmbedding."""
    if spec.form != "table" or spec.deinterleave or spec.around:
        standard.emit_rotary(spec, rw)
        return
    cos, sin, positions = standard.rotary_tables(spec, rw)
    # The kernel reads the head count of 4-D input from its shape; the attribute must only be
    # set (to anything) whenever rotary_embedding_dim is: tests/test_target_ort.py shows both.
    attrs = {"interleaved": int(spec.interleaved), "num_heads": 1}
    if spec.rotary_dim != spec.head_size:
        attrs["rotary_embedding_dim"] = spec.rotary_dim
    if spec.layout != "bsnh":
        rw.op(ROTARY, [spec.input, positions, cos, sin], attrs, domain=CONTRIB, outputs=[spec.output])
        return
    x = rw.op("Transpose", [spec.input], {"perm": [0, 2, 1, 3]}, dtype=spec.input.dtype)
    y = rw.op(ROTARY, [x, positions, cos, sin], attrs, domain=CONTRIB, dtype=spec.input.dtype)
    rw.op("Transpose", [y], {"perm": [0, 2, 1, 3]}, outputs=[spec.output])


# --- the fold ------------------------------------------------------------------------------------

@dataclass
class _Rotation:
    """A RotaryEmbedding seen from the GQA input it feeds, through layout-only ops."""

    node: Node
    spec: RotarySpec
    chain: list[Node]  # the head transpose and merge from the RoPE's [B, N, S, H] output to GQA's q/k


def fold_rotary(graph: Graph, result: PassResult) -> None:
    """Fold RotaryEmbeddings into the GroupQueryAttentions they feed, where proven; every
    attention fusion's report says whether (and why not)."""
    ropes = {name: (f, f.spec) for f in result.fused if isinstance(f.spec, RotarySpec) for name in f.nodes}
    attention_ops = {n.name: n for n in graph.gs.nodes if n.op == GQA and n.name in graph.fused_by}
    for fusion in result.fused:
        gqa = next((attention_ops[n] for n in fusion.nodes if n in attention_ops), None)
        if gqa is None or not isinstance(fusion.spec, AttentionSpec):
            continue
        try:
            query, key = (_rotation(graph, gqa.inputs[i], ropes) for i in (0, 1))
            if query is None or key is None:
                continue  # no RoPE feeds it: nothing to fold
            _require_foldable(fusion.spec, query, key)
        except Reject as reason:
            fusion.details["rotary"] = f"not folded: {reason}"
            continue
        _fold(graph, gqa, query, key, fusion)
        for rotation in (query, key):
            ropes[rotation.node.name][0].details["folded_into"] = gqa.name


def _rotation(graph: Graph, tensor: Tensor, ropes: dict) -> _Rotation | None:
    chain = []
    node = graph.producer(tensor)
    while node is not None and node.op in ("Reshape", "Transpose") and len(chain) < 3:
        chain.insert(0, node)
        node = graph.producer(node.inputs[0])
    if node is None or node.op != ROTARY or node.domain != CONTRIB or node.name not in ropes:
        return None  # no contrib RoPE feeds it (ONNX RotaryEmbedding for forms it cannot take)
    rotation = _Rotation(node, ropes[node.name][1], chain)
    ops = [(n.op, list(n.attrs.get("perm", []))) for n in chain]
    if rotation.spec.layout == "bsh" or ops != [("Transpose", [0, 2, 1, 3]), ("Reshape", [])]:
        raise Reject("the RoPE reaches GroupQueryAttention through other layout changes")
    return rotation


def _require_foldable(spec: AttentionSpec, query: _Rotation, key: _Rotation) -> None:
    q, k = query.node, key.node
    if q.inputs[2] is not k.inputs[2] or q.inputs[3] is not k.inputs[3] or q.inputs[1] is not k.inputs[1]:
        raise Reject("q and k are rotated with different caches or positions")
    if q.attrs.get("interleaved") != k.attrs.get("interleaved"):
        raise Reject("q and k are rotated differently")
    if spec.head_size % 16 or query.spec.rotary_dim % 16:
        raise Reject(f"onnxruntime's CPU kernel rotates inside GroupQueryAttention only for head "
                     f"sizes and rotary dims that are multiples of 16 (here {spec.head_size} and "
                     f"{query.spec.rotary_dim})")


def _fold(graph: Graph, gqa: Node, query: _Rotation, key: _Rotation, fusion: Fused) -> None:
    rw = Rewrite(graph, "rope")
    for index, rotation in ((0, query), (1, key)):
        tensor = rotation.node.inputs[0]
        for node in rotation.chain:  # the same layout changes, on the unrotated input
            tensor = rw.op(node.op, [tensor, *node.inputs[1:]], dict(node.attrs))
        gqa.inputs[index] = tensor
    # The RoPE's own [B, S] positions: GQA (given query_seqlens) rotates row by row by them.
    gqa.inputs[7], gqa.inputs[8], gqa.inputs[9] = (query.node.inputs[i] for i in (2, 3, 1))
    for rotation in (query, key):  # a rotation keeps the shape: its Shape readers read x
        rotated, x = rotation.node.outputs[0], rotation.node.inputs[0]
        for reader in [n for n in graph.consumers(rotated) if n.op == "Shape"]:
            reader.inputs[0] = x
    gqa.attrs["do_rotary"] = 1
    gqa.attrs["rotary_interleaved"] = int(query.node.attrs.get("interleaved", 0))
    created = rw.apply()
    fusion.nodes.extend(n.name for n in created)
    fusion.details["rotary"] = "folded into GroupQueryAttention (do_rotary=1)"
