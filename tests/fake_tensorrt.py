"""A fake `tensorrt` / `tensorrt.plugin` in sys.modules, recording what onnx_fuse.trt_plugins
registers (tensorrt cannot be installed here): `fake_trt` gives the registry {plugin id: {kind:
function}} and register_all()'s ids; `Desc` and `Dim` stand in for TensorDesc and ShapeExpr.
Needs no triton: registering imports none."""

import sys
import types

import pytest


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
