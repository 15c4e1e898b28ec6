"""Mutation fuzzing: the committed exports with one seeded change inside an attention subgraph
(a node dropped, an input rewired, the scale or a mask constant changed, the operands of a
non-commutative op swapped, the softmax axis or the key transpose changed) or inside a RoPE
application (a Neg dropped, halves swapped, cos and sin exchanged, a slice bound moved).

For every mutant that still runs, `fuse` must either fuse it correctly or leave the core unfused
with a reason: the model it returns is checked again here on other inputs. Raising CheckFailed
is the safety net, not the goal: how often the net was needed is counted and printed (run with
-s to see the tally). Mutants that no longer run in onnxruntime are skipped.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

import onnx_fuse
from onnx_fuse import BadInput, CheckFailed
from onnx_fuse.check import CheckError, ModelRef, check_equivalent, run_model, synthesize_inputs

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
SOURCES = ["llama-gqa_prefill_eager_torchscript.onnx", "llama-gqa_decode_sdpa_dynamo.onnx",
           "gpt2_decode_eager_torchscript.onnx", "bert_encoder_sdpa_torchscript.onnx",
           "qwen2-gqa_prefill_sdpa_dynamo.onnx", "gpt2_prefill_eager_dynamo.onnx"]
ROPE_SOURCES = ["llama-gqa_decode_eager_torchscript.onnx", "qwen2-gqa_prefill_sdpa_dynamo.onnx",
                "gptj_prefill_eager_torchscript.onnx", "phi3-partial_decode_eager_dynamo.onnx"]
SEED = 20240611
MUTANTS = 30  # mutants that still run (the CI budget: well under a minute on 2 cores)
ROPE_MUTANTS = 20
MAX_TRIES = 80
TIME_BUDGET_S = 40.0

KINDS = ["scale", "drop", "swap", "rewire", "mask_constant", "axis", "perm"]


class Mutant(Exception):
    """This mutation does not apply to the chosen core."""


class Editor:
    """Index of one model copy: producers, consumers and constant values by tensor name."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = model.graph.node
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.fresh = 0

    def value(self, name):
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def set_input_constant(self, node, index, array):
        name = f"fuzz_const_{self.fresh}"
        self.fresh += 1
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        node.input[index] = name

    def core(self, softmax):
        """The nodes around one Softmax: up to four producers back, three consumers forward."""
        chain, frontier = [softmax], [softmax]
        for _ in range(4):
            frontier = [self.producer[i] for n in frontier for i in n.input if i in self.producer
                        and self.producer[i].op_type not in ("Constant",)]
            chain += [n for n in frontier if n not in chain]
        frontier = [softmax]
        for _ in range(3):
            frontier = [c for n in frontier for o in n.output for c in self.consumers[o]]
            chain += [n for n in frontier if n not in chain]
        return chain

    def bypass(self, node, keep):
        """Remove `node`, its consumers reading `keep` instead."""
        out = node.output[0]
        for consumer in self.consumers[out]:
            for i, name in enumerate(consumer.input):
                if name == out:
                    consumer.input[i] = keep
        for graph_output in self.model.graph.output:
            if graph_output.name == out:
                raise Mutant("the node feeds a graph output")
        self.nodes.remove(node)


def mutate(model: onnx.ModelProto, rng: random.Random, kind: str, anchor: str = "Softmax") -> str:
    """Apply one mutation of `kind` in place, near a node of op type `anchor`; a description."""
    ed = Editor(model)
    softmaxes = [n for n in ed.nodes if n.op_type == anchor]
    if not softmaxes:
        raise Mutant(f"no {anchor}")
    softmax = rng.choice(softmaxes)
    chain = ed.core(softmax)
    where = f"near {softmax.name or softmax.output[0]}"
    if kind == "scale":
        options = [(n, i) for n in chain if n.op_type in ("Mul", "Div") for i in range(2)
                   if (v := ed.value(n.input[i])) is not None and v.size <= 16 and v.dtype.kind == "f"]
        if not options:
            raise Mutant("no constant scale")
        node, i = rng.choice(options)
        factor = rng.choice([0.5, 2.0, -1.0, 1.25])
        ed.set_input_constant(node, i, ed.value(node.input[i]) * np.asarray(factor, ed.value(node.input[i]).dtype))
        return f"scale x{factor} on {node.op_type} {where}"
    if kind == "drop":
        options = [n for n in chain if n.op_type in ("Mul", "Div", "Add", "Cast", "Where", "Transpose")]
        if not options:
            raise Mutant("nothing to drop")
        node = rng.choice(options)
        data = [i for i in node.input if i and ed.value(i) is None] or [node.input[0]]
        if node.op_type == "Where":
            data = [node.input[rng.choice([1, 2])]]
        ed.bypass(node, rng.choice(data))
        return f"drop {node.op_type} {where}"
    if kind == "swap":
        options = [n for n in chain if n.op_type in ("Div", "Sub", "MatMul", "Where")]
        if not options:
            raise Mutant("nothing to swap")
        node = rng.choice(options)
        a, b = (1, 2) if node.op_type == "Where" else (0, 1)
        node.input[a], node.input[b] = node.input[b], node.input[a]
        return f"swap operands of {node.op_type} {where}"
    if kind == "rewire":
        targets = [n for n in chain if n.op_type in ("MatMul", "Softmax", "Add", "Mul")]
        tensors = sorted({o for n in chain for o in n.output} | {i for n in chain for i in n.input if i})
        node = rng.choice(targets)
        i = rng.randrange(len(node.input))
        choices = [t for t in tensors if t != node.input[i] and t not in node.output
                   and ed.producer.get(t) is not node and not _downstream(ed, node, t)]
        if not choices:
            raise Mutant("nothing to rewire to")
        node.input[i] = rng.choice(choices)
        return f"rewire input {i} of {node.op_type} {where}"
    if kind == "mask_constant":
        options = []
        for n in ed.nodes:
            for i, name in enumerate(n.input):
                v = ed.value(name)
                if v is not None and v.dtype.kind == "f" and 0 < v.size <= 64 and np.any(v <= -1e4):
                    options.append((n, i))
        if not options:
            raise Mutant("no mask constant")
        node, i = rng.choice(options)
        v = ed.value(node.input[i]).copy()
        v[v <= -1e4] = rng.choice([-1.0, 0.0, -30.0])
        ed.set_input_constant(node, i, v)
        return f"mask constant of {node.op_type} {node.name or node.output[0]} -> {v.reshape(-1)[0]}"
    if kind == "axis":
        axis = rng.choice([0, 1, 2, -2])
        for attr in softmax.attribute:
            if attr.name == "axis":
                attr.i = axis
                break
        else:
            softmax.attribute.append(onnx.helper.make_attribute("axis", axis))
        return f"softmax axis {axis} {where}"
    if kind == "slice_bound":
        options = [(n, i) for n in chain if n.op_type == "Slice" for i in (1, 2)
                   if (v := ed.value(n.input[i])) is not None and v.size == 1
                   and abs(int(v.reshape(-1)[0])) < 1 << 20]
        if not options:
            raise Mutant("no constant slice bound")
        node, i = rng.choice(options)
        value = ed.value(node.input[i])
        ed.set_input_constant(node, i, value + rng.choice([-1, 1]))
        return f"slice {'start' if i == 1 else 'end'} {int(value.reshape(-1)[0])} moved by one {where}"
    if kind == "perm":
        options = [n for n in chain if n.op_type == "Transpose"
                   and any(a.name == "perm" and len(a.ints) == 4 for a in n.attribute)]
        if not options:
            raise Mutant("no 4-D transpose")
        node = rng.choice(options)
        attr = next(a for a in node.attribute if a.name == "perm")
        perm = list(attr.ints)
        while perm == list(attr.ints):
            rng.shuffle(perm)
        del attr.ints[:]
        attr.ints.extend(perm)
        return f"transpose perm {perm} {where}"
    raise AssertionError(kind)


def _downstream(ed: Editor, node, tensor: str) -> bool:
    """Whether `tensor` depends on `node` (rewiring to it would make a cycle)."""
    seen, stack = set(), [tensor]
    while stack:
        name = stack.pop()
        producer = ed.producer.get(name)
        if producer is None or id(producer) in seen:
            continue
        if producer is node:
            return True
        seen.add(id(producer))
        stack.extend(i for i in producer.input if i)
    return False


def fuzz(sources, kinds, anchor, mutants, fuse_options=None):
    """Mutate, fuse and re-check until `mutants` mutants ran (or the budget is spent); returns
    the tally. Fails on any returned model that disagrees with its mutant, and on any `anchor`
    left in a result without a reason."""
    rng = random.Random(SEED)
    originals = {name: onnx.load(os.path.join(MODELS, name)) for name in sources}
    tally, wrong, net, log = Counter(), [], [], []
    started = time.perf_counter()
    tries = 0
    while tally["ran"] < mutants and tries < MAX_TRIES and time.perf_counter() - started < TIME_BUDGET_S:
        tries += 1
        name = rng.choice(sources)
        kind = rng.choice(kinds)
        model = onnx.ModelProto()
        model.CopyFrom(originals[name])
        try:
            what = mutate(model, rng, kind, anchor)
        except Mutant:
            tally["not applicable"] += 1
            continue
        reference = ModelRef(model, MODELS)
        try:  # a mutant the runtime rejects was made invalid by the mutation: skipped
            onnx.checker.check_model(model)
            run_model(reference, synthesize_inputs(reference))
        except Exception:
            tally["invalid mutant"] += 1
            continue
        tally["ran"] += 1
        label = f"{name}: {what}"
        try:
            result = onnx_fuse.fuse(model, check=True, **(fuse_options or {}))
        except CheckFailed as exc:
            tally["check failed (net needed)"] += 1
            net.append(f"{label}: {exc}")
            continue
        except BadInput:
            tally["refused as bad input"] += 1
            continue
        if result.changed:
            tally["fused, check passed"] += 1
            # The returned model again, on other inputs (batch 3, another seed).
            try:
                inputs = synthesize_inputs(reference, batch=3, seed=7)
            except CheckError:
                inputs = None
            if inputs is not None:
                outcome = check_equivalent(reference, ModelRef(result.model, MODELS), inputs)
                if not outcome.passed:
                    wrong.append(f"{label}: {outcome.message}")
        else:
            tally["left unfused"] += 1
            assert result.model is model
        # Every candidate left in the result was reported with a reason.
        reported = {u["anchor"] for u in result.report["unfused"] if u["reason"]}
        for node in result.model.graph.node:
            if node.op_type == anchor:
                label_anchor = f"{anchor} '{node.name or node.output[0]}'"
                assert label_anchor in reported, f"{label}: {label_anchor} neither fused nor reported"
                tally["candidates left unfused, with a reason"] += 1
        log.append(f"{label}: counts {result.report['counts']}")
    print(f"\nmutation fuzz near {anchor}: {tries} tries in {time.perf_counter() - started:.1f}s: "
          f"{dict(tally)}")
    for line in log:
        print(f"  {line}")
    for line in net:
        print(f"  safety net: {line}")
    assert not wrong, "fuse returned wrong models:\n" + "\n".join(wrong)
    return tally


def test_attention_mutants_are_fused_correctly_or_left_alone():
    tally = fuzz(SOURCES, KINDS, "Softmax", MUTANTS)
    assert tally["ran"] >= 10, tally


def test_rope_mutants_are_fused_correctly_or_left_alone():
    # Dropped Negs, swapped halves, cos and sin exchanged, slice bounds off by one, scaled tables.
    tally = fuzz(ROPE_SOURCES, ["drop", "swap", "rewire", "scale", "slice_bound"], "Neg",
                 ROPE_MUTANTS, {"max_positions": 64})
    assert tally["ran"] >= 8, tally

