"""The pass: load, match every rule, raise the opset if the emitted ops need it, rewrite, export,
and prove the result equal to the input."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from . import trt_contract
from .errors import BadInput, CheckFailed
from .graph import Graph, Options
from .model_io import SourceModel, load_model, save_model, validate
from .opset import OpsetError, default_opset, raise_opset
from .rewrite import PassResult, Reject, Unfused, run_rules
from .targets import get_target


@dataclass
class FuseResult:
    """The rewritten model (weights still referencing the source's external data) and the report."""

    model: onnx.ModelProto
    report: dict
    base_dir: str | None = None
    changed: bool = field(default=False)
    source_path: str | None = None  # the file the model was read from, if any

    def save(self, path: str) -> None:
        """Write the model to `path` (never over the source file): a temporary file beside it,
        then a rename; external data files are copied beside it when it goes elsewhere. A model
        that passed through unchanged is written as a byte copy of its source file."""
        save_model(self.model, path, self.base_dir, self.source_path, unchanged=not self.changed)


def fuse(model, target: str = "onnx", check: bool = True, inputs: dict | None = None,
         *, apply: bool = True, max_positions: int | None = None, kv_cache: str | None = None,
         max_cache_len: int | None = None) -> FuseResult:
    """Fuse `model` (a path or an onnx.ModelProto) for `target`.

    With `check` (the default) the result is run against the input in onnxruntime and a
    disagreement raises CheckFailed, so a wrong model is never returned. `apply=False` only
    reports what would fuse. `max_positions` bounds the positions RoPE caches cover where the
    graph does not (cos/sin computed from the positions). Raises BadInput for models that cannot
    be used. `kv_cache="static"` also converts caches that grow by Concat to fixed caches of
    `max_cache_len` slots written by TensorScatter (kv_static.py; its check drives decode steps).
    """
    if kv_cache is not None:
        if kv_cache != "static":
            raise BadInput(f"unknown --kv-cache mode '{kv_cache}' (known: static)")
        if inputs is not None or not apply:
            raise BadInput("--kv-cache static rewrites the model and checks it over decode steps "
                           "with inputs of its own (no --inputs, no inspect)")
        from .kv_static import fuse_static

        return fuse_static(model, target, check, max_cache_len, max_positions)
    # The graph is hundreds of thousands of small objects that live until the pass ends: the
    # cyclic garbage collector would rescan them over and over (time growing faster than the
    # graph), so it is paused for the pass and whatever became garbage is collected after.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _fuse(model, target, check, inputs, apply, Options(max_positions=max_positions))
    finally:
        if collecting:
            gc.enable()


def _fuse(model, target: str, check: bool, inputs: dict | None, apply: bool,
          options: Options) -> FuseResult:
    started = time.perf_counter()
    source = source_model(model)
    chosen = get_target(target)
    report: dict = {"target": chosen.name, "counts": {}, "fused": [], "unfused": [],
                    "check": None}
    from_opset = default_opset(source.model)
    report["opset"] = {"from": from_opset, "to": from_opset}

    proof = _Proof(source, inputs) if check else None
    rules = _rules()
    working = source.model
    graph = None
    result = PassResult()
    if _has_anchors(source.model, rules):  # a model without candidates is not even imported
        weights = _Weights(source.model)
        # The opset is raised to what the fused ops need: the target's floor, or more where a
        # spec that fused declares it (min_opset: TensorScatter needs 24). Matched at the floor
        # first and again at the higher opset if something that fused needs it; if the model
        # cannot be raised that far, those specs stay unfused (with the reason) and the rest fuse.
        floor = chosen.min_opset
        graph, result, working, failure = _match(source, weights, rules, chosen.emit, options,
                                                 proof, report, from_opset, floor, apply)
        wanted = max((_spec_opset(f.spec) for f in result.fused), default=0)
        if apply and failure is None and wanted > max(floor, from_opset):
            graph, result, working, failure = _match(source, weights, rules, chosen.emit, options,
                                                     proof, report, from_opset, wanted, apply)
            if failure is not None:  # stay at the floor; what needs more stays unfused
                graph, result, working, _ = _match(
                    source, weights, rules, _capped(chosen.emit, floor, failure), options, proof,
                    report, from_opset, floor, apply)

    _describe(report, result)
    changed = apply and bool(result.fused)
    output = export(graph, working) if changed else source.model
    if changed:
        report["tensorrt"] = trt_contract.report(chosen.name, output)
        problems = {e["node"]: e["problems"] for e in report["tensorrt"]}
        for entry in report["fused"]:  # each fusion says what TensorRT would make of it
            entry["tensorrt"] = [p for node in entry["nodes"] for p in problems.get(node, [])]
    fused = FuseResult(output, report, source.base_dir, changed, source.path)
    if proof is not None and changed:
        try:
            proof.require(output, "the fused model")
        finally:
            report["check"] = proof.last
    report["seconds"] = round(time.perf_counter() - started, 3)
    return fused


def _match(source, weights, rules, emit, options, proof, report, from_opset: int, level: int,
           apply: bool):
    """Match (and with `apply`, rewrite) at opset `level`, converting the model first when it
    is below it. Returns the graph, the pass result, the export template and, when the
    conversion failed or did not check, why (every fusion is then blocked with that reason)."""
    working, failure = source.model, None
    report["opset"]["to"] = from_opset
    if apply and from_opset < level:
        # Convert first and match once on the converted model; keep the conversion only if
        # something fuses, so a model with nothing to fuse passes through untouched.
        try:
            converted = _convert(source.model, weights, level)
        except OpsetError as exc:
            graph = _graph(weights.lean, weights, source.base_dir, options)
            failure = _opset_reason(from_opset, level, exc)
            return graph, _blocked(run_rules(graph, rules, emit, apply=False), failure), working, failure
        graph = _graph(converted, weights, source.base_dir, options)
        result = run_rules(graph, rules, emit, apply=True)
        if result.fused:
            try:
                if proof is not None:
                    proof.require(weights.restore(converted), "the opset conversion")
            except CheckFailed as exc:
                failure = _opset_reason(from_opset, level, exc)
                result = _blocked(result, failure)
            else:
                working = converted  # the template for export: weights not needed
                report["opset"]["to"] = level
        return graph, result, working, failure
    graph = _graph(weights.lean, weights, source.base_dir, options)
    return graph, run_rules(graph, rules, emit, apply=apply and from_opset >= level), working, None


def _spec_opset(spec) -> int:
    """The default-domain opset a spec's emitted ops need beyond the target's own floor."""
    return getattr(spec, "min_opset", 0)


def _capped(emit, level: int, reason: str):
    """`emit`, refusing the specs whose ops need an opset above `level`."""
    def capped(spec, rw):
        if _spec_opset(spec) > level:
            raise Reject(f"needs opset {_spec_opset(spec)}: {reason}")
        emit(spec, rw)
    return capped


def _rules():
    from .patterns import RULES

    return RULES


def source_model(model) -> SourceModel:
    if isinstance(model, SourceModel):
        return model
    if isinstance(model, onnx.ModelProto):
        validate(model, None, "model")
        return SourceModel(model, None)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_model(str(model))
    raise BadInput(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")


def _has_anchors(model: onnx.ModelProto, rules) -> bool:
    anchors = {rule.anchor for rule in rules}
    return any(node.op_type in anchors for node in model.graph.node)


def _opset_reason(from_opset: int, to_opset: int, exc: Exception) -> str:
    return f"cannot raise the opset from {from_opset} to {to_opset}: {exc}"


def _graph(model: onnx.ModelProto, weights: "_Weights", base_dir: str | None,
           options: Options) -> Graph:
    """The graph to match on: `model` (weights possibly set aside) with inferred shapes."""
    return Graph(weights.restore(_with_shapes(model)), base_dir, options)


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference on a copy; rules that need shapes it cannot find say so."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is best effort: a model it cannot type still loads
        return model


def _convert(model: onnx.ModelProto, weights: "_Weights", version: int) -> onnx.ModelProto:
    """The model raised to opset `version`, its large weights possibly still set aside."""
    if weights.lean is model:
        return raise_opset(model, version)
    try:
        converted = raise_opset(weights.lean, version)
    except OpsetError:
        converted = None
    if converted is None or not weights.restorable(converted):
        return raise_opset(model, version)  # the converter needed the weights after all
    return converted


# Inline initializers with more elements than this are set aside while onnx's C++ tools (version
# converter, shape inference) run, which copy the whole model in and out: only the graph travels.
_SET_ASIDE_ELEMENTS = 1024
_SET_ASIDE = "onnx-fuse:set-aside"


class _Weights:
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
    return elements > _SET_ASIDE_ELEMENTS


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


def _blocked(result: PassResult, reason: str) -> PassResult:
    blocked = PassResult(unfused=list(result.unfused))
    blocked.unfused += [Unfused(f.anchor, f.rule, reason) for f in result.fused]
    return blocked


def _describe(report: dict, result: PassResult) -> None:
    report["counts"] = result.counts()
    report["fused"] = [{"rule": f.rule, "anchor": f.anchor, **f.spec.summary(), "nodes": f.nodes}
                       for f in result.fused]
    report["unfused"] = [u.to_json() for u in result.unfused]


def export(graph: Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """The rewritten graph in a model that keeps the template's metadata, opsets and the
    doc strings and metadata of every node that survived; fused nodes say which rule made them."""
    model = gs.export_onnx(graph.gs, do_type_check=False)
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version",
                 "doc_string"):
        setattr(model, name, getattr(template, name))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    exported_opsets = [(o.domain, o.version) for o in model.opset_import]
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    known = {o.domain for o in model.opset_import}
    for domain, version in exported_opsets:
        if domain not in known:
            model.opset_import.add(domain=domain, version=version)
    del model.functions[:]
    model.functions.extend(template.functions)
    originals = {n.name: n for n in template.graph.node
                 if n.name and (n.doc_string or len(n.metadata_props))}
    for node in model.graph.node:
        rule = graph.fused_by.get(node.name)
        if rule is not None:
            node.doc_string = f"onnx-fuse rule: {rule}"
            entry = node.metadata_props.add()
            entry.key, entry.value = "onnx_fuse.rule", rule
        elif node.name in originals:
            node.doc_string = originals[node.name].doc_string
            node.metadata_props.extend(originals[node.name].metadata_props)
    return model


class _Proof:
    """Runs the source once and compares each rewritten model with it."""

    def __init__(self, source: SourceModel, inputs: dict | None):
        self.source, self.inputs = source, inputs
        self.reference_outputs = None
        self.last: dict | None = None

    def require(self, model: onnx.ModelProto, what: str) -> None:
        from .check import CheckError, ModelRef, check_equivalent, run_model, synthesize_inputs

        reference = ModelRef(self.source.model, self.source.base_dir)
        if self.inputs is None:
            self.inputs = synthesize_inputs(reference)
        if self.reference_outputs is None:
            try:
                self.reference_outputs = run_model(reference, self.inputs)
            except Exception as exc:  # onnxruntime raises many unrelated exception types
                lines = str(exc).strip().splitlines()
                raise CheckError("the input model failed to run: "
                                 + (lines[0] if lines else type(exc).__name__)) from None
        outcome = check_equivalent(reference, ModelRef(model, self.source.base_dir), self.inputs,
                                   reference_outputs=self.reference_outputs)
        self.last = outcome.to_json()
        if not outcome.passed:
            raise CheckFailed(f"{what} does not match the input model: {outcome.message}",
                              self.last)
