"""The targets: what each turns the specs that rules produce into (see base.Target)."""

from __future__ import annotations

from ..errors import BadInput
from .base import Proof, Target
from .onnx import OnnxTarget
from .ort import OrtTarget
from .primitive_trt import PrimitiveTrtTarget
from .trt11 import Trt11Target
from .trt_plugin import TrtPluginTarget

TARGETS: dict[str, Target] = {t.name: t for t in [OnnxTarget(), PrimitiveTrtTarget(), Trt11Target(),
                                                  TrtPluginTarget(), OrtTarget()]}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise BadInput(f"unknown target '{name}' (known: {', '.join(sorted(TARGETS))})")
    return TARGETS[name]


__all__ = ["Proof", "Target", "TARGETS", "get_target"]
