"""The pass: load, match every rule, raise the opset if the emitted ops need it, rewrite, export,
and prove the result equal to the input."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from .errors import BadInput, CheckFailed
from .graph import Graph
from .model_io import SourceModel, load_model, save_model, validate
from .opset import OpsetError, default_opset, raise_opset
from .rewrite import PassResult, Unfused, run_rules
from .targets import Target, get_target


@dataclass
class FuseResult:
    """The rewritten model (weights still referencing the source's external data) and the report."""

    model: onnx.ModelProto
    report: dict
    base_dir: str | None = None
    changed: bool = field(default=False)

    def save(self, path: str) -> None:
        save_model(self.model, path, self.base_dir)


def fuse(model, target: str = "onnx", check: bool = True, inputs: dict | None = None,
         *, apply: bool = True) -> FuseResult:
    """Fuse `model` (a path or an onnx.ModelProto) for `target`.

    With `check` (the default) the result is run against the input in onnxruntime and a
    disagreement raises CheckFailed, so a wrong model is never returned. `apply=False` only
    reports what would fuse. Raises BadInput for models that cannot be used.
    """
    started = time.perf_counter()
    source = _source(model)
    chosen = get_target(target)
    report: dict = {"target": chosen.name, "counts": {}, "fused": [], "unfused": [],
                    "check": None}
    from_opset = default_opset(source.model)
    report["opset"] = {"from": from_opset, "to": from_opset}

    proof = _Proof(source, inputs) if check else None
    working = source.model
    graph = Graph(_with_shapes(working))
    needs_opset = from_opset < chosen.min_opset
    result = run_rules(graph, _rules(), chosen.emit, apply=apply and not needs_opset)
    if apply and result.fused and needs_opset:
        # Match first, convert only when something will fuse: a model with nothing to fuse
        # passes through untouched.
        try:
            working = raise_opset(source.model, chosen.min_opset)
            if proof is not None:
                proof.require(working, "the opset conversion")
        except (OpsetError, CheckFailed) as exc:
            result = _blocked(result, f"cannot raise the opset from {from_opset} to "
                                      f"{chosen.min_opset}: {exc}")
            working = source.model
        else:
            report["opset"]["to"] = chosen.min_opset
            graph = Graph(_with_shapes(working))
            result = run_rules(graph, _rules(), chosen.emit, apply=True)

    _describe(report, result)
    changed = apply and bool(result.fused)
    output = export(graph, working) if changed else source.model
    fused = FuseResult(output, report, source.base_dir, changed)
    if proof is not None and changed:
        try:
            proof.require(output, "the fused model")
        finally:
            report["check"] = proof.last
    report["seconds"] = round(time.perf_counter() - started, 3)
    return fused


def _rules():
    from .patterns import RULES

    return RULES


def _source(model) -> SourceModel:
    if isinstance(model, SourceModel):
        return model
    if isinstance(model, onnx.ModelProto):
        validate(model, None, "model")
        return SourceModel(model, None)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_model(str(model))
    raise BadInput(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference on a copy; rules that need shapes it cannot find say so."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is best effort: a model it cannot type still loads
        return model


def _blocked(result: PassResult, reason: str) -> PassResult:
    blocked = PassResult(unfused=list(result.unfused))
    blocked.unfused += [Unfused(f.anchor, f.rule, reason) for f in result.fused]
    return blocked


def _describe(report: dict, result: PassResult) -> None:
    report["counts"] = result.counts()
    report["fused"] = [{"rule": f.rule, "anchor": f.anchor, **f.spec.summary()}
                       for f in result.fused]
    report["unfused"] = [u.to_json() for u in result.unfused]


def export(graph: Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """The rewritten graph in a model that keeps the template's metadata, opsets and the
    doc strings and metadata of every node that survived; fused nodes say which rule made them."""
    exported = gs.export_onnx(graph.gs, do_type_check=False)
    model = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version",
                 "doc_string"):
        setattr(model, name, getattr(template, name))
    model.metadata_props.extend(template.metadata_props)
    model.opset_import.extend(template.opset_import)
    known = {o.domain for o in model.opset_import}
    for opset in exported.opset_import:
        if opset.domain not in known:
            model.opset_import.append(opset)
    model.graph.CopyFrom(exported.graph)
    model.functions.extend(template.functions)
    originals = {n.name: n for n in template.graph.node if n.name}
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
        from .check import ModelRef, check_equivalent, run_model, synthesize_inputs

        reference = ModelRef(self.source.model, self.source.base_dir)
        if self.inputs is None:
            self.inputs = synthesize_inputs(reference)
        if self.reference_outputs is None:
            self.reference_outputs = run_model(reference, self.inputs)
        outcome = check_equivalent(reference, ModelRef(model, self.source.base_dir), self.inputs,
                                   reference_outputs=self.reference_outputs)
        self.last = outcome.to_json()
        if not outcome.passed:
            raise CheckFailed(f"{what} does not match the input model: {outcome.message}",
                              self.last)
