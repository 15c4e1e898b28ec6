"""Loading and saving models: weights in external data stay on disk, and nothing is ever written
half-way (a temporary file beside the target, then a rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import onnx
from google.protobuf.message import DecodeError

from .errors import BadInput

KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training",
                 "com.microsoft.nchwc", "ai.onnx.training", "com.ms.internal.nhwc",
                 "org.pytorch.aten", "pkg.onnxscript.torch_lib.common", "trt", "onnx_fuse"}


@dataclass
class SourceModel:
    """A model and the directory its external data paths are relative to."""

    model: onnx.ModelProto
    base_dir: str | None


def load_model(path: str) -> SourceModel:
    """Load a model file without its external data; BadInput with one line on anything unusable."""
    if not os.path.exists(path):
        raise BadInput(f"{path}: no such file")
    if os.path.isdir(path):
        raise BadInput(f"{path}: is a directory, not an ONNX model")
    if os.path.getsize(path) == 0:
        raise BadInput(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not a valid ONNX model (protobuf parse failed: {_first_line(exc)})")
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror or exc})")
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise BadInput(f"{path}: not an ONNX model (no graph)")
    base_dir = os.path.dirname(os.path.abspath(path))
    validate(model, base_dir, path)
    return SourceModel(model, base_dir)


def validate(model: onnx.ModelProto, base_dir: str | None, label: str = "model") -> None:
    """The checks every model must pass before any rule looks at it."""
    if not model.opset_import:
        raise BadInput(f"{label}: model declares no opset")
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        domain = opset.domain or ""
        if domain not in KNOWN_DOMAINS and not any(f.domain == domain for f in model.functions):
            raise BadInput(f"{label}: unknown operator domain '{domain}'")
        if domain in ("", "ai.onnx") and not 1 <= opset.version <= newest:
            raise BadInput(f"{label}: default-domain opset {opset.version} is unknown "
                           f"(this onnx knows 1..{newest})")
    for tensor in _external_tensors(model):
        location = _external_location(tensor)
        if base_dir is None:
            raise BadInput(f"{label}: tensor '{tensor.name}' has external data but the model "
                           "directory is unknown (pass a path)")
        file = os.path.join(base_dir, location)
        if not os.path.isfile(file):
            raise BadInput(f"{label}: external data file '{location}' for tensor "
                           f"'{tensor.name}' is missing")
        end = _external_field(tensor, "offset", 0) + _external_field(tensor, "length", 0)
        if end > os.path.getsize(file):
            raise BadInput(f"{label}: external data file '{location}' is shorter than tensor "
                           f"'{tensor.name}' needs (truncated?)")
    _check_dangling_inputs(model.graph, label)


def _check_dangling_inputs(graph: onnx.GraphProto, label: str) -> None:
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    known |= {t.name for t in graph.sparse_initializer}
    known.add("")
    for node in graph.node:
        for name in node.input:
            if name not in known:
                raise BadInput(f"{label}: node '{node.name or node.op_type}' reads '{name}', "
                               "which nothing produces (or the nodes are not in order)")
        known.update(node.output)
    for out in graph.output:
        if out.name not in known:
            raise BadInput(f"{label}: graph output '{out.name}' is produced by no node")


def _external_tensors(model: onnx.ModelProto):
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t") and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                yield attr.t


def _external_field(tensor: onnx.TensorProto, key: str, default):
    for entry in tensor.external_data:
        if entry.key == key:
            return int(entry.value) if key in ("offset", "length") else entry.value
    return default


def _external_location(tensor: onnx.TensorProto) -> str:
    location = _external_field(tensor, "location", None)
    if not location or os.path.isabs(location) or ".." in location.replace("\\", "/").split("/"):
        raise BadInput(f"tensor '{tensor.name}' has an unusable external data location {location!r}")
    return location


def external_files(model: onnx.ModelProto) -> list[str]:
    return sorted({_external_location(t) for t in _external_tensors(model)})


def save_model(model: onnx.ModelProto, path: str, source_dir: str | None) -> None:
    """Write `model` to `path` atomically. External data files the model references are copied
    (streamed, never loaded) from `source_dir` beside the output unless already there."""
    out_dir = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(out_dir):
        raise BadInput(f"{path}: output directory '{out_dir}' does not exist")
    if not os.access(out_dir, os.W_OK):
        raise BadInput(f"{path}: output directory '{out_dir}' is not writable")
    copies = []
    for location in external_files(model):
        src = os.path.join(source_dir or out_dir, location)
        dst = os.path.join(out_dir, location)
        if os.path.abspath(src) != os.path.abspath(dst):
            copies.append((src, dst))
    staged = []
    try:
        for src, dst in copies:
            tmp = _temp_beside(dst)
            staged.append((tmp, dst))
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 16 << 20)
        tmp = _temp_beside(path)
        staged.append((tmp, path))
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
        for tmp, dst in staged:
            os.replace(tmp, dst)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def _temp_beside(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    return tmp


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
