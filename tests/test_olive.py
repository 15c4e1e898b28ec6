"""OnnxFusePass in real Olive workflows on a committed model: through `olive run` (the command
people use) mixed with one of Olive's own passes, and in-process with a check that fails."""

import json
import os
import subprocess
import sys

import onnx
import pytest

from ci import need
from onnx_fuse.check import ModelRef, check_equivalent, synthesize_inputs

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
NAME = "llama-gqa_decode_eager_torchscript.onnx"
LLAMA = os.path.abspath(os.path.join(MODELS, NAME))


@pytest.fixture(autouse=True)
def _olive(monkeypatch):
    need("olive")  # olive-ai: CI installs it (.ci/run), so there it fails rather than skips
    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")  # nothing leaves the machine


def _workflow(tmp_path, **fuse_options):
    return {"input_model": {"type": "ONNXModel", "model_path": LLAMA},
            "passes": {"fuse": {"type": "OnnxFusePass", **fuse_options}},
            "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
            "log_severity_level": 3}


def test_olive_run_command_fuses_with_olives_own_passes(tmp_path):
    truth = MANIFEST[NAME]
    config = tmp_path / "olive_package.json"
    subprocess.run([sys.executable, "-m", "onnx_fuse.olive", str(config)], check=True)
    workflow = _workflow(tmp_path, max_positions=64, atol=["1e-4", "logits:1e-3"],
                         report_html=str(tmp_path / "report.html"))
    # One of Olive's passes after ours: the package configuration keeps Olive's passes.
    workflow["passes"]["peephole"] = {"type": "OnnxPeepholeOptimizer", "onnxscript_optimize": False,
                                      "onnxoptimizer_optimize": False}
    (tmp_path / "workflow.json").write_text(json.dumps(workflow))
    olive = os.path.join(os.path.dirname(sys.executable), "olive")
    run = subprocess.run([olive, "run", "--config", str(tmp_path / "workflow.json"),
                          "--package-config", str(config)], capture_output=True, text=True,
                         env={**os.environ, "OLIVE_DISABLE_TELEMETRY": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    fused = onnx.load(str(tmp_path / "out" / "model.onnx"))
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("Attention") == truth["attention_cores"] and "Softmax" not in ops
    assert ops.count("RotaryEmbedding") == truth["rope_applications"]
    reference = ModelRef(onnx.load(LLAMA), MODELS)
    outcome = check_equivalent(reference, ModelRef(fused), synthesize_inputs(reference, seed=5))
    assert outcome.passed, outcome.message
    report = json.loads((tmp_path / "out" / "model_config.json").read_text())
    report = report["config"]["model_attributes"]["onnx_fuse_report"]
    assert report["counts"] == {"attention": 2, "rope": 4} and report["check"]["passed"]
    assert report["check"]["outputs"]["logits"]["tolerance"]["atol"] == 1e-3
    assert 'class="layer"' in (tmp_path / "report.html").read_text()


def test_a_failing_pass_hands_on_no_model(tmp_path, monkeypatch):
    from olive.workflows import run

    from onnx_fuse import CheckFailed
    from onnx_fuse.olive import package_config
    from onnx_fuse.proof import Prover

    checked = []
    really = Prover.require

    def disagree(self, model, what, base_dir=None):
        checked.append(what)
        if what == "the fused model":  # the opset conversion before it still checks
            raise CheckFailed(f"{what} does not match the input model: simulated")
        really(self, model, what, base_dir)

    monkeypatch.setattr(Prover, "require", disagree)
    output = run(_workflow(tmp_path, max_positions=64), package_config=package_config())
    assert checked == ["the opset conversion", "the fused model"]
    assert not output.has_output_model()
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_bad_options_fail_the_pass(tmp_path):
    from olive.workflows import run

    from onnx_fuse.olive import package_config

    output = run(_workflow(tmp_path, atol=["no_such_output:1e-3"]), package_config=package_config())
    assert not output.has_output_model()
