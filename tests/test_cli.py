"""The command line with bad input: one line on stderr, exit 2, nothing written, the input
untouched; unexpected internal errors: one line, exit 3. Most cases run `cli.main` in-process
(stderr captured at the file-descriptor level, so C++ noise would show); a few run the installed
command in a subprocess to check the real thing."""

import importlib
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import attention_model
from onnx_fuse import cli, model_io

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
LLAMA = os.path.join(MODELS, "llama-gqa_prefill_eager_torchscript.onnx")
API = importlib.import_module("onnx_fuse.api")  # the package's `fuse` is the function
PROOF = importlib.import_module("onnx_fuse.proof")


def run_main(capfd, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def assert_refused(capfd, tmp_path, argv, *, code=2, inputs=(), expect=None):
    """Exit `code`, exactly one stderr line, nothing new in tmp_path, inputs byte-identical."""
    before = {p: open(p, "rb").read() for p in inputs if os.path.isfile(p)}
    listing = sorted(os.listdir(tmp_path))
    got, _, err = run_main(capfd, *argv)
    lines = err.splitlines()
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("onnx-fuse: error: "), err
    assert "Traceback" not in err
    if expect:
        assert expect in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == listing  # no output, no report, no temp files
    for path, data in before.items():
        assert open(path, "rb").read() == data
    return lines[0]


def save(model, path, **kwargs):
    onnx.save(model, str(path), **kwargs)
    return str(path)


# --------------------------------------------------------------------------- unusable files


@pytest.mark.parametrize("kind, expect", [
    ("empty", "empty file"),
    ("random", "not"),
    ("truncated", "not"),
    ("text", "not"),
    ("missing", "no such file"),
    ("directory", "is a directory"),
])
def test_unusable_input_files(capfd, tmp_path, kind, expect):
    path = tmp_path / "in.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        path.write_bytes(open(LLAMA, "rb").read()[:20000])
    elif kind == "text":
        path.write_text("ir_version: 8\ngraph { node { op_type: \"Relu\" } }\n")
    elif kind == "directory":
        path.mkdir()
    assert_refused(capfd, tmp_path, ["fuse", path, "-o", tmp_path / "out.onnx"],
                   inputs=[path], expect=expect)


def test_truncated_at_many_points_is_always_refused(capfd, tmp_path):
    # Cut anywhere, a model either fails to parse or fails validation: never a crash.
    data = open(os.path.join(MODELS, "gpt2_prefill_eager_dynamo.onnx"), "rb").read()
    path = tmp_path / "cut.onnx"
    for cut in np.linspace(1, len(data) - 1, 12).astype(int):
        path.write_bytes(data[:cut])
        assert_refused(capfd, tmp_path, ["fuse", path, "-o", tmp_path / "out.onnx"],
                       inputs=[path])


# --------------------------------------------------------------------------- unusable models


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),), ir_version=8):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = ir_version
    return model


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])


@pytest.mark.parametrize("case, expect", [
    ("opset_too_new", "opset 99 is unknown"),
    ("unknown_domain", "unknown operator domain 'com.example'"),
    ("unknown_op", "'NoSuchOp' does not exist"),
    ("op_newer_than_opset", "'Attention' does not exist"),
    ("domain_not_imported", "does not import"),
    ("dangling_input", "which nothing produces"),
    ("output_not_produced", "produced by no node"),
    ("ir_too_new", "IR version"),
    ("no_opset", "no opset"),
])
def test_invalid_models(capfd, tmp_path, case, expect):
    relu = [helper.make_node("Relu", ["x"], ["y"])]
    model = {
        "opset_too_new": lambda: _model(relu, [X], [Y], opsets=(("", 99),)),
        "unknown_domain": lambda: _model([helper.make_node("Foo", ["x"], ["y"], domain="com.example")],
                                         [X], [Y], opsets=(("", 17), ("com.example", 1))),
        "unknown_op": lambda: _model([helper.make_node("NoSuchOp", ["x"], ["y"])], [X], [Y]),
        "op_newer_than_opset": lambda: _model(
            [helper.make_node("Attention", ["x", "x", "x"], ["y"])], [X], [Y]),
        "domain_not_imported": lambda: _model(
            [helper.make_node("Relu", ["x"], ["y"], domain="com.microsoft")], [X], [Y]),
        "dangling_input": lambda: _model([helper.make_node("Add", ["x", "ghost"], ["y"])], [X], [Y]),
        "output_not_produced": lambda: _model(
            relu, [X], [Y, helper.make_tensor_value_info("z", TensorProto.FLOAT, None)]),
        "ir_too_new": lambda: _model(relu, [X], [Y], ir_version=onnx.IR_VERSION + 5),
        "no_opset": lambda: _model(relu, [X], [Y], opsets=()),
    }[case]()
    path = tmp_path / "in.onnx"
    path.write_bytes(model.SerializeToString())  # onnx.save would refuse some of these
    assert_refused(capfd, tmp_path, ["fuse", path, "-o", tmp_path / "out.onnx"],
                   inputs=[path], expect=expect)
    # inspect and check refuse it the same way
    assert_refused(capfd, tmp_path, ["inspect", path], inputs=[path], expect=expect)


def _external_model(tmp_path, truncate=None, location="weights.bin"):
    weight = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [X], [Y], [weight])
    path = save(model, tmp_path / "in.onnx", save_as_external_data=True, location=location,
                size_threshold=0)
    if truncate is not None:
        with open(tmp_path / location, "r+b") as f:
            f.truncate(truncate)
    return path


def test_missing_external_data(capfd, tmp_path):
    path = _external_model(tmp_path)
    os.unlink(tmp_path / "weights.bin")
    assert_refused(capfd, tmp_path, ["fuse", path, "-o", tmp_path / "out.onnx"],
                   inputs=[path], expect="external data file 'weights.bin'")


def test_truncated_external_data(capfd, tmp_path):
    path = _external_model(tmp_path, truncate=8)
    assert_refused(capfd, tmp_path, ["fuse", path, "-o", tmp_path / "out.onnx"],
                   inputs=[path, tmp_path / "weights.bin"], expect="shorter")


def test_external_data_outside_the_model_directory(capfd, tmp_path):
    path = _external_model(tmp_path)
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../weights.bin"
    open(path, "wb").write(model.SerializeToString())
    assert_refused(capfd, tmp_path, ["fuse", path, "-o", tmp_path / "out.onnx"],
                   inputs=[path], expect="unusable external data location")


# --------------------------------------------------------------------------- unusable outputs


@pytest.fixture
def model_path(tmp_path):
    return save(attention_model(mask="additive"), tmp_path / "in.onnx")


def test_output_directory_missing(capfd, tmp_path, model_path):
    assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", tmp_path / "nowhere" / "out.onnx"],
                   inputs=[model_path], expect="does not exist")


def test_output_directory_is_a_file(capfd, tmp_path, model_path):
    assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", os.path.join(model_path, "out.onnx")],
                   inputs=[model_path], expect="not a directory")


def test_output_is_a_directory(capfd, tmp_path, model_path):
    (tmp_path / "sub").mkdir()
    assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", tmp_path / "sub"],
                   inputs=[model_path], expect="is a directory")


def test_output_directory_not_writable(capfd, tmp_path, model_path, monkeypatch):
    # root may write anywhere, so the permission answer is simulated (the real thing below).
    real = os.access
    monkeypatch.setattr(model_io.os, "access",
                        lambda p, mode: False if os.path.abspath(p) == str(tmp_path / "ro") else real(p, mode))
    (tmp_path / "ro").mkdir()
    assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", tmp_path / "ro" / "out.onnx"],
                   inputs=[model_path], expect="not writable")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_output_directory_not_writable_for_real(capfd, tmp_path, model_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", ro / "out.onnx"],
                       inputs=[model_path], expect="not writable")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("how", ["same", "relative", "symlink"])
def test_output_may_not_be_the_input(capfd, tmp_path, model_path, how, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if how == "same":
        target = model_path
    elif how == "relative":
        target = os.path.join(".", "sub", os.pardir, "in.onnx")
        (tmp_path / "sub").mkdir()
    else:
        os.symlink(model_path, tmp_path / "link.onnx")
        target = tmp_path / "link.onnx"
    assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", target], inputs=[model_path],
                   expect="refusing to overwrite the input")


def test_output_may_not_be_the_inputs_external_data(capfd, tmp_path):
    path = _external_model(tmp_path)
    assert_refused(capfd, tmp_path, ["fuse", path, "-o", tmp_path / "weights.bin"],
                   inputs=[path, tmp_path / "weights.bin"], expect="refusing to overwrite")


def test_report_may_not_overwrite_the_model(capfd, tmp_path, model_path):
    assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", tmp_path / "out.onnx",
                                     "--report", tmp_path / "out.onnx"], inputs=[model_path])


def test_report_directory_missing_writes_nothing(capfd, tmp_path, model_path):
    assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", tmp_path / "out.onnx",
                                     "--report", tmp_path / "no" / "r.json"], inputs=[model_path])


def test_bad_inputs_file(capfd, tmp_path, model_path):
    (tmp_path / "x.npz").write_text("not an archive")
    assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", tmp_path / "out.onnx",
                                     "--inputs", tmp_path / "x.npz"], inputs=[model_path])


# --------------------------------------------------------------------------- usage


@pytest.mark.parametrize("argv", [[], ["fuse"], ["fuse", "in.onnx"], ["frobnicate"],
                                  ["fuse", "in.onnx", "-o", "out.onnx", "--bogus"]])
def test_usage_errors_are_one_line(capfd, tmp_path, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_refused(capfd, tmp_path, argv, expect="--help")


def test_unknown_target(capfd, tmp_path, model_path):
    assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", tmp_path / "out.onnx",
                                     "--target", "nosuchtarget"], inputs=[model_path])


# --------------------------------------------------------------------------- internal errors


def test_internal_error_is_one_line_and_exit_3(capfd, tmp_path, model_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something broke\nwith a second line")

    monkeypatch.setattr(API, "fuse", broken)
    line = assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", tmp_path / "out.onnx"],
                          code=3, inputs=[model_path])
    assert line == "onnx-fuse: error: internal error: RuntimeError: something broke"


def test_internal_error_traceback_with_debug(tmp_path, model_path, monkeypatch):
    monkeypatch.setattr(API, "fuse", lambda *a, **k: 1 / 0)
    monkeypatch.setenv("ONNX_FUSE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["fuse", model_path, "-o", str(tmp_path / "out.onnx")])


def test_failure_while_saving_leaves_nothing(capfd, tmp_path, model_path, monkeypatch):
    # The disk fills up at the rename: no output, no temporary file, one line, exit 2.
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io.os, "replace", full)
    assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", tmp_path / "out.onnx"],
                   inputs=[model_path], expect="No space left on device")


def test_failure_while_copying_external_data_leaves_nothing(capfd, tmp_path, monkeypatch):
    path = _external_model(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    calls = []

    def failing_copy(src, dst):
        calls.append(dst)
        open(dst, "wb").write(b"partial")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(model_io, "copy_file", failing_copy)
    code, _, err = run_main(capfd, "fuse", path, "-o", out_dir / "out.onnx", "--no-check")
    assert code == 2 and len(err.splitlines()) == 1 and "Input/output error" in err
    assert calls and os.listdir(out_dir) == []


def test_interrupt_while_saving_leaves_nothing(tmp_path, model_path, monkeypatch):
    import onnx_fuse

    result = onnx_fuse.fuse(model_path, check=False)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        result.save(str(tmp_path / "out.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


# --------------------------------------------------------------------------- success


def test_fuse_writes_model_and_report(capfd, tmp_path, model_path):
    code, out, err = run_main(capfd, "fuse", model_path, "-o", tmp_path / "out.onnx",
                              "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "fused: attention 1" in out and "check passed" in out
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx", "r.json"]
    assert oct(os.stat(tmp_path / "out.onnx").st_mode & 0o777) != oct(0o600)  # not mkstemp's mode
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))


def test_subprocess_bad_input_and_success(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage\xff" * 10)
    command = [sys.executable, "-m", "onnx_fuse.cli", "fuse"]
    done = subprocess.run(command + [str(bad), "-o", str(tmp_path / "o.onnx")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "o.onnx").exists()
    done = subprocess.run(command + [LLAMA, "-o", str(tmp_path / "o.onnx"), "--no-check"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (tmp_path / "o.onnx").exists()


def test_input_that_does_not_run_is_one_line(capfd, tmp_path):
    model = onnx.load(os.path.join(MODELS, "gpt2_prefill_eager_dynamo.onnx"))
    # ids shifted past the vocabulary: every embedding lookup fails at run time (shape
    # inference and the checker's sizes cannot see it)
    for node in model.graph.node:
        node.input[:] = ["shifted_ids" if name == "input_ids" else name for name in node.input]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1000, np.int64), "shift"))
    model.graph.node.insert(0, helper.make_node("Add", ["input_ids", "shift"], ["shifted_ids"]))
    path = save(model, tmp_path / "in.onnx")
    # onnxruntime logs the failure natively to fd 2 too; the command shows only its own line
    assert_refused(capfd, tmp_path, ["fuse", path, "-o", tmp_path / "out.onnx"], inputs=[path],
                   expect="cannot check: reference model did not run")


def test_failed_check_is_exit_1_and_writes_no_model(capfd, tmp_path, model_path, monkeypatch):
    from onnx_fuse.errors import CheckFailed

    def disagree(self, model, what):
        self.last = {"passed": False, "outputs": {}, "message": "output 't9' differs"}
        raise CheckFailed(f"{what} does not match the input model: output 't9' differs", self.last)

    monkeypatch.setattr(PROOF.Prover, "require", disagree)
    line = assert_refused(capfd, tmp_path, ["fuse", model_path, "-o", tmp_path / "out.onnx"],
                          code=1, inputs=[model_path])
    assert "does not match" in line
    # with --report, the report (only) says why
    code, _, err = run_main(capfd, "fuse", model_path, "-o", tmp_path / "out.onnx",
                            "--report", tmp_path / "r.json")
    assert code == 1 and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "r.json"]


def test_failure_at_the_model_rename_removes_the_data_already_renamed(capfd, tmp_path, monkeypatch):
    path = _external_model(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real = os.replace

    def model_rename_fails(src, dst):
        if str(dst).endswith(".onnx"):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(model_io.os, "replace", model_rename_fails)
    code, _, err = run_main(capfd, "fuse", path, "-o", out_dir / "out.onnx", "--no-check")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert os.listdir(out_dir) == []


# --------------------------------------------------------------------------- explaining


def test_inspect_says_what_fuses_and_explains_every_candidate_it_leaves(capfd):
    rotary = os.path.join(MODELS, "llama-gqa_decode_eager_torchscript.onnx")
    code, out, err = run_main(capfd, "inspect", rotary)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("fused: attention 2, rope 4; unfused candidates: 0")
    fuses = [line for line in lines if line.lstrip().startswith("fuses")]
    assert len(fuses) == 6
    assert sum("mask_class=causal_padding" in f for f in fuses) == 2
    # Nothing bounds the positions: RoPE takes the graph's own cos/sin, and says why.
    assert sum("form=computed" in f and "nothing bounds the positions" in f for f in fuses) == 4
    # With the bound given, the table form with position ids.
    code, out, _ = run_main(capfd, "inspect", rotary, "--max-positions", 64)
    assert code == 0 and sum("form=table" in line for line in out.splitlines()) == 4
    # Each candidate a target leaves gets one line: the rule, its anchor node and the reason.
    code, out, _ = run_main(capfd, "inspect", rotary, "--target", "primitive-trt")
    misses = [line for line in out.splitlines() if line.lstrip().startswith("unfused")]
    assert code == 0 and len(misses) == 4
    assert all(" rope " in m and "at Neg '" in m and "keeps this as primitive ops" in m for m in misses)


def test_inspect_json_report_has_the_contract_fields(capfd, tmp_path):
    path = save(attention_model(probs_as_output=True), tmp_path / "probs.onnx")
    code, out, _ = run_main(capfd, "inspect", path, "--json")
    report = __import__("json").loads(out)
    assert code == 0 and report["counts"] == {}
    (miss,) = report["unfused"]
    assert set(miss) == {"anchor", "pattern", "reason", "position"}
    assert isinstance(miss["position"], int)  # the anchor's place in the graph (report_html's layers)
    assert miss["pattern"] == "attention" and "graph output" in miss["reason"]


def test_check_command_compares_two_models(capfd, tmp_path):
    fused = tmp_path / "fused.onnx"
    assert run_main(capfd, "fuse", LLAMA, "-o", fused, "--no-check")[0] == 0
    code, out, _ = run_main(capfd, "check", LLAMA, fused)
    assert code == 0 and out.splitlines()[-1].startswith("passed:")
    # A model that computes something else fails with exit 1 and names the output.
    other = os.path.join(MODELS, "qwen2-gqa_prefill_eager_torchscript.onnx")
    code, out, _ = run_main(capfd, "check", LLAMA, other)
    assert code == 1 and "logits" in out and out.splitlines()[-1].startswith("failed:")


def test_version(capfd):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    out, _ = capfd.readouterr()
    assert exit_info.value.code == 0 and out.startswith("onnx-fuse ")
