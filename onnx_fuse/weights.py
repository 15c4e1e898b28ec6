"""Large inline weights set aside while onnx's C++ tools (version converter, shape inference) run:
they copy the whole model in and out, so only the graph should travel."""

from __future__ import annotations

import onnx

# Inline initializers with more elements than this are set aside while onnx's C++ tools (version
# converter, shape inference) run, which copy the whole model in and out: only the graph travels.
SET_ASIDE_ELEMENTS = 1024
_SET_ASIDE = "onnx-fuse:set-aside"


class SetAside:
    """A model's large inline initializers and a lean copy of it where each is a placeholder
    (same name, type and dims; its data "external" in a file that does not exist)."""

    def __init__(self, model: onnx.ModelProto):
        self.tensors: dict[str, onnx.TensorProto] = {}
        names = [t.name for t in model.graph.initializer]
        if len(set(names)) == len(names):
            self.tensors = {t.name: t for t in model.graph.initializer if _large_inline(t)}
        self.lean = _lean_copy(model, self.tensors) if self.tensors else model

    def restorable(self, model: onnx.ModelProto) -> bool:
        return all(t.name in self.tensors for t in model.graph.initializer if _is_placeholder(t))

    def restore(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Put the weights back into `model` (in place, a copy of each); returns it."""
        if self.tensors:
            if not self.restorable(model):
                raise RuntimeError("a weight set aside for the version converter went missing")
            for tensor in model.graph.initializer:
                if _is_placeholder(tensor):
                    tensor.CopyFrom(self.tensors[tensor.name])
        return model


def _large_inline(tensor: onnx.TensorProto) -> bool:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.name:
        return False
    elements = 1
    for d in tensor.dims:
        elements *= d
    return elements > SET_ASIDE_ELEMENTS


def _is_placeholder(tensor: onnx.TensorProto) -> bool:
    return (tensor.data_location == onnx.TensorProto.EXTERNAL and len(tensor.external_data) == 1
            and tensor.external_data[0].value == _SET_ASIDE)


def _lean_copy(model: onnx.ModelProto, aside: dict) -> onnx.ModelProto:
    """`model` with the tensors in `aside` replaced by placeholders, never copying their data."""
    lean = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            _copy_field(lean, descriptor, value)
    for descriptor, value in model.graph.ListFields():
        if descriptor.name != "initializer":
            _copy_field(lean.graph, descriptor, value)
    for tensor in model.graph.initializer:
        if tensor.name in aside:
            placeholder = lean.graph.initializer.add()
            placeholder.name, placeholder.data_type = tensor.name, tensor.data_type
            placeholder.dims.extend(tensor.dims)
            placeholder.data_location = onnx.TensorProto.EXTERNAL
            entry = placeholder.external_data.add()
            entry.key, entry.value = "location", _SET_ASIDE
        else:
            lean.graph.initializer.add().CopyFrom(tensor)
    return lean


def _copy_field(target, descriptor, value) -> None:
    repeated = (descriptor.is_repeated if hasattr(descriptor, "is_repeated")  # protobuf >= 5.28
                else descriptor.label == descriptor.LABEL_REPEATED)
    if repeated:
        getattr(target, descriptor.name).extend(value)
    elif descriptor.type == descriptor.TYPE_MESSAGE:
        getattr(target, descriptor.name).CopyFrom(value)
    else:
        setattr(target, descriptor.name, value)
