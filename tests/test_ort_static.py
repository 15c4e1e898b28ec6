"""`--kv-cache static` for target ort: GroupQueryAttention over one shared past/present buffer per
cache (targets/ort_static.py).

First the facts about onnxruntime's GQA kernel the form relies on, each against a numpy reference
of the fixed cache (and each reference shown to tell a wrong answer apart); then every decode model
of models/ converted and checked over decode steps (or refused with its reason); then forms that
are subtly wrong, each seen to fail the multi-step check; then the refusals.
"""

import json
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnx_fuse
from onnx_fuse import cli, kv_static
from onnx_fuse.check import run_sharing_buffers
from onnx_fuse.errors import BadInput, CheckFailed
from onnx_fuse.targets import ort_attention
from onnx_fuse.targets.ort_static import OrtStaticForm

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
CONTRIB = "com.microsoft"
CACHE_LEN = 64
GQA = "GroupQueryAttention"
SHARED = "onnx_fuse.kv_cache.shared_buffer"


def static(name, cache_len=CACHE_LEN, **options):
    path = name if isinstance(name, onnx.ModelProto) else os.path.join(MODELS, name)
    return onnx_fuse.fuse(path, target="ort", kv_cache="static", max_cache_len=cache_len, **options)


# --------------------------------------------------------------------------- the kernel's facts

HEADS, KV_HEADS, HEAD, SLOTS = 4, 2, 16, 12


def gqa_session(bias=False, window=None):
    """One GroupQueryAttention over past/present buffers of SLOTS slots, with query_seqlens."""
    names = ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total"] + ["", "", ""]
    names += ["bias" if bias else ""] + [""] * 5 + ["query_seqlens"]
    attrs = {"num_heads": HEADS, "kv_num_heads": KV_HEADS, **({"local_window_size": window} if window else {})}
    node = helper.make_node(GQA, names, ["out", "present_key", "present_value"], domain=CONTRIB, **attrs)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT32 if n in ("seqlens_k", "total", "query_seqlens")
                                            else TensorProto.FLOAT, None) for n in names if n]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output]
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(CONTRIB, 1)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def step_feeds(write, seq, valid=None, total=SLOTS, seed=0):
    """This step's tokens for rows writing at `write`; seqlens_k = write + S - 1; the bias hides
    the slots `valid` (a [B, SLOTS] 0/1 mask) says are not valid."""
    rng = np.random.default_rng(seed)
    batch = len(write)
    feeds = {"q": rng.standard_normal((batch, seq, HEADS * HEAD)),
             "k": rng.standard_normal((batch, seq, KV_HEADS * HEAD)),
             "v": rng.standard_normal((batch, seq, KV_HEADS * HEAD)),
             "past_key": rng.standard_normal((batch, KV_HEADS, SLOTS, HEAD)),
             "past_value": rng.standard_normal((batch, KV_HEADS, SLOTS, HEAD))}
    feeds = {name: value.astype(np.float32) for name, value in feeds.items()}
    feeds.update(seqlens_k=(np.array(write) + seq - 1).astype(np.int32), total=np.array(total, np.int32),
                 query_seqlens=np.full(batch, seq, np.int32))
    if valid is not None:
        hidden = np.where(valid[:, None, None, :total] == 1, 0, np.finfo(np.float32).min / 2)
        feeds["bias"] = np.broadcast_to(hidden, (batch, 1, seq, total)).astype(np.float32).copy()
    return feeds


def fixed_cache_reference(feeds, write, valid=None, window=None):
    """The fixed cache's step in numpy: row b's new tokens written at slots write[b] + t, query t
    seeing slots j <= write[b] + t that are valid (and j > write[b] + t - window)."""
    batch, seq = feeds["q"].shape[:2]
    caches = {name: feeds[name].copy() for name in ("past_key", "past_value")}
    out = np.zeros_like(feeds["q"])
    for b in range(batch):
        for name, new in (("past_key", "k"), ("past_value", "v")):
            caches[name][b, :, write[b]:write[b] + seq] = feeds[new][b].reshape(seq, KV_HEADS, HEAD).transpose(1, 0, 2)
        keys, values = (np.repeat(caches[n][b], HEADS // KV_HEADS, axis=0) for n in ("past_key", "past_value"))
        query = feeds["q"][b].reshape(seq, HEADS, HEAD).transpose(1, 0, 2)
        scores = query @ keys.transpose(0, 2, 1) / np.sqrt(HEAD)
        slots, at = np.arange(SLOTS)[None, :], write[b] + np.arange(seq)[:, None]
        seen = (slots <= at) & (True if valid is None else valid[b].astype(bool)[None, :])
        if window is not None:
            seen &= slots > at - window
        scores = np.where(seen[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[b] = ((probs / probs.sum(-1, keepdims=True)) @ values).transpose(1, 0, 2).reshape(seq, -1)
    return out, caches["past_key"], caches["past_value"]


@pytest.mark.parametrize("seq", [1, 3])
def test_gqa_writes_and_reads_the_slots_seqlens_k_names_in_a_longer_buffer(seq):
    """A past of SLOTS slots, rows at different write positions: the output is the fixed cache's,
    present is SLOTS long with slots 0 .. seqlens_k right; in a plain run the slots after them
    come back zero, in a shared buffer (IO binding) every other slot keeps what it held."""
    write = [5, 2]
    feeds = step_feeds(write, seq)
    session = gqa_session()
    out, present, _ = session.run(None, feeds)
    expected, key_cache, _ = fixed_cache_reference(feeds, write)
    assert present.shape == (2, KV_HEADS, SLOTS, HEAD)
    assert np.allclose(out, expected, atol=1e-5)
    assert not np.allclose(out, fixed_cache_reference(feeds, [6, 3])[0], atol=1e-3)  # one slot later
    for b, end in enumerate(np.array(write) + seq):
        assert np.allclose(present[b, :, :end], key_cache[b, :, :end], atol=1e-6)
        assert not present[b, :, end:].any()  # separate buffers: zeros, not the past
    shared = run_sharing_buffers(session, feeds, {"present_key": "past_key", "present_value": "past_value"})
    assert np.allclose(shared["out"], expected, atol=1e-5)
    assert np.allclose(shared["present_key"], key_cache, atol=1e-6)  # every slot: the past kept
    assert np.array_equal(feeds["past_key"][:, :, 9:], shared["present_key"][:, :, 9:])  # the feed untouched too


def test_the_bias_spans_total_sequence_length_which_may_be_every_slot():
    """attention_bias's last dim must equal total_sequence_length; with total = SLOTS the bias over
    the slots hides holes (a left-padded row) exactly, and without it the holes are seen."""
    write = [6, 6]
    valid = np.zeros((2, SLOTS), np.int64)
    valid[:, :7] = 1
    valid[1, :2] = 0  # row 1 left-padded by 2
    feeds = step_feeds(write, 1, valid)
    out = gqa_session(bias=True).run(None, feeds)[0]
    assert np.allclose(out, fixed_cache_reference(feeds, write, valid)[0], atol=1e-5)
    assert not np.allclose(out, fixed_cache_reference(feeds, write)[0], atol=1e-3)
    shorter = step_feeds(write, 1, valid, total=7)
    shorter["bias"] = feeds["bias"]  # over SLOTS slots, total 7
    with pytest.raises(Exception, match="attention_bias dimension 3 must be equal to total_sequence_length"):
        gqa_session(bias=True).run(None, shorter)


@pytest.mark.parametrize("seq", [1, 3])
def test_local_window_size_hides_what_the_window_over_the_slots_hides(seq):
    """GQA's window over the shared buffer is the standard form's: slot j is seen from the query at
    slot p iff j > p - W (rows past the window, at different write positions)."""
    write, window = [8, 5], 3
    feeds = step_feeds(write, seq)
    out = gqa_session(window=window).run(None, feeds)[0]
    assert np.allclose(out, fixed_cache_reference(feeds, write, window=window)[0], atol=1e-5)
    for other in (window - 1, window + 1):
        assert not np.allclose(out, fixed_cache_reference(feeds, write, window=other)[0], atol=1e-3)


# --------------------------------------------------------------------------- every decode model

DECODERS = sorted(n for n in MANIFEST if MANIFEST[n]["kind"].startswith("decode"))
# Whisper's decoder embeds positions from a table of 32 rows: a cache of 64 slots cannot be
# positioned (kv_positions says so); it converts at 24.
POSITION_TABLE_ROWS = {"whisper-dec_decode-cross_eager_dynamo.onnx": 32,
                       "whisper-dec_decode-cross_eager_torchscript.onnx": 32}


def refusal(truth) -> str | None:
    if truth["kind"] == "decode_merged":
        return "inside If/Loop bodies"
    if truth.get("dtype") == "bfloat16":
        return "no CPU kernel for bfloat16"
    return None


def cache_len(name) -> int:
    truth = MANIFEST[name]
    if name in POSITION_TABLE_ROWS:
        return POSITION_TABLE_ROWS[name] - 8
    return truth.get("cache_len") or CACHE_LEN


def written_as_onnx_attention(truth) -> bool:
    """What ort writes as ONNX Attention: MLA (V's head size differs) and StaticCache's masks (they
    read cache_position). The exporter's own Attention is rewritten into GroupQueryAttention."""
    return truth.get("v_head_size") not in (None, truth["head_size"]) or truth["kind"] == "decode_static"


def windows(truth) -> list[int | None]:
    layers = truth.get("sliding_window_layers", [])
    return [truth["sliding_window"] if i in layers else None for i in range(truth["layers"])]


@pytest.mark.parametrize("name", DECODERS)
def test_every_decode_model_converts_and_checks_or_is_refused_with_the_reason(name):
    truth = MANIFEST[name]
    if refusal(truth):
        with pytest.raises(BadInput, match=refusal(truth)):
            static(name)
        return
    result = static(name, cache_len(name))
    check, section, model = result.report["check"], result.report["kv_cache"], result.proto
    assert check["passed"], check["message"]
    ops = [n.op_type for n in model.graph.node]
    self_attention = truth["attention_cores"] - truth.get("cross_attention_cores", 0)
    assert ops.count("MultiHeadAttention") == truth.get("cross_attention_cores", 0)
    if truth["kind"] == "decode_static":  # already fixed: its interface kept, writes TensorScatter
        assert list(check["scenarios"]) == ["static"] and section["already_static"]
        assert ops.count("TensorScatter") == truth["kv_cache_writes"] and ops.count("Attention") == self_attention
        return
    assert list(check["scenarios"]) == (["ragged", "left_padded"] if "attention_mask" in truth["inputs"] else ["ragged"])
    assert check["steps"] >= 9 and {p.key: p.value for p in model.metadata_props}[SHARED] == "true"
    if written_as_onnx_attention(truth):  # the standard form for those layers
        assert ops.count("Attention") == self_attention and ops.count("TensorScatter") == truth["kv_cache_writes"]
        assert GQA not in ops
        return
    assert ops.count(GQA) == self_attention and "TensorScatter" not in ops
    assert_gqa_reads_and_writes_the_fixed_caches(model, section, truth)


def assert_gqa_reads_and_writes_the_fixed_caches(model, section, truth):
    gqa = [n for n in model.graph.node if n.op_type == GQA]
    writes = {n.input[i]: n.output[i - 2] for n in gqa for i in (3, 4)}  # past -> present, in place
    assert {present: past for past, present in writes.items()} == section["pairs"]
    declared = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                for v in [*model.graph.input, *model.graph.output]}
    slots = section["max_cache_len"]
    assert all(declared[name][2] == slots for pair in section["pairs"].items() for name in pair)
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(initializers[n.input[6]] == slots for n in gqa)  # total_sequence_length = N
    assert len({n.input[5] for n in gqa}) == 1  # one seqlens_k for every layer
    has_mask = "attention_mask" in truth["inputs"]
    assert all((len(n.input) > 10 and bool(n.input[10])) == has_mask for n in gqa)  # the slot bias
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in gqa]
    assert [a.get("local_window_size") for a in attrs] == windows(truth)
    assert all(n.input[9] for n, a in zip(gqa, attrs) if a.get("do_rotary"))  # positions re-pointed


def test_the_command_writes_the_shared_buffer_form(tmp_path, capfd):
    out = tmp_path / "static.onnx"
    source = os.path.join(MODELS, "qwen2-gqa_decode_sdpa_dynamo.onnx")
    assert cli.main(["fuse", source, "-o", str(out), "--target", "ort", "--kv-cache", "static",
                     "--max-cache-len", str(CACHE_LEN)]) == 0
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[SHARED] == "true" and meta["onnx_fuse.kv_cache.write_position"] == "write_position"
    assert [n.op_type for n in model.graph.node].count(GQA) == 2
    capfd.readouterr()


# --------------------------------------------------------------------------- forms subtly wrong

LEFT_PADDED = "llama-gqa_decode_eager_torchscript.onnx"


def with_seqlens(monkeypatch, build):
    """The form with seqlens_k built by `build(conversion)` (INT32 [B])."""
    lengths = OrtStaticForm._lengths_of

    def patched(self, conversion):
        _, total = lengths(self, conversion)
        return build(conversion), total

    monkeypatch.setattr(OrtStaticForm, "_lengths_of", patched)


def as_int32(conversion, tensor):
    return conversion.node("Cast", [tensor], {"to": TensorProto.INT32}, np.int32)


@pytest.mark.parametrize("shift", [-1, 1])
def test_seqlens_k_one_slot_off_fails_the_check(monkeypatch, shift):
    """write_position + S - 1 is right; one slot less or more is not."""
    def shifted(conversion):
        seq = conversion.node("Shape", [conversion.tensors[conversion.layout.ids]], {"start": 1, "end": 2}, np.int64)
        last = conversion.node("Add", [conversion.write, seq], dtype=np.int64)  # write_position + S
        return as_int32(conversion, conversion.node("Add", [last, conversion.const("shift", np.array([shift - 1]))],
                                                    dtype=np.int64))

    with_seqlens(monkeypatch, shifted)
    with pytest.raises(CheckFailed, match="ragged step 1"):
        static(LEFT_PADDED)


def test_seqlens_k_from_the_valid_count_fails_for_left_padding(monkeypatch):
    """onnxruntime-genai's ReduceSum(attention_mask) - 1: right while a row has no holes (the
    ragged scenario passes), the slot of the last token only then."""
    def valid_count(conversion):
        mask = conversion.tensors[conversion.layout.mask]
        count = conversion.node("ReduceSum", [mask, conversion.const("axis", np.array([1]))], {"keepdims": 0},
                                np.int64)
        return as_int32(conversion, conversion.node("Sub", [count, conversion.const("one", np.array(1))],
                                                    dtype=np.int64))

    with_seqlens(monkeypatch, valid_count)
    with pytest.raises(CheckFailed, match="left-padded step 1") as failed:
        static(LEFT_PADDED)
    assert "ragged" not in failed.value.args[0]


def test_without_the_slot_bias_the_left_padded_scenario_fails(monkeypatch):
    monkeypatch.setattr(OrtStaticForm, "_slot_bias", lambda self, conversion, like: gs.Variable.empty())
    with pytest.raises(CheckFailed, match="left-padded step 1"):
        static(LEFT_PADDED)


def test_past_and_present_in_separate_buffers_lose_the_slots_after_the_valid_ones(monkeypatch):
    """The shared buffer is part of the interface: run as separate buffers (the model not saying
    it shares them), the slots after a row's valid ones come back zero and the check says so."""
    monkeypatch.setattr(OrtStaticForm, "shares_buffer", False)
    with pytest.raises(CheckFailed, match="changed slots past the valid"):
        static(LEFT_PADDED)


@pytest.mark.parametrize("name", ["mistral-swa_decode_sdpa_dynamo.onnx", "mistral-swcache_decode_sdpa_torchscript.onnx",
                                  "gemma3_decode_eager_dynamo.onnx"])
@pytest.mark.parametrize("off", [-1, 1])
def test_a_window_one_slot_off_fails_the_check(monkeypatch, name, off):
    """local_window_size is the window: the check drives W + 2 steps, so W - 1 and W + 1 fail
    (gemma3 mixes a window layer and a full one)."""
    remask = OrtStaticForm.remask

    def shifted(self, conversion, attention, window):
        remask(self, conversion, attention, window)
        if window is not None:
            attention.attrs["local_window_size"] = window + off

    monkeypatch.setattr(OrtStaticForm, "remask", shifted)
    with pytest.raises(CheckFailed, match="differs"):
        static(name)


def test_without_the_matched_masks_a_reader_of_the_exporters_mask_is_refused(monkeypatch):
    """transformers' exporter zeroes fully hidden query rows from its own mask, which GQA's bias
    replaced; the matched masks are what finds that reader and gives it the mask over the slots."""
    name = "llama31_decode_sdpa_transformers.onnx"
    assert static(name).report["kv_cache"]["mask_readers"]
    monkeypatch.setattr(kv_static, "_matched_masks", lambda source, fused: frozenset())
    with pytest.raises(BadInput, match="also read by Cast"):
        static(name)


# --------------------------------------------------------------------------- refusals


def test_a_cache_reading_multi_head_attention_is_refused(monkeypatch):
    """Where GQA does not fit a cached self-attention with as many K/V heads as query heads, ort
    writes MultiHeadAttention, which this form does not put over a fixed cache."""
    misfit = ort_attention._gqa_misfit
    monkeypatch.setattr(ort_attention, "_gqa_misfit",
                        lambda spec, shape: misfit(spec, shape) or "(not taken in this test)")
    with pytest.raises(BadInput, match="MultiHeadAttention '.*' reads a cache"):
        static("gpt2_decode_sdpa_dynamo.onnx")


def with_past_read_by(name: str, op: str) -> onnx.ModelProto:
    """The decode model with one more output: `op` of the first past cache."""
    model = onnx.load(os.path.join(MODELS, name))
    past = next(i.name for i in model.graph.input if i.name.startswith("past"))
    model.graph.node.append(helper.make_node(op, [past], ["past_read"], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("past_read", TensorProto.FLOAT, None))
    return model


def test_a_past_read_by_another_op_is_refused_for_the_shared_buffer():
    """In a buffer its present shares, any other reader of the past would see this step's writes or
    not by node order: refused, naming it."""
    model = with_past_read_by("qwen2-gqa_decode_sdpa_dynamo.onnx", "ReduceSum")
    assert "ReduceSum" in [n.op_type for n in model.graph.node]
    with pytest.raises(BadInput, match="is read by .*ReduceSum .*shared with its present"):
        static(model)


def test_bfloat16_is_written_with_no_check():
    """GQA has no CPU kernel for bfloat16: refused with the check on (above), written without."""
    result = static("llama-gqa-bf16_decode_sdpa_dynamo.onnx", check=False)
    model = result.proto
    assert [n.op_type for n in model.graph.node].count(GQA) == 2
    bias = next(n for n in model.graph.node if n.op_type == GQA).input[10]
    producer = next(n for n in model.graph.node if bias in n.output)
    assert producer.op_type == "Expand"  # the slot bias, cast to bfloat16 before it
    assert any(n.op_type == "Cast" and helper.get_attribute_value(n.attribute[0]) == TensorProto.BFLOAT16
               for n in model.graph.node if n.name.startswith("kv_static/"))


def test_an_already_static_cache_keeps_its_length():
    name = "llama-static_decode-static_sdpa_dynamo.onnx"
    with pytest.raises(BadInput, match=f"already fixed at {MANIFEST[name]['cache_len']} slots"):
        static(name)
