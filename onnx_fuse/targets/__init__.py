"""Emitters: each target turns the specs that rules produce into that target's nodes."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from ..errors import BadInput
from . import onnx as onnx_target
from . import primitive_trt


@dataclass(frozen=True)
class Target:
    name: str
    min_opset: int  # default-domain opset the emitted ops need
    emit: Callable[[Any, Any], None]


def _target(name: str, module: ModuleType) -> Target:
    return Target(name, module.MIN_OPSET, module.emit)


TARGETS = {t.name: t for t in [_target("onnx", onnx_target),
                                _target("primitive-trt", primitive_trt)]}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise BadInput(f"unknown target '{name}' (known: {', '.join(sorted(TARGETS))})")
    return TARGETS[name]
