"""`onnx_fuse.fuse` takes a path, an onnx.ModelProto, an onnx_ir.Model or a torch ONNXProgram
and gives back the kind it was given (`result.model`; `result.proto` is always the ModelProto),
with the weights the given model held, not copies of them."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

import onnx_fuse
from onnx_fuse import BadInput
from onnx_fuse.check import ModelRef, check_equivalent, synthesize_inputs

ir = pytest.importorskip("onnx_ir")

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
NAME = "llama-gqa_decode_eager_torchscript.onnx"
LLAMA = os.path.join(MODELS, NAME)
TRUTH = MANIFEST[NAME]


def _expect_fused(result):
    counts = result.report["counts"]
    assert counts == {"attention": TRUTH["attention_cores"], "rope": TRUTH["rope_applications"]}
    assert result.report["check"]["passed"], result.report["check"]["message"]
    ops = [n.op_type for n in result.proto.graph.node]
    assert ops.count("Attention") == TRUTH["attention_cores"] and "Softmax" not in ops


def _agrees_with_llama(proto, base_dir=None):
    """The fused model against the committed file, on inputs that respect it (batch 2, padding,
    past 3): an independent check besides the one fuse ran."""
    reference = ModelRef(onnx.load(LLAMA), MODELS)
    outcome = check_equivalent(reference, ModelRef(proto, base_dir), synthesize_inputs(reference, seed=7))
    assert outcome.passed, outcome.message


def _large_initializers(model):
    return {name: value.const_value for name, value in model.graph.initializers.items()
            if value.const_value is not None and value.const_value.size > 1024}


def test_ir_model_in_ir_model_out_keeps_the_weight_objects():
    given = ir.load(LLAMA)
    weights = _large_initializers(given)
    assert weights  # embeddings, projections
    result = onnx_fuse.fuse(given, max_positions=64)
    assert isinstance(result.model, ir.Model) and isinstance(result.proto, onnx.ModelProto)
    _expect_fused(result)
    kept = _large_initializers(result.model)
    assert set(weights) <= set(kept)
    for name, tensor in weights.items():
        assert kept[name] is tensor, name
    _agrees_with_llama(ir.serde.serialize_model(result.model))


def test_numpy_backed_ir_tensor_keeps_its_memory():
    given = ir.load(LLAMA)
    name, value = max(given.graph.initializers.items(), key=lambda item: item[1].const_value.size)
    array = np.array(value.const_value.numpy())  # a private buffer the model now points at
    value.const_value = ir.Tensor(array, name=name)
    result = onnx_fuse.fuse(given, max_positions=64)
    _expect_fused(result)
    tensor = result.model.graph.initializers[name].const_value
    assert tensor is value.const_value
    assert np.shares_memory(tensor.numpy(), array)


def test_external_data_ir_model_is_never_read_into_memory(tmp_path):
    onnx.save(onnx.load(LLAMA), tmp_path / "m.onnx", save_as_external_data=True,
              location="m.data", size_threshold=1024)
    given = ir.load(tmp_path / "m.onnx")
    external = {n: v.const_value for n, v in given.graph.initializers.items()
                if isinstance(v.const_value, ir.ExternalTensor)}
    assert len(external) >= 10
    result = onnx_fuse.fuse(given, max_positions=64)
    _expect_fused(result)
    for name, tensor in external.items():
        assert result.model.graph.initializers[name].const_value is tensor
        proto = next(t for t in result.proto.graph.initializer if t.name == name)
        assert proto.data_location == onnx.TensorProto.EXTERNAL and not proto.raw_data
    assert result.base_dir == str(tmp_path)
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    result.save(str(out))  # external data copied beside it
    assert (out.parent / "m.data").stat().st_size == (tmp_path / "m.data").stat().st_size
    _agrees_with_llama(onnx.load(str(out), load_external_data=False), str(out.parent))


def test_changed_bytes_are_not_passed_off_as_the_given_tensor():
    """Reattaching a given tensor needs the same bytes: a rewritten initializer of the same name
    keeps the result's data (the check a weight reuse would have to pass can fail)."""
    from onnx_fuse.interop import _same_tensor

    a = ir.Tensor(np.arange(2048, dtype=np.float32))
    assert _same_tensor(a, ir.Tensor(np.arange(2048, dtype=np.float32)), ir)
    changed = np.arange(2048, dtype=np.float32)
    changed[1000] += 1
    assert not _same_tensor(a, ir.Tensor(changed), ir)
    assert not _same_tensor(a, ir.Tensor(np.arange(2048, dtype=np.int32)), ir)
    assert not _same_tensor(a, ir.Tensor(np.arange(2048, dtype=np.float32).reshape(2, 1024)), ir)
    words = ir.StringTensor(np.array([b"a", b"b"], dtype=object))
    assert _same_tensor(words, ir.StringTensor(np.array([b"a", b"b"], dtype=object)), ir)
    assert not _same_tensor(words, ir.StringTensor(np.array([b"a", b"c"], dtype=object)), ir)


def test_unchanged_ir_model_comes_back_as_itself():
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 3]))
    relu = ir.node("Relu", [x])
    relu.outputs[0].name = "y"
    graph = ir.Graph([x], relu.outputs, nodes=[relu], opset_imports={"": 17})
    given = ir.Model(graph, ir_version=8)
    result = onnx_fuse.fuse(given)
    assert result.model is given and not result.changed and result.report["counts"] == {}


def test_other_objects_are_refused_with_the_kinds_accepted():
    with pytest.raises(BadInput, match="onnx_ir.Model or a torch.onnx.ONNXProgram, got int"):
        onnx_fuse.fuse(42)


def test_fusing_a_path_imports_neither_torch_nor_onnx_ir():
    code = ("import sys, onnx_fuse; r = onnx_fuse.fuse(sys.argv[1], max_positions=64); "
            "assert r.report['counts']['attention'] == 2; "
            "print(sorted(m for m in ('torch', 'onnx_ir') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, LLAMA], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- torch ONNXProgram


def test_onnx_program_in_onnx_program_out():
    torch = pytest.importorskip("torch")
    program = torch.onnx.ONNXProgram(ir.load(LLAMA), None)
    result = onnx_fuse.fuse(program, max_positions=64)
    assert type(result.model) is torch.onnx.ONNXProgram
    assert isinstance(result.model.model, ir.Model)
    _expect_fused(result)
    # The program runs (onnxruntime, through torch) and agrees with the given one.
    inputs = synthesize_inputs(ModelRef(onnx.load(LLAMA), MODELS), seed=3)
    args = [torch.from_numpy(inputs[name]) for name in TRUTH["inputs"]]
    expected, actual = program(*args), result.model(*args)
    for want, got in zip(expected, actual):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=1e-3)


def test_dynamo_export_fuses_in_memory():
    """What torch.onnx.export(..., dynamo=True) returns goes straight in: a causal attention
    block with an additive padding mask, exported, fused and checked."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x, mask):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
            bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            scores = q @ k.transpose(-1, -2) * 8 ** -0.5 + bias
            return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, 32)

    x, mask = torch.randn(2, 5, 32), torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(Block().eval(), (x, mask), dynamo=True, verbose=False,
                                dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    result = onnx_fuse.fuse(program)
    assert type(result.model) is type(program)
    assert result.report["counts"] == {"attention": 1}, result.report["unfused"]
    assert result.report["check"]["passed"]
    (fused,) = result.report["fused"]
    assert fused["mask_class"] == "padding"
    given = program.model.graph.initializers  # torch-backed tensors: the same objects come back
    weights = {name: v.const_value for name, v in given.items() if v.const_value.size > 1024}
    assert weights and all(result.model.model.graph.initializers[name].const_value is tensor
                           for name, tensor in weights.items())
    np.testing.assert_allclose(result.model(x, mask)[0].numpy(), program(x, mask)[0].numpy(),
                               atol=1e-5)
