"""Target "ort": onnxruntime's contrib ops. Every committed model fuses and checks; the facts about
onnxruntime's kernels the emitters rely on are run here; seqlens_k is exact for left- and
right-padded batches (and a seqlens_k taken from the valid-token count, as position ids or the
attention mask's sum give it, fails); learned sinks; ops the CPU cannot run need --no-check."""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_fuse
from onnx_fuse.check import ModelRef, check_equivalent
from onnx_fuse.graph import Graph
from onnx_fuse.specs import AttentionSpec, MaskClass, MaskSpec
from onnx_fuse.targets import TARGETS
from onnx_fuse.verify import emitted, session
from graphs import GraphBuilder
from test_models import runnable

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
CONTRIB = "com.microsoft"


def expected_ops(truth, fused: dict) -> set[str]:
    """What an attention may become, from its model's ground truth and its proven mask class:
    causal self-attention whose cache grows by Concat (or none) → GQA; decoders with a mask
    class GQA cannot take (StaticCache masks read cache_position, transformers' exporter and
    HF's sliding cache give "arbitrary") or MLA (V's head size differs) → ONNX Attention;
    cross-attention, encoders and T5 → MHA."""
    if truth.get("v_head_size") not in (None, truth["head_size"]):
        return {"Attention"}
    if fused["mask_class"] == "arbitrary" and truth["kv_heads"] != truth["q_heads"]:
        return {"Attention"}
    if truth.get("causal") and truth["kind"] != "seq2seq":
        return {"GroupQueryAttention", "MultiHeadAttention"} if "cross" in truth["kind"] else {"GroupQueryAttention"}
    return {"MultiHeadAttention"}


@pytest.mark.parametrize("name", [n for n in sorted(MANIFEST) if runnable(MANIFEST[n])])
def test_every_attention_core_fuses_and_checks(name):
    truth = MANIFEST[name]
    if truth.get("dtype") == "bfloat16":  # GQA/MHA have no CPU kernel for it: --no-check
        report = onnx_fuse.fuse(os.path.join(MODELS, name), target="ort", max_positions=64).report
        assert all("no CPU kernel for bfloat16" in u["reason"] for u in report["unfused"] if u["pattern"] == "attention")
        return
    result = onnx_fuse.fuse(os.path.join(MODELS, name), target="ort", max_positions=64)
    report = result.report
    # the exporter's own ONNX Attention becomes GroupQueryAttention or MultiHeadAttention too
    assert report["counts"].get("attention", 0) == truth["attention_cores"], report["unfused"]
    assert report["check"]["passed"], report["check"]["message"]
    attention = [f for f in report["fused"] if f["rule"] == "attention"]
    if truth.get("subgraph"):  # fused inside If bodies: finish sees the top level only (a gap)
        return
    assert all(f["op"] in expected_ops(truth, f) for f in attention), [(f["op"], f.get("why")) for f in attention]
    assert all("why" in f for f in attention if f["op"] != "GroupQueryAttention")
    ropes = [f for f in report["fused"] if f["rule"] == "rope"]
    foldable = truth["head_size"] % 16 == 0 and all(f["rotary_dim"] % 16 == 0 for f in ropes)
    if ropes and {f["op"] for f in attention} == {"GroupQueryAttention"} and truth["kind"] in ("decode", "prefill"):
        folded = [f for f in ropes if "folded_into" in f]
        assert len(folded) == (len(ropes) if foldable else 0)
    onnx.checker.check_model(result.model)


def test_the_report_lists_each_node_with_its_providers():
    result = onnx_fuse.fuse(os.path.join(MODELS, "mistral-swa_decode_sdpa_dynamo.onnx"), target="ort",
                            max_positions=64)
    nodes = {e["op"]: e for e in result.report["onnxruntime"]}
    gqa = nodes["GroupQueryAttention"]
    assert gqa["num_heads"] == 4 and gqa["kv_num_heads"] == 2 and gqa["local_window_size"] == 4
    assert "float" in gqa["providers"]["CPU"] and gqa["problems"] == []
    # query_seqlens is honoured by CPU and CUDA only; the others reject such a node
    assert set(gqa["providers"]) == {"CPU", "CUDA"}
    assert set(nodes["RotaryEmbedding"]["providers"]) >= {"CPU", "CUDA", "DirectML"}
    fused = [f for f in result.report["fused"] if f["rule"] == "attention"]
    assert all(f["op"] == "GroupQueryAttention" and f["window"] == 4 for f in fused)


# --- seqlens_k and padding ---------------------------------------------------------------------

DECODE = os.path.join(MODELS, "llama-gqa_decode_eager_torchscript.onnx")


def decode_inputs(mask: np.ndarray, seq: int, seed=0) -> dict:
    """Inputs of the Llama decode model: ids within its 256-token vocabulary, the given mask over
    past + seq keys, random caches of the past length."""
    rng = np.random.default_rng(seed)
    batch, total = mask.shape
    feeds = {"input_ids": rng.integers(0, 256, (batch, seq)), "attention_mask": mask.astype(np.int64)}
    for layer in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal(
                (batch, 2, total - seq, 16)).astype(np.float32)
    return feeds


def padded_masks(seq: int, past: int) -> dict[str, np.ndarray]:
    """Row 0 full; row 1 left-padded by 3, or right-padded (its past ends 2 slots early: a hole)."""
    left = np.ones((2, past + seq), np.int64)
    left[1, :3] = 0
    right = np.ones((2, past + seq), np.int64)
    right[1, past - 2:past] = 0
    return {"left": left, "right": right}


def with_seqlens_from_valid_tokens(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fused model with seqlens_k = (valid tokens per row) - 1, what position ids
    (cumsum(attention_mask) - 1 at the last token) or onnxruntime-genai's ReduceSum(mask) - 1 give."""
    mutant = onnx.ModelProto()
    mutant.CopyFrom(model)
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "mut_axis"], ["mut_sum"], keepdims=0),
        helper.make_node("Sub", ["mut_sum", "mut_one"], ["mut_last"]),
        helper.make_node("Cast", ["mut_last"], ["mut_seqlens"], to=TensorProto.INT32),
    ]
    mutant.graph.initializer.extend([onnx.numpy_helper.from_array(np.array([1], np.int64), "mut_axis"),
                                     onnx.numpy_helper.from_array(np.array(1, np.int64), "mut_one")])
    for node in mutant.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[5] = "mut_seqlens"
    rest = list(mutant.graph.node)
    del mutant.graph.node[:]
    mutant.graph.node.extend(nodes + rest)
    return mutant


@pytest.fixture(scope="module")
def fused_decode():
    return onnx_fuse.fuse(DECODE, target="ort", max_positions=64).model


@pytest.mark.parametrize("seq", [1, 3])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_seqlens_k_is_right_for_left_and_right_padded_batches(fused_decode, padding, seq):
    mask = padded_masks(seq, past=6)[padding]
    inputs = decode_inputs(mask, seq)
    original = ModelRef(onnx.load(DECODE), MODELS)
    outcome = check_equivalent(original, ModelRef(fused_decode, MODELS), inputs)
    assert outcome.passed, outcome.message
    # the first layer's present V (computed before any attention, not rotated) is the original's
    # Concat bit for bit in every slot: the new V went where the original's did, padded rows too
    outputs = outcome.to_json()["outputs"]
    assert outputs["present.0.value"]["max_abs"] == 0 and outputs["present.0.key"]["max_abs"] < 1e-6
    wrong = check_equivalent(original, ModelRef(with_seqlens_from_valid_tokens(fused_decode), MODELS), inputs)
    assert not wrong.passed


def test_without_the_padding_bias_the_check_fails(fused_decode):
    mutant = onnx.ModelProto()
    mutant.CopyFrom(fused_decode)
    for node in mutant.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[10] = ""
    inputs = decode_inputs(padded_masks(1, past=6)["left"], 1)
    outcome = check_equivalent(ModelRef(onnx.load(DECODE), MODELS), ModelRef(mutant, MODELS), inputs)
    assert not outcome.passed


# --- onnxruntime facts the emitters rely on ----------------------------------------------------

def run_nodes(nodes, feeds, outputs):
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), None)
              for k, v in feeds.items()]
    results = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    model = helper.make_model(helper.make_graph(nodes, "facts", inputs, results),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CONTRIB, 1)])
    model.ir_version = 10
    return session(model, None).run(None, feeds)


def gqa_node(inputs: dict, outputs, **attrs):
    names = [inputs.get(i, "") for i in range(max(inputs) + 1)]
    return helper.make_node("GroupQueryAttention", names, outputs, domain=CONTRIB, **attrs)


def test_gqa_rotates_by_position_ids_row_by_row_like_rotary_embedding():
    """What the fold relies on: with query_seqlens, do_rotary + position_ids equals
    RotaryEmbedding at those positions, also for rows whose positions differ (left padding)."""
    rng = np.random.default_rng(0)
    heads, kv_heads, head, seq, past = 4, 2, 32, 3, 4
    angles = np.arange(16)[:, None] * rng.random(head // 2)[None]
    feeds = {"q": rng.standard_normal((2, heads, seq, head)).astype(np.float32),
             "k": rng.standard_normal((2, kv_heads, seq, head)).astype(np.float32),
             "v": rng.standard_normal((2, seq, kv_heads * head)).astype(np.float32),
             "pk": rng.standard_normal((2, kv_heads, past, head)).astype(np.float32),
             "pv": rng.standard_normal((2, kv_heads, past, head)).astype(np.float32),
             "sl": np.full(2, past + seq - 1, np.int32), "tl": np.array(past + seq, np.int32),
             "qs": np.full(2, seq, np.int32), "cos": np.cos(angles).astype(np.float32),
             "sin": np.sin(angles).astype(np.float32), "merge": np.array([0, 0, -1], np.int64),
             "pos": np.array([[4, 5, 6], [1, 2, 3]], np.int64)}

    def bsd(x, name):
        return [helper.make_node("Transpose", [x], [name + "_t"], perm=[0, 2, 1, 3]),
                helper.make_node("Reshape", [name + "_t", "merge"], [name])]

    common = {2: "v", 3: "pk", 4: "pv", 5: "sl", 6: "tl", 16: "qs"}
    separate = [helper.make_node("RotaryEmbedding", [x, "pos", "cos", "sin"], [x + "_r"], domain=CONTRIB)
                for x in ("q", "k")] + bsd("q_r", "q3") + bsd("k_r", "k3") + [
        gqa_node({0: "q3", 1: "k3", **common}, ["o", "present", "present_v"], num_heads=heads, kv_num_heads=kv_heads)]
    folded = bsd("q", "q3") + bsd("k", "k3") + [
        gqa_node({0: "q3", 1: "k3", **common, 7: "cos", 8: "sin", 9: "pos"}, ["o", "present", "present_v"],
                 num_heads=heads, kv_num_heads=kv_heads, do_rotary=1)]
    a = run_nodes(separate, feeds, ["o", "present"])
    b = run_nodes(folded, feeds, ["o", "present"])
    assert all(np.allclose(x, y, atol=1e-6) for x, y in zip(a, b))
    feeds["pos"] = feeds["pos"][[0, 0]]  # the same fold with other positions is another result
    assert not np.allclose(run_nodes(folded, feeds, ["o"])[0], a[0], atol=1e-3)


def test_rotary_embedding_reads_the_head_count_of_4d_input_from_its_shape():
    """num_heads only has to be set with rotary_embedding_dim; its value does not matter for 4-D x."""
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 4, 3, 16)).astype(np.float32),
             "pos": np.array([[0, 1, 2], [5, 6, 7]], np.int64),
             "cos": rng.standard_normal((8, 4)).astype(np.float32),
             "sin": rng.standard_normal((8, 4)).astype(np.float32)}
    results = [run_nodes([helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain=CONTRIB,
                                           rotary_embedding_dim=8, num_heads=n)], feeds, ["y"])[0]
               for n in (1, 4, 7)]
    assert all(np.array_equal(results[0], r) for r in results[1:])
    assert not np.array_equal(results[0][..., :8], feeds["x"][..., :8])  # it did rotate
    assert np.array_equal(results[0][..., 8:], feeds["x"][..., 8:])  # the rest passes through


# --- sinks, and what only another provider runs --------------------------------------------------

def sink_spec(graph: Graph, window=None) -> AttentionSpec:
    tensors = graph.gs.tensors()
    klass = MaskClass("sliding_window" if window else "causal_upper_left", alignment="upper_left",
                      window=window, sizes=((2, 3, 3), (1, 5, 5)))
    return AttentionSpec(
        query=tensors["q"], key=tensors["k"], key_perm=None, value=tensors["v"], output=tensors["out"],
        scale=0.25, softcap=0.0, mask=MaskSpec("additive", tensors["q"], klass=klass), softmax_dtype=None,
        empty_row_output="mean", flat_output=False, output_dtype=TensorProto.FLOAT, dtype=TensorProto.FLOAT,
        q_heads=4, kv_heads=2, head_size=16, sinks=tensors["sinks"])


def sink_graph() -> Graph:
    shapes = {"q": ["B", 4, "S", 16], "k": ["B", 2, "S", 16], "v": ["B", 2, "S", 16], "sinks": [4]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 4, "S", 16])
    identity = helper.make_node("Identity", ["q"], ["out"])  # stands for the matched core
    return Graph(helper.make_model(helper.make_graph([identity], "g", inputs, [out]),
                                   opset_imports=[helper.make_opsetid("", 23)]))


def sink_reference(q, k, v, sinks, with_sinks=True):
    k, v = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) * 0.25
    seq = q.shape[2]
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    column = np.broadcast_to(sinks[None, :, None, None], scores.shape[:3] + (1,))
    full = np.concatenate([scores, column if with_sinks else np.full_like(column, -np.inf)], axis=-1)
    probs = np.exp(full - full.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs[..., :-1] @ v


def test_learned_sinks_become_gqa_head_sink():
    graph = sink_graph()
    spec = sink_spec(graph)
    tensors = graph.gs.tensors()
    model = emitted(graph, spec, TARGETS["ort"], [tensors[n] for n in ("q", "k", "v", "sinks")], [tensors["out"]])
    assert [n.op_type for n in model.graph.node].count("GroupQueryAttention") == 1
    rng = np.random.default_rng(2)
    feeds = {"q": rng.standard_normal((2, 4, 5, 16)), "k": rng.standard_normal((2, 2, 5, 16)),
             "v": rng.standard_normal((2, 2, 5, 16)), "sinks": rng.standard_normal(4) * 2}
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    got = session(model, None).run(None, feeds)[0]
    assert np.allclose(got, sink_reference(**feeds), atol=1e-5)
    assert not np.allclose(got, sink_reference(**feeds, with_sinks=False), atol=1e-3)


def test_sinks_on_attention_gqa_cannot_take_are_refused_with_the_reason():
    graph = sink_graph()
    spec = sink_spec(graph)
    spec.mask.klass = MaskClass("padding", padding=True, padding_input="q", sizes=((2, 3, 3),))
    reason = TARGETS["ort"].refusal(spec)
    assert "head_sink" in reason and "mask is padding" in reason
    assert "sinks" in TARGETS["onnx"].refusal(spec)


def bfloat16_attention() -> onnx.ModelProto:
    g = GraphBuilder()
    q, k, v = (g.input(n, TensorProto.BFLOAT16, ["B", 4, "S", 16]) for n in ("q", "k", "v"))
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    scaled = g.op("Mul", scores, g.const(0.25, np.float32))
    scaled = g.op("Cast", scaled, to=TensorProto.BFLOAT16)
    out = g.op("MatMul", g.op("Softmax", scaled, axis=-1), v)
    return g.model(out, dtype=TensorProto.BFLOAT16)


def test_an_op_without_a_cpu_kernel_needs_no_check():
    """bfloat16 MultiHeadAttention runs on CUDA only: with the check on it stays unfused with
    the reason; with --no-check it fuses and the report marks it not CPU-checkable."""
    model = bfloat16_attention()
    checked = onnx_fuse.fuse(model, target="ort", check=False, apply=False)
    assert checked.report["counts"] == {"attention": 1}
    refused = onnx_fuse.fuse(model, target="ort")  # the check on: nothing fuses, nothing to run
    assert refused.report["counts"] == {}
    assert any("no CPU kernel for bfloat16" in u["reason"] and "--no-check" in u["reason"]
               for u in refused.report["unfused"])
    unchecked = onnx_fuse.fuse(model, target="ort", check=False)
    entry, = [e for e in unchecked.report["onnxruntime"] if e["op"] == "MultiHeadAttention"]
    assert "not checkable" in entry["problems"][0]
    assert "CPU" not in entry["providers"] or "bfloat16" not in entry["providers"]["CPU"]


def test_finish_runs_after_every_rule():
    """The engine hook the fold uses: finish sees the fusions of every rule, before tidy."""
    from onnx_fuse.targets.onnx import OnnxTarget

    seen = []

    class Watching(OnnxTarget):
        name = "watching"

        def finish(self, graph, result):
            seen.append(sorted(result.counts().items()))

    TARGETS["watching"] = Watching()
    try:
        onnx_fuse.fuse(os.path.join(MODELS, "llama-gqa_prefill_eager_dynamo.onnx"), target="watching",
                       max_positions=32, check=False)
    finally:
        del TARGETS["watching"]
    assert seen == [[("attention", 2), ("rope", 4)]]


# --- a sliding-window cache: the mask outgrows the cache -----------------------------------------

SLIDING_CACHE = os.path.join(MODELS, "mistral-swcache_decode_sdpa_dynamo.onnx")


def with_first_mask_columns(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fused model with its padding bias over the mask's first past + S columns."""
    mutant = onnx.ModelProto()
    mutant.CopyFrom(model)
    (cut,) = [n for n in mutant.graph.node if n.op_type == "Slice" and n.input[0] == "attention_mask"]
    (neg,) = [n for n in mutant.graph.node if n.output[0] == cut.input[1]]
    mutant.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), "mut_zero"))
    cut.input[1], cut.input[2] = "mut_zero", neg.input[0]
    return mutant


def test_a_sliding_window_cache_reads_the_last_mask_columns():
    """Hugging Face's sliding-window cache holds the last W - 1 tokens while attention_mask grows
    with every token; the padding bias is the mask's last past + S columns (the one-step check
    feeds a mask as long as the keys, where first and last are the same)."""
    fused = onnx_fuse.fuse(SLIDING_CACHE, target="ort", max_positions=64).model
    rng = np.random.default_rng(3)
    mask = np.ones((2, 10), np.int64)
    mask[1, :2] = 0  # left padding, long out of the window
    mask[0, 7] = 0  # a hole inside it
    feeds = {"input_ids": rng.integers(0, 64, (2, 1)), "attention_mask": mask}
    for layer in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal((2, 2, 3, 8)).astype(np.float32)
    original = ModelRef(onnx.load(SLIDING_CACHE), MODELS)
    outcome = check_equivalent(original, ModelRef(fused, MODELS), feeds)
    assert outcome.passed, outcome.message
    assert not check_equivalent(original, ModelRef(with_first_mask_columns(fused), MODELS), feeds).passed
