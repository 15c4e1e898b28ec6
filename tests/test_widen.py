"""bfloat16 models are checked as float32 (widen.py): onnxruntime's CPU provider has no bfloat16
Mul or Where, the float32 copy runs. Every bfloat16 tensor is widened (interface, initializers
in every encoding, Constant and ConstantOfShape values, Cast targets, If bodies); a result that
differs still fails; the committed bfloat16 models fuse, check as float32 and stay bfloat16."""

import json
import os

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fuse
from onnx_fuse.check import ModelRef, run_model
from onnx_fuse.errors import CheckFailed
from onnx_fuse.model_io import SourceModel
from onnx_fuse.proof import Prover
from onnx_fuse.widen import has_bfloat16, widened, widened_inputs

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
BF16 = ml_dtypes.bfloat16


def bf16_tensor(values, name, raw=True) -> onnx.TensorProto:
    """A bfloat16 initializer, in raw_data or (as older writers do) one value per int32_data."""
    array = np.asarray(values, dtype=BF16)
    if raw:
        return numpy_helper.from_array(array, name)
    bits = array.view(np.uint16).astype(np.int32)
    return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, bits.tolist())


def scaled_model(scale=2.0, in_subgraph=False) -> onnx.ModelProto:
    """y = Where(x > 0, x * w, fill) + Cast(bias) on bfloat16 x [batch, 4], with fill from
    ConstantOfShape, w a raw initializer, bias an int32_data initializer cast to bfloat16;
    in_subgraph: the Mul inside an If on a bool input."""
    w = bf16_tensor(np.full(4, scale), "w")
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [4], [0.5, -0.25, 1.0, 0.0])
    zero = bf16_tensor(0.0, "zero", raw=False)
    mul = helper.make_node("Mul", ["x", "w"], ["xw"])
    nodes = [helper.make_node("Greater", ["x", "zero"], ["positive"]),
             helper.make_node("Constant", [], ["shape"], value_ints=[4]),
             helper.make_node("ConstantOfShape", ["shape"], ["fill"], value=bf16_tensor([-1.0], "v")),
             helper.make_node("Cast", ["bias"], ["bias16"], to=TensorProto.BFLOAT16)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch", 4])]
    if in_subgraph:
        out = helper.make_tensor_value_info("xw", TensorProto.BFLOAT16, ["batch", 4])
        body = helper.make_graph([mul], "then", [], [out])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["xw"])], "else", [], [out])
        nodes.append(helper.make_node("If", ["flag"], ["xw"], then_branch=body, else_branch=other))
        inputs.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, [1]))
    else:
        nodes.append(mul)
    nodes += [helper.make_node("Where", ["positive", "xw", "fill"], ["picked"]),
              helper.make_node("Add", ["picked", "bias16"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["batch", 4])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [w, bias, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def expected(x: np.ndarray, scale: float) -> np.ndarray:
    bias = np.array([0.5, -0.25, 1.0, 0.0], np.float32)
    return np.where(x > 0, x * np.float32(BF16(scale)), -1.0) + bias


def test_onnxruntime_cannot_run_bfloat16_but_runs_the_widened_copy():
    model = scaled_model()
    x = np.array([[1.5, -2.0, 0.25, 3.0], [-0.5, 8.0, 0.0, 1.0]], dtype=BF16)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|implementation"):
        run_model(ModelRef(model), {"x": x})
    wide = widened(model, None)
    assert has_bfloat16(model) and not has_bfloat16(wide)
    y = run_model(ModelRef(wide), widened_inputs({"x": x}))["y"]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, expected(x.astype(np.float32), 2.0))


def test_bodies_of_if_are_widened():
    model = scaled_model(in_subgraph=True)
    assert has_bfloat16(model)
    wide = widened(model, None)
    assert not has_bfloat16(wide)
    x = np.array([[1.0, 2.0, -3.0, 4.0]], np.float32)
    y = run_model(ModelRef(wide), {"x": x, "flag": np.array([True])})["y"]
    np.testing.assert_array_equal(y, expected(x, 2.0))


def test_external_bfloat16_weights_are_read_and_widened(tmp_path):
    model = scaled_model()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    lean = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL and t.data_type == TensorProto.BFLOAT16
               for t in lean.graph.initializer)
    wide = widened(lean, str(tmp_path))
    x = np.array([[1.0, -1.0, 2.0, 0.5]], np.float32)
    np.testing.assert_array_equal(run_model(ModelRef(wide, str(tmp_path)), {"x": x})["y"],
                                  expected(x, 2.0))


def test_a_bfloat16_result_is_checked_as_float32_and_a_difference_fails():
    source = SourceModel(scaled_model(), None)
    prover = Prover(source, None)
    prover.require(scaled_model(), "the same model")
    assert prover.last["passed"] and prover.last["checked_as"] == "float32"
    # 2.015625 is the next bfloat16 after 2: one rounding step of the weights shows.
    with pytest.raises(CheckFailed, match="does not match"):
        prover.require(scaled_model(scale=2.015625), "a model one bfloat16 step off")
    assert prover.last["checked_as"] == "float32" and not prover.last["passed"]


def test_user_inputs_in_bfloat16_are_widened():
    x = np.array([[1.0, -1.0, 2.0, 0.5], [3.0, 0.0, -2.0, 1.0]], dtype=BF16)
    prover = Prover(SourceModel(scaled_model(), None), {"x": x})
    prover.require(scaled_model(), "the same model")
    assert prover.cases[0].inputs["x"].dtype == np.float32


@pytest.mark.parametrize("name", sorted(n for n in MANIFEST if MANIFEST[n].get("dtype") == "bfloat16"
                                        and MANIFEST[n]["arch"] == "llama"))
def test_committed_bfloat16_models_fuse_and_check_as_float32(name):
    truth = MANIFEST[name]
    result = onnx_fuse.fuse(os.path.join(MODELS, name), max_positions=64)
    report = result.report
    assert report["counts"].get("attention") == truth["attention_cores"], report["unfused"]
    assert report["counts"].get("rope") == truth["rope_applications"], report["unfused"]
    assert report["check"]["passed"] and report["check"]["checked_as"] == "float32"
    # The fused model itself stays bfloat16: its interface and its Attention nodes.
    outputs = {o.name: o.type.tensor_type.elem_type for o in result.model.graph.output}
    assert outputs["logits"] == TensorProto.BFLOAT16
    assert any(n.op_type == "Attention" for n in result.model.graph.node)
    assert has_bfloat16(result.model)


def test_the_check_command_compares_bfloat16_models_as_float32():
    from onnx_fuse.check import check_equivalent

    same = check_equivalent(ModelRef(scaled_model()), ModelRef(scaled_model()))
    assert same.passed and same.to_json()["checked_as"] == "float32"
    assert not check_equivalent(ModelRef(scaled_model()), ModelRef(scaled_model(scale=2.015625))).passed
