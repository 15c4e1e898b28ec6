"""`onnx-fuse lint`: one violating graph per rule (each rule seen to fire, and its clean twin
seen not to), verdicts for every attention, RoPE and cache node of every committed model and of
every target's output, exit codes and --json."""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fuse
from graphs import attention_model
from onnx_fuse import cli, lint, plugin_ops
from onnx_fuse.trt_contract import verdicts

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
F16, F32, I32, I64, BOOL = (TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.INT32,
                            TensorProto.INT64, TensorProto.BOOL)
Q, KV = [2, 4, 3, 8], [2, 2, 5, 8]


def node_model(op, inputs, attrs=None, *, domain="", node_inputs=None, initializers=(),
               functions=(), scaled_q=False):
    """One node over graph inputs {name: (type, shape)} (its inputs: `node_inputs`, default all
    of them, "" for an absent optional one) whose output y is the graph's; `scaled_q` puts
    Mul(q, c) before it."""
    values = [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()]
    names = list(node_inputs or inputs)
    nodes = []
    if scaled_q:
        nodes.append(helper.make_node("Mul", ["q", "scale"], ["q_scaled"]))
        initializers = [*initializers, numpy_helper.from_array(np.array(0.35, np.float16), "scale")]
        names[0] = "q_scaled"
    nodes.append(helper.make_node(op, names, ["y"], name="n", domain=domain, **(attrs or {})))
    outs = [helper.make_tensor_value_info("y", 0, None)]
    opsets = [helper.make_opsetid("", 24)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph(nodes, "g", values, outs, list(initializers)),
                              opset_imports=opsets, functions=list(functions))
    model.ir_version = 10
    return model


def qkv(dtype=F16, **extra):
    """Q [2, 4, 3, 8], K and V [2, 2, 5, 8] (GQA), replaced or joined by `extra` inputs."""
    return {"q": (dtype, Q), "k": (dtype, KV), "v": (dtype, KV), **extra}


def attention(version="10.16", dtype=F16, extra=None, **attrs):
    return node_model("Attention", qkv(dtype, **(extra or {})), attrs), version


def trt_attention(version="11", dtype=F16, extra=None, scaled=True, node_inputs=None, **attrs):
    return node_model("TRT_Attention", qkv(dtype, **(extra or {})), attrs, domain="trt",
                      node_inputs=node_inputs, scaled_q=scaled), version


def rope(x=(F16, [2, 4, 3, 8]), positions=(I64, [2, 3]), cache_rank=2, version="10.15", **attrs):
    cache = (F16, [16, 4][:cache_rank] if cache_rank == 2 else [2, 3, 4])
    return node_model("RotaryEmbedding", {"x": x, "cos": cache, "sin": cache, "p": positions}, attrs), version


CACHE = (F16, [2, 2, 16, 8])
UPDATE = (F16, [2, 2, 1, 8])


def scatter(op="TensorScatter", cache=CACHE, update=UPDATE, indices=(I64, [2]), as_output=True,
            version="11", domain="", **attrs):
    inputs = {"cache": cache, "u": update, **({"i": indices} if indices else {})}
    model = node_model(op, inputs, attrs, domain=domain)
    if not as_output:  # the updated cache feeds another op instead of being a graph output
        model.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
        model.graph.output[0].name = "z"
    return model, version


def two_writers():
    model, version = scatter()
    second = helper.make_node("TensorScatter", ["cache", "u", "i"], ["y2"], name="n2")
    model.graph.node.append(second)
    model.graph.output.append(helper.make_tensor_value_info("y2", 0, None))
    return model, version


def cache_from_an_op():
    model, version = scatter()
    model.graph.node.insert(0, helper.make_node("Identity", ["cache"], ["copy"]))
    model.graph.node[1].input[0] = "copy"
    return model, version


def plugin(op="FlashDecode", version="11", domain="onnx_fuse.plugins", functions=(), **attrs):
    return node_model(op, qkv(), attrs, domain=domain, functions=functions), version


def local_function(name, domain):
    return helper.make_function(domain, name, ["q", "k", "v"], ["y"], [helper.make_node("Identity", ["q"], ["y"])],
                                [helper.make_opsetid("", 24)])


def quantized(scale_shape, version="11", pairs=("q", "k", "v"), pair_type=TensorProto.FLOAT8E4M3FN):
    """TRT_QuantizedAttention with a normalization quantize scale of `scale_shape` (a scalar: []),
    Q/DQ pairs of `pair_type` in front of the inputs named in `pairs`."""
    inputs = qkv(m=(BOOL, [2, 1, 3, 5]), s=(F16, scale_shape))
    model = node_model("TRT_QuantizedAttention", inputs, domain="trt")
    zero = numpy_helper.from_array(np.zeros((), helper.tensor_dtype_to_np_dtype(pair_type)), "zero")
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float16), "step"), zero])
    node = model.graph.node[0]
    for index, name in enumerate(node.input[:3]):
        if name in pairs:
            model.graph.node.insert(0, helper.make_node("DequantizeLinear", [f"{name}_q", "step", "zero"], [f"{name}_dq"]))
            model.graph.node.insert(0, helper.make_node("QuantizeLinear", [name, "step", "zero"], [f"{name}_q"]))
            node.input[index] = f"{name}_dq"
    return model, version


def project_op(op, inputs, node_inputs=None, **attrs):
    """One of target trt-plugin's ops (plugin_ops.py) with its function, attributes as given
    (by default every one of its contract, plugin namespace and version included)."""
    spec = plugin_ops.OPS[op]
    values = {"plugin_namespace": plugin_ops.PLUGIN_NAMESPACE, "plugin_version": plugin_ops.PLUGIN_VERSION,
              **{a.name: a.default for a in spec.attrs if a.default is not None}, **attrs}
    model = node_model(op, inputs, values, domain=plugin_ops.DOMAIN, node_inputs=node_inputs,
                       functions=[plugin_ops.function(op)])
    return model, "11"


def fused_attention(kv_lengths=I32, node_inputs=None, **attrs):
    inputs = qkv(m=(BOOL, [2, 5]), s=(F16, [4]), L=(kv_lengths, [2]))
    return project_op("FusedAttention", inputs, node_inputs, **{"scale": 0.35, "causal": 2, **attrs})


def fused_kv_write(cache=CACHE):
    return project_op("FusedKVWrite", {"cache": cache, "u": UPDATE, "i": (I32, [2])})


def primitive(**kwargs):
    return attention_model(**kwargs), "11"


# (case, model and version, rule that must fire, words of its message)
VIOLATIONS = {
    "attention 3-D": (attention(extra={"q": (F16, [2, 3, 32])}), "rank", "4-D"),
    "attention mask rank": (attention(extra={"m": (BOOL, [3, 5])}), "rank", "rank differs"),
    "attention mask type": (attention(extra={"m": (F32, [2, 1, 3, 5])}), "dtype", "neither boolean"),
    "attention past_key": (attention(extra={"m": (BOOL, [2, 1, 3, 5]), "pk": (F16, KV)}), "inputs", "past_key"),
    "attention softcap": (attention(softcap=30.0), "attribute", "softcap"),
    "attention is_causal with mask": (attention(extra={"m": (BOOL, [2, 1, 3, 5])}, is_causal=1), "mask",
                                      "cannot both"),
    "attention normalization op": (attention(TRT_normalization_op="relu"), "attribute", "TRT_normalization_op"),
    "attention decomposable type": (attention(TRT_decomposable="yes"), "attribute", "TRT_decomposable"),
    "attention nb_rank before 10.16": (attention("10.15", nb_rank=2), "version", "10.16"),
    "attention nb_rank float32": (attention(dtype=F32, nb_rank=2, TRT_decomposable=1), "dtype", "FP16 or BF16"),
    "attention heads": (attention(extra={"k": (F16, [2, 3, 5, 8]), "v": (F16, [2, 3, 5, 8])}), "heads", "multiple"),
    "attention float32": (attention(dtype=F32), "dtype", "the build fails"),
    "trt_attention on 10.16": (trt_attention("10.16"), "version", "since 11"),
    "trt_attention schema A": (trt_attention(scale=0.35), "schema", "schema (A)"),
    "trt_attention causal_kind": (trt_attention(causal_kind="causal"), "attribute", "causal_kind"),
    "trt_attention form": (trt_attention(query_form="packed"), "attribute", "query_form"),
    "trt_attention unknown attribute": (trt_attention(window=4), "attribute", "not in TRT_Attention"),
    "trt_attention mask with causal": (trt_attention(extra={"m": (BOOL, [2, 1, 3, 5])}, causal_kind="lower_right"),
                                       "mask", "cannot be combined"),
    "trt_attention packed rank": (trt_attention(query_form="packed_nhd", kv_form="packed_nhd"), "rank", "3-D"),
    "trt_attention int64 lengths": (trt_attention(extra={"m": (BOOL, [2, 1, 3, 5]), "ql": (I32, [3]),
                                                         "kl": (I64, [2])}), "indices", "INT32"),
    "trt_attention nb_rank type": (trt_attention(nb_rank=0), "attribute", "nb_rank"),
    "quantized attention scale": (quantized([2]), "inputs", "normalization_quantize_scale"),
    "quantized attention on 10.16": (quantized([], "10.16"), "version", "since 11"),
    "quantized attention without a K pair": (quantized([], pairs=("q", "v")), "quantization", "K has no Q/DQ pair"),
    "quantized attention int8 pairs for fp8": (quantized([], pair_type=TensorProto.INT8), "quantization",
                                               "normalization_quantize_to_type is float8e4m3fn"),
    "rope 3-D": (rope(x=(F16, [2, 3, 32])), "rank", "4-D"),
    "rope int32 positions": (rope(positions=(I32, [2, 3])), "indices", "INT64"),
    "rope odd rotary dim": (rope(rotary_embedding_dim=5), "attribute", "odd"),
    "rope cache rank": (rope(cache_rank=3), "rank", "cos/sin"),
    "scatter rank": (scatter(update=(F16, [2, 1, 8])), "rank", "4-D"),
    "scatter axis": (scatter(axis=2), "attribute", "axis"),
    "scatter mode": (scatter(mode="circular"), "attribute", "linear"),
    "scatter no indices": (scatter(indices=None), "indices", "no write indices"),
    "scatter indices rank": (scatter(indices=(I64, [2, 1])), "indices", "[B]"),
    "scatter dynamic cache": (scatter(cache=(F16, [2, 2, "L", 8])), "static_cache", "not static"),
    "scatter cache not an input": (cache_from_an_op(), "static_cache", "not a network input"),
    "scatter output not an output": (scatter(as_output=False), "aliasing", "not a network output"),
    "scatter two writers": (two_writers(), "aliasing", "updated by 2"),
    "kv update on 10.15": (scatter("TRT_KVCacheUpdate", indices=(I32, [2]), domain="trt", version="10.15"),
                           "version", "since 11"),
    "kv update int64 indices": (scatter("TRT_KVCacheUpdate", domain="trt"), "indices", "INT32"),
    "kv update attribute": (scatter("TRT_KVCacheUpdate", indices=(I32, [2]), domain="trt", window=2),
                            "attribute", "not in TRT_KVCacheUpdate"),
    "kv update form": (scatter("TRT_KVCacheUpdate", indices=(I32, [2]), domain="trt", update_form="ragged"),
                       "attribute", "update_form"),
    "plugin named like a built-in": (plugin("Attention"), "plugin_name", "built-in"),
    "plugin namespace type": (plugin(plugin_namespace=3), "attribute", "plugin_namespace"),
    "plugin version type": (plugin(plugin_namespace="ns", plugin_version=2), "attribute", "plugin_version"),
    "plugin aot type": (plugin(plugin_namespace="ns", aot="yes"), "attribute", "aot must be an INT"),
    "plugin list attribute": (plugin(plugin_namespace="ns", block=[64, 64]), "attribute", "not lists"),
    "plugin without importer": (plugin(), "plugin_lookup", "registered"),
    "contrib op collides": (plugin("RotaryEmbedding", domain="com.microsoft"), "plugin_name", "built-in"),
    "project op input types": (fused_attention(kv_lengths=I64), "dtype", "kv_lengths is int64"),
    "project op attribute value": (fused_attention(causal=5), "plugin_contract", "causal is 0, 1 or 2"),
    "project op input count": (fused_attention(node_inputs=["q", "k", "v", "m", "s"]), "plugin_contract",
                               "takes 6 inputs"),
    "project op namespace": (fused_attention(plugin_namespace="other"), "plugin_contract", "'onnx_fuse'"),
    "project op dynamic cache": (fused_kv_write((F16, [2, 2, "L", 8])), "static_cache", "not static"),
    "primitive float32": (primitive(mask="keep", scale_on="q"), "dtype", "no fused MHA kernel"),
    "primitive cast before softmax": (primitive(mask="keep", scale_on="q", casts=True), "pointwise", "Cast"),
    "primitive no masking op": (primitive(scale_on="q"), "masking", "0 masking ops"),
    "primitive finite fill": (primitive(mask="keep_finite", scale_on="q"), "masking", "-inf"),
    "primitive mask not from Range": (primitive(mask="keep", scale_on="q"), "mask_form", "Range"),
    "primitive scale on the scores": (primitive(mask="keep"), "scale", "not scaled"),
}


def findings_of(model, version):
    return [(f.rule, f.message) for v in verdicts(model, version) for f in v.findings]


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_each_rule_fires_on_its_violating_graph(case):
    (model, version), rule, words = VIOLATIONS[case]
    found = findings_of(model, version)
    assert any(r == rule and words in m for r, m in found), found


CLEAN = {
    "attention": attention(extra={"m": (BOOL, [2, 1, 3, 5])}),
    "attention 3-D with head counts": attention(extra={"q": (F16, [2, 3, 32]), "k": (F16, [2, 5, 16]),
                                                       "v": (F16, [2, 5, 16])}, q_num_heads=4, kv_num_heads=2),
    "attention nb_rank": attention(nb_rank=2),
    "trt_attention": trt_attention(causal_kind="lower_right"),
    "trt_attention with lengths": trt_attention(extra={"kl": (I32, [2])}, node_inputs=["q", "k", "v", "", "", "kl"],
                                                causal_kind="lower_right"),
    "trt_attention nb_rank": trt_attention(nb_rank=2),
    "quantized attention": quantized([]),
    "rope": rope(),
    "scatter": scatter(),
    "kv update": scatter("TRT_KVCacheUpdate", indices=(I32, [2]), domain="trt"),
    "plugin": plugin(plugin_namespace="ns", plugin_version="1", aot=1),
    "project attention op": fused_attention(),
    "project rotary op": project_op("FusedRotary", {"x": (F16, [2, 4, 3, 8]), "cos": (F16, [16, 4]),
                                                    "sin": (F16, [16, 4]), "p": (I64, [2, 3])}),
    "project kv write op": fused_kv_write(),
    "plugin with a local function": plugin(functions=[local_function("FlashDecode", "onnx_fuse.plugins")]),
}


@pytest.mark.parametrize("case", sorted(CLEAN))
def test_the_clean_twin_of_each_kind_has_no_findings(case):
    model, version = CLEAN[case]
    assert findings_of(model, version) == []
    assert verdicts(model, version), "it still gets a verdict"


def test_notes_say_what_a_clean_node_needs():
    model, version = CLEAN["trt_attention nb_rank"]
    (verdict,) = verdicts(model, version)
    assert any("kMULTIDEVICE_RUNTIME_10_16" in n and "SM 100" in n for n in verdict.notes)
    model, version = trt_attention(scaled=False)
    (verdict,) = verdicts(model, version)
    assert verdict.findings == [] and any("not visibly scaled" in n for n in verdict.notes)
    model, version = CLEAN["plugin"]
    assert any("ns::FlashDecode version 1" in n for n in verdicts(model, version)[0].notes)


def test_the_float32_finding_depends_on_decomposable():
    model, version = attention(dtype=F32, TRT_decomposable=1)
    (verdict,) = verdicts(model, version)
    assert verdict.builds and [f.breaks for f in verdict.findings] == ["kernel"]
    model, version = attention(dtype=F32)
    assert not verdicts(model, version)[0].builds


# --------------------------------------------------------------------------- every model


LAYER_OPS = {"Attention": "attention", "TRT_Attention": "attention", "Softmax": "attention",
             "RotaryEmbedding": "rope", "TensorScatter": "kv_cache", "TRT_KVCacheUpdate": "kv_cache"}
TARGET_VERSION = {"onnx": "10.15", "primitive-trt": "10.15", "trt11": "11"}


def layer_counts(model, version):
    counts = {}
    for verdict in verdicts(model, version):
        family = LAYER_OPS[verdict.op]
        counts[family] = counts.get(family, 0) + 1
    return counts


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_committed_model_gets_a_verdict_for_every_attention_core(name):
    model = onnx.load(os.path.join(MODELS, name))
    counts = layer_counts(model, "11")
    assert counts.pop("attention") == MANIFEST[name]["attention_cores"]
    assert counts == written_layers(model)  # what the exporter wrote as fused ops itself


@pytest.mark.parametrize("target", sorted(TARGET_VERSION))
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_fused_output_gets_a_verdict_for_every_fused_node(name, target):
    result = onnx_fuse.fuse(os.path.join(MODELS, name), target=target, check=False, max_positions=64)
    truth = MANIFEST[name]
    version = TARGET_VERSION[target]
    counts = layer_counts(result.model, version)
    # Attention fused or left as primitive ops: every core has a verdict either way.
    assert counts.pop("attention") == truth["attention_cores"]
    assert counts == written_layers(result.proto)
    # What a target writes parses in the version it is for, but for the onnx target's softcap
    # (Gemma 2) and float32 softmax over float16 (softmax_precision), which standard Attention
    # has for onnxruntime's sake and TensorRT's parser rejects.
    rejected = [f.message for v in verdicts(result.proto, version) for f in v.findings if f.breaks == "parse"]
    assert all("softcap" in m or "softmax_precision" in m for m in rejected), rejected
    assert not rejected or target == "onnx"


def written_layers(model) -> dict:
    """RoPE and cache-write ops in the model, If/Loop/Scan bodies included."""
    counts, graphs = {}, [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            family = LAYER_OPS.get(node.op_type)
            if family in ("rope", "kv_cache"):
                counts[family] = counts.get(family, 0) + 1
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
    return counts


def test_a_static_cache_output_lints_clean_but_for_float32():
    path = os.path.join(MODELS, "qwen2-gqa_decode_sdpa_dynamo.onnx")
    result = onnx_fuse.fuse(path, target="trt11", kv_cache="static", max_cache_len=16, check=False)
    report = lint.lint(result.model, "11")
    rules = {f["rule"] for v in report["verdicts"] for f in v["findings"]}
    assert report["layers"] == 10 and rules == {"dtype"}  # 4 RoPE, 4 cache writes, 2 attention


# --------------------------------------------------------------------------- the command


def clean_model(tmp_path):
    path = tmp_path / "clean.onnx"
    model, _ = CLEAN["trt_attention"]
    onnx.save(model, path)
    return str(path)


def test_exit_0_when_clean_and_1_with_findings(tmp_path, capfd):
    assert cli.main(["lint", clean_model(tmp_path), "--trt", "11"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("TensorRT 11: 1 transformer layers, 0 with findings") and "ok" in out
    assert cli.main(["lint", clean_model(tmp_path), "--trt", "10.16"]) == 1
    out = capfd.readouterr().out
    assert "NO PARSE" in out and "since 11" in out


def test_json_output(tmp_path, capfd):
    path = os.path.join(MODELS, "llama-gqa_decode_eager_dynamo.onnx")
    assert cli.main(["lint", path, "--trt", "10.15", "--json"]) == 1
    report = json.loads(capfd.readouterr().out)
    assert report["trt"] == "10.15" and not report["clean"] and report["layers"] == 2
    (verdict, _) = report["verdicts"]
    assert verdict["layer"].startswith("MHA fusion") and verdict["parses"] and not verdict["fused_kernel"]
    assert {"rule", "breaks", "message"} <= set(verdict["findings"][0])


def test_a_model_without_transformer_layers_is_clean(tmp_path, capfd):
    path = tmp_path / "relu.onnx"
    onnx.save(node_model("Relu", {"x": (F32, [2])}), path)
    assert cli.main(["lint", str(path), "--trt", "10.15"]) == 0
    assert "0 transformer layers" in capfd.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["lint", "missing.onnx", "--trt", "11"], "missing.onnx"),
    (["lint", os.path.join(MODELS, "manifest.json"), "--trt", "11"], "manifest.json"),
    (["lint", os.path.join(MODELS, "bert_encoder_eager_dynamo.onnx"), "--trt", "9"], "invalid choice"),
    (["lint", os.path.join(MODELS, "bert_encoder_eager_dynamo.onnx")], "--trt"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capfd):
    assert cli.main(argv) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("onnx-fuse: error:") and words in err
