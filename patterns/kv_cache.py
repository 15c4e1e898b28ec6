"""KV-cache writes into fixed-size caches: the S new tokens' keys (or values) copied into the cache
[B, N, L, H] along its sequence axis, at slots p .. p + S - 1; rewritten to ONNX TensorScatter
(opset 24, axis -2, mode linear), which TensorRT's parser maps to IKVCacheUpdateLayer.

Who writes it which way (Hugging Face StaticCache: `cache.index_copy_(2, cache_position, new)`):
- TorchScript: ScatterElements(past, Expand(Unsqueeze(positions, [0, 1, 3]), shape), new, axis=2),
  the Expand shape being past's shape with dim 2 replaced by S.
- dynamo: Transpose(ScatterND(Transpose(past, [2, 0, 1, 3]), Unsqueeze(positions, [1]),
  Transpose(new, [2, 0, 1, 3])), [1, 2, 0, 3]).

Both write token s to slot positions[s], the same slot for every batch row; TensorScatter writes
it to slot write_indices[b] + s. They agree when positions = arange(p, p + S) and write_indices is
positions[0] broadcast over the batch. That contiguity is proven where the graph computes the
positions (a Range with step 1, a constant) and assumed where they are a graph input (Hugging
Face's cache_position is always arange(past_length, past_length + S)); each fused write says
which in the report. Every match is also run in onnxruntime, with what the target emits in its
place, on random caches and updates for several lengths S and starts p (the last slots
included), and must agree exactly.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fuse.graph import Graph, Node, Tensor, is_integer, np_dtype, onnx_dtype
from onnx_fuse.pattern import Match, match, op, var
from onnx_fuse.rewrite import Reject, Rule, once
from onnx_fuse.specs import KVCacheWriteSpec
from onnx_fuse.verify import Cut, emitted, run, session

# --- patterns --------------------------------------------------------------------------------

scatter_elements = op.ScatterElements(var("past"), var("indices"), var("update"), name="scatter")
scatter_nd = op.Transpose(
    op.ScatterND(op.Transpose(var("past"), name="past_t"), var("indices"),
                 op.Transpose(var("update"), name="update_t"), name="scatter"),
    name="back")

# The indices are matched apart from the write: one Unsqueeze may feed every layer's writes, and a
# node in a match belongs to that fusion alone.
elements_indices = op.Expand(op.Unsqueeze(var("positions"), name="unsqueeze"), var("index_shape"))
nd_indices = op.Unsqueeze(var("positions"), name="unsqueeze")


def scatter_elements_output(graph: Graph, scatter: Node) -> Tensor:
    return scatter.outputs[0]


def scatter_nd_output(graph: Graph, scatter: Node) -> Tensor:
    """The Transpose that lays the scattered [L, B, N, H] cache out as [B, N, L, H] again."""
    back = [u for u in graph.consumers(scatter.outputs[0]) if u.op == "Transpose"]
    if len(back) != 1:
        raise Reject("the ScatterND's result is not transposed back by one Transpose")
    return back[0].outputs[0]


# --- describe: structure, positions, numbers --------------------------------------------------

def describe_write(graph: Graph, m: Match) -> KVCacheWriteSpec:
    scatter: Node = m["scatter"]
    past, update = m["past"], m["update"]
    nd = "back" in m.captures
    output = (m["back"] if nd else scatter).outputs[0]
    shape = graph.shape(past)
    if shape is None or len(shape) != 4:
        raise Reject(f"the scattered tensor has rank {None if shape is None else len(shape)}, "
                     "not a 4-D cache [B, N, S, H]")
    if scatter.attrs.get("reduction", "none") != "none":
        raise Reject(f"the scatter reduces ({scatter.attrs['reduction']}) instead of writing")
    axis, update_perm = _nd_layout(m) if nd else (scatter.attrs.get("axis", 0) % 4, None)
    if axis != 2:
        raise Reject(f"writes along axis {axis} of the cache; TensorScatter (TensorRT's KV-cache "
                     "update) writes along axis -2 of [B, N, S, H]")
    positions = _positions(graph, m["indices"], nd)
    contiguity = _contiguity(graph, positions)

    update_shape = graph.shape(update)
    if update_shape is None or len(update_shape) != 4:
        raise Reject("the update is not 4-D [B, N, S, H]")
    if update_perm is not None:
        update_shape = tuple(update_shape[i] for i in update_perm)
    for what, axis_ in (("batch", 0), ("K/V heads", 1), ("head size", 3)):
        a, b = shape[axis_], update_shape[axis_]
        if isinstance(a, int) and isinstance(b, int) and a != b:
            raise Reject(f"the cache and the update differ in {what} ({a} vs {b})")
    dtype = onnx_dtype(past)
    if dtype is None or dtype != onnx_dtype(update):
        raise Reject("the cache and the update do not share one known type")

    return KVCacheWriteSpec(
        past=past, update=update, update_perm=update_perm, output=output, positions=positions, contiguity=contiguity,
        form="scatter_nd" if nd else "scatter_elements", cache_len=shape[2], kv_heads=shape[1],
        head_size=shape[3], dtype=dtype,
    )


def _nd_layout(m: Match) -> tuple[int, tuple[int, ...] | None]:
    """For a ScatterND over Transpose(past, perm), transposed back by the inverse: the cache axis
    it writes along (perm[0]), and the permutation that lays the update out like the cache. The
    update's Transpose(u, q) must equal Transpose(update, perm) for update = Transpose(u, r),
    r = q ∘ perm⁻¹ (the dynamo exporter merges the head transpose of V into q)."""
    perm = m["past_t"].attrs.get("perm")
    if perm is None or sorted(perm) != [0, 1, 2, 3]:
        raise Reject(f"the cache is transposed by {perm}, not a permutation of 4 axes")
    inverse = [int(i) for i in np.argsort(perm)]
    if list(m["back"].attrs.get("perm") or []) != inverse:
        raise Reject(f"the result is transposed by {m['back'].attrs.get('perm')}, not back by {inverse}")
    q = m["update_t"].attrs.get("perm")
    if q is None or sorted(q) != [0, 1, 2, 3]:
        raise Reject(f"the update is transposed by {q}, not a permutation of 4 axes")
    r = tuple(int(q[i]) for i in inverse)
    return int(perm[0]), None if r == (0, 1, 2, 3) else r


def _positions(graph: Graph, indices: Tensor, nd: bool) -> Tensor:
    """The 1-D tensor of slots, from which the indices put positions[s] at every element of
    token s: ScatterND's [S, 1] = Unsqueeze(positions, [1]); ScatterElements' [B, N, S, H] =
    Expand(Unsqueeze(positions, [0, 1, 3]))."""
    found, why = match(nd_indices if nd else elements_indices, graph, indices)
    if found is None:
        form = "Unsqueeze(positions, [1])" if nd else "Expand(Unsqueeze(positions, [0, 1, 3]))"
        raise Reject(f"the write indices are not {form}: {why}")
    positions, unsqueeze = found["positions"], found["unsqueeze"]
    if graph.rank(positions) != 1:
        raise Reject(f"the positions '{positions.name}' have rank {graph.rank(positions)}, not 1")
    if not is_integer(positions):
        raise Reject(f"the positions '{positions.name}' are not integers")
    axes = graph.value(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else unsqueeze.attrs.get("axes")
    rank = 2 if nd else 4
    wanted = [1] if nd else [0, 1, 3]
    if axes is None or sorted(int(a) % rank for a in np.ravel(axes)) != wanted:
        raise Reject(f"the positions are unsqueezed at axes {None if axes is None else list(np.ravel(axes))}, "
                     f"not {wanted}: they do not run along the written axis")
    return positions


def _contiguity(graph: Graph, positions: Tensor) -> str:
    """Why positions = arange(positions[0], positions[0] + S): "range", "constant", or "assumed"
    for a graph input (the caller's contract, as for Hugging Face's cache_position)."""
    tensor = positions
    while (node := graph.producer(tensor)) is not None and node.op in ("Cast", "Identity") \
            and is_integer(node.inputs[0]):
        tensor = node.inputs[0]
    value = graph.value(tensor)
    if value is not None:
        flat = np.asarray(value).reshape(-1).astype(np.int64)
        if flat.size and not np.all(np.diff(flat) == 1):
            raise Reject(f"the write positions {flat[:8].tolist()} are not contiguous")
        return "constant"
    node = graph.producer(tensor)
    if node is None:
        return "assumed"
    if node.op == "Range":
        delta = graph.value(node.inputs[2])
        if delta is None or delta.size != 1 or int(np.ravel(delta)[0]) != 1:
            raise Reject("the write positions are a Range whose step is not 1")
        return "range"
    raise Reject(f"the write positions are computed by {node.op}: not provably contiguous")



# --- numerical verification ------------------------------------------------------------------

_BATCH, _HEADS, _HEAD_SIZE, _CACHE_LEN = 2, 3, 4, 8  # sizes for dims the graph leaves symbolic


def verify_write(graph: Graph, m: Match, spec: KVCacheWriteSpec, target) -> None:
    """Run the matched write and what the target emits for it on the same random cache and
    update, with positions arange(p, p + S) for S in 1 and 3 and p at the first, middle and last
    possible slot; once per distinct subgraph and cache shape."""
    roles = {id(spec.past): "past", id(spec.update): "update", id(spec.positions): "positions"}
    cut = Cut(graph, [spec.output], roles, limit=200, what="the write subgraph")
    if cut.shape_leaves:
        raise Reject(f"the write reads '{cut.shape_leaves[0].name}', not only the cache, the update "
                     "and the positions")
    static = tuple(d if isinstance(d, int) else None for d in graph.shape(spec.past))
    key = (cut.signature, static, spec.update_perm, spec.dtype, onnx_dtype(spec.positions), target.name)
    once(graph, ("kv_cache", key), lambda: _compare(graph, cut, spec, target))


def _compare(graph: Graph, cut: Cut, spec: KVCacheWriteSpec, target) -> None:
    inputs = [spec.past, spec.update, spec.positions]
    original = cut.session(inputs)
    replacement = session(emitted(graph, spec, target, inputs, [spec.output]), graph.base_dir,
                          f"what target {target.name} emits")
    shape = graph.shape(spec.past)
    batch, heads, length, head = (d if isinstance(d, int) else default
                                  for d, default in zip(shape, (_BATCH, _HEADS, _CACHE_LEN, _HEAD_SIZE)))
    np_type = onnx.helper.tensor_dtype_to_np_dtype(spec.dtype)
    rng = np.random.default_rng(0)
    constant = graph.value(spec.positions)
    if constant is not None:  # the graph's own positions only
        cases = [(constant.size, int(np.ravel(constant)[0]))] if constant.size else []
    else:
        cases = [(seq, start) for seq in sorted({1, min(3, length)})
                 for start in sorted({0, (length - seq) // 2, length - seq})]
    for seq, start in cases:
        update = [batch, heads, seq, head]  # as TensorScatter takes it; the graph's update:
        if spec.update_perm is not None:  # update[perm[j]] is dim j of the transposed one
            update = [update[int(j)] for j in np.argsort(spec.update_perm)]
        feeds = {
            spec.past.name: rng.standard_normal((batch, heads, length, head)).astype(np_type),
            spec.update.name: rng.standard_normal(update).astype(np_type),
            spec.positions.name: np.arange(start, start + seq).astype(np_dtype(spec.positions)),
        }
        (got,) = run(original, feeds, "the matched write")
        (want,) = run(replacement, feeds, f"what target {target.name} emits")
        if got.shape != want.shape or not np.array_equal(got, want):
            raise Reject(f"what target {target.name} emits differs from the matched write "
                         f"(S {seq}, first slot {start})")


RULES = [
    Rule(name="kv_cache", anchor="ScatterElements", pattern=scatter_elements,
         root=scatter_elements_output, describe=describe_write, verify=verify_write),
    Rule(name="kv_cache", anchor="ScatterND", pattern=scatter_nd,
         root=scatter_nd_output, describe=describe_write, verify=verify_write),
]
