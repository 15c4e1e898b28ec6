"""The engine's structure: targets are the extension point, rules know nothing of them, and a
target's refusal is decided before anything is emitted or verified."""

import ast
import os

import numpy as np
import onnx
import pytest

import onnx_fuse
from onnx_fuse import targets
from onnx_fuse.specs import AttentionSpec, RotarySpec
from onnx_fuse.targets.base import Proof
from onnx_fuse.targets.onnx import OnnxTarget

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
MODELS = os.path.join(ROOT, "models")


def sources(folder):
    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
        if name.endswith(".py"):
            path = os.path.join(ROOT, folder, name)
            yield path, ast.parse(open(path).read())


def imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")


def test_rules_do_not_import_targets():
    for path, tree in sources("patterns"):
        assert not any("targets" in m for m in imported_modules(tree)), path


def test_no_target_name_is_compared_outside_targets():
    names = set(targets.TARGETS)
    for folder in ("onnx_fuse", "patterns"):
        for path, tree in sources(folder):
            for node in ast.walk(tree):
                if isinstance(node, ast.Compare):
                    constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                    assert not names & set(constants), f"{path}:{node.lineno}"


class RopeRefusingTarget(OnnxTarget):
    """The onnx target without RotaryEmbedding, as a new target would declare it."""

    name = "no-rope"
    verified = 0

    def refusal(self, spec):
        if isinstance(spec, RotarySpec):
            return "target no-rope has no rotary op"
        return super().refusal(spec)

    def emit(self, spec, rw):
        assert not isinstance(spec, RotarySpec), "a refused spec is never emitted"
        super().emit(spec, rw)


def test_a_refused_spec_is_unfused_with_the_targets_reason(monkeypatch):
    monkeypatch.setitem(targets.TARGETS, "no-rope", RopeRefusingTarget())
    path = os.path.join(MODELS, "llama-gqa_prefill_eager_torchscript.onnx")
    report = onnx_fuse.fuse(path, target="no-rope", max_positions=32).report
    assert report["counts"] == {"attention": 2}
    reasons = {u["reason"] for u in report["unfused"] if u["pattern"] == "rope"}
    assert reasons == {"target no-rope has no rotary op"}
    assert report["check"]["passed"]


def test_a_target_that_cannot_be_checked_refuses_to_fuse_with_the_check_on(monkeypatch):
    class Unrunnable(OnnxTarget):
        name = "unrunnable"
        proof = Proof("none", "its ops exist only in TensorRT")

    monkeypatch.setitem(targets.TARGETS, "unrunnable", Unrunnable())
    path = os.path.join(MODELS, "gpt2_prefill_eager_torchscript.onnx")
    with pytest.raises(onnx_fuse.BadInput, match="cannot be checked.*--no-check"):
        onnx_fuse.fuse(path, target="unrunnable")
    assert onnx_fuse.fuse(path, target="unrunnable", check=False).report["counts"] == {"attention": 2}


def test_results_carry_the_typed_specs():
    path = os.path.join(MODELS, "mistral-swa_decode_eager_dynamo.onnx")
    result = onnx_fuse.fuse(path, check=False)
    attention = result.specs(AttentionSpec)
    assert len(attention) == result.report["counts"]["attention"]
    assert {spec.mask.klass.window for _, spec in attention} == {4}
    ops = {n.name: n.op_type for n in result.model.graph.node}
    for fusion, _ in attention:
        assert [ops[n] for n in fusion.nodes].count("Attention") == 1


def test_a_discarded_rewrite_gives_its_names_back():
    from onnx_fuse.graph import Graph
    from onnx_fuse.rewrite import Rewrite

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    graph = Graph(onnx.helper.make_model(onnx.helper.make_graph([], "g", [x], [x])))
    refused = Rewrite(graph, "rule")
    first = refused.op("Relu", [refused.const("c", np.ones(2, np.float32))]).name
    refused.discard()
    again = Rewrite(graph, "rule")
    assert again.op("Relu", [again.const("c", np.ones(2, np.float32))]).name == first


def test_the_command_line_help_names_every_target():
    from onnx_fuse import cli
    from onnx_fuse.targets import TARGETS

    assert [name for name in TARGETS if name not in cli._TARGET_HELP] == []
