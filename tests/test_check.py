"""Tests for the equivalence checker on small hand-built models."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fuse.check import (
    CheckError,
    ModelRef,
    check_equivalent,
    load_inputs_npz,
    run_model,
    synthesize_inputs,
)

VOCAB = 7
HIDDEN = 8  # = 2 kv heads x head_dim 4


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _affine(shift: float = 0.0, with_second_output: bool = True) -> ModelRef:
    """y = x + 1 + shift, z = x * 2."""
    nodes = [helper.make_node("Add", ["x", "one"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if with_second_output:
        nodes.append(helper.make_node("Mul", ["x", "two"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    inits = [
        numpy_helper.from_array(np.array(1.0 + shift, np.float32), "one"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    return ModelRef(_model(nodes, [x], outputs, inits))


def _identity(elem_type: int, dims=(3,)) -> ModelRef:
    x = helper.make_tensor_value_info("x", elem_type, list(dims))
    y = helper.make_tensor_value_info("y", elem_type, list(dims))
    return ModelRef(_model([helper.make_node("Identity", ["x"], ["y"])], [x], [y]))


def _decoder(ids_dims, mask_dims, past_dims, with_positions: bool = False) -> ModelRef:
    """A toy decoder layer that only runs when mask length == past + seq:
    present = concat(past, reshape(embed(input_ids))), scores = sum(present) + mask."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "embed"),
        numpy_helper.from_array(np.array([0, 0, 2, 4], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([1, 3], np.int64), "reduce_axes"),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ids_dims),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, mask_dims),
        helper.make_tensor_value_info("past_key", TensorProto.FLOAT, past_dims),
    ]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["tokens"])]
    hidden = "tokens"
    if with_positions:
        inits.append(numpy_helper.from_array(rng.standard_normal((16, HIDDEN)).astype(np.float32), "pos_table"))
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ids_dims))
        nodes += [
            helper.make_node("Gather", ["pos_table", "position_ids"], ["positions"]),
            helper.make_node("Add", ["tokens", "positions"], ["hidden"]),
        ]
        hidden = "hidden"
    nodes += [
        helper.make_node("Reshape", [hidden, "heads_shape"], ["heads"]),
        helper.make_node("Transpose", ["heads"], ["new_key"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["past_key", "new_key"], ["present_key"], axis=2),
        helper.make_node("ReduceSum", ["present_key", "reduce_axes"], ["summed"], keepdims=0),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["summed", "mask_float"], ["scores"]),
    ]
    outputs = [
        helper.make_tensor_value_info("present_key", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, None),
    ]
    return ModelRef(_model(nodes, inputs, outputs, inits))


def _dynamo_decoder(**kwargs) -> ModelRef:
    return _decoder(["s0", "s1"], ["s0", "s1 + s2"], ["s0", 2, "s2", 4], **kwargs)


def _torchscript_decoder() -> ModelRef:
    # Mask length named independently: nothing in the model says it is past + seq.
    return _decoder(["batch", "seq"], ["batch", "total"], ["batch", 2, "past", 4])


# --------------------------------------------------------------------------- comparing


def test_identical_models_pass():
    model = _affine()
    result = check_equivalent(model, model)
    assert result.passed
    assert result.message == "all 2 outputs agree"
    assert set(result.outputs) == {"y", "z"}
    assert all(d.passed and d.max_abs == 0.0 for d in result.outputs.values())
    assert json.loads(json.dumps(result.to_json()))["passed"] is True


def test_perturbed_output_fails_and_names_it():
    result = check_equivalent(_affine(), _affine(shift=1e-2))
    assert not result.passed
    diff = result.outputs["y"]
    assert not diff.passed and diff.max_abs == pytest.approx(1e-2, rel=1e-3)
    assert result.outputs["z"].passed
    assert "'y'" in result.message and f"max_abs {diff.max_abs:.3g}" in result.message


def test_candidate_missing_output_fails():
    result = check_equivalent(_affine(), _affine(with_second_output=False))
    assert not result.passed
    assert result.outputs["y"].passed and not result.outputs["z"].passed
    assert "'z'" in result.message and "missing" in result.message


def test_candidate_that_cannot_load_fails_without_raising():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")]
    nodes = [helper.make_node("NoSuchOp", ["x"], ["y"]), helper.make_node("NoSuchOp", ["x"], ["z"])]
    graph = helper.make_graph(nodes, "g", [x], outputs)
    broken = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    broken.ir_version = 10

    result = check_equivalent(_affine(), ModelRef(broken))
    assert not result.passed
    assert result.message.startswith("candidate failed to run: ") and "\n" not in result.message
    assert set(result.outputs) == {"y", "z"}
    assert json.loads(json.dumps(result.to_json()))["outputs"]["y"]["max_abs"] is None


def test_reference_that_cannot_run_raises():
    with pytest.raises(CheckError, match="reference model failed to run"):
        check_equivalent(_affine(), _affine(), {"x": np.zeros((2, 3), np.float32)})


def test_nan_and_inf_rules():
    model = _identity(TensorProto.FLOAT)
    x = np.array([np.nan, np.inf, 1.0], np.float32)
    same = check_equivalent(model, model, {"x": x}, reference_outputs={"y": x.copy()})
    assert same.passed
    flipped = check_equivalent(model, model, {"x": x}, reference_outputs={"y": np.array([np.nan, -np.inf, 1.0], np.float32)})
    assert not flipped.passed and "NaN/inf" in flipped.message
    one_nan = check_equivalent(model, model, {"x": x}, reference_outputs={"y": np.array([0.0, np.inf, 1.0], np.float32)})
    assert not one_nan.passed
    # The reference NaN where the candidate has a number: the original is undefined there, and
    # the message says so (and what to do), rather than "positions differ".
    undefined = check_equivalent(model, model, {"x": np.array([0.0, np.inf, 1.0], np.float32)},
                                 reference_outputs={"y": x.copy()})
    assert not undefined.passed and "the original computes NaN at 1 of 3 values" in undefined.message


def test_tolerance_depends_on_dtype():
    model = _identity(TensorProto.FLOAT16)
    x = np.array([0.0, 1.0, -0.5], np.float16)
    assert check_equivalent(model, model, {"x": x}, reference_outputs={"y": x + np.float16(5e-3)}).passed
    assert not check_equivalent(model, model, {"x": x}, reference_outputs={"y": x + np.float16(5e-2)}).passed

    ints = _identity(TensorProto.INT64)
    i = np.array([1, 2, 3], np.int64)
    off_by_one = check_equivalent(ints, ints, {"x": i}, reference_outputs={"y": i + np.array([0, 0, 1])})
    assert not off_by_one.passed and "exact" in off_by_one.message


def test_shape_mismatch_fails():
    model = _identity(TensorProto.FLOAT)
    x = np.zeros(3, np.float32)
    result = check_equivalent(model, model, {"x": x}, reference_outputs={"y": np.zeros((1, 3), np.float32)})
    assert not result.passed and "shape" in result.message


def test_bfloat16_runs_and_compares():
    model = _identity(TensorProto.BFLOAT16, ["batch", 3])
    inputs = synthesize_inputs(model)
    assert inputs["x"].dtype == ml_dtypes.bfloat16 and inputs["x"].shape == (2, 3)
    outputs = run_model(model, inputs)
    assert outputs["y"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(outputs["y"], inputs["x"])
    assert check_equivalent(model, model).passed


# --------------------------------------------------------------------------- inputs


def test_token_ids_stay_inside_the_gather_table():
    # int32 ids reach the table through Cast and Unsqueeze, as exporters emit them.
    table = numpy_helper.from_array(np.zeros((VOCAB, 3), np.float32), "table")
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["ids64", "axes"], ["ids3d"]),
        helper.make_node("Gather", ["table", "ids3d"], ["emb"]),
    ]
    axes = numpy_helper.from_array(np.array([2], np.int64), "axes")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "seq"])
    emb = helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)
    inputs = synthesize_inputs(ModelRef(_model(nodes, [ids], [emb], [table, axes])), batch=3)
    values = inputs["ids"]
    assert values.dtype == np.int32 and values.shape == (3, 5)
    assert values.min() >= 0 and values.max() < VOCAB
    assert len(np.unique(values)) > 1


def test_mask_is_binary_with_a_left_padded_row_and_positions_follow_it():
    inputs = synthesize_inputs(_dynamo_decoder(with_positions=True))
    mask, positions = inputs["attention_mask"], inputs["position_ids"]
    past = inputs["past_key"].shape[2]
    assert past > 0
    assert mask.dtype == np.int64 and set(np.unique(mask)) == {0, 1}
    assert mask[0].all()
    padded = int((mask[1] == 0).sum())
    assert 1 <= padded <= past and not mask[1, :padded].any() and mask[1, padded:].all()
    seq = inputs["input_ids"].shape[1]
    np.testing.assert_array_equal(positions[0], np.arange(past, past + seq))
    np.testing.assert_array_equal(positions[1], np.arange(past, past + seq) - padded)


def test_dynamo_dim_expressions_are_evaluated():
    model = _dynamo_decoder()
    inputs = synthesize_inputs(model, batch=3)
    batch, seq = inputs["input_ids"].shape
    past = inputs["past_key"].shape[2]
    assert batch == 3 and seq != past
    assert inputs["attention_mask"].shape == (3, seq + past)
    assert run_model(model, inputs)["present_key"].shape == (3, 2, past + seq, 4)


def test_independent_mask_length_is_resolved_by_running_the_reference():
    model = _torchscript_decoder()
    inputs = synthesize_inputs(model)
    seq, past = inputs["input_ids"].shape[1], inputs["past_key"].shape[2]
    assert inputs["attention_mask"].shape == (2, past + seq)
    assert check_equivalent(model, model).passed


def test_unrelated_lengths_fall_back_to_equal_when_the_model_needs_it():
    # BERT-like export with a separately named length per input; all must be equal.
    inits = [
        numpy_helper.from_array(np.ones((VOCAB, 4), np.float32), "words"),
        numpy_helper.from_array(np.ones((2, 4), np.float32), "types"),
        numpy_helper.from_array(np.array([2], np.int64), "last_axis"),
    ]
    nodes = [
        helper.make_node("Gather", ["words", "input_ids"], ["w"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
        helper.make_node("Add", ["w", "t"], ["emb"]),
        helper.make_node("ReduceSum", ["emb", "last_axis"], ["summed"], keepdims=0),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["summed", "m"], ["out"]),
    ]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, [f"{name}_dim_0", f"{name}_dim_1"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    model = ModelRef(_model(nodes, inputs, [out], inits))

    synthesized = synthesize_inputs(model)
    assert {a.shape for a in synthesized.values()} == {(2, 5)}
    assert set(np.unique(synthesized["token_type_ids"])) <= {0, 1}  # the 2-row type table
    assert check_equivalent(model, model).passed


def _flattened_tokens_plus_mask(square: bool) -> ModelRef:
    """out = flatten(tokens) + mask: the mask must be as long as the flattened tokens, 8 * seq
    (a Reshape the relation finder solves), or seq * seq when `square` (tokens @ tokensᵀ:
    not a linear relation, found by nothing)."""
    inits = [
        numpy_helper.from_array(np.ones((VOCAB, 8), np.float32), "embed"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
    ]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["tokens"])]
    if square:
        nodes += [helper.make_node("Transpose", ["tokens"], ["tokens_t"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["tokens", "tokens_t"], ["grid"])]
    nodes += [
        helper.make_node("Reshape", ["grid" if square else "tokens", "flat"], ["flat_tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["flat_tokens", "m"], ["out"]),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
    ]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    return ModelRef(_model(nodes, inputs, [out], inits))


def test_a_length_the_graph_implies_is_read_from_it():
    # total = 8 * seq: no candidate size says so, the Reshape and the Add do.
    inputs = synthesize_inputs(_flattened_tokens_plus_mask(square=False))
    assert inputs["attention_mask"].shape == (2, 8 * inputs["input_ids"].shape[1])


def test_no_workable_shapes_raises_check_error():
    with pytest.raises(CheckError, match="did not run"):
        synthesize_inputs(_flattened_tokens_plus_mask(square=True))


# --------------------------------------------------------------------------- external data


def test_external_data_model_runs_from_base_dir(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    (tmp_path / "data").mkdir()  # onnx writes into, but does not create, the data folder
    onnx.save(
        _model(nodes, [x], [y], inits), tmp_path / "model.onnx",
        save_as_external_data=True, location="data/weights.bin", size_threshold=0,
    )
    model = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)

    ref = ModelRef(model, str(tmp_path))
    inputs = synthesize_inputs(ref)
    np.testing.assert_allclose(run_model(ref, inputs)["y"], inputs["x"] @ weight + bias, rtol=1e-5)
    assert check_equivalent(ref, ref).passed
    # Without base_dir the weights cannot be found: a failed check, not a crash.
    assert not check_equivalent(ref, ModelRef(model)).passed


# --------------------------------------------------------------------------- npz


def test_load_inputs_npz_round_trip(tmp_path):
    path = tmp_path / "inputs.npz"
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    np.savez(path, input_ids=ids, pixel_values=np.ones((1, 3), np.float16))
    loaded = load_inputs_npz(str(path))
    assert set(loaded) == {"input_ids", "pixel_values"}
    np.testing.assert_array_equal(loaded["input_ids"], ids)
    assert loaded["pixel_values"].dtype == np.float16


@pytest.mark.parametrize("kind", ["missing", "text", "npy", "object", "empty"])
def test_load_inputs_npz_rejects_bad_files(tmp_path, kind):
    path = tmp_path / "bad.npz"
    if kind == "text":
        path.write_text("not an archive\n")
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "object":
        np.savez(path, x=np.array([{"a": 1}], dtype=object))
    elif kind == "empty":
        np.savez(path)
    with pytest.raises(ValueError, match="cannot read inputs from") as error:
        load_inputs_npz(str(path))
    assert "\n" not in str(error.value)


def _perturbed_at(model: ModelRef, inputs, output: str, where) -> ModelRef:
    """The same model with `output` changed by 1.0 at the positions `where` picks (a boolean
    array over the output), as a candidate."""
    reference = run_model(model, inputs)[output]
    bump = np.zeros_like(reference)
    bump[where(reference.shape)] = 1.0
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model.model)
    candidate.graph.initializer.append(numpy_helper.from_array(bump, "bump"))
    for node in candidate.graph.node:  # everything inside reads the unperturbed tensor
        for names in (node.output, node.input):
            for i, name in enumerate(names):
                if name == output:
                    names[i] = output + "_raw"
    candidate.graph.node.append(helper.make_node("Add", [output + "_raw", "bump"], [output]))
    return ModelRef(candidate)


def test_outputs_at_padded_tokens_may_differ_and_are_reported():
    # present_key [B, 2, past+seq, 4]: its slots at padded tokens (attention_mask 0) are
    # undefined in real models (a softmax over a fully masked row), so only they may differ.
    model = _dynamo_decoder()
    inputs = synthesize_inputs(model)
    pads = inputs["attention_mask"] == 0
    assert pads.any() and not pads.all()
    candidate = _perturbed_at(model, inputs, "present_key",
                              lambda shape: np.broadcast_to(pads[:, None, :, None], shape))
    result = check_equivalent(model, candidate, inputs)
    assert result.passed and result.outputs["present_key"].only_padding_differs
    assert "padded positions" in result.message


def test_a_difference_at_a_real_token_still_fails():
    model = _dynamo_decoder()
    inputs = synthesize_inputs(model)
    valid = inputs["attention_mask"] == 1
    first_valid = np.zeros_like(valid)
    first_valid[1, int(np.argmax(valid[1]))] = True  # row 1's first real token
    candidate = _perturbed_at(model, inputs, "present_key",
                              lambda shape: np.broadcast_to(first_valid[:, None, :, None], shape))
    result = check_equivalent(model, candidate, inputs)
    assert not result.passed and "present_key" in result.message
    assert not result.outputs["present_key"].only_padding_differs


def test_a_pooled_output_never_gets_the_padding_allowance():
    # [batch, 5] class scores next to a [batch, 5] attention mask: the sizes match, but it is
    # not a per-token output, so a difference at a "padded" column still fails.
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 5])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", 5])
    table = numpy_helper.from_array(np.arange(VOCAB * 5, dtype=np.float32).reshape(VOCAB, 5), "table")
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["rows"]),
             helper.make_node("ReduceSum", ["rows", "axes"], ["scores"], keepdims=0),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["scores", "m"], ["labels"])]
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    out = helper.make_tensor_value_info("labels", TensorProto.FLOAT, None)
    model = ModelRef(_model(nodes, [ids, mask], [out], [table, axes]))
    inputs = synthesize_inputs(model)
    pads = inputs["attention_mask"] == 0
    assert pads.any()
    candidate = _perturbed_at(model, inputs, "labels", lambda shape: pads)
    result = check_equivalent(model, candidate, inputs)
    assert not result.passed and not result.outputs["labels"].only_padding_differs
