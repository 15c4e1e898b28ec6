#!/usr/bin/env python
"""Time of the checker's input planning (dim_relations.find_relations + input_plan.plan_sizes)
against graph size: is it linear?

The graphs are k side-by-side copies of a committed decode model (its nodes and initializers
renamed per copy, the graph inputs shared, every copy's outputs kept): k times the nodes, the
same inputs, the same relations to find. Prints a table: nodes, milliseconds (best of --repeat),
microseconds per node.

    python benchmarks/bench_input_plan.py [--model models/X.onnx] [--copies 1 4 16 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, os.pardir, "models", "llama-gqa_decode_eager_torchscript.onnx")


def side_by_side(model: onnx.ModelProto, copies: int) -> onnx.ModelProto:
    """`copies` renamed copies of the model's computation reading the same graph inputs."""
    inputs = {v.name for v in model.graph.input}
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    graph = wide.graph
    for field in ("node", "initializer", "output", "value_info"):
        graph.ClearField(field)
    for k in range(copies):
        rename = lambda name: name if not name or name in inputs else f"c{k}/{name}"
        for node in model.graph.node:
            copy = graph.node.add()
            copy.CopyFrom(node)
            copy.name = rename(node.name)
            copy.input[:] = [rename(n) for n in node.input]
            copy.output[:] = [rename(n) for n in node.output]
        for tensor in model.graph.initializer:
            graph.initializer.add().CopyFrom(tensor)
            graph.initializer[-1].name = rename(tensor.name)
        for value in model.graph.output:
            graph.output.add().CopyFrom(value)
            graph.output[-1].name = rename(value.name)
    return wide


def plan_time(model: onnx.ModelProto, repeat: int) -> float:
    from onnx_fuse.check import input_specs
    from onnx_fuse.dim_relations import find_relations
    from onnx_fuse.input_plan import plan_sizes

    best = float("inf")
    gc.disable()  # as during a fuse (api.fuse pauses the cyclic collector)
    try:
        for _ in range(repeat):
            started = time.perf_counter()
            plan_sizes(input_specs(model), find_relations(model), 2)
            best = min(best, time.perf_counter() - started)
    finally:
        gc.enable()
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT)
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    model = onnx.load(args.model)
    print("| copies | nodes | ms | µs per node |")
    print("|---:|---:|---:|---:|")
    for copies in args.copies:
        wide = side_by_side(model, copies)
        seconds = plan_time(wide, args.repeat)
        nodes = len(wide.graph.node)
        print(f"| {copies} | {nodes} | {seconds * 1e3:.1f} | {seconds * 1e6 / nodes:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
