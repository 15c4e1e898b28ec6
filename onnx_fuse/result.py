"""What a fusion pass returns: the model, what fused (with the typed specs), what did not and why,
and the report built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from .model_io import SourceModel, save_model
from .rewrite import Fused, Unfused


@dataclass
class FuseResult:
    """The rewritten model (weights still referencing the source's external data), the typed
    results of the pass and the JSON report.

    model:   of the kind `onnx_fuse.fuse` was given (an onnx.ModelProto for a path or a proto, an
             onnx_ir.Model, a torch.onnx.ONNXProgram; interop.py); the given object itself when
             nothing changed.
    proto:   the same model as an onnx.ModelProto, whatever the kind given.
    fused:   one Fused per rewrite applied: the rule, the anchor, the spec (AttentionSpec with
             its proven MaskClass, RotarySpec, KVCacheWriteSpec) and the names of the nodes added.
    unfused: every candidate left as it was, with the reason.
    """

    model: Any
    report: dict
    base_dir: str | None = None
    changed: bool = False
    source_path: str | None = None  # the file the model was read from, if any
    fused: list[Fused] = field(default_factory=list)
    unfused: list[Unfused] = field(default_factory=list)
    # the model the pass rewrote and checked against: the input, or the input with
    # exporter-broken ops repaired (repair.py)
    source: SourceModel | None = None
    proto: onnx.ModelProto | None = None

    def __post_init__(self):
        if self.proto is None:
            self.proto = self.model

    def save(self, path: str) -> None:
        """Write the model to `path` (never over the source file): a temporary file beside it,
        then a rename; external data files are copied beside it when it goes elsewhere. A model
        that passed through unchanged is written as a byte copy of its source file."""
        save_model(self.proto, path, self.base_dir, self.source_path, unchanged=not self.changed)

    def specs(self, kind: type) -> list[tuple[Fused, object]]:
        """(fusion, spec) for every applied fusion whose spec is of type `kind`."""
        return [(f, f.spec) for f in self.fused if isinstance(f.spec, kind)]


def describe(report: dict, fused: list[Fused], unfused: list[Unfused], kept: list[Unfused] = ()) -> None:
    """The report's counts, fused and unfused sections, and `kept` (only when a target kept an op
    the model already had as its own: Target.own_ops)."""
    counts: dict[str, int] = {}
    for f in fused:
        counts[f.rule] = counts.get(f.rule, 0) + 1
    report["counts"] = counts
    report["fused"] = [{"rule": f.rule, "anchor": f.anchor, **f.spec.summary(), **f.details, "nodes": f.nodes,
                        **({"position": f.position} if f.position is not None else {})}
                       for f in fused]
    report["unfused"] = [u.to_json() for u in unfused]
    if kept:
        report["kept"] = [k.to_json() for k in kept]


def attach_contract(report: dict, entries: list[dict], key: str = "tensorrt") -> None:
    """The target's contract check under `key` (the runtime it is for): per emitted node, and
    per fusion for the nodes it added."""
    report[key] = entries
    problems = {e["node"]: e["problems"] for e in entries}
    for entry in report["fused"]:
        entry[key] = [p for node in entry["nodes"] for p in problems.get(node, [])]
