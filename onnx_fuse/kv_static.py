"""Growing KV caches → fixed-size caches (`fuse --kv-cache static --max-cache-len N`).

A decode model whose caches grow (`present = Concat(past, new)` along the sequence axis) is
rewritten to the interface TensorRT's IKVCacheUpdateLayer needs:

- per layer, K and V cache inputs [B, N_kv, N, H] of static length N, and the updated caches as
  outputs [B, N_kv, N, H], each paired with its input (metadata_props "onnx_fuse.kv_cache.pairs"
  and the report);
- `write_position` INT64 [B]: the slot where row b's first new token goes (its valid length);
- `attention_mask` [B, N] over the cache slots: 1 where a slot holds a valid token of the row,
  the tokens written by this step included (Hugging Face's convention, over slots);
- the writes are TensorScatter(past, new, write_position) (axis -2, linear); every Attention reads
  the whole fixed cache with a boolean mask [B, 1, S, N]: slot j is visible from new token t iff
  attention_mask[b, j] = 1 and j <= write_position[b] + t (lower-right causal within the new
  tokens), and j > write_position[b] + t - W for a layer with a sliding window W. TensorRT's parser
  rejects Attention's past_key/past_value/nonpad_kv_seqlen, so validity is all in the mask;
- positions (RoPE position_ids, learned position embeddings) are write_position[b] + t.

How: the model is fused as usual first (attention cores into Attention, RoPE into
RotaryEmbedding with max_positions N) and checked against the original (api.py composes the two
steps; this module reads the pass's typed results). Each Attention's mask class, proven by the
pass (masks.py), must be causal (+ sliding window W) and padding, for which a template over the
fixed cache is emitted. Every integer tensor that evaluates to past_length + arange(S) in the
fused model (at two sizes whose key length reaches N - 1) is a position: the ones that feed
RotaryEmbedding or a Gather from a constant table (position embeddings) are re-pointed to
write_position + arange(S); any other use left alive is an error.

Proof (`check_static`): the original and the converted model are driven through 8 single-token
decode steps after a non-empty past, at batch 2 with rows of different valid lengths, in two
scenarios: "ragged" (row b holds L_b tokens in slots 0..L_b-1, written at write_position L_b + k;
the original runs each row on its own, batch 1, with its own growing past) and "left-padded" (the
original's own batch-2 run with a left-padded row; the converted cache mirrors its layout). Logits
are compared at every step, and so is the valid part of every cache; the slots past the valid
part must come back untouched.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from .check import ModelRef, compare_output, input_specs, run_model, run_session, session_for
from .errors import BadInput, CheckFailed
from .graph import FreshNames
from .opset import OpsetError, default_opset, raise_opset
from .result import FuseResult
from .rewrite import tidy
from .specs import AttentionSpec

STEPS = 8  # single-token decode steps the check drives
WRITE_POSITION = "write_position"


@dataclass
class Layout:
    """What the conversion found in the original model's interface."""

    pairs: list[tuple[str, str]]  # (past input, present output) per cache
    ids: str  # token ids input [B, S]
    mask: str  # attention mask input [B, past + S]
    vocab: int  # rows of the table the ids index
    batch_dim: int | str
    cache_dims: dict[str, tuple]  # past input -> (kv_heads, head_size)
    dtypes: dict[str, np.dtype] = field(default_factory=dict)  # input name -> numpy dtype


# --------------------------------------------------------------------------- the interface


def find_layout(model: onnx.ModelProto) -> Layout:
    """The caches that grow by Concat and the other inputs; BadInput (one line) when the model has
    no recognisable cache, a layout TensorScatter cannot express, or inputs this does not handle."""
    graph = model.graph
    initialized = {t.name for t in graph.initializer}
    inputs = {v.name: v for v in graph.input if v.name not in initialized}
    producer = {o: n for n in graph.node for o in n.output}
    pairs, cache_dims = [], {}
    for output in graph.output:
        node = producer.get(output.name)
        while node is not None and _passes_through(node, inputs, producer):
            node = producer.get(node.input[0])  # a Cast to the cache's own type, an Identity
        if node is None or node.op_type != "Concat" or len(node.input) != 2 or node.input[0] not in inputs:
            continue
        past = inputs[node.input[0]]
        dims = past.type.tensor_type.shape.dim
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        if len(dims) != 4:
            raise BadInput(f"cache '{past.name}' is {len(dims)}-D: TensorScatter takes 4-D caches "
                           "[batch, kv_heads, sequence, head_size]")
        if axis is None or axis % 4 != 2:
            raise BadInput(f"'{output.name}' grows its cache along axis {axis}: TensorScatter writes "
                           "along axis -2 of [batch, kv_heads, sequence, head_size]")
        if not (dims[1].HasField("dim_value") and dims[3].HasField("dim_value")):
            raise BadInput(f"cache '{past.name}' has no static kv_heads and head_size (axes 1 and 3)")
        pairs.append((past.name, output.name))
        cache_dims[past.name] = (dims[1].dim_value, dims[3].dim_value)
    if not pairs:
        raise BadInput("no recognisable KV cache: no output is Concat(past input, new keys/values) "
                       "along the sequence axis")
    specs = {s.name: s for s in input_specs(model)}
    ids = [s for s in specs.values() if s.kind == "ids"]
    masks = [s for s in specs.values() if s.kind == "mask"]
    caches = {p for p, _ in pairs}
    others = [n for n in specs if n not in caches and n not in {s.name for s in ids + masks}]
    if len(ids) != 1 or len(masks) != 1 or others:
        what = f"input '{others[0]}'" if others else f"{len(ids)} token-id and {len(masks)} mask inputs"
        raise BadInput(f"--kv-cache static takes decode models whose inputs are the token ids, the "
                       f"attention mask and the caches; found {what}")
    ids_dims = specs[ids[0].name].dims
    return Layout(pairs=pairs, ids=ids[0].name, mask=masks[0].name, vocab=int(ids[0].table_rows),
                  batch_dim=ids_dims[0], cache_dims=cache_dims,
                  dtypes={s.name: s.dtype for s in specs.values()})


def _passes_through(node: onnx.NodeProto, inputs: dict, producer: dict) -> bool:
    """Identity, or a Cast to the type its input already has (GPT-J's TorchScript export casts
    the concatenated cache to float32 again)."""
    if node.op_type == "Identity":
        return True
    if node.op_type != "Cast":
        return False
    source = producer.get(node.input[0])
    past = inputs.get(source.input[0]) if source is not None and source.input else None
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return past is not None and to == past.type.tensor_type.elem_type


def minimum_cache_len(check: bool) -> tuple[int, str]:
    """The smallest N this model can be converted (and, checking, verified) at."""
    if check:
        return STEPS + 2, f"a past of 2 tokens and the {STEPS} decode steps the check drives"
    return 2, "a non-empty past and one new token"


# --------------------------------------------------------------------------- the steps


def plan(source, cache_len: int, check: bool) -> Layout:
    """The model's cache layout, once the length asked for is known to be enough."""
    layout = find_layout(source.model)
    needed, why = minimum_cache_len(check)
    if cache_len < needed:
        raise BadInput(f"--max-cache-len {cache_len} is smaller than the model needs: at least "
                       f"{needed} slots ({why})")
    return layout


def make_static(source, fused: FuseResult, target, layout: Layout, cache_len: int,
                check: bool) -> FuseResult:
    """The fused model with its growing caches turned into fixed caches of `cache_len` slots,
    checked over decode steps against the source."""
    started = time.perf_counter()
    form = target.static_form() or StandardForm()
    windows = attention_windows(fused, form.attention_op)
    try:
        model24 = raise_opset(fused.model, 24) if default_opset(fused.model) < 24 else fused.model
    except OpsetError as exc:
        raise BadInput(f"cannot raise the fused model to opset 24 for TensorScatter: {exc}") from None
    static, section = convert(model24, layout, cache_len, source.base_dir, windows, form)
    report = _report(fused.report, layout, section, cache_len)
    report["tensorrt"] = target.contract(static)
    result = FuseResult(static, report, source.base_dir, True, source.path, fused.fused, fused.unfused)
    if check:
        outcome = check_static(ModelRef(source.model, source.base_dir),
                               ModelRef(static, source.base_dir), layout, cache_len,
                               scenarios=form.scenarios)
        outcome["fused"] = fused.report.get("check")  # the single-step proof of the fusions
        report["check"] = outcome
        if not outcome["passed"]:
            raise CheckFailed(f"the static-cache model does not match the input model: "
                              f"{outcome['message']}", outcome)
    report["seconds"] = round(fused.report["seconds"] + time.perf_counter() - started, 3)
    return result


def attention_windows(fused: FuseResult, op: str = "Attention") -> dict[str, int | None]:
    """Each fused Attention node's sliding window (None: causal only), from the mask class the
    pass proved for it; BadInput where that mask is not causal (+ a window) and padding, which
    is all a mask over the fixed cache expresses."""
    ops = {n.name: n.op_type for n in fused.model.graph.node}
    leftover = [n.name for n in fused.model.graph.node if n.op_type == "Softmax"]
    if op not in ops.values() or leftover:
        where = f" (Softmax '{leftover[0]}' remains)" if leftover else ""
        raise BadInput(f"not every attention core was fused into {op}" + where +
                       ": --kv-cache static re-masks fused attention only")
    windows = {}
    for fusion, spec in fused.specs(AttentionSpec):
        (name,) = [n for n in fusion.nodes if ops.get(n) == op]
        klass = spec.mask.klass if spec.mask is not None and spec.mask.bias is None else None
        if klass is None:
            raise BadInput(f"Attention '{name}' has no mask to re-express over the fixed cache")
        if klass.kind not in ("causal_padding", "sliding_window") or not klass.padding \
                or klass.alignment != "lower_right":
            raise BadInput(f"the mask of Attention '{name}' is {klass.kind}, not causal (+ a sliding "
                           "window) and padding: it cannot be re-expressed over a fixed cache")
        windows[name] = klass.window
    return windows


def _report(fused: dict, layout: Layout, section: dict, cache_len: int) -> dict:
    report = dict(fused)
    report["counts"] = {**report["counts"], "kv_cache": len(layout.pairs)}
    report["opset"] = {**report["opset"], "to": 24}
    report["kv_cache"] = section
    report["fused"] = list(report["fused"]) + [
        {"rule": "kv_cache", "anchor": anchor, "form": "concat", "mode": "static", "past": past,
         "present": present, "cache_len": cache_len, "write_index": section["write_position"]}
        for (past, present), anchor in zip(layout.pairs, section.pop("anchors"))]
    return report


# --------------------------------------------------------------------------- conversion


class StandardForm:
    """How the fixed caches are written and read in standard ops: TensorScatter writes, every
    Attention over the whole cache with a boolean mask over the slots (holes allowed). Targets
    with a form of their own (Target.static_form) override it."""

    attention_op = "Attention"
    write_op = "TensorScatter"
    scenarios = ("ragged", "left_padded")  # what check_static drives
    valid_slots = "1 = the slot holds a valid token (this step's included)"

    def remask(self, conversion: _Conversion, attention: gs.Node, window: int | None) -> None:
        attention.inputs[3] = conversion.mask(window)

    def write(self, conversion: _Conversion, concat: gs.Node) -> None:
        """Turn Concat(past, new) into the write of `new` into `past` at write_position."""
        concat.op, concat.attrs = "TensorScatter", {"axis": -2, "mode": "linear"}
        concat.inputs.append(conversion.write)  # (past, new, write_position)

    def functions(self) -> list[onnx.FunctionProto]:
        """Model-local functions the written nodes call."""
        return []


def convert(model: onnx.ModelProto, layout: Layout, cache_len: int, base_dir: str | None,
            windows: dict[str, int | None], form: StandardForm = StandardForm()):
    """The fused model (opset 24) with fixed caches; returns it and the report's section."""
    positions, tables, position_users = _positions(model, layout, cache_len, base_dir)
    rewrite = _Conversion(model, layout, cache_len, form)
    layers = rewrite.masks(windows)
    anchors = rewrite.writes()
    repointed = rewrite.repoint(positions)
    tidy(rewrite.g)
    _require_gone(rewrite.g, layout, rewrite.tensors, position_users)
    out = rewrite.export()
    section = {
        "mode": "static", "max_cache_len": cache_len, "pairs": rewrite.pairs,
        "write_position": rewrite.write.name,
        "attention_mask": f"{layout.mask} [batch, {cache_len}]: {form.valid_slots}",
        "layers": layers, "positions": repointed, "position_tables": tables, "anchors": anchors,
    }
    return out, section


class _Conversion:
    """The fused model's graph, rewritten to the fixed-cache interface step by step."""

    def __init__(self, model: onnx.ModelProto, layout: Layout, cache_len: int, form: StandardForm):
        self.model, self.layout, self.cache_len, self.form = model, layout, cache_len, form
        self.g = gs.import_onnx(model)
        self.tensors = self.g.tensors()
        self.names = FreshNames(model.graph)
        self.pairs = {present: past for past, present in layout.pairs}
        batch = layout.batch_dim
        self.write = gs.Variable(self.names(WRITE_POSITION), np.int64, [batch])
        self.g.inputs.append(self.write)
        self.tensors[layout.mask].shape = [batch, cache_len]
        for past, present in layout.pairs:
            heads, head = layout.cache_dims[past]
            self.tensors[past].shape = [batch, heads, cache_len, head]
            self.tensors[present].shape = [batch, heads, cache_len, head]
        self.query = self._query_positions()
        self._visible = self._visibility()
        self._masks: dict = {}

    def node(self, op, inputs, attrs=None, dtype=None, shape=None):
        out = gs.Variable(self.names(f"kv_static/{op}_out"), dtype, shape)
        self.g.nodes.append(gs.Node(op, self.names(f"kv_static/{op}"), attrs or {}, inputs, [out]))
        return out

    def const(self, prefix, value):
        return gs.Constant(self.names(f"kv_static/{prefix}"), np.asarray(value))

    def _axis(self, name: str, axis: int):
        return self.const(name, np.array([axis], np.int64))

    def _query_positions(self):
        """[B, S]: write_position[b] + t, the slot (and position) of row b's new token t."""
        seq = self.node("Shape", [self.tensors[self.layout.ids]], {"start": 1, "end": 2}, np.int64, [1])
        seq = self.node("Squeeze", [seq, self._axis("axis0", 0)], dtype=np.int64, shape=[])
        steps = self.node("Range", [self.const("zero", np.array(0, np.int64)), seq,
                                    self.const("one", np.array(1, np.int64))], dtype=np.int64, shape=["S"])
        rows = self.node("Unsqueeze", [self.write, self._axis("axis1", 1)], dtype=np.int64)
        cols = self.node("Unsqueeze", [steps, self._axis("axis0", 0)], dtype=np.int64)
        return self.node("Add", [rows, cols], dtype=np.int64, shape=[self.layout.batch_dim, None])

    def _visibility(self):
        """[B, S, N]: a valid slot, at or before the query's own slot."""
        self._slots = self.const("slots", np.arange(self.cache_len, dtype=np.int64).reshape(1, 1, -1))
        self._query_col = self.node("Unsqueeze", [self.query, self._axis("axis2", 2)], dtype=np.int64)
        causal = self.node("LessOrEqual", [self._slots, self._query_col], dtype=np.bool_)
        flags = self.node("Cast", [self.tensors[self.layout.mask]], {"to": TensorProto.BOOL}, np.bool_)
        valid = self.node("Unsqueeze", [flags, self._axis("axis1", 1)], dtype=np.bool_)
        return self.node("And", [causal, valid], dtype=np.bool_)

    def mask(self, window):
        """[B, 1, S, N] boolean, with the sliding window W: slot j > query - W."""
        if window not in self._masks:
            shown = self._visible
            if window is not None:
                start = self.node("Sub", [self._query_col, self.const("window", np.array(window, np.int64))],
                                  dtype=np.int64)
                inside = self.node("Greater", [self._slots, start], dtype=np.bool_)
                shown = self.node("And", [shown, inside], dtype=np.bool_)
            self._masks[window] = self.node("Unsqueeze", [shown, self._axis("axis1", 1)], dtype=np.bool_,
                                            shape=[self.layout.batch_dim, 1, None, self.cache_len])
        return self._masks[window]

    def masks(self, windows: dict[str, int | None]) -> list[dict]:
        """Every Attention reads the whole fixed cache through the mask of its window."""
        layers = []
        for attention in (n for n in self.g.nodes if n.op == self.form.attention_op):
            if attention.name not in windows:
                raise BadInput(f"Attention '{attention.name}' was not fused by this pass: "
                               "its mask is not proven")
            self.form.remask(self, attention, windows[attention.name])
            layers.append({"attention": attention.name, "window": windows[attention.name]})
        return layers

    def writes(self) -> list[str]:
        """Each Concat(past, new) becomes the form's write of new into past at write_position
        (TensorScatter) writing the present output itself (no-op Casts after it dropped), as
        TensorRT's in-place update wants."""
        anchors = []
        for past, present in self.layout.pairs:
            concat, chain = self.tensors[present].inputs[0], []
            while concat.op != "Concat":  # no-op Casts / Identity (find_layout checked them)
                chain.append(concat)
                concat = concat.inputs[0].inputs[0]
            anchors.append(f"Concat '{concat.name}'")
            self.form.write(self, concat)
            concat.name = self.names(f"kv_static/{self.form.write_op}")
            if chain:
                self._drop(chain, concat, self.tensors[present])
        return anchors

    @staticmethod
    def _drop(chain: list, scatter, target) -> None:
        between = [scatter.outputs[0]] + [hop.outputs[0] for hop in chain[1:]]
        for hop in chain:
            hop.inputs.clear()
            hop.outputs.clear()
        for tensor in between:
            for user in list(tensor.outputs):
                for i, t in enumerate(user.inputs):
                    if t is tensor:
                        user.inputs[i] = target
        scatter.outputs[0] = target

    def repoint(self, positions: list[tuple[str, int]]) -> list[str]:
        """The position readers read write_position + t (in the type they read)."""
        repointed = []
        for node_name, index in positions:
            user = next(n for n in self.g.nodes if n.name == node_name)
            wanted = user.inputs[index].dtype
            ids = self.query
            if wanted is not None and np.dtype(wanted) != np.int64:
                ids = self.node("Cast", [self.query], {"to": helper.np_dtype_to_tensor_dtype(np.dtype(wanted))},
                                dtype=wanted)
            user.inputs[index] = ids
            repointed.append(f"{user.op} '{user.name}'")
        return repointed

    def export(self) -> onnx.ModelProto:
        """The graph as a model with the source's metadata, the cache pairs recorded."""
        model, out = self.model, gs.export_onnx(self.g, do_type_check=False)
        for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
            setattr(out, name, getattr(model, name))
        del out.opset_import[:]
        out.opset_import.extend(model.opset_import)
        del out.functions[:]
        out.functions.extend(model.functions)
        present = {(f.domain, f.name) for f in model.functions}
        out.functions.extend(f for f in self.form.functions() if (f.domain, f.name) not in present)
        meta = {"onnx_fuse.kv_cache.pairs": json.dumps(self.pairs),
                "onnx_fuse.kv_cache.max_cache_len": str(self.cache_len),
                "onnx_fuse.kv_cache.write_position": self.write.name,
                "onnx_fuse.kv_cache.attention_mask": self.layout.mask}
        kept = [p for p in model.metadata_props if p.key not in meta]
        del out.metadata_props[:]
        out.metadata_props.extend(kept)
        for key, value in meta.items():
            entry = out.metadata_props.add()
            entry.key, entry.value = key, value
        for n in out.graph.node:
            if n.op_type == self.form.write_op and n.name.startswith("kv_static/"):
                n.doc_string = "onnx-fuse rule: kv_cache (--kv-cache static)"
                entry = n.metadata_props.add()
                entry.key, entry.value = "onnx_fuse.rule", "kv_cache"
        for value in out.graph.value_info:  # stale lengths (past + S) from before the conversion
            if value.name in self.pairs or value.name in self.pairs.values():
                value.type.tensor_type.shape.dim[2].Clear()
                value.type.tensor_type.shape.dim[2].dim_value = self.cache_len
        return out


def _require_gone(g: gs.Graph, layout: Layout, tensors: dict, position_users: set[str]) -> None:
    """After the rewrite nothing may still read the old meaning of the mask (over past + S
    positions) or of the positions (past length + arange(S))."""
    other = next((n for n in tensors[layout.mask].outputs
                  if not n.name.startswith("kv_static/") and not _reads_batch_only(n)), None)
    if other is not None:
        raise BadInput(f"the attention mask is also read by {other.op} '{other.name}', which "
                       "--kv-cache static cannot give the mask over cache slots")
    other = next((n for n in g.nodes if n.name in position_users), None)
    if other is not None:
        raise BadInput(f"the positions feed {other.op} '{other.name}', which --kv-cache static "
                       "cannot re-point to the write positions")


def _reads_batch_only(node: gs.Node) -> bool:
    """Shape(mask)[0:1]: the batch size, which the mask over slots still has."""
    if node.op != "Shape":
        return False
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return start in (0, -2) and end in (1, -1)


# --------------------------------------------------------------------------- positions


def _positions(model: onnx.ModelProto, layout: Layout, cache_len: int, base_dir: str | None):
    """The (node, input index) of every position use to re-point, the position tables as
    {name: rows}, and the names of position readers it cannot re-point. Positions are the
    integer tensors that evaluate to past + arange(S) in the fused model at two sizes whose key
    length reaches cache_len - 1."""
    constants = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            constants[n.output[0]] = None
    candidates, runs = _evaluate_integers(model, layout, cache_len, base_dir, constants)
    valued = {name for name in candidates
              if all(_is_positions(out.get(name), seq, past) for seq, past, out in runs)}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    repoint, tables, unhandled = [], {}, []
    for name in valued:
        for user, index in consumers.get(name, []):
            if user.op_type == "RotaryEmbedding" and index == 3:
                repoint.append((user.name, index))
            elif user.op_type == "Gather" and index == 1 and user.input[0] in constants:
                repoint.append((user.name, index))
                rows = constants[user.input[0]]
                if rows is not None:
                    tables[user.input[0]] = rows[0]
            elif not all(o in valued for o in user.output) and user.op_type not in ("Shape", "Size"):
                unhandled.append(user)
    for table, rows in tables.items():
        if cache_len > rows:
            raise BadInput(f"--max-cache-len {cache_len} exceeds the {rows} positions of the model's "
                           f"position table '{table}'")
    return sorted(set(repoint)), tables, {u.name for u in unhandled}


def _evaluate_integers(model: onnx.ModelProto, layout: Layout, cache_len: int, base_dir: str | None,
                       constants: dict):
    """The computed integer tensors of the model, and their values at the two probe sizes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    integers = {TensorProto.INT64, TensorProto.INT32}
    candidates = [name for n in model.graph.node for name in n.output
                  if types.get(name) in integers and name not in constants]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(candidates):
        if name not in existing:
            probe.graph.output.add().name = name
    ref = ModelRef(probe, base_dir)
    runs, rng = [], np.random.default_rng(1)
    for seq, past in [(1, cache_len - 1), (3, max(1, cache_len - 4))]:
        feeds, _ = _probe_inputs(layout, 2, seq, past, rng)
        try:
            runs.append((seq, past, run_model(ref, feeds)))
        except Exception as exc:  # onnxruntime raises many unrelated exception types
            error = " ".join(str(exc).split())[:200]
            try:  # does it run with a short past? Then the cache is longer than the model allows
                run_model(ref, _probe_inputs(layout, 2, 1, 2, rng)[0])
            except Exception:
                raise BadInput(f"the fused model does not run: {error}") from None
            raise BadInput(f"--max-cache-len {cache_len} is more than the model supports: it does "
                           f"not run with {past + seq} positions ({error})") from None
    return candidates, runs


def _probe_inputs(layout: Layout, batch: int, seq: int, past: int, rng):
    """Inputs of the original interface: a left-padded second row (2 slots) when the past allows."""
    feeds = {layout.ids: rng.integers(0, layout.vocab, (batch, seq)).astype(layout.dtypes[layout.ids])}
    am = np.ones((batch, past + seq), dtype=np.int64)
    am[1, :min(2, past - 1) if past > 1 else 0] = 0
    feeds[layout.mask] = am.astype(layout.dtypes[layout.mask])
    for name, _ in layout.pairs:
        heads, head = layout.cache_dims[name]
        feeds[name] = rng.standard_normal((batch, heads, past, head)).astype(layout.dtypes[name])
    return feeds, am


def _is_positions(value, seq: int, past: int) -> bool:
    if value is None:
        return False
    value = np.asarray(value)
    if value.ndim not in (1, 2) or value.shape[-1] != seq or not np.issubdtype(value.dtype, np.integer):
        return False
    return bool(np.all(value.reshape(-1, seq) == np.arange(past, past + seq)))


# --------------------------------------------------------------------------- the proof


def check_static(original, converted, layout: Layout, cache_len: int, *, steps: int = STEPS,
                 seed: int = 0, scenarios: tuple[str, ...] = StandardForm.scenarios) -> dict:
    """Drive the original (growing past) and the converted model (fixed cache) through `steps`
    single-token decode steps after a non-empty past, batch 2, rows of different valid lengths;
    compare the logits (every non-cache output) at every step and the valid part of every cache.
    `scenarios`: "ragged" and/or "left_padded" (holes in the valid slots, for forms that allow
    them). Returns the report's `check`: {passed, outputs: {name: {max_abs, max_rel, passed}},
    message, steps, scenarios}."""
    longest = min(4, cache_len - steps)
    if longest < 2:
        raise BadInput(f"--max-cache-len {cache_len} leaves no room for a past of 2 and {steps} steps")
    lengths = [longest, max(1, longest - 2)]
    drive = _Decode(original, converted, layout, cache_len, seed)
    driven = {"ragged": {"valid_lengths": lengths, "first_write_positions": lengths},
              "left_padded": {"past": longest, "padding": [0, 2]}}
    driven = {name: driven[name] for name in scenarios}
    try:
        if "ragged" in driven:
            drive.ragged(lengths, steps)
        if "left_padded" in driven:
            drive.left_padded(longest, steps)
    except Exception as exc:  # a model that fails to run fails the check
        if isinstance(exc, BadInput):
            raise
        drive.problems.append(f"a model failed to run: {' '.join(str(exc).split())[:300]}")
    problems = drive.problems
    outputs = {name: {"max_abs": float(a), "max_rel": float(r), "passed": bool(p)}
               for name, (a, r, p) in drive.stats.items()}
    what = [f"ragged rows of {lengths[0]} and {lengths[1]} tokens"] * ("ragged" in driven)
    what += ["a left-padded batch"] * ("left_padded" in driven)
    message = (f"{steps} decode steps agree (batch 2, {', and '.join(what)})" if not problems
               else problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return {"passed": not problems, "outputs": outputs, "message": message, "steps": steps,
            "scenarios": driven}


class _Decode:
    """The two models driven side by side through decode steps, differences recorded."""

    def __init__(self, original, converted, layout: Layout, cache_len: int, seed: int):
        self.ref, self.cand = session_for(original), session_for(converted)
        self.write = _meta(converted.model, "onnx_fuse.kv_cache.write_position") or WRITE_POSITION
        self.layout, self.cache_len = layout, cache_len
        self.presents = {present for _, present in layout.pairs}
        self.rng = np.random.default_rng(seed)
        self.stats: dict[str, list] = {}
        self.problems: list[str] = []

    def record(self, name, actual, expected, where) -> None:
        diff, problem = compare_output(actual, expected)
        entry = self.stats.setdefault(name, [0.0, 0.0, True])
        entry[0], entry[1] = max(entry[0], diff.max_abs), max(entry[1], diff.max_rel)
        entry[2] = entry[2] and diff.passed
        if problem:
            self.problems.append(f"{where}: '{name}' differs: {problem}")

    def caches(self, batch: int, length: int) -> dict:
        layout = self.layout
        return {name: self.rng.standard_normal((batch, *_kv(layout, name, length))).astype(layout.dtypes[name])
                for name, _ in layout.pairs}

    def ids(self):
        return self.rng.integers(0, self.layout.vocab, (2, 1)).astype(self.layout.dtypes[self.layout.ids])

    def ragged(self, lengths: list[int], steps: int) -> None:
        """Row b holds lengths[b] tokens in the fixed cache; the original runs each row alone
        (batch 1) with its own growing past."""
        layout = self.layout
        pasts = [self.caches(1, length) for length in lengths]
        fixed = self.caches(2, self.cache_len)
        for b, length in enumerate(lengths):
            for name in fixed:
                fixed[name][b, :, :length] = pasts[b][name][0]
        for step in range(steps):
            ids = self.ids()
            outs = [run_session(self.ref, {layout.ids: ids[b:b + 1], **pasts[b],
                                           layout.mask: np.ones((1, length + step + 1), layout.dtypes[layout.mask])})
                    for b, length in enumerate(lengths)]
            am = np.zeros((2, self.cache_len), layout.dtypes[layout.mask])
            for b, length in enumerate(lengths):
                am[b, :length + step + 1] = 1
            got = run_session(self.cand, {layout.ids: ids, layout.mask: am, **fixed,
                                          self.write: np.array([n + step for n in lengths], np.int64)})
            for b, length in enumerate(lengths):
                self._compare_row(got, outs[b], fixed, b, length + step + 1, f"ragged step {step + 1}, row {b}")
                pasts[b] = {past: outs[b][present] for past, present in layout.pairs}
            fixed = {past: got[present] for past, present in layout.pairs}

    def _compare_row(self, got: dict, expected: dict, fixed: dict, b: int, valid: int, where: str) -> None:
        for name, value in expected.items():
            cut = got[name][b:b + 1, :, :valid] if name in self.presents else got[name][b:b + 1]
            self.record(name, cut, value, where)
        for past, present in self.layout.pairs:
            if not np.array_equal(got[present][b, :, valid:], fixed[past][b, :, valid:]):
                self.problems.append(f"{where}: '{present}' changed slots past the valid {valid}")

    def left_padded(self, start: int, steps: int) -> None:
        """The original's own batch-2 run with row 1 left-padded by 2, mirrored slot for slot."""
        layout = self.layout
        past = self.caches(2, start)
        fixed = self.caches(2, self.cache_len)
        for name in fixed:
            fixed[name][:, :, :start] = past[name]
        am_orig = np.ones((2, start), layout.dtypes[layout.mask])
        am_orig[1, :2] = 0
        for step in range(steps):
            ids = self.ids()
            am_orig = np.concatenate([am_orig, np.ones((2, 1), am_orig.dtype)], axis=1)
            expected = run_session(self.ref, {layout.ids: ids, layout.mask: am_orig, **past})
            am = np.zeros((2, self.cache_len), layout.dtypes[layout.mask])
            am[:, :am_orig.shape[1]] = am_orig
            position = start + step
            got = run_session(self.cand, {layout.ids: ids, layout.mask: am, **fixed,
                                          self.write: np.array([position, position], np.int64)})
            for name, value in expected.items():
                cut = got[name][:, :, :position + 1] if name in self.presents else got[name]
                self.record(name, cut, value, f"left-padded step {step + 1}")
            past = {p: expected[q] for p, q in layout.pairs}
            fixed = {p: got[q] for p, q in layout.pairs}


def _kv(layout: Layout, name: str, length: int) -> tuple:
    heads, head = layout.cache_dims[name]
    return heads, length, head


def _meta(model: onnx.ModelProto, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)
