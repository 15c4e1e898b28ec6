"""Loading and saving models: weights in external data stay on disk, and nothing is ever written
half-way (a temporary file beside the target, then a rename)."""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass

import onnx
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError, EncodeError

from .errors import BadInput, first_line

KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training",
                 "com.microsoft.nchwc", "ai.onnx.training", "com.ms.internal.nhwc",
                 "org.pytorch.aten", "pkg.onnxscript.torch_lib.common", "trt", "onnx_fuse"}
# Domains whose operators onnx has schemas for: every op in them must exist at the model's opset.
_SCHEMA_DOMAINS = {"": "", "ai.onnx": "", "ai.onnx.ml": "ai.onnx.ml"}
# Newest opset of domains onnx does not version (onnxruntime's contrib ops are all version 1).
_NEWEST_OTHER = {"com.microsoft": 1, "com.microsoft.nchwc": 1, "com.ms.internal.nhwc": 1}
_PROTOBUF_LIMIT = 2**31 - 1


@dataclass
class SourceModel:
    """A model and the directory its external data paths are relative to."""

    model: onnx.ModelProto
    base_dir: str | None
    path: str | None = None  # the file it was read from, if any


def load_model(path: str) -> SourceModel:
    """Load a model file without its external data; BadInput with one line on anything unusable."""
    if not os.path.exists(path):
        raise BadInput(f"{path}: no such file")
    if os.path.isdir(path):
        raise BadInput(f"{path}: is a directory, not an ONNX model")
    if not os.path.isfile(path):
        raise BadInput(f"{path}: not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise BadInput(f"{path}: empty file, not an ONNX model")
    if size > _PROTOBUF_LIMIT:
        raise BadInput(f"{path}: a model file over 2 GB cannot be parsed (protobuf limit); "
                       "store the weights as external data")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError, json_format.ParseError,
            text_format.ParseError) as exc:  # onnx.load reads .json and .txt names as text formats
        raise BadInput(f"{path}: not a valid ONNX model (protobuf parse failed: {first_line(exc)})")
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror or exc})")
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise BadInput(f"{path}: not an ONNX model (no graph)")
    base_dir = os.path.dirname(os.path.abspath(path))
    validate(model, base_dir, path)
    return SourceModel(model, base_dir, path)


def as_source(model) -> SourceModel:
    """A path, an onnx.ModelProto or a SourceModel as the SourceModel the pass reads."""
    if isinstance(model, SourceModel):
        return model
    if isinstance(model, onnx.ModelProto):
        validate(model, None, "model")
        return SourceModel(model, None)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_model(str(model))
    raise BadInput(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")


def validate(model: onnx.ModelProto, base_dir: str | None, label: str = "model") -> None:
    """The checks every model must pass before any rule looks at it."""
    if model.ir_version < 1:
        raise BadInput(f"{label}: model declares no IR version")
    if model.ir_version > onnx.IR_VERSION:
        raise BadInput(f"{label}: IR version {model.ir_version} is newer than this onnx knows "
                       f"({onnx.IR_VERSION})")
    if not model.opset_import:
        raise BadInput(f"{label}: model declares no opset")
    newest = onnx.defs.onnx_opset_version()
    newest_ml = onnx.helper.VERSION_TABLE[-1][3]
    functions = {(f.domain, f.name) for f in model.functions}
    function_domains = {f.domain for f in model.functions}
    opsets = {}
    for opset in model.opset_import:
        domain = opset.domain or ""
        opsets[domain] = opset.version
        if domain not in KNOWN_DOMAINS and domain not in function_domains:
            raise BadInput(f"{label}: unknown operator domain '{domain}'")
        if domain in ("", "ai.onnx") and not 1 <= opset.version <= newest:
            raise BadInput(f"{label}: default-domain opset {opset.version} is unknown "
                           f"(this onnx knows 1..{newest})")
        if domain == "ai.onnx.ml" and not 1 <= opset.version <= newest_ml:
            raise BadInput(f"{label}: ai.onnx.ml opset {opset.version} is unknown "
                           f"(this onnx knows 1..{newest_ml})")
        if domain in _NEWEST_OTHER and not 1 <= opset.version <= _NEWEST_OTHER[domain]:
            raise BadInput(f"{label}: opset {opset.version} of domain '{domain}' is unknown")
    if "ai.onnx" in opsets:
        opsets.setdefault("", opsets["ai.onnx"])
    _check_operators(model.graph, opsets, functions, label)
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


def _check_operators(graph: onnx.GraphProto, opsets: dict, functions: set, label: str) -> None:
    """Every top-level node's domain is imported, and its op exists at that domain's opset."""
    seen = set()
    for node in graph.node:
        key = (node.domain, node.op_type)
        if key in seen:
            continue
        seen.add(key)
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (node.domain, node.op_type) in functions:
            continue
        if domain not in opsets:
            raise BadInput(f"{label}: node '{node.name or node.op_type}' uses domain "
                           f"'{node.domain}', which the model does not import")
        if domain in _SCHEMA_DOMAINS:
            try:
                onnx.defs.get_schema(node.op_type, opsets[domain], _SCHEMA_DOMAINS[domain])
            except onnx.defs.SchemaError:
                where = f"domain '{domain}'" if domain else "the default domain"
                raise BadInput(f"{label}: operator '{node.op_type}' does not exist in {where} "
                               f"at opset {opsets[domain]}") from None


def _check_dangling_inputs(graph: onnx.GraphProto, label: str) -> None:
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    known |= {t.values.name for t in graph.sparse_initializer}
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


def check_output_path(path: str, source: str | None = None,
                      source_files: list[str] | None = None) -> None:
    """BadInput unless `path` can receive a model: its directory exists and is writable, it is
    not a directory, and it is neither the source model nor one of its external data files."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        what = "is not a directory" if os.path.exists(out_dir) else "does not exist"
        raise BadInput(f"{path}: output directory '{out_dir}' {what}")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise BadInput(f"{path}: output directory '{out_dir}' is not writable")
    if os.path.isdir(path):
        raise BadInput(f"{path}: is a directory; give the path of the model file to write")
    for other in ([source] if source else []) + list(source_files or []):
        if _same_file(path, other):
            what = "the input model" if other == source else f"the input's external data '{other}'"
            raise BadInput(f"{path}: refusing to overwrite {what}; give -o another path")


def save_model(model: onnx.ModelProto, path: str, source_dir: str | None,
               source_path: str | None = None, unchanged: bool = False) -> None:
    """Write `model` to `path` atomically. External data files the model references are copied
    (streamed, holes kept, never loaded) from `source_dir` beside the output unless already
    there. `source_path` is the file the model came from: never overwritten, and with
    `unchanged` its bytes are copied instead of serializing the model, so a model that passes
    through is written byte for byte."""
    out_dir = os.path.dirname(os.path.abspath(path)) or "."
    locations = external_files(model)
    inputs = [os.path.join(source_dir, loc) for loc in locations] if source_dir else []
    check_output_path(path, source_path, inputs)
    copies = []
    for location in locations:
        src = os.path.join(source_dir or out_dir, location)
        dst = os.path.join(out_dir, location)
        if _same_file(dst, path) or os.path.abspath(dst) == os.path.abspath(path):
            raise BadInput(f"{path}: the model's external data '{location}' would be written "
                           "over the model itself; give -o another name")
        if not _same_file(src, dst):
            copies.append((src, dst))
    copy_of = source_path if unchanged and source_path and os.path.isfile(source_path) else None
    payload = None
    if copy_of is None:
        try:
            payload = model.SerializeToString()
        except (ValueError, EncodeError) as exc:  # protobuf refuses messages over 2 GB
            raise BadInput(f"{path}: the model is too large to serialize ({first_line(exc)}); "
                           "store its weights as external data") from None
    staged: list[tuple[str, str]] = []
    made_dirs: list[str] = []
    created: list[str] = []
    try:
        for src, dst in copies:
            made_dirs += _make_dirs(os.path.dirname(dst))
            tmp = _temp_beside(dst)
            staged.append((tmp, dst))
            copy_file(src, tmp)
        tmp = _temp_beside(path)
        staged.append((tmp, path))
        if payload is None:
            copy_file(copy_of, tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(payload)
        for tmp, dst in staged:
            existed = os.path.lexists(dst)
            os.replace(tmp, dst)
            if not existed:
                created.append(dst)
    except BaseException as exc:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for dst in created:  # data files already in place for a model that never came
            os.unlink(dst)
        for directory in reversed(made_dirs):
            try:
                os.rmdir(directory)
            except OSError:
                pass
        if isinstance(exc, OSError):
            where = f": {exc.filename}" if exc.filename else ""
            raise BadInput(f"{path}: cannot save ({exc.strerror or exc}{where})") from None
        raise


def copy_file(src: str, dst: str) -> None:
    """Copy `src` to the (existing, empty) file `dst` without reading it into memory and keeping
    its holes: an 8 GB sparse file of zeros copies in milliseconds and takes no disk space."""
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        if not _copy_sparse(fin.fileno(), fout.fileno(), size):
            fin.seek(0)
            fout.seek(0)
            fout.truncate(0)
            _copy_skipping_zeros(fin, fout)
        fout.truncate(size)


_BLOCK = 1 << 20
_ZEROS = bytes(_BLOCK)


def _copy_skipping_zeros(fin, fout) -> None:
    """Where holes cannot be found: read it all, but leave blocks of zeros as holes."""
    while True:
        block = fin.read(_BLOCK)
        if not block:
            return
        if block == _ZEROS[:len(block)]:
            fout.seek(len(block), os.SEEK_CUR)
        else:
            fout.write(block)


def _copy_sparse(fin: int, fout: int, size: int) -> bool:
    """Copy only the data regions (SEEK_DATA/SEEK_HOLE); False where the system cannot say."""
    if not hasattr(os, "SEEK_DATA"):
        return False
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fin, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                return True
            return False  # SEEK_DATA unsupported here: the caller copies it all
        end = os.lseek(fin, start, os.SEEK_HOLE)
        _copy_range(fin, fout, start, end - start)
        offset = end
    return True


def _copy_range(fin: int, fout: int, offset: int, length: int) -> None:
    while length > 0:
        chunk = min(length, 64 << 20)
        try:
            done = os.copy_file_range(fin, fout, chunk, offset, offset)
        except (AttributeError, OSError):
            os.lseek(fin, offset, os.SEEK_SET)
            os.lseek(fout, offset, os.SEEK_SET)
            data = os.read(fin, chunk)
            done = os.write(fout, data) if data else 0
        if done <= 0:
            raise OSError(errno.EIO, "short copy")
        offset += done
        length -= done


def _same_file(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _make_dirs(directory: str) -> list[str]:
    """Create `directory` and missing parents; the ones created, outermost first."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for d in reversed(missing):
        os.mkdir(d)
    return list(reversed(missing))


def _temp_beside(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a model is an ordinary file
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


