"""A decode model's interface as `--kv-cache static` reads it: the caches, found by what computes
each present output, and every other input with the role it plays.

Caches (one `Cache` per present output):

- growing: `present = Concat(past, new)` along axis 2 of [batch, kv_heads, sequence, head_size]
  (Identity and Casts to the cache's own type between them are looked through);
- windowed: `present = Slice(Concat(past, new))[:, :, -k:]`: Hugging Face's sliding-window cache
  (DynamicSlidingWindowLayer) keeps the last k = W - 1 tokens while attention reads the whole
  Concat;
- already static: `present` is `past` with the new tokens scattered in (ScatterND between
  Transposes, or ScatterElements: Hugging Face's StaticCache), of the fixed length both declare.

kv_heads and head_size are the declared dims, or, where those are symbolic, the ones the graph
fixes (the refined shape of the new keys: Reshape targets).

Every other input keeps its meaning and is passed through; `Layout.others` says how the
multi-step check feeds it (`Other.role`): "positions" (integer [B, S] or [S] position ids of
the new tokens), "float" (an encoder's hidden states: fixed over the steps), "mask" (a 0/1 mask
other than the self-attention's, e.g. an encoder's padding: fixed over the steps) and "value"
(an integer or boolean of unknown meaning, fed 0/False as the one-step check does). Which 0/1
input is the self-attention's mask is what the pass proved (MaskClass.padding_input): see
`Layout.with_mask`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .check import input_specs
from .errors import BadInput

# A Slice end at least this large runs to the end of the axis (torch writes INT64_MAX).
_TO_THE_END = 2**31 - 1


@dataclass(frozen=True)
class Cache:
    past: str  # the cache input
    present: str  # the updated cache output
    heads: int
    head_size: int
    keep: int | None = None  # windowed: the present holds the last `keep` tokens
    form: str = "concat"  # "concat", "window" or "scatter" (already static)
    past_len: int | None = None  # the past's length where the model declares it fixed


@dataclass(frozen=True)
class Other:
    """An input passed through with its meaning; `dims` as declared (ints and symbols)."""

    name: str
    role: str  # "positions", "float", "mask" or "value" (see the module docstring)
    dtype: np.dtype
    dims: tuple


@dataclass
class Layout:
    """What the conversion found in the original model's interface."""

    caches: list[Cache]
    ids: str  # token ids input [B, S]
    vocab: int  # rows of the table the ids index
    batch_dim: int | str
    seq_dim: int | str
    dtypes: dict[str, np.dtype] = field(default_factory=dict)  # input name -> numpy dtype
    masks: list[str] = field(default_factory=list)  # the 0/1 inputs [B, T] (mask candidates)
    mask: str | None = None  # the self-attention's mask, once the pass proved which (with_mask)
    others: dict[str, Other] = field(default_factory=dict)
    static_len: int | None = None  # already-static caches: the length the model declares
    mask_dims: dict[str, tuple] = field(default_factory=dict)  # declared dims of `masks`

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(c.past, c.present) for c in self.caches]

    @property
    def shortest_past(self) -> int:
        """The fewest past tokens the model runs with (a sliding-window cache may declare its
        past's length fixed: W - 1)."""
        return max([c.past_len for c in self.caches if c.past_len] + [1])

    def with_mask(self, mask: str | None) -> Layout:
        """This layout with `mask` as the self-attention's mask; the other 0/1 inputs pass
        through (an encoder's padding mask)."""
        others = dict(self.others)
        for name in self.masks:
            if name != mask:
                others[name] = Other(name, "mask", self.dtypes[name], self.mask_dims[name])
        return dataclasses.replace(self, mask=mask, others=others)


def find_layout(model: onnx.ModelProto) -> Layout:
    """The caches and the other inputs; BadInput (one line) when the model has no recognisable
    cache, one TensorScatter cannot write, or an input this cannot give a meaning to."""
    graph = model.graph
    initialized = {t.name for t in graph.initializer}
    inputs = {v.name: v for v in graph.input if v.name not in initialized}
    producer = {o: n for n in graph.node for o in n.output}
    constants = _constants(graph)
    found = [f for f in (_cache(o, inputs, producer, constants) for o in graph.output) if f]
    if not found and any(producer.get(o.name) is not None and producer[o.name].op_type in _CONTROL_FLOW
                         for o in graph.output):
        raise BadInput("the caches are computed inside If/Loop bodies (optimum's merged decoder picks "
                       "a branch per step): --kv-cache static converts a decoder whose caches are "
                       "in the main graph (optimum's decoder with past)")
    if not found:
        raise BadInput("no recognisable KV cache: no output is Concat(past input, new keys/values) "
                       "along the sequence axis (or a window Slice of one), nor a past input with "
                       "the new tokens scattered in")
    if len({cache.form == "scatter" for cache, _ in found}) > 1:
        raise BadInput("the model mixes caches that grow with caches already of fixed size")
    caches = _with_graph_dims(model, found)
    return _interface(model, caches)


# --------------------------------------------------------------------------- caches


def _cache(output, inputs: dict, producer: dict, constants: dict) -> tuple | None:
    """(Cache, the new keys/values tensor or None) for an output that is a cache, else None."""
    node = _through_copies(producer.get(output.name), producer, inputs)
    keep = _window_kept(node, constants)
    if keep is not None:
        node = _through_copies(producer.get(node.input[0]), producer, inputs)
    if node is not None and node.op_type == "Concat":
        return _grown(node, output.name, inputs, producer, keep)
    scatter = _scatter_of(node, producer)
    if scatter is not None and keep is None:
        return _scattered(scatter, output, inputs, producer)
    return None


def _through_copies(node, producer: dict, inputs: dict):
    """Back through Identity and Casts to the type the cache already has (GPT-J's TorchScript
    export casts the concatenated cache to float32 again)."""
    while node is not None and (node.op_type == "Identity" or _is_noop_cast(node, producer, inputs)):
        node = producer.get(node.input[0])
    return node


def _is_noop_cast(node, producer: dict, inputs: dict) -> bool:
    if node.op_type != "Cast":
        return False
    source = producer.get(node.input[0])
    past = inputs.get(_past_input(source.input[0], producer)) if source is not None and source.input else None
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return past is not None and to == past.type.tensor_type.elem_type


def _past_input(name: str, producer: dict) -> str:
    """The tensor behind Identity nodes (an export may copy the past input before the Concat)."""
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return name


def _window_kept(node, constants: dict) -> int | None:
    """k for `Slice(x, starts=[-k], ends=[to the end], axes=[2], steps=[1])`, else None."""
    if node is None or node.op_type != "Slice" or len(node.input) < 4:
        return None
    values = [constants.get(name) for name in node.input[1:5]]
    starts, ends, axes = values[:3]
    steps = values[3] if len(values) > 3 and node.input[4:5] != [""] else np.array([1])
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)):
        return None
    starts, ends, axes, steps = (int(v.reshape(-1)[0]) for v in (starts, ends, axes, steps))
    if axes % 4 != 2 or steps != 1 or starts >= 0 or ends < _TO_THE_END:
        return None
    return -starts


def _grown(concat, present: str, inputs: dict, producer: dict, keep: int | None) -> tuple | None:
    if len(concat.input) != 2:
        return None
    past_name = _past_input(concat.input[0], producer)
    if past_name not in inputs:
        return None
    past = inputs[past_name]
    dims = past.type.tensor_type.shape.dim
    axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
    if len(dims) != 4:
        raise BadInput(f"cache '{past.name}' is {len(dims)}-D: TensorScatter takes 4-D caches "
                       "[batch, kv_heads, sequence, head_size]")
    if axis is None or axis % 4 != 2:
        raise BadInput(f"'{present}' grows its cache along axis {axis}: TensorScatter writes "
                       "along axis -2 of [batch, kv_heads, sequence, head_size]")
    heads, head = _declared(dims[1]), _declared(dims[3])
    cache = Cache(past.name, present, heads, head, keep, "window" if keep else "concat", _declared(dims[2]))
    return cache, concat.input[1]


_SCATTERS = ("ScatterND", "ScatterElements")
_CONTROL_FLOW = ("If", "Loop", "Scan")


def _scatter_of(node, producer: dict):
    """The ScatterND/ScatterElements a present comes from (through dynamo's Transposes)."""
    while node is not None and node.op_type == "Transpose":
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type in _SCATTERS else None


def _scattered(scatter, output, inputs: dict, producer: dict) -> tuple | None:
    data = scatter.input[0]
    while data in producer and producer[data].op_type in ("Transpose", "Identity"):
        data = producer[data].input[0]
    if data not in inputs:
        return None
    dims = inputs[data].type.tensor_type.shape.dim
    out_dims = output.type.tensor_type.shape.dim
    if len(dims) != 4 or len(out_dims) != 4 or _declared(dims[2]) is None or \
            _declared(dims[2]) != _declared(out_dims[2]):
        return None
    cache = Cache(data, output.name, _declared(dims[1]), _declared(dims[3]), form="scatter")
    return cache, None


def _declared(dim) -> int | None:
    """A dim's size when it is declared: dim_value, or a number written as a string ('2':
    transformers' exporter)."""
    if dim.HasField("dim_value"):
        return dim.dim_value
    return int(dim.dim_param) if dim.dim_param.strip().isdigit() else None


def _with_graph_dims(model: onnx.ModelProto, found: list[tuple]) -> list[Cache]:
    """Caches whose symbolic kv_heads / head_size are fixed by the graph get them from the
    refined shape of their new keys or values (Reshape targets)."""
    missing = [(c, new) for c, new in found if c.heads is None or c.head_size is None]
    shapes = _refined_shapes(model, [new for _, new in missing if new]) if missing else {}
    caches = []
    for cache, new in found:
        shape = shapes.get(new) or (None,) * 4
        heads = cache.heads if cache.heads is not None else _int(shape[1])
        head = cache.head_size if cache.head_size is not None else _int(shape[3])
        if heads is None or head is None:
            raise BadInput(f"cache '{cache.past}' has no static kv_heads and head_size (axes 1 and "
                           "3): neither declared nor fixed by the graph")
        caches.append(dataclasses.replace(cache, heads=heads, head_size=head))
    return caches


def _refined_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple]:
    from .graph import Graph, with_shapes

    graph = Graph(with_shapes(model))
    tensors = graph.gs.tensors()
    return {name: graph.shape(tensors[name]) for name in names if name in tensors
            and graph.shape(tensors[name]) is not None and len(graph.shape(tensors[name])) == 4}


def _int(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Small integer constants (initializers and Constant nodes) by name."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer
              if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and np.prod(t.dims) <= 8}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            t = n.attribute[0].t
            if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                values[n.output[0]] = numpy_helper.to_array(t)
    return values


# --------------------------------------------------------------------------- the other inputs


def _interface(model: onnx.ModelProto, caches: list[Cache]) -> Layout:
    specs = {s.name: s for s in input_specs(model)}
    cached = {c.past for c in caches}
    ids = [s for s in specs.values() if s.kind == "ids"]
    if len(ids) != 1:
        raise BadInput(f"--kv-cache static takes decode models with one token-id input (the "
                       f"indices of the embedding table); found {len(ids)}")
    (ids,) = ids
    masks = [n for n, s in specs.items() if s.kind == "mask" and n not in cached]
    others = {}
    for name, spec in specs.items():
        if name in cached or name == ids.name or name in masks:
            continue
        others[name] = Other(name, _role(spec), spec.dtype, tuple(spec.dims))
    static = {_declared_len(model, c.past) for c in caches if c.form == "scatter"}
    layout = Layout(caches=caches, ids=ids.name, vocab=int(ids.table_rows), batch_dim=ids.dims[0],
                    seq_dim=ids.dims[1], dtypes={s.name: s.dtype for s in specs.values()},
                    masks=masks, others=others, static_len=static.pop() if static else None,
                    mask_dims={n: tuple(specs[n].dims) for n in masks})
    # One 0/1 input is the self-attention's mask until the pass proves otherwise (with_mask).
    return layout.with_mask(masks[0]) if len(masks) == 1 else layout


def _role(spec) -> str:
    if spec.kind == "position":
        return "positions"
    if spec.kind == "float":
        return "float"
    return "value"


def _declared_len(model: onnx.ModelProto, name: str) -> int:
    (value,) = [v for v in model.graph.input if v.name == name]
    return _declared(value.type.tensor_type.shape.dim[2])
