"""Robustness and scale: models without shapes, models with nothing to fuse, an 8 GB model whose
weights stay on disk, external data beside the output, idempotence and determinism."""

import importlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_fuse
from graphs import GraphBuilder, attention_model
from onnx_fuse import BadInput, cli

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
TORCHSCRIPT = os.path.join(MODELS, "llama-gqa_prefill_eager_torchscript.onnx")
DYNAMO = os.path.join(MODELS, "llama-gqa_decode_sdpa_dynamo.onnx")


def fuse_cli(capfd, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def attention(g, q, k, v, scale):
    s = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(scale))
    return g.op("MatMul", g.op("Softmax", s, axis=-1), v)


# --------------------------------------------------------------------------- no shapes


def _strip_shapes(model):
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    return model


def test_without_shapes_attention_is_left_alone_with_a_reason(capfd, tmp_path):
    model = _strip_shapes(attention_model(mask="additive"))
    assert onnx.shape_inference.infer_shapes(model).graph.value_info[0].type.tensor_type.HasField(
        "shape") is False  # inference cannot recover the ranks
    result = onnx_fuse.fuse(model, check=False)
    assert result.report["counts"] == {} and not result.changed
    (miss,) = result.report["unfused"]
    assert "rank" in miss["reason"] and "unknown" in miss["reason"]

    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    code, out, err = fuse_cli(capfd, "fuse", path, "-o", tmp_path / "out.onnx")
    assert code == 0 and err == "" and "fused: nothing" in out
    assert (tmp_path / "out.onnx").read_bytes() == path.read_bytes()


def test_only_the_core_without_shapes_is_skipped():
    g = GraphBuilder()
    shaped = [g.input(n, TensorProto.FLOAT, ["B", 4, "S", 8]) for n in ("q1", "k1", "v1")]
    bare = [g.input(n, TensorProto.FLOAT, None) for n in ("q2", "k2", "v2")]
    first = attention(g, *shaped, 0.35)
    second = attention(g, *bare, 0.35)
    model = g.model(first)
    model.graph.output.append(helper.make_tensor_value_info(second, TensorProto.FLOAT, None))
    feeds = {n: np.random.default_rng(0).standard_normal((2, 4, 3, 8)).astype(np.float32)
             for n in ("q1", "k1", "v1", "q2", "k2", "v2")}
    result = onnx_fuse.fuse(model, check=True, inputs=feeds)
    assert result.report["counts"] == {"attention": 1}
    assert result.report["check"]["passed"]
    (miss,) = result.report["unfused"]
    assert "unknown" in miss["reason"]
    assert [n.op_type for n in result.model.graph.node].count("Softmax") == 1


# --------------------------------------------------------------------------- nothing to fuse


def _cnn():
    g = GraphBuilder()
    x = g.input("image", TensorProto.FLOAT, ["N", 3, 16, 16])
    rng = np.random.default_rng(0)
    y = g.op("Relu", g.op("Conv", x, g.const(rng.standard_normal((4, 3, 3, 3))), pads=[1, 1, 1, 1]))
    y = g.op("Flatten", g.op("MaxPool", y, kernel_shape=[2, 2], strides=[2, 2]))
    y = g.op("Softmax", g.op("Gemm", y, g.const(rng.standard_normal((256, 10)))), axis=-1)
    return g.model(y, opset=17)


def _mlp():
    g = GraphBuilder()
    x = g.input("x", TensorProto.FLOAT, ["N", 8])
    rng = np.random.default_rng(1)
    h = g.op("Relu", g.op("Add", g.op("MatMul", x, g.const(rng.standard_normal((8, 16)))),
                          g.const(rng.standard_normal(16))))
    return g.model(g.op("MatMul", h, g.const(rng.standard_normal((16, 2)))), opset=13)


@pytest.mark.parametrize("build", [_cnn, _mlp])
def test_nothing_to_fuse_passes_through_byte_identical(capfd, tmp_path, build):
    path = tmp_path / "in.onnx"
    onnx.save(build(), path)
    code, out, err = fuse_cli(capfd, "fuse", path, "-o", tmp_path / "out.onnx",
                              "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "fused: nothing" in out and "opset" not in out  # no conversion either
    assert (tmp_path / "out.onnx").read_bytes() == path.read_bytes()


def test_pass_through_keeps_bytes_a_reserialization_would_change(capfd, tmp_path):
    # Fields written out of the canonical order (opset_import before graph): protobuf parses
    # it fine, but serializing it again would reorder the bytes. The output is the input's copy.
    model = _mlp()
    head, body = onnx.ModelProto(), onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    body.graph.CopyFrom(model.graph)
    data = body.SerializeToString() + head.SerializeToString()
    assert onnx.load_from_string(data).SerializeToString() != data
    path = tmp_path / "in.onnx"
    path.write_bytes(data)
    code, _, err = fuse_cli(capfd, "fuse", path, "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert (tmp_path / "out.onnx").read_bytes() == data


# --------------------------------------------------------------------------- idempotent, deterministic


@pytest.mark.parametrize("path", [TORCHSCRIPT, DYNAMO])
def test_fusing_twice_changes_nothing_and_runs_repeat_exactly(tmp_path, path):
    first = tmp_path / "first.onnx"
    result = onnx_fuse.fuse(path, check=False)
    assert result.report["counts"].get("attention")
    result.save(str(first))
    again = onnx_fuse.fuse(path, check=False)
    assert again.model.SerializeToString() == first.read_bytes()  # same input, same bytes

    second = tmp_path / "second.onnx"
    refused = onnx_fuse.fuse(str(first), check=False)
    assert refused.report["counts"] == {} and not refused.changed
    refused.save(str(second))
    assert second.read_bytes() == first.read_bytes()


def test_output_does_not_depend_on_the_hash_seed(tmp_path):
    # Set iteration order changes with PYTHONHASHSEED; the output must not.
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"out{seed}.onnx"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-m", "onnx_fuse.cli", "fuse", DYNAMO, "-o",
                               str(out), "--no-check"], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


# --------------------------------------------------------------------------- external data


def _save_external(model, path, location, threshold=0):
    os.makedirs(os.path.dirname(os.path.join(os.path.dirname(path), location)), exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=location,
              size_threshold=threshold)


def test_small_constants_in_external_data_are_read_from_the_model_directory(tmp_path, monkeypatch):
    # Every tensor external, the scale too: the rule still reads it (relative to the model, not
    # the working directory), and the weight the output still needs is copied beside it.
    g = GraphBuilder()
    q, k, v = (g.input(n, TensorProto.FLOAT, ["B", 4, "S", 8]) for n in "qkv")
    out = g.op("MatMul", attention(g, q, k, v, 0.3), g.const(np.eye(8) * 2))
    model = g.model(out)
    path = tmp_path / "m" / "in.onnx"
    path.parent.mkdir()
    _save_external(model, path, "w/data.bin")
    monkeypatch.chdir(tmp_path)
    feeds = {n: np.ones((2, 4, 3, 8), np.float32) for n in "qkv"}
    result = onnx_fuse.fuse(str(path), check=True, inputs=feeds)
    assert result.report["counts"] == {"attention": 1}
    assert result.report["fused"][0]["scale"] == pytest.approx(0.3)
    out = tmp_path / "elsewhere" / "out.onnx"
    out.parent.mkdir()
    result.save(str(out))
    assert (out.parent / "w" / "data.bin").read_bytes() == (path.parent / "w" / "data.bin").read_bytes()
    saved = onnx.load(str(out), load_external_data=False)
    assert [t.name for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    onnx.checker.check_model(str(out))


def test_output_beside_the_input_shares_its_data_file(tmp_path):
    model = attention_model(mask="additive")
    path = tmp_path / "in.onnx"
    _save_external(model, path, "data.bin")
    stat = os.stat(tmp_path / "data.bin")
    onnx_fuse.fuse(str(path), check=False).save(str(tmp_path / "out.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "in.onnx", "out.onnx"]
    after = os.stat(tmp_path / "data.bin")
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_saving_over_the_source_is_refused(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(attention_model(), path)
    data = path.read_bytes()
    with pytest.raises(BadInput, match="refusing to overwrite"):
        onnx_fuse.fuse(str(path), check=False).save(str(path))
    assert path.read_bytes() == data and os.listdir(tmp_path) == ["in.onnx"]


# --------------------------------------------------------------------------- 8 GB


LAYERS, HIDDEN, HEADS = 2, 16384, 128  # 8 weights of 16384 x 16384 float32: 8 GiB


def _big_model(directory):
    """A two-layer attention model whose eight 1 GiB weights live in one sparse file."""
    size = LAYERS * 4 * HIDDEN * HIDDEN * 4
    with open(os.path.join(directory, "weights.bin"), "wb") as f:
        f.truncate(size)
    g = GraphBuilder()
    offset = 0

    def weight(name):
        nonlocal offset
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[HIDDEN, HIDDEN],
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "weights.bin"), ("offset", offset),
                           ("length", HIDDEN * HIDDEN * 4)):
            t.external_data.add(key=key, value=str(value))
        offset += HIDDEN * HIDDEN * 4
        g.initializers.append(t)
        return name

    head = HIDDEN // HEADS
    split = g.const([0, 0, HEADS, head], np.int64)
    merge = g.const([0, 0, HIDDEN], np.int64)
    x = g.input("x", TensorProto.FLOAT, ["B", "S", HIDDEN])
    for layer in range(LAYERS):
        def heads(w):
            return g.op("Transpose", g.op("Reshape", g.op("MatMul", x, weight(f"l{layer}.{w}")), split),
                        perm=[0, 2, 1, 3])

        o = attention(g, heads("q"), heads("k"), heads("v"), 1 / np.sqrt(head))
        o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), merge)
        x = g.op("Add", x, g.op("MatMul", o, weight(f"l{layer}.o")))
    model = g.model(x, opset=17)
    model.ir_version = 8
    path = os.path.join(directory, "big.onnx")
    onnx.save(model, path)
    return path, size


def _allocated(path):
    return os.stat(path).st_blocks * 512


PEAK_RSS = textwrap.dedent("""
    import resource, sys
    from onnx_fuse.cli import main
    code = main(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("peak_kib", peak if sys.platform != "darwin" else peak // 1024)
    sys.exit(code)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="sparse files")
def test_8gb_model_fuses_in_little_memory_and_keeps_weights_external(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    path, size = _big_model(str(source))
    if _allocated(source / "weights.bin") > (64 << 20):
        pytest.skip("this filesystem has no sparse files")
    out = tmp_path / "out" / "big-fused.onnx"
    out.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, "fuse", path, "-o", str(out),
                           "--no-check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fused: attention 2" in done.stdout
    peak = int(done.stdout.split("peak_kib")[1].split()[0]) * 1024
    assert peak < (1 << 30), f"peak RSS {peak / 2**20:.0f} MiB"

    copied = out.parent / "weights.bin"
    assert os.path.getsize(copied) == size  # copied beside the output, full length
    assert _allocated(copied) < (64 << 20)  # and still sparse: no 8 GB of zeros on disk
    assert os.path.getsize(out) < (1 << 20)  # the graph alone was serialized
    fused = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in fused.graph.node].count("Attention") == 2
    weights = [t for t in fused.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert len(weights) == 2 * 4 and sum(int(np.prod(t.dims)) * 4 for t in weights) == size
    onnx.checker.check_model(str(out))  # resolves every external reference beside the output


def test_copy_file_keeps_holes(tmp_path):
    model_io = importlib.import_module("onnx_fuse.model_io")
    src, dst = tmp_path / "a.bin", tmp_path / "b.bin"
    with open(src, "wb") as f:
        f.truncate(1 << 30)
        f.seek(123 << 20)
        f.write(b"weights")
        f.seek((1 << 30) - 5)
        f.write(b"tail!")
    dst.touch()
    model_io.copy_file(str(src), str(dst))
    assert os.path.getsize(dst) == 1 << 30
    with open(dst, "rb") as f:
        f.seek(123 << 20)
        assert f.read(7) == b"weights"
        f.seek((1 << 30) - 5)
        assert f.read() == b"tail!"
    if _allocated(src) < (64 << 20):
        assert _allocated(dst) < (64 << 20)
    # the fallback for filesystems that cannot report holes reads, but writes no zero blocks
    small = tmp_path / "c.bin"
    with open(small, "wb") as f:
        f.truncate(32 << 20)
        f.seek(5 << 20)
        f.write(b"weights")
    with open(small, "rb") as fin, open(dst, "r+b") as fout:
        fout.truncate(0)
        model_io._copy_skipping_zeros(fin, fout)
        fout.truncate(32 << 20)
    assert dst.read_bytes() == small.read_bytes()
    if _allocated(small) < (1 << 20):
        assert _allocated(dst) <= (2 << 20)  # the one block that holds data
