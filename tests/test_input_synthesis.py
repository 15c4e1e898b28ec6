"""The checker's inputs for every exporter: dims the graph relates (dim_relations.py) sized from
the graph itself (input_plan.py), not from the names the export gave them; one input set per
branch of an If on an input (optimum's merged decoder); and, over every committed model, inputs
that run: batch 2, a padded row, a non-empty past for decode models."""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_fuse.check import CheckError, ModelRef, check_equivalent, synthesize_cases, synthesize_inputs
from onnx_fuse.dim_relations import DimFacts, Lin, find_relations
from onnx_fuse.model_io import load_model
from onnx_fuse.proof import Prover
from onnx_fuse.repair import repair_model
from onnx_fuse.model_io import SourceModel
from graphs import GraphBuilder

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
VOCAB, HEADS, HEAD = 11, 2, 4
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def decoder(ids_dims, mask_dims, cache_dims, mask_use="broadcast") -> onnx.ModelProto:
    """present = Concat(past, heads(embed(ids))) along 2; scores [B, 1, S, past + S] from it;
    out = scores + mask. mask_use "broadcast": the mask added to the scores (ties its length to
    past + S by shape); "gather": read at arange(past + S) by Gather (the length is only needed,
    never broadcast: HF's index-based padding masks)."""
    g = GraphBuilder()
    ids = g.input("input_ids", INT64, ids_dims)
    mask = g.input("attention_mask", INT64, mask_dims)
    past = g.input("past_key", FLOAT, cache_dims)
    tokens = g.op("Gather", g.const(np.random.default_rng(0).standard_normal((VOCAB, HEADS * HEAD))), ids)
    new = g.op("Transpose", g.op("Reshape", tokens, g.const([0, 0, HEADS, HEAD], np.int64)), perm=[0, 2, 1, 3])
    present = g.op("Concat", past, new, axis=2)
    g.nodes[-1].output[0] = "present"
    scores = g.op("ReduceSum", g.op("MatMul", new, g.op("Transpose", "present", perm=[0, 1, 3, 2])),
                  g.const([1], np.int64))  # [B, 1, S, past + S]
    mask = g.op("Cast", mask, to=FLOAT)
    if mask_use == "gather":
        length = g.op("Squeeze", g.op("Shape", "present", start=2, end=3), g.const([0], np.int64))
        mask = g.op("Gather", mask, g.op("Range", g.const(0, np.int64), length, g.const(1, np.int64)), axis=1)
    out = g.op("Add", scores, g.op("Unsqueeze", mask, g.const([1, 2], np.int64)))
    model = g.model(out, opset=20)
    model.graph.output.append(helper.make_tensor_value_info("present", FLOAT, None))
    return model


def test_a_mask_tied_by_a_broadcast_gets_its_length_from_the_graph():
    # Every dim named apart, as transformers' exporter does ([s43, s53] for the mask).
    model = decoder(["s10", "s70"], ["s43", "s53"], ["s10", "s2", "s54", "s8"])
    facts = find_relations(model)
    assert ("past_key", 2) in facts.growing
    solved = facts.solve({("input_ids", 0): 2, ("input_ids", 1): 5, ("past_key", 2): 3})
    assert solved[("attention_mask", 1)] == 8 and solved[("attention_mask", 0)] == 2
    # The cache's heads and head size: Concat's other axes equal the Reshape's constants.
    assert solved[("past_key", 1)] == HEADS and solved[("past_key", 3)] == HEAD
    inputs = synthesize_inputs(ModelRef(model))
    assert inputs["past_key"].shape == (2, HEADS, 3, HEAD)
    assert inputs["attention_mask"].shape == (2, 3 + inputs["input_ids"].shape[1])


def test_sizes_written_as_strings_are_sizes():
    model = decoder(["s10", "s70"], ["s43", "s53"], ["s10", str(HEADS), "s54", str(HEAD)], "gather")
    inputs = synthesize_inputs(ModelRef(model))
    assert inputs["past_key"].shape == (2, HEADS, 3, HEAD)
    assert inputs["attention_mask"].shape == (2, 8)  # past + new: what generate() feeds


def test_a_past_of_fixed_length_is_the_past():
    # HF's sliding-window cache: the past is W - 1 = 3 slots, declared static; the mask is past + S.
    model = decoder(["batch", "seq"], ["batch", "total"], ["batch", HEADS, 3, HEAD], "gather")
    inputs = synthesize_inputs(ModelRef(model))
    assert inputs["attention_mask"].shape == (2, 3 + inputs["input_ids"].shape[1])
    assert inputs["attention_mask"][1, 0] == 0  # the padded row pads inside the past


def test_equations_that_contradict_what_is_known_are_ignored():
    a, b = Lin.of(("a", 0)), Lin.of(("b", 0))
    facts = DimFacts(equations=[a - b, a - b.scaled(2) - Lin(const=1), a.scaled(2) - Lin(const=5)])
    assert facts.solve({("a", 0): 4}) == {("b", 0): 4}  # 4 = 2·b + 1 has no integer b
    assert facts.solve({}) == {}  # 2a = 5: no positive integer


def test_sizes_without_the_equations_are_tried_when_one_assumed_too_much():
    # y = x[:, :L + 1] is x itself (a Slice end is clamped to the dim); the walk takes it as
    # L + 1 long, so y + c asks c for L + 1. The declared names (c as long as x) are right.
    g = GraphBuilder()
    x, c = g.input("x", FLOAT, ["batch", "L"]), g.input("c", FLOAT, ["batch", "L"])
    end = g.op("Add", g.op("Shape", x, start=1, end=2), g.const([1], np.int64))
    y = g.op("Slice", x, g.const([0], np.int64), end, g.const([1], np.int64))
    model = g.model(g.op("Add", y, c))
    assert find_relations(model).solve({("x", 1): 5}).get(("c", 1)) == 6  # the wrong guess
    inputs = synthesize_inputs(ModelRef(model))
    assert inputs["c"].shape == inputs["x"].shape


def merged_decoder(declared_mask=("batch", "seq")) -> onnx.ModelProto:
    """optimum's merged decoder: one If on use_cache_branch; the cached branch needs the mask as
    long as past + new, the first step as long as the new tokens; the mask is declared like the
    ids (as optimum declares it), which fits the first step only."""
    cached, first = decoder(["batch", "seq"], list(declared_mask), ["batch", HEADS, "past", HEAD]), \
        decoder(["batch", "seq"], list(declared_mask), ["batch", HEADS, "past", HEAD])
    first = _without_past(first)
    branches = []
    for body, name in ((cached, "with_past"), (first, "first_step")):
        outputs = [helper.make_tensor_value_info(o.name, FLOAT, None) for o in body.graph.output]
        graph = helper.make_graph(list(body.graph.node), name, [], outputs, list(body.graph.initializer))
        branches.append(graph)
    _rename(branches[1], "f_")
    outs = [o.name for o in cached.graph.output]
    node = helper.make_node("If", ["use_cache_branch"], outs, then_branch=branches[0], else_branch=branches[1])
    inputs = list(cached.graph.input) + [helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])]
    graph = helper.make_graph([node], "merged", inputs, [helper.make_tensor_value_info(n, FLOAT, None) for n in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


def _without_past(model: onnx.ModelProto) -> onnx.ModelProto:
    """The first step: the present is the new keys alone (the past input is not read)."""
    for node in model.graph.node:
        if node.op_type == "Concat" and "past_key" in node.input:
            node.op_type, node.input[:] = "Identity", [node.input[1]]
            del node.attribute[:]
    return model


def _rename(graph: onnx.GraphProto, prefix: str) -> None:
    """Inner names unique across the two branches (ONNX wants them so); outputs kept."""
    keep = {o.name for o in graph.output} | {"input_ids", "attention_mask", "past_key"}
    rename = lambda n: n if not n or n in keep else prefix + n
    for node in graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)


def test_each_branch_of_a_merged_decoder_gets_inputs_sized_for_it():
    model = ModelRef(merged_decoder())
    cached, first = synthesize_cases(model)
    assert cached.label == "use_cache_branch=True" and first.label == "use_cache_branch=False"
    seq, past = cached.inputs["input_ids"].shape[1], cached.inputs["past_key"].shape[2]
    assert past > 0 and cached.inputs["attention_mask"].shape == (2, past + seq)
    assert first.inputs["attention_mask"].shape == (2, seq)
    assert cached.inputs["use_cache_branch"].tolist() == [True]
    outcome = check_equivalent(model, model)
    assert outcome.passed and "each input set" in outcome.message


def test_a_difference_in_the_other_branch_fails_the_check():
    reference = merged_decoder()
    candidate = merged_decoder()
    (node,) = candidate.graph.node
    first_step = next(a.g for a in node.attribute if a.name == "else_branch")
    add = next(n for n in reversed(first_step.node) if n.op_type == "Add")
    add.op_type = "Sub"  # only the first step computes something else
    outcome = check_equivalent(ModelRef(reference), ModelRef(candidate))
    assert not outcome.passed and "use_cache_branch=False" in outcome.message


def runnable_prover(name: str) -> Prover:
    """The prover fuse() uses, on the model as the pass reads it (exporter-broken ops repaired;
    bfloat16 checked as float32)."""
    source = load_model(os.path.join(MODELS, name))
    model, _ = repair_model(source.model)
    return Prover(SourceModel(model, source.base_dir, source.path), None)


RUNS_NOWHERE = sorted(n for n in MANIFEST if MANIFEST[n].get("ort_cpu_runs") is False
                      and MANIFEST[n].get("dtype") != "bfloat16")


@pytest.mark.parametrize("name", sorted(n for n in MANIFEST if n not in RUNS_NOWHERE))
def test_the_checker_synthesizes_inputs_that_run(name):
    truth = MANIFEST[name]
    cases = runnable_prover(name).input_cases()  # runs the model on each: raises if it cannot
    assert all(c.outputs is not None for c in cases)
    inputs = cases[0].inputs
    assert set(inputs) == set(truth["inputs"])
    masks = [v for k, v in inputs.items() if "mask" in k and v.ndim == 2]
    if masks:
        assert masks[0].shape[0] == 2 and masks[0][0].all() and not masks[0][1].all()
    if truth["kind"] in ("decode", "decode_cross", "decode_merged"):
        caches = [v for k, v in inputs.items() if v.ndim == 4 and "encoder" not in k]
        assert caches and all(c.shape[0] == 2 and c.shape[2] > 0 for c in caches)


@pytest.mark.parametrize("name", RUNS_NOWHERE)
def test_a_model_onnxruntime_cannot_run_is_named_as_such(name):
    with pytest.raises(CheckError, match="did not run|failed to run"):
        runnable_prover(name).input_cases()
