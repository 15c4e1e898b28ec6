"""`onnx-fuse lint MODEL --trt VERSION`: before any build, whether TensorRT's ONNX parser of that
version takes each transformer layer of a model, and whether it gets a fused kernel.

Every node the parser maps to a transformer layer (trt_contract.py: ONNX Attention,
RotaryEmbedding and TensorScatter, TRT_Attention and TRT_KVCacheUpdate, custom ops it resolves as
plugins, and primitive MatMul-Softmax-MatMul attention, which TensorRT fuses itself) gets a
verdict: the rules it breaks, each saying whether the parser rejects the node, the build fails,
or only the fused kernel (or mask skipping) is lost. It runs on any model, fused or not, whoever
wrote it. Exit 0: no findings; 1: findings.
"""

from __future__ import annotations

import onnx

from .trt_contract import verdicts
from .trt_facts import VERSIONS

__all__ = ["VERSIONS", "exit_code", "lint", "render"]


def lint(model: onnx.ModelProto, version: str) -> dict:
    """The lint report of `model` for TensorRT `version` ("10.15", "10.16" or "11")."""
    found = verdicts(model, version)
    flagged = [v for v in found if v.findings]
    return {
        "trt": version,
        "clean": not flagged,
        "layers": len(found),
        "with_findings": len(flagged),
        "parse_failures": sum(not v.parses for v in found),
        "build_failures": sum(v.parses and not v.builds for v in found),
        "verdicts": [v.to_json() for v in found],
    }


def render(report: dict) -> str:
    """The report as lines for a terminal: a summary, then one line per layer and its findings."""
    lines = [f"TensorRT {report['trt']}: {report['layers']} transformer layers, "
             f"{report['with_findings']} with findings ({report['parse_failures']} do not parse, "
             f"{report['build_failures']} fail the build)"]
    for verdict in report["verdicts"]:
        lines += _verdict_lines(verdict)
    return "\n".join(lines)


def _verdict_lines(verdict: dict) -> list[str]:
    status = ("ok" if not verdict["findings"] else "NO PARSE" if not verdict["parses"]
              else "NO BUILD" if not verdict["builds"] else "NO KERNEL")
    lines = [f"  {status:<9} {verdict['op']} '{verdict['node']}' -> {verdict['layer']}"]
    lines += [f"            {f['breaks']}: [{f['rule']}] {f['message']}" for f in verdict["findings"]]
    lines += [f"            note: {note}" for note in verdict["notes"]]
    return lines


def exit_code(report: dict) -> int:
    return 0 if report["clean"] else 1
