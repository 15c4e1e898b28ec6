"""Layer 3: the TensorRT plugins without TensorRT or a GPU.

The AOT step compiles each kernel to PTX for sm_80 and sm_90 on the CPU, and launch
parameters follow the shapes; then a fake `tensorrt` / `tensorrt.plugin` in sys.modules shows
what register_all() registers (names, inputs, attribute types, aliasing, autotune, AOT and
JIT implementations), and runs the AOT implementations through symbolic shapes.

Triton cannot compile in a process that imported it under TRITON_INTERPRET=1 (test_kernels
does, for its interpreter); there every compilation runs in a child process without it.
"""
import functools
import inspect
import json
import os
import re
import subprocess
import sys
import types

import pytest

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.language.standard  # noqa: E402

from onnx_fuse import plugin_ops  # noqa: E402
from onnx_fuse.kernels import launch  # noqa: E402
from onnx_fuse.trt_plugins import aot  # noqa: E402

CHILD = """
import dataclasses, importlib, json, sys
sys.path.insert(0, sys.argv[2])
from onnx_fuse.trt_plugins import aot
job = json.loads(sys.argv[1])
aot.PTX_VERSION = job.pop("ptx_version")
fn = getattr(importlib.import_module(job.pop("module")), job.pop("name"))
try:
    print(json.dumps(dataclasses.asdict(aot.compile_kernel(fn, **job))))
except ValueError as err:
    print(json.dumps({"error": str(err)}))
"""


@functools.lru_cache(maxsize=None)
def _compile_in_child(job):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", CHILD, job, os.path.dirname(__file__)],
                         capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "error" in result:
        raise ValueError(result["error"])
    return aot.Compiled(**result)


@pytest.fixture(autouse=True, scope="module")
def compiler():
    if type(triton.language.standard.cdiv).__name__ != "InterpretedFunction":
        yield
        return

    def compile_kernel(fn, signature, constexprs, num_warps, num_stages, arch):
        job = dict(module=fn.fn.__module__, name=fn.fn.__name__, signature=signature,
                   constexprs=constexprs, num_warps=num_warps, num_stages=num_stages, arch=arch,
                   ptx_version=aot.PTX_VERSION)
        return _compile_in_child(json.dumps(job, sort_keys=True))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aot, "compile_kernel", compile_kernel)
        yield

ATTRS = dict(scale=0.125, causal=2, window=0, softcap=0.0, masked_row=0, use_key_mask=1)


def entry_params(ptx, name):
    match = re.search(rf"\.entry {name}\((.*?)\)", ptx, re.S)
    assert match, f"PTX has no entry {name}"
    return match.group(1).count(".param")


@pytest.fixture(scope="module", params=aot.ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def attention_ptx(arch):
    return aot.attention_kernel("fp16", "i1", "fp32", 128, 128, ATTRS, arch)


def test_attention_compiles_to_ptx(arch, attention_ptx):
    compiled, tile = attention_ptx
    target = "sm_90a" if arch == 90 else "sm_80"
    assert f".target {target}" in compiled.ptx and ".version 8.4" in compiled.ptx
    # 6 tensors, 4 int32 extras, the output, and Triton's two hidden scratch pointers
    assert entry_params(compiled.ptx, compiled.name) == 6 + 4 + 1 + 2
    assert ("wgmma" in compiled.ptx) == (arch == 90)
    assert compiled.num_warps == tile.num_warps
    assert 0 < compiled.shared <= 227 * 1024


def test_attention_launch_parameters(attention_ptx):
    compiled, tile = attention_ptx
    params = aot.attention_launch(compiled, tile, batch=3, nq=32, sq=1000)
    assert params.grid == (-(-1000 // tile.block_m), 3 * 32, 1)
    assert params.block == (tile.num_warps * 32, 1, 1)
    assert params.shared == compiled.shared
    assert aot.attention_extra_args(32, 8, 1000, 4096) == (32, 8, 1000, 4096)


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rope_compiles_and_launches(arch, interleaved):
    compiled, const = aot.rope_kernel("bf16", 128, 32, interleaved, arch)
    assert entry_params(compiled.ptx, compiled.name) == 4 + 3 + 1 + 2
    rows = 2 * 8 * 100
    params = aot.rows_launch(compiled, const, rows)
    assert params.grid == (-(-rows // const["BLOCK_R"]), 1, 1)
    assert params.block == (compiled.num_warps * 32, 1, 1)
    assert aot.rope_extra_args(2, 8, 100) == (rows, 800, 100)


def test_kv_write_compiles_and_launches(arch):
    compiled, const = aot.kv_write_kernel("fp16", "i64", 128, arch)
    assert entry_params(compiled.ptx, compiled.name) == 3 + 4 + 1 + 2
    params = aot.rows_launch(compiled, const, 4 * 8 * 3)
    assert params.grid == (-(-96 // const["BLOCK_R"]), 1, 1)
    assert aot.kv_write_extra_args(4, 8, 512, 3) == (96, 8, 3, 512)


@triton.jit
def with_descriptor(X, N, Y):
    desc = tl.make_tensor_descriptor(X, shape=[N, 16], strides=[16, 1], block_shape=[16, 16])
    tl.store(Y + tl.arange(0, 16), tl.sum(desc.load([0, 0]), 0))


def test_kernels_needing_global_scratch_are_refused(monkeypatch):
    # device-side descriptors need a newer PTX ISA than the one we pin (ptxas refuses them)
    monkeypatch.setattr(aot, "PTX_VERSION", None)
    with pytest.raises(ValueError, match="global scratch"):
        aot.compile_kernel(with_descriptor, {"X": "*fp16", "N": "i32", "Y": "*fp16"}, {}, 4, 1, 90)


# ---------------------------------------------------------------- fake tensorrt


class Dim:
    """A TensorRT ShapeExpr stand-in: constant, with the arithmetic the grid functions use."""

    is_constant = True

    def __init__(self, value):
        self.value = value

    def constant_value(self):
        return self.value

    def _op(self, other, fn):
        return Dim(fn(self.value, other.value if isinstance(other, Dim) else other))

    def __add__(self, o):
        return self._op(o, lambda a, b: a + b)

    def __sub__(self, o):
        return self._op(o, lambda a, b: a - b)

    def __mul__(self, o):
        return self._op(o, lambda a, b: a * b)

    def __floordiv__(self, o):
        return self._op(o, lambda a, b: a // b)

    __radd__, __rmul__ = __add__, __mul__


class Desc:
    def __init__(self, shape, dtype):
        self.shape_expr = [Dim(d) for d in shape]
        self.dtype = dtype
        self.aliased_to = None

    def like(self):
        return Desc([d.value for d in self.shape_expr], self.dtype)

    def aliased(self):
        out = self.like()
        out.aliased_to = self
        return out


@pytest.fixture
def fake_trt(monkeypatch):
    registry = {}
    trt = types.ModuleType("tensorrt")
    for name in ("float16", "bfloat16", "float32", "int32", "int64", "bool"):
        setattr(trt, name, f"trt.{name}")
    trtp = types.ModuleType("tensorrt.plugin")

    def recorder(kind):
        def decorator_for(plugin_id, **_):
            def decorate(fn):
                registry.setdefault(plugin_id, {})[kind] = fn
                return fn
            return decorate
        return decorator_for

    for kind in ("register", "impl", "aot_impl", "autotune"):
        setattr(trtp, kind, recorder(kind))
    trtp.TensorDesc, trtp.Tensor = Desc, object
    trtp.KernelLaunchParams = types.SimpleNamespace
    trtp.AutoTuneCombination = lambda types_, layout, tactics: (types_, layout, tactics)
    trtp.SymInt32 = lambda v: v
    trtp.SymIntExprs = types.SimpleNamespace(from_tuple=list)
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.delitem(sys.modules, "onnx_fuse.trt_plugins.defs", raising=False)
    import onnx_fuse.trt_plugins as plugins

    ids = plugins.register_all()
    defs = sys.modules["onnx_fuse.trt_plugins.defs"]
    monkeypatch.setattr(defs, "_arch", lambda: 90)
    return registry, ids


def test_registrations_match_the_op_contract(fake_trt):
    registry, ids = fake_trt
    assert set(ids) == set(registry) == {f"onnx_fuse::{n}" for n in plugin_ops.OPS}
    for plugin_id, fns in registry.items():
        spec = plugin_ops.OPS[plugin_id.split("::")[1]]
        assert set(fns) == {"register", "impl", "aot_impl", "autotune"}
        params = inspect.signature(fns["register"]).parameters
        assert list(params) == [n.lower() for n in spec.inputs] + [a.name for a in spec.attrs]
        for a in spec.attrs:
            assert params[a.name].annotation is a.kind
        aot_params = list(inspect.signature(fns["aot_impl"]).parameters)
        assert aot_params == list(params) + ["outputs", "tactic"]


def test_descriptors(fake_trt):
    registry, _ = fake_trt
    q, k, v = Desc([2, 32, 7, 192], "trt.float16"), Desc([2, 8, 9, 192], "trt.float16"), \
        Desc([2, 8, 9, 128], "trt.float16")
    y = registry["onnx_fuse::FusedAttention"]["register"](q, k, v, None, None, None, **ATTRS)
    assert [d.value for d in y.shape_expr] == [2, 32, 7, 128]
    cache = Desc([2, 8, 64, 128], "trt.float16")
    present = registry["onnx_fuse::FusedKVWrite"]["register"](cache, Desc([2, 8, 3, 128], ""),
                                                             Desc([2], "trt.int64"))
    assert present.aliased_to is cache


def test_autotune_combinations_cover_every_position(fake_trt):
    registry, _ = fake_trt
    for plugin_id, fns in registry.items():
        n_io = len(plugin_ops.OPS[plugin_id.split("::")[1]].inputs) + 1
        combos = fns["autotune"](*[None] * n_io)
        assert combos and all(len(c[0].split(",")) == n_io for c in combos)
        assert all("|" not in c[0] for c in combos)


def test_aot_implementations_through_symbolic_shapes(fake_trt):
    registry, _ = fake_trt
    f16, i32, i64, f32, b = "trt.float16", "trt.int32", "trt.int64", "trt.float32", "trt.bool"
    q, k = Desc([2, 32, 300, 128], f16), Desc([2, 8, 1000, 128], f16)
    name, ptx, params, extra = registry["onnx_fuse::FusedAttention"]["aot_impl"](
        q, k, Desc([2, 8, 1000, 128], f16), Desc([2, 1000], b), Desc([32], f32), Desc([2], i32),
        **ATTRS, outputs=(q.like(),), tactic=1)
    tile = aot.attention_tactics(128, 128)[1]
    assert f".entry {name}(" in ptx
    assert (params.grid_x.value, params.grid_y.value, params.grid_z) == (
        -(-300 // tile.block_m), 64, 1)
    assert params.block_x == tile.num_warps * 32 and params.shared_mem > 0
    assert [e.value for e in extra] == [32, 8, 300, 1000]
    cache = Desc([2, 8, 64, 128], f16)
    name, ptx, params, extra = registry["onnx_fuse::FusedKVWrite"]["aot_impl"](
        cache, Desc([2, 8, 3, 128], f16), Desc([2], i64), outputs=(cache.aliased(),), tactic=1)
    assert f".entry {name}(" in ptx and [e.value for e in extra] == [48, 8, 3, 64]
    rows = params.grid_x.value * launch.rows_per_program(128, launch.KV_WRITE_TILE)
    assert rows >= 48


def test_import_needs_no_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None\n"
            "import onnx_fuse, onnx_fuse.trt_plugins as p, onnx_fuse.plugin_ops\n"
            "try:\n    p.register_all()\nexcept ImportError:\n    print('lazy')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lazy"
