"""Raising the default-domain opset to what a target's ops need."""

from __future__ import annotations

import onnx
import onnx.version_converter


def default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 0


class OpsetError(Exception):
    """The version converter could not raise the opset."""


def raise_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The model converted to `version` by onnx's version converter (the caller proves it
    equivalent before relying on it). Model-local functions, which the converter drops, are
    kept as they are: each declares the opsets its body is written in."""
    try:
        converted = onnx.version_converter.convert_version(model, version)
    except Exception as exc:  # the converter raises bare RuntimeErrors and ValueErrors
        message = str(exc).strip().splitlines()
        raise OpsetError(message[0] if message else type(exc).__name__) from None
    if not converted.functions:
        converted.functions.extend(model.functions)
    return converted
