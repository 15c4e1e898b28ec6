"""The attention nodes of a fused decode model as `--kv-cache static` re-masks them: which read a
cache (their K or V is computed from a present: self-attention, MLA's latent cache included) and
which do not (cross-attention over an encoder's states, left as it is), and for each
cache-reading one the mask class the pass proved (masks.py). Attention the exporter wrote itself
(torch's opset-23 SDPA) and the target kept as its own op (target onnx) is classified here by the
same evaluation; for the other targets the pass rewrote it, and its spec carries the class.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .errors import BadInput
from .kv_layout import Layout
from .result import FuseResult
from .specs import AttentionSpec, MaskClass

_CAUSAL = ("causal_lower_right", "causal_padding", "sliding_window")


@dataclass(frozen=True)
class Layer:
    attention: str  # the attention node
    window: int | None  # its sliding window (None: causal only)
    padding_input: str | None  # the 0/1 input its mask reads (None: none)
    cross: bool  # reads no cache: left as it is
    written_by: str  # "the pass" or "the exporter"

    def summary(self) -> dict:
        return {"attention": self.attention, "window": self.window, "cross": self.cross,
                "mask_proven_for": self.written_by}


def attention_layers(fused: FuseResult, model: onnx.ModelProto, layout: Layout, ops: tuple[str, ...],
                     base_dir: str | None) -> list[Layer]:
    """One Layer per node of `model` (the fused model at opset 24) whose op is one of `ops` (what
    the target writes attention as); BadInput where a core stayed unfused or a cache-reading mask
    is not causal (+ a window) over the caches."""
    op = "/".join(ops)
    unfused = [u for u in fused.unfused if u.pattern == "attention"]
    if unfused:
        raise BadInput(f"not every attention core was fused into {op}: {unfused[0].anchor} stays "
                       f"unfused ({unfused[0].reason}); --kv-cache static re-masks fused attention only")
    nodes = [n for n in model.graph.node if n.op_type in ops]
    classes = _pass_classes(fused, {n.name for n in nodes}, op)
    if not nodes:
        raise BadInput(f"no attention was fused into {op}: --kv-cache static re-masks fused attention only")
    written = [n for n in nodes if n.name not in classes]
    if written:
        classes.update(_exporter_classes(model, written, base_dir))
    written = {n.name for n in written}
    readers = _cache_readers(model, layout)
    layers = []
    for node in nodes:
        by = "the exporter" if node.name in written else "the pass"
        if node.name not in readers:
            layers.append(Layer(node.name, None, None, True, by))
            continue
        klass = _causal(node.name, classes[node.name], layout)
        layers.append(Layer(node.name, klass.window, klass.padding_input if klass.padding else None, False, by))
    return layers


def _pass_classes(fused: FuseResult, names: set[str], op: str) -> dict[str, MaskClass | str | None]:
    """The proven mask class of each attention the pass fused (a string: why it has none)."""
    classes = {}
    for fusion, spec in fused.specs(AttentionSpec):
        mine = [n for n in fusion.nodes if n in names]
        if not mine:
            raise BadInput(f"not every attention core was fused into {op}: {fusion.anchor} is kept as "
                           "primitive ops; --kv-cache static re-masks fused attention only")
        if spec.mask is None:
            classes[mine[0]] = "it has no mask"
        elif spec.mask.bias is not None:
            classes[mine[0]] = "its mask carries a bias besides the masking"
        else:
            classes[mine[0]] = spec.mask.klass
    return classes


def _exporter_classes(model: onnx.ModelProto, nodes: list, base_dir: str | None) -> dict:
    """Mask classes of the attention nodes the exporter wrote (input 3 of ONNX Attention)."""
    from .graph import Graph, with_shapes
    from .masks import classify_mask

    graph = Graph(with_shapes(model), base_dir)
    tensors = graph.gs.tensors()
    classes = {}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 4 and any(node.input[4:]):
            classes[node.name] = "it takes the cache as past_key/past_value (the exporter's own update)"
        elif attrs.get("is_causal", 0) or len(node.input) < 4 or not node.input[3]:
            classes[node.name] = "its masking is is_causal or nothing, not a mask over the keys"
        else:
            classes[node.name] = classify_mask(graph, tensors[node.input[3]], query_len=tensors[node.input[0]],
                                               key_len=tensors[node.input[1]], model=model)
    return classes


def _cache_readers(model: onnx.ModelProto, layout: Layout) -> set[str]:
    """The nodes whose K or V is computed from a cache: inputs 1 and 2, or any later one (an op
    that takes the past itself, GroupQueryAttention's past_key/past_value)."""
    derived = {c.past for c in layout.caches}
    readers = set()
    for n in model.graph.node:  # graph order is topological
        if any(i in derived for i in n.input[1:]):
            readers.add(n.name)
        if n.op_type not in ("Shape", "Size") and any(i in derived for i in n.input):
            derived.update(n.output)
    return readers


def _causal(name: str, klass: MaskClass | str | None, layout: Layout) -> MaskClass:
    """The class, when a mask over the fixed cache can say it: lower-right causal (+ a window),
    with padding exactly when the model has a mask input."""
    if not isinstance(klass, MaskClass):
        raise BadInput(f"attention '{name}' reads a cache but {klass or 'its mask is not proven'}: "
                       "it cannot be re-expressed over a fixed cache")
    if klass.kind not in _CAUSAL or klass.alignment != "lower_right":
        raise BadInput(f"the mask of attention '{name}' is {klass.kind}, not causal (+ a sliding "
                       "window) and padding: it cannot be re-expressed over a fixed cache")
    if bool(klass.padding) != bool(layout.masks):
        what = "ignores the model's mask input" if layout.masks else "reads padding with no mask input"
        raise BadInput(f"the mask of attention '{name}' {what}: it cannot be re-expressed over a fixed cache")
    return klass
