"""TensorRT plugins for onnx_fuse.plugin_ops' ops: Triton kernels compiled ahead of time.

Load them before building an engine from a model made with `--target trt-plugin`, then
parse and build as usual (trt.OnnxParser, builder.build_serialized_network):

    import tensorrt as trt, onnx_fuse.trt_plugins
    onnx_fuse.trt_plugins.register_all()
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS))

Each op gets an AOT implementation (PTX from Triton, launched by TensorRT without Python: the
engine then runs with TensorRT's runtime alone) and a JIT fallback (torch + Triton at run
time). With both defined TensorRT needs one of the flags PREFER_AOT_PYTHON_PLUGINS /
PREFER_JIT_PYTHON_PLUGINS, or the node attribute `aot` (INT, 1 = AOT). Needs tensorrt >= 10.9
and triton (the `trt` extra), and torch for the JIT fallback (the `kernels` extra).

Importing this package does not import tensorrt; register_all() does. Everything below
tensorrt (AOT compilation, launch parameters) is in aot.py and runs without a GPU.
"""
import importlib
import sys

PLUGIN_IDS = ("onnx_fuse::FusedAttention", "onnx_fuse::FusedRotary", "onnx_fuse::FusedKVWrite")


def register_all():
    """Registers the three plugins with TensorRT (once per process); returns their ids."""
    if "onnx_fuse.trt_plugins.defs" not in sys.modules:
        importlib.import_module(".defs", __name__)
    return PLUGIN_IDS
