"""RoPE fusion on hand-built graphs: every spelling exporters use (rotate_half by Slice or Split,
either operand order, interleaved pairs, partial rotary, 3-D and 4-D before or after the head
transpose, tables gathered, sliced or computed in the graph) fuses to one RotaryEmbedding that
computes the same thing; near-misses stay unfused with a reason. Then the committed models."""

import json
import functools
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnx_fuse
import onnx_fuse.patterns
from graphs import GraphBuilder

INT_MAX = np.iinfo(np.int64).max
SEQ_AXIS = {"bnsh": 2, "bsnh": 1, "3d": 1}


@pytest.fixture
def max_positions(monkeypatch):
    """Make onnx_fuse.fuse use max_positions=n for one test (what --max-positions does)."""
    original = onnx_fuse.fuse
    return lambda n: monkeypatch.setattr(onnx_fuse, "fuse", functools.partial(original, max_positions=n))


def angles(positions, rotary_dim, base=10000.0):
    inv_freq = 1.0 / base ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    return np.outer(positions, inv_freq).astype(np.float32)  # [positions, rotary_dim / 2]


def rope_model(*, halves="slice", order="x_first", interleaved=None, rotary_dim=16, passed="slice",
               layout="bnsh", tables="computed", positions="input", scaling=1.0, table_rows=48,
               defect=None, heads=2, head=16, layers=1, rotate_cast=False):
    """y = x·cos + rotate(x)·sin on the first rotary_dim channels of x, for q and k of `layers`
    layers sharing one cos/sin computation.

    halves: "slice" | "split" (rotate_half). interleaved: None | "strided" (GPT-J) | "pairs"
    (x viewed as [..., head/2, 2], Gather) | "pair_slices" (the same, Slice keeping the axis). order: "x_first" (x·cos + rot·sin) | "sin_first"
    (sin·rot + cos·x). passed: how a partial rotary cuts x ("slice" | "split").
    layout: "bnsh" | "bsnh" | "3d" ([batch, seq, head], one head).
    tables: "computed" (positions · inv_freq by a broadcasting Mul) | "matmul" (inv_freq [1, d/2, 1]
    @ positions [B, 1, S], transposed) | "gathered" (constant tables [table_rows, rotary_dim] by
    position_ids) | "sliced" (table[:seq_len] then gathered).
    positions: "input" (position_ids [B, S]) | "range" (arange(seq) from x's shape).
    defect: None | "wrong_sign" (Concat(x2, -x1)) | "mismatched" (x1 = x[1:h+1]) | "swapped"
    (x·sin + rot·cos) | "uneven_tables" (computed tables whose halves differ) | "length_switch"
    (computed: inv_freq switched on max(positions) + 1 > 16, as LongRoPE switches factors).
    """
    g = GraphBuilder()
    ax = SEQ_AXIS[layout]
    dims = {"bnsh": ["B", heads, "S", head], "bsnh": ["B", "S", heads, head], "3d": ["B", "S", head]}[layout]
    xs = [g.input(f"x{i}", TensorProto.FLOAT, dims) for i in range(2 * layers)]
    rank = len(dims)
    if positions == "input":
        pos = g.input("position_ids", TensorProto.INT64, ["B", "S"])
    else:
        seq = g.op("Shape", xs[0], start=ax, end=ax + 1)
        pos = g.op("Range", g.const(0, np.int64), g.op("Squeeze", seq), g.const(1, np.int64))
    half = rotary_dim // 2
    pos2 = pos if positions == "input" else g.op("Unsqueeze", pos, g.const([0], np.int64))  # [1|B, S]

    def repeat(t):  # each angle for both channels of its pair
        if interleaved:
            pair = g.op("Concat", g.op("Unsqueeze", t, g.const([-1], np.int64)),
                        g.op("Unsqueeze", t, g.const([-1], np.int64)), axis=-1)
            return g.op("Reshape", pair, g.const([0, 0, -1], np.int64))
        return g.op("Concat", t, t, axis=-1)

    if tables in ("computed", "matmul"):
        inv_freq = angles([1], rotary_dim)[0]
        if defect == "length_switch":
            longest = g.op("Add", g.op("ReduceMax", pos2, keepdims=0), g.const(1, np.int64))
            inv_freq = g.op("Where", g.op("Greater", longest, g.const(16, np.int64)),
                            g.const(inv_freq / 4), g.const(inv_freq))
        else:
            inv_freq = g.const(inv_freq)
        if tables == "computed":
            freqs = g.op("Mul", g.op("Cast", g.op("Unsqueeze", pos2, g.const([-1], np.int64)),
                                     to=TensorProto.FLOAT), inv_freq)
        else:
            column = g.op("Cast", g.op("Unsqueeze", pos2, g.const([1], np.int64)), to=TensorProto.FLOAT)
            inv_freq = g.op("Unsqueeze", inv_freq, g.const([0, 2], np.int64))
            freqs = g.op("Transpose", g.op("MatMul", inv_freq, column), perm=[0, 2, 1])
        emb = repeat(freqs)
        if defect == "uneven_tables":
            emb = g.op("Concat", freqs, g.op("Mul", freqs, g.const(np.float32(1.5))), axis=-1)
        cos, sin = (g.op("Cast", g.op("Mul", g.op(f, emb), g.const(scaling)), to=TensorProto.FLOAT)
                    for f in ("Cos", "Sin"))
    else:
        theta = angles(np.arange(table_rows), rotary_dim)
        table = {"cos": np.cos(theta), "sin": np.sin(theta)}
        full = {k: np.concatenate([v, v], -1) if not interleaved else np.repeat(v, 2, -1) for k, v in table.items()}
        cos, sin = (g.const(full[k]) for k in ("cos", "sin"))
        if tables == "sliced":
            seq_len = g.op("Shape", xs[0], start=ax, end=ax + 1)
            cos, sin = (g.op("Slice", t, g.const([0], np.int64), seq_len, g.const([0], np.int64)) for t in (cos, sin))
        cos, sin = (g.op("Gather", t, pos2, axis=0) for t in (cos, sin))
    if defect == "swapped":
        cos, sin = sin, cos
    if layout != "3d":  # broadcast over the heads
        heads_axis = g.const([1 if layout == "bnsh" else 2], np.int64)
        cos, sin = g.op("Unsqueeze", cos, heads_axis), g.op("Unsqueeze", sin, heads_axis)

    def cut(x, start, end, step=1):
        return g.op("Slice", x, g.const([start], np.int64), g.const([end], np.int64),
                    g.const([-1], np.int64), g.const([step], np.int64))

    def rotate(x):
        if rotate_cast:  # ModernBERT's TorchScript export: rotate_half reads x behind a Cast to its own type
            x = g.op("Cast", x, to=TensorProto.FLOAT)
        if interleaved == "strided":
            even, odd = cut(x, 0, INT_MAX, 2), cut(x, 1, INT_MAX, 2)
        elif interleaved:
            pairs = g.op("Reshape", x, g.const([0] * (rank - 1) + [-1, 2], np.int64))
            if interleaved == "pairs":  # pairs[..., i]
                even, odd = (g.op("Gather", pairs, g.const(i, np.int64), axis=-1) for i in (0, 1))
            else:  # pairs[..., i:i+1], already stackable
                even, odd = cut(pairs, 0, 1), cut(pairs, 1, 2)
        if interleaved:
            lift = (lambda t: t) if interleaved == "pair_slices" else (
                lambda t: g.op("Unsqueeze", t, g.const([-1], np.int64)))
            stacked = g.op("Concat", lift(g.op("Neg", odd)), lift(even), axis=-1)
            return g.op("Reshape", stacked, g.const([0] * (rank - 1) + [-1], np.int64))
        if halves == "split":
            name = f"t_split{len(g.nodes)}"
            g.nodes.append(helper.make_node("Split", [x, g.const([half, half], np.int64)],
                                            [name + "_0", name + "_1"], axis=-1))
            x1, x2 = name + "_0", name + "_1"
        else:
            x1 = cut(x, 1, half + 1) if defect == "mismatched" else cut(x, 0, half)
            x2 = cut(x, half, INT_MAX)
        if defect == "wrong_sign":
            return g.op("Concat", x2, g.op("Neg", x1), axis=-1)
        return g.op("Concat", g.op("Neg", x2), x1, axis=-1)

    outputs = []
    for x in xs:
        if rotary_dim == head:
            xr = x
        elif passed == "split":
            name = f"t_parts{len(g.nodes)}"
            g.nodes.append(helper.make_node("Split", [x, g.const([rotary_dim, head - rotary_dim], np.int64)],
                                            [name + "_0", name + "_1"], axis=-1))
            xr, xp = name + "_0", name + "_1"
        else:
            xr, xp = cut(x, 0, rotary_dim), cut(x, rotary_dim, INT_MAX)
        if order == "x_first":
            y = g.op("Add", g.op("Mul", xr, cos), g.op("Mul", rotate(xr), sin))
        else:
            y = g.op("Add", g.op("Mul", sin, rotate(xr)), g.op("Mul", cos, xr))
        outputs.append(y if rotary_dim == head else g.op("Concat", y, xp, axis=-1))
    model = g.model(outputs[0])
    model.graph.output.extend(helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in outputs[1:])
    return model


def feeds_for(model, seq=5, batch=2, limit=48, rng=None):
    """x random; positions random below `limit` (an arange when a sliced table needs them < seq)."""
    rng = rng or np.random.default_rng(1)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value or {"B": batch, "S": seq}[d.dim_param] for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.INT64:
            feeds[value.name] = rng.integers(0, limit, size=dims)
            feeds[value.name][0] = np.arange(seq)
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rotary_nodes(model):
    return [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]


def attribute(node, name):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def assert_fused_and_equal(model, feeds=None, **expect):
    feeds = feeds or feeds_for(model)
    result = onnx_fuse.fuse(model, check=True, inputs=feeds)
    applications = len(model.graph.output)
    assert result.report["counts"] == {"rope": applications}, result.report["unfused"]
    assert result.report["check"]["passed"]
    nodes = rotary_nodes(result.model)
    assert len(nodes) == applications
    left = [n.op_type for n in result.model.graph.node]
    assert "Neg" not in left
    if {f["form"] for f in result.report["fused"]} == {"table"}:  # the tables became caches
        assert "Cos" not in left and "Sin" not in left
    else:  # the per-token tables are computed once for every layer
        assert left.count("Cos") <= 1 and left.count("Sin") <= 1
    for fused, original in zip(run(result.model, feeds), run(model, feeds)):
        np.testing.assert_allclose(fused, original, rtol=1e-5, atol=1e-5)
    for fused in result.report["fused"]:
        for key, value in expect.items():
            assert fused[key] == value, key
    return result


@pytest.mark.parametrize("layout", ["bnsh", "bsnh", "3d"])
@pytest.mark.parametrize("order", ["x_first", "sin_first"])
@pytest.mark.parametrize("halves", ["slice", "split"])
def test_rotate_half_in_every_order_and_layout(halves, order, layout, max_positions):
    max_positions(64)
    result = assert_fused_and_equal(rope_model(halves=halves, order=order, layout=layout),
                                    interleaved=False, rotary_dim=16, head_size=16, max_positions=64,
                                    layout=layout.replace("3d", "bsh"))
    nodes = rotary_nodes(result.model)
    assert all(attribute(n, "interleaved") == 0 and attribute(n, "rotary_embedding_dim") == 0 for n in nodes)
    # The op always gets 4-D [batch, heads, seq, head]: x as it is, transposed, or given a heads axis.
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert {producers.get(n.input[0]) for n in nodes} == {{"bnsh": None, "bsnh": "Transpose", "3d": "Unsqueeze"}[layout]}


@pytest.mark.parametrize("layout", ["bnsh", "bsnh"])
@pytest.mark.parametrize("interleaved", ["strided", "pairs", "pair_slices"])
def test_interleaved_pairs(interleaved, layout):
    result = assert_fused_and_equal(rope_model(interleaved=interleaved, layout=layout, tables="gathered"),
                                    interleaved=True, rotary_dim=16, max_positions=48)
    assert attribute(rotary_nodes(result.model)[0], "interleaved") == 1


@pytest.mark.parametrize("interleaved", [None, "strided"])
@pytest.mark.parametrize("passed", ["slice", "split"])
def test_partial_rotary_passes_the_other_channels_through(passed, interleaved):
    model = rope_model(rotary_dim=8, passed=passed, interleaved=interleaved, layout="bsnh", tables="gathered")
    result = assert_fused_and_equal(model, rotary_dim=8, head_size=16, interleaved=bool(interleaved))
    node = rotary_nodes(result.model)[0]
    assert attribute(node, "rotary_embedding_dim") == 8
    cos_cache = next(i for i in result.model.graph.initializer if i.name == node.input[1])
    assert list(cos_cache.dims) == [48, 4]  # [max_positions, rotary_dim / 2]


@pytest.mark.parametrize("tables, scaling", [("computed", 1.0), ("computed", 1.25), ("matmul", 1.0)])
def test_tables_computed_in_the_graph_fold_into_caches(tables, scaling, max_positions):
    max_positions(40)
    model = rope_model(tables=tables, scaling=scaling, rotary_dim=8, head=8)
    result = assert_fused_and_equal(model, feeds=feeds_for(model, limit=40), max_positions=40)
    node = rotary_nodes(result.model)[0]
    caches = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    theta = angles(np.arange(40), 8)
    np.testing.assert_allclose(caches[node.input[1]], scaling * np.cos(theta), atol=1e-5)
    np.testing.assert_allclose(caches[node.input[2]], scaling * np.sin(theta), atol=1e-5)


@pytest.mark.parametrize("tables", ["gathered", "sliced"])
def test_gathered_tables_give_max_positions(tables):
    model = rope_model(tables=tables, table_rows=48)
    # Positions past a table sliced to the sequence length would fail in the original too.
    assert_fused_and_equal(model, feeds=feeds_for(model, limit=5 if tables == "sliced" else 48), max_positions=48)


def test_positions_computed_in_the_graph_feed_the_op(max_positions):
    # No position_ids input: the positions are arange(seq), and the op takes those.
    max_positions(32)
    model = rope_model(positions="range")
    result = assert_fused_and_equal(model, max_positions=32)
    producers = {o: n for n in result.model.graph.node for o in n.output}
    tensor, seen = rotary_nodes(result.model)[0].input[3], []
    while tensor in producers:
        seen.append(producers[tensor].op_type)
        tensor = producers[tensor].input[0]
    assert "Range" in seen


def test_one_cache_pair_and_position_ids_for_all_layers(max_positions):
    max_positions(64)
    result = assert_fused_and_equal(rope_model(layers=3))
    nodes = rotary_nodes(result.model)
    assert len({tuple(n.input[1:]) for n in nodes}) == 1  # cos cache, sin cache, position ids
    initializers = {i.name for i in result.model.graph.initializer}
    assert set(nodes[0].input[1:3]) <= initializers


@pytest.mark.parametrize("kwargs", [dict(), dict(tables="matmul"), dict(layout="bsnh"), dict(layout="3d"),
                                    dict(interleaved="strided"), dict(rotary_dim=8), dict(positions="range")])
def test_computed_tables_with_nothing_bounding_the_positions_fuse_as_computed(kwargs):
    """No --max-positions: RotaryEmbedding takes the graph's own cos/sin per token, [B, S, R/2],
    without position ids, shared by every layer; proven on positions far beyond any table."""
    model = rope_model(layers=2, **kwargs)
    result = assert_fused_and_equal(model, feeds_for(model, limit=60_000))
    rope = [f for f in result.report["fused"] if f["rule"] == "rope"]
    assert {f["form"] for f in rope} == {"computed"} and {f["max_positions"] for f in rope} == {None}
    assert all("nothing bounds the positions" in f["form_reason"] for f in rope)
    nodes = rotary_nodes(result.model)
    assert all(len(n.input) == 3 for n in nodes)  # x, cos, sin: no position ids
    assert len({tuple(n.input[1:]) for n in nodes}) == 1


def test_computed_tables_whose_halves_differ_stay_unfused():
    model = rope_model(defect="uneven_tables")
    result = onnx_fuse.fuse(model, check=False)
    assert result.report["counts"] == {} and not result.changed
    reasons = {m["reason"] for m in result.report["unfused"]}
    assert reasons == {"the cos table's two halves differ: it does not rotate pairs of channels"}


def test_a_switch_on_the_sequence_length_keeps_the_computed_form_even_with_max_positions(max_positions):
    """LongRoPE picks its factors by the longest position: a table indexed by position would be
    wrong for short sequences, so the switch stays in the graph feeding the per-token form."""
    max_positions(64)
    model = rope_model(defect="length_switch")
    for seq in (5, 20):  # both sides of the switch
        result = assert_fused_and_equal(model, feeds_for(model, seq=seq, limit=seq))
        rope = [f for f in result.report["fused"] if f["rule"] == "rope"]
        assert {f["form"] for f in rope} == {"computed"}
        assert all("depend on the other positions" in f["form_reason"] for f in rope)


def test_max_positions_override_cannot_exceed_a_table(max_positions):
    max_positions(100)
    result = onnx_fuse.fuse(rope_model(tables="gathered", table_rows=48), check=False)
    assert result.report["counts"] == {}
    assert all("exceeds the 48 positions" in m["reason"] for m in result.report["unfused"])
    max_positions(20)  # a smaller cache than the table is allowed: the positions below 20
    model = rope_model(tables="gathered", table_rows=48)
    assert_fused_and_equal(model, feeds=feeds_for(model, limit=20), max_positions=20)


@pytest.mark.parametrize("defect, reason", [
    ("wrong_sign", "wrong sign"),
    ("mismatched", "mismatched halves"),
    ("swapped", "cos and sin are swapped"),
])
def test_near_misses_are_left_alone_with_a_reason(defect, reason):
    model = rope_model(defect=defect, tables="gathered")
    result = onnx_fuse.fuse(model, check=True, inputs=feeds_for(model))
    assert result.report["counts"] == {} and not result.changed
    assert not rotary_nodes(result.model)
    misses = result.report["unfused"]
    assert len(misses) == len(model.graph.output)
    for miss in misses:
        assert miss["pattern"] == "rope" and miss["anchor"].startswith("Neg")
        assert reason in miss["reason"], miss["reason"]


# --- the committed exports ----------------------------------------------------------------------

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
# Rotary exports onnxruntime runs (bfloat16 ones are checked widened; a known exporter bug may
# leave one that runs at no size at all).
ROTARY = sorted(n for n, t in MANIFEST.items() if t["rope_applications"]
                and (t.get("ort_cpu_runs", True) is not False or t.get("dtype") == "bfloat16"))


def all_rotary_nodes(model):
    """RotaryEmbedding nodes, those inside If/Loop/Scan bodies included."""
    found, graphs = [], [model.graph]
    while graphs:
        graph = graphs.pop()
        found += [n for n in graph.node if n.op_type == "RotaryEmbedding"]
        graphs.extend(a.g for n in graph.node for a in n.attribute if a.HasField("g"))
    return found
# The manifest does not record max_position_embeddings yet; models/export.py builds every rotary
# model with at least 64 (MAX_POS 128, S_MAX_POS 64), and the checker's positions stay below.
EXPORT_MAX_POSITIONS = 64


@pytest.mark.parametrize("name", ROTARY)
def test_every_rope_in_the_committed_models_fuses_and_checks(name, max_positions):
    truth = MANIFEST[name]
    max_positions(truth.get("max_position_embeddings", EXPORT_MAX_POSITIONS))
    native = len(all_rotary_nodes(onnx.load(os.path.join(MODELS, name))))  # the exporter's own
    result = onnx_fuse.fuse(os.path.join(MODELS, name), check=True)
    report = result.report
    assert report["counts"].get("rope", 0) == truth["rope_applications"] - native, report["unfused"]
    assert report["check"] is None or report["check"]["passed"], report["check"]["message"]
    assert len(all_rotary_nodes(result.proto)) == truth["rope_applications"]
    # Multi-head latent attention rotates a slice of its own, the qk_rope_head_dim channels.
    head = (truth.get("mla") or {}).get("qk_rope_head_dim", truth["head_size"])
    for fused in (f for f in report["fused"] if f["rule"] == "rope"):
        assert fused["head_size"] == head
        assert fused["rotary_dim"] == truth.get("rotary_dim", truth["head_size"])
        # Even/odd pairs come out interleaved, or (DeepSeek-V3) de-interleaved as halves.
        paired = fused["interleaved"] or fused.get("deinterleave", False)
        assert paired == truth.get("rope_interleaved", False)


@pytest.mark.parametrize("rope_first", [True, False])
def test_rope_and_attention_fuse_in_either_order(rope_first, max_positions, monkeypatch):
    max_positions(64)
    rules = sorted(onnx_fuse.patterns.RULES, key=lambda r: (r.name == "rope") != rope_first)
    monkeypatch.setattr(onnx_fuse.patterns, "RULES", rules)
    name = "llama-gqa_decode_eager_torchscript.onnx"
    result = onnx_fuse.fuse(os.path.join(MODELS, name), check=True)
    assert result.report["counts"] == {"attention": MANIFEST[name]["attention_cores"],
                                       "rope": MANIFEST[name]["rope_applications"]}
    assert result.report["check"]["passed"]
    # The attention's Q is a RotaryEmbedding output, whichever rule rewrote its tensor first.
    rotary_outputs = {n.output[0] for n in rotary_nodes(result.model)}
    attention = [n for n in result.model.graph.node if n.op_type == "Attention"]
    assert all(n.input[0] in rotary_outputs for n in attention)


def complex_rope_model(*, parts="halves", around=False, defect=None, heads=2, head=16):
    """(x1·c − x2·s, x2·c + x1·s) with x1, x2 the halves of x (GPT-OSS) or its even and odd
    channels (DeepSeek-V3), c and s one angle per pair computed from position_ids; `around`
    puts the rotation inside a longer Concat after a pass-through tensor (TorchScript's MLA).
    defect "plus": the real part written x1·c + x2·s (not a rotation); "cos_twice": the real
    part x1·c − x2·c."""
    g = GraphBuilder()
    x = g.input("x", TensorProto.FLOAT, ["B", heads, "S", head])
    pos = g.input("position_ids", TensorProto.INT64, ["B", "S"])
    freqs = g.op("Mul", g.op("Cast", g.op("Unsqueeze", pos, g.const([-1], np.int64)), to=TensorProto.FLOAT),
                 g.const(angles([1], head)[0]))  # [B, S, head/2]
    c, s = (g.op("Unsqueeze", g.op(f, freqs), g.const([1], np.int64)) for f in ("Cos", "Sin"))

    def cut(start, end, step):
        return g.op("Slice", x, g.const([start], np.int64), g.const([end], np.int64), g.const([-1], np.int64),
                    g.const([step], np.int64))

    x1, x2 = (cut(0, head // 2, 1), cut(head // 2, INT_MAX, 1)) if parts == "halves" \
        else (cut(0, INT_MAX, 2), cut(1, INT_MAX, 2))
    real = g.op("Add" if defect == "plus" else "Sub", g.op("Mul", x1, c),
                g.op("Mul", x2, c if defect == "cos_twice" else s))
    imag = g.op("Add", g.op("Mul", x2, c), g.op("Mul", x1, s))
    if around:
        passed = g.input("passed", TensorProto.FLOAT, ["B", heads, "S", 4])
        return g.model(g.op("Concat", passed, real, imag, axis=-1))
    return g.model(g.op("Concat", real, imag, axis=-1))


def test_rotate_half_of_x_behind_a_cast_to_its_own_type():
    assert_fused_and_equal(rope_model(rotate_cast=True))


@pytest.mark.parametrize("parts, around", [("halves", False), ("strided", False), ("strided", True)])
def test_rotation_written_as_a_complex_product_fuses(parts, around):
    model = complex_rope_model(parts=parts, around=around)
    result = assert_fused_and_equal(model, feeds_for(model, limit=5000))
    (fused,) = result.report["fused"]
    assert fused.get("deinterleave", False) == (parts == "strided")


def test_a_complex_product_that_is_not_a_rotation_stays_unfused():
    model = complex_rope_model(defect="plus")
    result = onnx_fuse.fuse(model, check=False)
    assert result.report["counts"] == {} and not result.changed
    assert result.report["unfused"] == []  # x1·c + x2·s has no Sub: not even a candidate
    result = onnx_fuse.fuse(complex_rope_model(parts="strided", defect="cos_twice"), check=False)
    assert result.report["counts"] == {} and not result.changed
    (miss,) = result.report["unfused"]
    assert miss["pattern"] == "rope" and "must be the same tensor" in miss["reason"], miss
