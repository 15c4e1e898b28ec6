"""How `onnx-fuse lint` scales with the graph: the TensorRT contract verdicts (trt_contract.verdicts)
of synthetic models with N attention layers, primitive (MatMul, scale, Where(Range mask, s, -inf),
Softmax, MatMul) or fused (Mul, TRT_Attention, with RotaryEmbedding and TRT_KVCacheUpdate per
layer). Prints a table: layers, nodes, seconds (best of 3), microseconds per node.

    python benchmarks/bench_lint.py [--layers 100 400 1600]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_fuse.trt_contract import verdicts

F16 = TensorProto.FLOAT16


class _Chain:
    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def op(self, op_type, *inputs, domain="", **attrs):
        self.count += 1
        name = f"t{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=f"n{self.count}",
                                           domain=domain, **attrs))
        return name

    def const(self, value, dtype):
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name


def primitive_model(layers: int) -> onnx.ModelProto:
    g = _Chain()
    one, zero = g.const(1, np.int64), g.const(0, np.int64)
    length = g.op("Squeeze", g.op("Shape", "k", start=2, end=3))
    positions = g.op("Range", zero, length, one)
    keep = g.op("GreaterOrEqual", g.op("Unsqueeze", positions, g.const([1], np.int64)),
                g.op("Unsqueeze", positions, g.const([0], np.int64)))
    kt = g.op("Transpose", "k", perm=[0, 1, 3, 2])
    x = "q"
    for _ in range(layers):
        scores = g.op("MatMul", g.op("Mul", x, g.const(0.35, np.float16)), kt)
        masked = g.op("Where", keep, scores, g.const(-np.inf, np.float16))
        x = g.op("MatMul", g.op("Softmax", masked, axis=-1), "v")
    return _model(g, x, [])


def fused_model(layers: int) -> onnx.ModelProto:
    g = _Chain()
    cos, sin = g.const(np.zeros((64, 4)), np.float16), g.const(np.zeros((64, 4)), np.float16)
    indices = g.op("Cast", "write", to=TensorProto.INT32)
    x, outputs = "q", []
    for layer in range(layers):
        k = g.op("RotaryEmbedding", "k", cos, sin, "positions")
        cache = g.op("TRT_KVCacheUpdate", f"cache{layer}", k, indices, domain="trt", mode="linear", axis=-2)
        outputs.append(cache)
        x = g.op("TRT_Attention", g.op("Mul", x, g.const(0.35, np.float16)), "k", "v", domain="trt",
                 causal_kind="upper_left")
    caches = [helper.make_tensor_value_info(f"cache{i}", F16, [1, 2, 64, 8]) for i in range(layers)]
    extra = [helper.make_tensor_value_info("positions", TensorProto.INT64, [1, 16]),
             helper.make_tensor_value_info("write", TensorProto.INT64, [1])] + caches
    return _model(g, x, outputs, extra)


def _model(g: _Chain, output: str, more_outputs: list[str], extra_inputs=()) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("q", F16, [1, 2, 16, 8]),
              helper.make_tensor_value_info("k", F16, [1, 2, 16, 8]),
              helper.make_tensor_value_info("v", F16, [1, 2, 16, 8]), *extra_inputs]
    outputs = [helper.make_tensor_value_info(o, F16, None) for o in [output, *more_outputs]]
    graph = helper.make_graph(g.nodes, "chain", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", 24), helper.make_opsetid("trt", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def best_of(runs: int, model: onnx.ModelProto) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        verdicts(model, "11")
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[100, 400, 1600])
    args = parser.parse_args()
    print("| model | layers | nodes | seconds | µs per node |")
    print("|---|---:|---:|---:|---:|")
    for kind, build in (("primitive", primitive_model), ("fused (trt11)", fused_model)):
        for layers in args.layers:
            model = build(layers)
            seconds = best_of(3, model)
            nodes = len(model.graph.node)
            print(f"| {kind} | {layers} | {nodes} | {seconds:.3f} | {1e6 * seconds / nodes:.1f} |")


if __name__ == "__main__":
    main()
