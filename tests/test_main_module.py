"""`python -m onnx_fuse` is the `onnx-fuse` command: same output, exit codes and error lines."""

import os
import shutil
import subprocess
import sys

import pytest

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
GPT2 = os.path.join(MODELS, "gpt2_decode_eager_torchscript.onnx")


def _both(*argv, cwd):
    """(exit code, stdout, stderr) of the installed command and of the module, same arguments."""
    command = shutil.which("onnx-fuse") or os.path.join(os.path.dirname(sys.executable), "onnx-fuse")
    if not os.path.exists(command):
        pytest.skip("the onnx-fuse command is not installed (pip install -e .)")
    runs = []
    module = [sys.executable, "-m", "onnx_fuse"]
    for prefix, tag in (([command], "out_by_command"), (module, "out_by_module")):
        args = [a.replace("{}", tag) for a in map(str, argv)]
        done = subprocess.run(prefix + args, capture_output=True, text=True, cwd=cwd, timeout=300)
        runs.append((done.returncode, done.stdout.replace(tag, "{}"), done.stderr.replace(tag, "{}")))
    return runs


def test_version_and_usage_errors(tmp_path):
    command, module = _both("--version", cwd=tmp_path)
    assert command == module and command[0] == 0 and command[1].startswith("onnx-fuse ")
    command, module = _both("fuse", cwd=tmp_path)
    assert command == module and command[0] == 2 and command[2].count("\n") == 1


def test_bad_input_is_the_same_one_line(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    command, module = _both("fuse", "bad.onnx", "-o", "out.onnx", cwd=tmp_path)
    assert command == module and command[0] == 2
    assert command[2].startswith("onnx-fuse: error: bad.onnx: not") and command[2].count("\n") == 1


def test_fusing_writes_the_same_model(tmp_path):
    command, module = _both("fuse", GPT2, "-o", "{}.onnx", cwd=tmp_path)
    assert command == module and command[0] == 0 and "fused: attention 2" in command[1]
    written = [(tmp_path / f"out_by_{who}.onnx").read_bytes() for who in ("command", "module")]
    assert written[0] == written[1]
