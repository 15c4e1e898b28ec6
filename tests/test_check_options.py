"""Checking like Polygraphy: --atol/--rtol globally and per output, --inputs from .npz or
Polygraphy's JSON, --check-batch, and the per-output error statistics in the report."""

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from ci import need
from onnx_fuse import BadInput, cli
from onnx_fuse.check import compare_output
from onnx_fuse.inputs_file import load_inputs
from onnx_fuse.tolerances import Tolerances, parse_tolerances

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
LLAMA = os.path.join(MODELS, "llama-gqa_decode_eager_torchscript.onnx")
BERT = os.path.join(MODELS, "bert_encoder_eager_torchscript.onnx")


def run_main(capfd, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fused_llama(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "llama.onnx"
    assert cli.main(["fuse", LLAMA, "-o", str(out), "--max-positions", "64"]) == 0
    return str(out)


# --------------------------------------------------------------------------- tolerances


def test_tolerance_forms_as_polygraphy_writes_them():
    parsed = parse_tolerances(["1e-4", "logits:1e-3", "a:b:0"], ["present.0.key:0.5"])
    assert parsed.atol == {"": 1e-4, "logits": 1e-3, "a:b": 0.0}  # the value follows the last colon
    assert parsed.rtol == {"present.0.key": 0.5}
    assert parse_tolerances(None, None) is None


def test_output_value_wins_over_global_wins_over_dtype():
    tolerances = Tolerances(atol={"": 1e-2, "logits": 1e-6}, rtol={"logits": 0.0})
    dtype_default = (1e-4, 1e-3)
    assert tolerances.resolve("logits", dtype_default) == (1e-6, 0.0)
    assert tolerances.resolve("other", dtype_default) == (1e-2, 1e-3)  # rtol: the dtype's
    assert tolerances.resolve("ids", None) is None  # integers stay exact


@pytest.mark.parametrize("values, expect", [
    (["abc"], "expected [OUTPUT:]NUMBER"),
    (["logits:"], "expected [OUTPUT:]NUMBER"),
    (["-1e-3"], ">= 0"),
    (["nan"], "finite"),
    (["logits:1", "logits:2"], "given twice"),
    (["1", "2"], "every output given twice"),
])
def test_bad_tolerances_are_refused(values, expect):
    with pytest.raises(BadInput, match=expect.replace("[", r"\[").replace("]", r"\]")):
        parse_tolerances(values, None)


def test_a_per_output_tolerance_decides_that_output_only(capfd, fused_llama):
    # The fused logits differ from the original's by a few 1e-6: zero tolerance fails them and
    # only them (present.0.value is bit-identical, the rest keep the dtype's tolerance).
    code, out, err = run_main(capfd, "check", LLAMA, fused_llama, "--atol", "logits:0",
                              "--rtol", "logits:0")
    assert code == 1 and not err
    verdicts = {line.split(":")[0].strip(): line.split()[-1] for line in out.splitlines()[:-1]}
    assert verdicts["logits"] == "DIFFERS"
    assert {v for k, v in verdicts.items() if k != "logits"} == {"ok"}
    assert out.splitlines()[-1].startswith("failed: output 'logits' differs")
    # A global tolerance of 0 fails every output that is not bit-identical; a loose one passes.
    code, out, _ = run_main(capfd, "check", LLAMA, fused_llama, "--atol", "0", "--rtol", "0")
    assert code == 1 and "present.0.value: abs max 0 " in out and out.count("DIFFERS") >= 2
    code, out, _ = run_main(capfd, "check", LLAMA, fused_llama, "--atol", "1e-2")
    assert code == 0 and out.splitlines()[-1].startswith("passed")


def test_fuse_refuses_a_tolerance_for_an_output_it_does_not_have(capfd, tmp_path):
    code, _, err = run_main(capfd, "fuse", LLAMA, "-o", tmp_path / "o.onnx", "--atol", "logit:1e-3")
    assert code == 2 and err.count("\n") == 1 and "unknown output(s) logit" in err
    assert not os.listdir(tmp_path)


def test_fuse_report_has_tolerances_and_statistics(capfd, tmp_path):
    report = tmp_path / "r.json"
    code, _, _ = run_main(capfd, "fuse", LLAMA, "-o", tmp_path / "o.onnx", "--max-positions", 64,
                          "--atol", "1e-4", "logits:1e-3", "--report", report)
    assert code == 0
    outputs = json.loads(report.read_text())["check"]["outputs"]
    assert outputs["logits"]["tolerance"] == {"atol": 1e-3, "rtol": 1e-3}
    assert outputs["present.0.key"]["tolerance"] == {"atol": 1e-4, "rtol": 1e-3}
    for diff in outputs.values():
        stats = diff["stats"]
        for kind in ("abs", "rel"):
            s = stats[kind]
            assert 0 <= s["median"] <= s["p99"] <= s["max"] and s["mean"] <= s["max"]
        assert stats["abs"]["max"] == diff["max_abs"]


def test_error_statistics_are_those_of_the_elementwise_errors():
    expected = np.ones(100, np.float32)
    actual = expected + np.arange(100, dtype=np.float32) * np.float32(1e-6)
    diff, problem = compare_output(actual, expected)
    errors = np.abs(actual.astype(np.float64) - 1.0)
    assert problem is None and diff.tolerance == {"atol": 1e-4, "rtol": 1e-3}
    assert diff.stats["abs"]["max"] == pytest.approx(errors.max())
    assert diff.stats["abs"]["mean"] == pytest.approx(errors.mean())
    assert diff.stats["abs"]["median"] == pytest.approx(np.median(errors))
    assert diff.stats["abs"]["p99"] == pytest.approx(np.percentile(errors, 99))
    assert diff.stats["rel"]["max"] == pytest.approx(errors.max())  # |reference| is 1
    _, problem = compare_output(actual, expected, (1e-5, 0.0))
    assert "tolerance atol 1e-05, rtol 0" in problem


# --------------------------------------------------------------------------- --check-batch


def test_check_batch_sizes_the_synthesized_inputs(capfd, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = run_main(capfd, "fuse", LLAMA, "-o", tmp_path / "o.onnx", "--check-batch", 3,
                            "--report", report)
    assert code == 0, err
    check = json.loads(report.read_text())["check"]
    assert check["passed"] and check["inputs"]["input_ids"][0] == 3
    assert check["inputs"]["past_key_values.0.key"][0] == 3


@pytest.mark.parametrize("extra, expect", [
    (["--check-batch", "0"], "at least 1"),
    (["--check-batch", "2", "--inputs", "X"], "cannot go with --inputs"),
])
def test_bad_check_batch(capfd, tmp_path, extra, expect):
    if "X" in extra:
        np.savez(tmp_path / "x.npz", input_ids=np.zeros((1, 1), np.int64))
        extra = [str(tmp_path / "x.npz") if e == "X" else e for e in extra]
    listing = sorted(os.listdir(tmp_path))
    code, _, err = run_main(capfd, "fuse", LLAMA, "-o", tmp_path / "o.onnx", *extra)
    assert code == 2 and expect in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == listing


# --------------------------------------------------------------------------- --inputs


def _polygraphy_inputs(tmp_path, iterations=1):
    """A real `polygraphy run --save-inputs` file for the BERT encoder: batch 2, 7 tokens, ids
    inside the vocabulary, a 0/1 mask."""
    need("polygraphy")
    path = tmp_path / "inputs.json"
    polygraphy = os.path.join(os.path.dirname(sys.executable), "polygraphy")
    subprocess.run([polygraphy, "run", BERT, "--onnxrt", "--save-inputs", str(path),
                    "--iterations", str(iterations),
                    "--input-shapes", "input_ids:[2,7]", "attention_mask:[2,7]",
                    "--val-range", "input_ids:[0,99]", "attention_mask:[0,1]"],
                   check=True, capture_output=True, timeout=120)
    return path


def test_polygraphy_json_reads_as_polygraphy_reads_it(tmp_path):
    path = _polygraphy_inputs(tmp_path, iterations=2)
    from polygraphy.json import load_json

    theirs = load_json(str(path))
    ours = load_inputs(str(path))
    assert len(ours) == len(theirs) == 2
    for mine, their in zip(ours, theirs):
        assert mine.keys() == their.keys() == {"input_ids", "attention_mask"}
        for name in mine:
            assert mine[name].dtype == their[name].dtype and mine[name].shape == (2, 7)
            np.testing.assert_array_equal(mine[name], their[name])


def test_fuse_checks_every_polygraphy_feed(capfd, tmp_path):
    inputs = _polygraphy_inputs(tmp_path, iterations=2)
    report = tmp_path / "r.json"
    code, _, err = run_main(capfd, "fuse", BERT, "-o", tmp_path / "o.onnx", "--inputs", inputs,
                            "--report", report)
    assert code == 0, err
    check = json.loads(report.read_text())["check"]
    assert check["passed"] and check["input_sets"] == 2
    assert check["message"].endswith("with each input set (feed 0; feed 1)")
    assert check["inputs"] == {"input_ids": [2, 7], "attention_mask": [2, 7]}


def test_inputs_are_really_fed(capfd, tmp_path):
    """Ids outside the vocabulary make the reference fail: the file's arrays are what runs."""
    bad = tmp_path / "bad.json"
    ids = np.full((1, 3), 10**6, np.int64)
    bad.write_text(json.dumps([{"input_ids": _encoded(ids), "attention_mask": _encoded(np.ones((1, 3), np.int64))}]))
    code, _, err = run_main(capfd, "fuse", BERT, "-o", tmp_path / "o.onnx", "--inputs", bad)
    assert code == 2 and "cannot check" in err and err.count("\n") == 1


def _encoded(array, legacy=False):
    buffer = io.BytesIO()
    if legacy:  # old Polygraphy: an .npz inside, and the legacy type marker
        np.savez(buffer, array)
        return {"array": base64.b64encode(buffer.getvalue()).decode(),
                "__polygraphy_encoded_ndarray": "polygraphy_serialized_json_type"}
    np.save(buffer, array, allow_pickle=False)
    return {"array": base64.b64encode(buffer.getvalue()).decode(), "polygraphy_class": "ndarray"}


def test_older_polygraphy_encodings_and_npz(tmp_path):
    x = np.arange(6, dtype=np.float16).reshape(2, 3)
    path = tmp_path / "old.json"
    path.write_text(json.dumps([{"x": _encoded(x, legacy=True)}]))
    (feed,) = load_inputs(str(path))
    np.testing.assert_array_equal(feed["x"], x)
    np.savez(tmp_path / "x.npz", x=x)
    (feed,) = load_inputs(str(tmp_path / "x.npz"))
    np.testing.assert_array_equal(feed["x"], x)


@pytest.mark.parametrize("content, expect", [
    ("[]", "non-empty list"),
    ('"text"', "non-empty list"),
    ("[1]", "feed 0 is not"),
    ('[{"x": [1, 2]}]', "not a Polygraphy-encoded array"),
    ('[{"x": {"array": "AAAA", "polygraphy_class": "ndarray"}}]', "does not decode"),
    ("[{", "not valid JSON"),
    ('[{"x": {"array": "\u20ac!", "polygraphy_class": "ndarray"}}]', "neither base64 nor latin-1"),
])
def test_bad_polygraphy_files(tmp_path, capfd, content, expect):
    path = tmp_path / "in.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=expect):
        load_inputs(str(path))
    code, _, err = run_main(capfd, "fuse", BERT, "-o", tmp_path / "o.onnx", "--inputs", path)
    assert code == 2 and expect in err and err.count("\n") == 1


def test_tolerances_reach_the_check_of_the_python_api():
    import onnx_fuse

    result = onnx_fuse.fuse(LLAMA, max_positions=64, tolerances=Tolerances(atol={"logits": 0.5}))
    assert result.report["check"]["outputs"]["logits"]["tolerance"]["atol"] == 0.5
    assert onnx.checker.check_model(result.model) is None
