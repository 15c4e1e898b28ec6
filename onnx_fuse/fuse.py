"""The fusion pass: repair what the exporter wrote invalid (repair.py), match every rule, raise the
opset if the emitted ops need it, rewrite, export, and prove the result equal to the input.

The opset is raised to what the fused ops need: the target's floor, or more where a spec that
fused needs it (`Target.spec_opset`: TensorScatter needs 24). The model is matched at the floor first
and again at the higher opset if something that fused needs it; if the model cannot be raised
that far (or the raised model does not check), those specs stay unfused with the reason and the
rest fuse at the floor. A conversion is kept only if something fused, and is proven first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import onnx

from . import progress
from .errors import CheckFailed
from .export import export
from .graph import Graph, Options, with_shapes
from .model_io import SourceModel
from .opset import OpsetError, default_opset, raise_opset
from .proof import Prover
from .repair import repair_model
from .result import FuseResult, attach_contract, describe
from .rewrite import PassResult, Unfused, run_rules
from .targets import Target
from .weights import SetAside


def fuse_source(source: SourceModel, target: Target, options: Options, prover: Prover | None,
                apply: bool = True) -> FuseResult:
    """Fuse `source` for `target`; with a prover, a result that does not check raises CheckFailed."""
    started = time.perf_counter()
    from_opset = default_opset(source.model)
    report: dict = {"target": target.name, "counts": {}, "fused": [], "unfused": [], "check": None,
                    "opset": {"from": from_opset, "to": from_opset}}
    source = _repaired(source, prover, report)
    attempt = _Attempt(None, PassResult(), source.model, from_opset)
    rules = _rules()
    if _has_anchors(source.model, rules):  # a model without candidates is not even imported
        attempt = _Pass(source, rules, options, prover, apply).run(target)
    report["opset"]["to"] = attempt.opset
    describe(report, attempt.result.fused, attempt.result.unfused, attempt.result.kept)
    rewritten = apply and bool(attempt.result.fused)
    output = export(attempt.graph, attempt.template, target.domains) if rewritten else source.model
    if rewritten:
        attach_contract(report, target.contract(output), target.contract_name)
        if target.notes():
            report["target_notes"] = target.notes()
    changed = apply and (rewritten or bool(report["repairs"]))
    fused = FuseResult(output, report, source.base_dir, changed, source.path,
                       attempt.result.fused, attempt.result.unfused, source)
    if prover is not None and rewritten:
        try:
            prover.require(output, "the fused model")
        finally:
            report["check"] = prover.last
    report["seconds"] = round(time.perf_counter() - started, 3)
    return fused


def _repaired(source: SourceModel, prover: Prover | None, report: dict) -> SourceModel:
    """The source with exporter-broken ops repaired (repair.py; listed in the report's
    `repairs`), proven against it when checking (`repair_check`): the source from here on."""
    model, repairs = repair_model(source.model)
    report["repairs"] = [r.to_json() for r in repairs]
    if not repairs:
        return source
    if prover is not None:
        try:
            prover.require_repair(model)
        finally:
            report["repair_check"] = prover.last
    return SourceModel(model, source.base_dir, source.path)


@dataclass
class _Attempt:
    """One match of the rules at one opset."""

    graph: Graph | None
    result: PassResult
    template: onnx.ModelProto  # the model the export starts from (its opsets, metadata)
    opset: int  # the template's default-domain opset
    failure: str | None = None  # why the opset could not be raised (every fusion blocked by it)


class _Pass:
    def __init__(self, source: SourceModel, rules, options: Options, prover: Prover | None,
                 apply: bool):
        self.source, self.rules, self.options = source, rules, options
        self.prover, self.apply = prover, apply
        self.weights = SetAside(source.model)
        self.from_opset = default_opset(source.model)

    def run(self, target: Target) -> _Attempt:
        floor = target.floor_opset
        attempt = self.at(floor, target)
        wanted = max((target.spec_opset(f.spec) for f in attempt.result.fused), default=0)
        if self.apply and attempt.failure is None and wanted > max(floor, self.from_opset):
            attempt = self.at(wanted, target)
            if attempt.failure is not None:  # stay at the floor; what needs more stays unfused
                attempt = self.at(floor, _Capped(target, floor, attempt.failure))
        return attempt

    def at(self, level: int, target) -> _Attempt:
        """Match (and with `apply`, rewrite) at opset `level`, converting the model first when it
        is below it (matched once on the converted model; kept only if something fuses)."""
        source = self.source.model
        if not (self.apply and self.from_opset < level):
            graph = self._graph(self.weights.lean)
            result = run_rules(graph, self.rules, target, apply=self.apply and self.from_opset >= level)
            return _Attempt(graph, result, source, self.from_opset)
        try:
            converted = self._convert(level)
        except OpsetError as exc:
            graph = self._graph(self.weights.lean)
            failure = _opset_reason(self.from_opset, level, exc)
            blocked = _blocked(run_rules(graph, self.rules, target, apply=False), failure)
            return _Attempt(graph, blocked, source, self.from_opset, failure)
        graph = self._graph(converted)
        result = run_rules(graph, self.rules, target, apply=True)
        if not result.fused:
            return _Attempt(graph, result, source, self.from_opset)
        try:
            if self.prover is not None:
                self.prover.require(self.weights.restore(converted), "the opset conversion")
        except CheckFailed as exc:
            failure = _opset_reason(self.from_opset, level, exc)
            return _Attempt(graph, _blocked(result, failure), source, self.from_opset, failure)
        return _Attempt(graph, result, converted, level)  # the converted model: weights not needed

    def _graph(self, model: onnx.ModelProto) -> Graph:
        """The graph to match on: `model` (weights possibly set aside) with inferred shapes."""
        progress.phase("load", "shapes and graph")
        return Graph(self.weights.restore(with_shapes(model)), self.source.base_dir, self.options)

    def _convert(self, version: int) -> onnx.ModelProto:
        """The model raised to opset `version`, its large weights possibly still set aside."""
        model, weights = self.source.model, self.weights
        progress.phase("load", f"opset {self.from_opset} -> {version}")
        if weights.lean is model:
            return raise_opset(model, version)
        try:
            converted = raise_opset(weights.lean, version)
        except OpsetError:
            converted = None
        if converted is None or not weights.restorable(converted):
            return raise_opset(model, version)  # the converter needed the weights after all
        return converted


class _Capped:
    """A target that also refuses the specs whose ops need an opset above `level`."""

    def __init__(self, target: Target, level: int, reason: str):
        self.target, self.level, self.reason = target, level, reason

    def __getattr__(self, name):
        return getattr(self.target, name)

    def refusal(self, spec) -> str | None:
        needed = self.target.spec_opset(spec)
        if needed > self.level:
            return f"needs opset {needed}: {self.reason}"
        return self.target.refusal(spec)


def _rules():
    from .patterns import RULES

    return RULES


def _has_anchors(model: onnx.ModelProto, rules) -> bool:
    """Whether some node, in the graph or in an If/Loop/Scan body, is a rule's anchor."""
    anchors = {rule.anchor for rule in rules}
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.op_type in anchors:
                return True
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
            graphs.extend(g for a in node.attribute for g in a.graphs)
    return False


def _opset_reason(from_opset: int, to_opset: int, exc: Exception) -> str:
    return f"cannot raise the opset from {from_opset} to {to_opset}: {exc}"


def _blocked(result: PassResult, reason: str) -> PassResult:
    blocked = PassResult(unfused=list(result.unfused), kept=list(result.kept))
    blocked.unfused += [Unfused(f.anchor, f.rule, reason, f.position) for f in result.fused]
    return blocked
