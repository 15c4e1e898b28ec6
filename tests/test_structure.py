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


def package_modules():
    """{module name: file} for onnx_fuse and the rules (patterns/ is onnx_fuse.patterns)."""
    found = {}
    for folder, package in (("onnx_fuse", "onnx_fuse"), ("patterns", "onnx_fuse.patterns")):
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            relative = os.path.relpath(directory, os.path.join(ROOT, folder))
            prefix = package if relative == "." else package + "." + relative.replace(os.sep, ".")
            for name in files:
                if name.endswith(".py"):
                    module = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    found[module] = os.path.join(directory, name)
    return found


def import_edges(module, path, known):
    """The package modules `module` imports, at the top or inside a function alike."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            # `from pkg import sub` imports the submodule; `from pkg import name`, pkg itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        yield from (n for n in names if n in known and n != module)


def test_no_import_circle():
    known = package_modules()
    edges = {m: set(import_edges(m, path, known)) for m, path in known.items()}
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(known):
        if module not in state:
            visit(module)


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
