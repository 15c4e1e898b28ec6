"""Growing KV caches → fixed-size caches (`fuse --kv-cache static --max-cache-len N`).

A decode model whose caches grow (`present = Concat(past, new)` along the sequence axis, or a
window Slice of it: kv_layout.py) is rewritten to the interface TensorRT's IKVCacheUpdateLayer
needs:

- per layer, K and V cache inputs [B, N_kv, N, H] of static length N, and the updated caches as
  outputs [B, N_kv, N, H], each paired with its input (metadata_props "onnx_fuse.kv_cache.pairs"
  and the report);
- `write_position` INT64 [B]: the slot where row b's first new token goes (its valid length);
- `attention_mask` [B, N] over the cache slots: 1 where a slot holds a valid token of the row,
  the tokens written by this step included (Hugging Face's convention, over slots). A model
  without a mask input gets none: row b's valid slots are 0 .. write_position[b] + S - 1;
- the writes are TensorScatter(past, new, write_position) (axis -2, linear); every attention that
  reads a cache reads the whole fixed cache with a boolean mask [B, 1, S, N]: slot j is visible
  from new token t iff attention_mask[b, j] = 1 and j <= write_position[b] + t (lower-right causal
  within the new tokens), and j > write_position[b] + t - W for a layer with a sliding window W.
  TensorRT's parser rejects Attention's past_key/past_value/nonpad_kv_seqlen, so validity is all
  in the mask. Cross-attention (K/V from an encoder's states) stays as it is;
- positions are write_position[b] + t wherever the graph reads them (kv_positions.py); what the
  graph derives from the past's shape otherwise (a Reshape to past + S keys) reads a past length
  of N - S, so that past + S is the N slots attention now reads;
- every other input passes through with its meaning (position ids, an encoder's states and mask).

Sliding-window caches (Hugging Face's DynamicSlidingWindowLayer, the present keeping the last
W - 1 tokens) become linear caches of N slots with the window in the mask, like the models whose
caches grow and whose masks carry the window: TensorRT's cache update has only the linear mode,
the models that mix window and full layers need one interface for both, and a ring of W slots
would be overwritten within a step of more than one token. The cost: N slots per layer where W
would do for generations longer than N.

Caches already of fixed size (Hugging Face's StaticCache: a scatter into the past) keep their
interface (cache_position, a mask over the slots); the pass writes them with TensorScatter and
the multi-step check drives both models over the same fixed cache.

How: the model is fused as usual first (attention cores into Attention, RoPE into
RotaryEmbedding with max_positions N) and checked against the original (api.py composes the two
steps; this module reads the pass's typed results). Each cache-reading attention's mask class,
proven by the pass (masks.py), must be causal (+ sliding window W) and padding (causal alone for
a model without a mask input). Proof: kv_check.check_static, the multi-step check.

That is the standard form; a target's own (Target.static_form, a StandardForm) writes the same
interface with its ops: trt11's and trt-plugin's write and read with their plugins, ort's
GroupQueryAttention takes the fixed cache as its past and present itself (a cache writer: the
pass left no Concat to turn into a write) in one buffer the caller shares between them, which
the written model's metadata_props say ("onnx_fuse.kv_cache.shared_buffer") and the check obeys.
"""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from .check import ModelRef
from .errors import BadInput, CheckFailed
from .graph import FreshNames
from .kv_attention import Layer, attention_layers
from .kv_check import CHUNK, SHARED_BUFFER, STEPS, WRITE_POSITION, check_static, needed_slots
from .kv_layout import Layout, find_layout
from .kv_positions import Positions, Use, find_positions
from .opset import OpsetError, default_opset, raise_opset
from .result import FuseResult
from .rewrite import tidy
from .specs import AttentionSpec, KVCacheWriteSpec

__all__ = ["Layout", "StandardForm", "check_static", "find_layout", "make_static", "plan"]


# --------------------------------------------------------------------------- the steps


def minimum_cache_len(check: bool) -> tuple[int, str]:
    """The smallest N this model can be converted (and, checking, verified) at."""
    if check:
        return needed_slots(), (f"a past of 2 tokens, a {CHUNK}-token step and the {STEPS} "
                                "single-token steps the check drives")
    return 2, "a non-empty past and one new token"


def plan(source, cache_len: int, check: bool) -> Layout:
    """The model's cache layout, once the length asked for is known to be enough."""
    layout = find_layout(source.model)
    needed, why = minimum_cache_len(check)
    if cache_len < needed:
        raise BadInput(f"--max-cache-len {cache_len} is smaller than the model needs: at least "
                       f"{needed} slots ({why})")
    if layout.static_len is not None and cache_len != layout.static_len:
        raise BadInput(f"the model's caches are already fixed at {layout.static_len} slots (a static "
                       f"cache written by scatter): --max-cache-len must be {layout.static_len}, not "
                       f"{cache_len}")
    return layout


def make_static(source, fused: FuseResult, target, layout: Layout, cache_len: int,
                check: bool) -> FuseResult:
    """The fused model with its growing caches turned into fixed caches of `cache_len` slots
    (or its already fixed caches kept), checked over decode steps against the source."""
    started = time.perf_counter()
    form = target.static_form() or StandardForm()
    if layout.static_len is not None:
        static, section, layout = _already_static(fused, layout, form)
        scenarios = ("static",)
    else:
        model24 = _at_opset_24(fused.model)
        layers = attention_layers(fused, model24, layout, form.attention_ops, source.base_dir)
        layout = layout.with_mask(_proven_mask(layers, layout))
        static, section = convert(model24, layout, cache_len, source.base_dir, layers, form,
                                  _matched_masks(source.model, fused))
        scenarios = tuple(s for s in form.scenarios if s != "left_padded" or layout.mask)
    report = _report(fused.report, layout, section, cache_len)
    report["tensorrt"] = target.contract(static)
    result = FuseResult(static, report, source.base_dir, True, source.path, fused.fused, fused.unfused)
    if check:
        outcome = check_static(ModelRef(source.model, source.base_dir), ModelRef(static, source.base_dir),
                               layout, cache_len, scenarios=scenarios,
                               steps=_steps(section.get("layers", []), cache_len))
        outcome["fused"] = fused.report.get("check")  # the single-step proof of the fusions
        report["check"] = outcome
        if not outcome["passed"]:
            raise CheckFailed(f"the static-cache model does not match the input model: "
                              f"{outcome['message']}", outcome)
    report["seconds"] = round(fused.report["seconds"] + time.perf_counter() - started, 3)
    return result


def _at_opset_24(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return raise_opset(model, 24) if default_opset(model) < 24 else model
    except OpsetError as exc:
        raise BadInput(f"cannot raise the fused model to opset 24 for TensorScatter: {exc}") from None


def _proven_mask(layers: list[Layer], layout: Layout) -> str | None:
    """The input the self-attention masks read their padding from (None: they read none)."""
    inputs = {layer.padding_input for layer in layers if not layer.cross}
    if len(inputs) != 1:
        raise BadInput("the self-attention masks read their padding from different inputs: "
                       f"{', '.join(sorted(map(str, inputs)))}")
    (mask,) = inputs
    if mask is not None and mask not in layout.masks:
        raise BadInput(f"the self-attention masks read '{mask}', which is not a 0/1 mask input")
    return mask


def _steps(layers: list[dict], cache_len: int) -> int:
    """STEPS, or W + 2 for the widest sliding window W, as far as the cache holds them."""
    widest = max((layer["window"] or 0 for layer in layers), default=0)
    return max(STEPS, min(widest + 2, cache_len - 2 - CHUNK))


def _already_static(fused: FuseResult, layout: Layout, form) -> tuple:
    """The fused model of a model whose caches were fixed already: every write must have become
    the form's write op."""
    writes = {spec.past.name: spec for _, spec in fused.specs(KVCacheWriteSpec)}
    missing = [c.past for c in layout.caches if c.past not in writes]
    if missing:
        reasons = [u.reason for u in fused.unfused if u.pattern == "kv_cache"]
        raise BadInput(f"the write into the fixed cache '{missing[0]}' was not fused into "
                       f"{form.write_op}" + (f": {reasons[0]}" if reasons else ""))
    positions = sorted({spec.positions.name for spec in writes.values()})
    mask = layout.mask if len(layout.masks) == 1 else None
    if mask is None:
        raise BadInput("a model with fixed caches needs one 0/1 mask input over its slots")
    section = {"mode": "static", "already_static": True, "max_cache_len": layout.static_len,
               "pairs": {c.present: c.past for c in layout.caches}, "write_position": positions[0],
               "attention_mask": f"{mask} [batch, {layout.static_len}]: the model's own",
               "caches": [{"past": c.past, "present": c.present, "form": c.form,
                           "write": f"{form.write_op} (fused by the pass)"} for c in layout.caches],
               "layers": []}
    return fused.model, section, layout


def _report(fused: dict, layout: Layout, section: dict, cache_len: int) -> dict:
    report = dict(fused)
    report["kv_cache"] = section
    if section.get("already_static"):
        return report
    report["counts"] = {**report["counts"], "kv_cache": len(layout.pairs)}
    report["opset"] = {**report["opset"], "to": 24}
    report["fused"] = list(report["fused"]) + [
        {"rule": "kv_cache", "anchor": anchor, "form": cache.form, "mode": "static", "past": cache.past,
         "present": cache.present, "cache_len": cache_len, "write_index": section["write_position"]}
        for cache, anchor in zip(layout.caches, section.pop("anchors"))]
    return report


# --------------------------------------------------------------------------- conversion


class StandardForm:
    """How the fixed caches are written and read in standard ops: TensorScatter writes, every
    cache-reading Attention over the whole cache with a boolean mask over the slots (holes
    allowed). Targets with a form of their own (Target.static_form) override it.

    What a form may use of the conversion (`_Conversion`): `node(op, inputs, attrs, dtype, shape)`
    and `const(prefix, value)` to add nodes, `mask(window)` (the standard mask [B, 1, S, N]),
    `write` (the write_position input [B]), `query` (write_position[b] + t, [B, S]), `tensors`
    (the graph's tensors by name), `layout` (kv_layout.Layout: `ids`, `batch_dim`, `mask`) and
    `cache_len` (N)."""

    # Every op the pass writes attention as for this target (one, unless the target picks an op
    # per attention).
    attention_ops: tuple[str, ...] = ("Attention",)
    write_op = "TensorScatter"
    scenarios = ("ragged", "left_padded")  # what check_static drives
    valid_slots = "1 = the slot holds a valid token (this step's included)"
    # Attention ops that take the past and give the present themselves (no Concat left to turn
    # into a write): their `remask` makes them write the fixed cache, and the present outputs
    # come from them.
    cache_writers: tuple[str, ...] = ()
    # Whether each present must be bound to its past's buffer (past_present_share_buffer): the
    # written model says so in its metadata_props, and the multi-step check runs it so.
    shares_buffer = False

    def old_masks(self, attention: gs.Node) -> list:
        """The tensors `remask` stops `attention` reading its masking from."""
        return attention.inputs[3:4]  # none: causal by attribute

    def remask(self, conversion: _Conversion, attention: gs.Node, window: int | None) -> None:
        attention.inputs[3] = conversion.mask(window)

    def write(self, conversion: _Conversion, concat: gs.Node) -> None:
        """Turn Concat(past, new) into the write of `new` into `past` at write_position."""
        concat.op, concat.attrs = "TensorScatter", {"axis": -2, "mode": "linear"}
        concat.inputs.append(conversion.write)  # (past, new, write_position)

    def functions(self) -> list[onnx.FunctionProto]:
        """Model-local functions the written nodes call."""
        return []

    def finish(self, conversion: _Conversion) -> None:
        """A last look at the rewritten graph (a form's own requirement on it), before export."""


def convert(model: onnx.ModelProto, layout: Layout, cache_len: int, base_dir: str | None,
            layers: list[Layer], form: StandardForm = StandardForm(), matched_masks: frozenset = frozenset()):
    """The fused model (opset 24) with fixed caches; returns it and the report's section.
    `matched_masks`: the tensors the source computes the pass's matched masks from (_matched_masks)."""
    positions = find_positions(model, layout, cache_len, base_dir)
    rewrite = _Conversion(model, layout, cache_len, form)
    layer_report = rewrite.masks(layers, matched_masks)
    anchors = rewrite.writes()
    tidy(rewrite.g)  # what computed the old masks goes: its readers of the past need no care
    mask_readers = rewrite.remask_readers(model, base_dir)
    tidy(rewrite.g)
    lengths = rewrite.reexpress_past_lengths()
    repointed = rewrite.repoint(positions)
    tidy(rewrite.g)
    rewrite.require_gone()
    form.finish(rewrite)
    out = rewrite.export()
    section = {
        "mode": "static", "max_cache_len": cache_len, "pairs": rewrite.pairs,
        "write_position": rewrite.write.name,
        "attention_mask": (f"{layout.mask} [batch, {cache_len}]: {form.valid_slots}" if layout.mask
                           else f"none: row b's valid slots are 0 .. {rewrite.write.name}[b] + S - 1"),
        "passed_through": sorted(layout.others),
        "caches": [{"past": c.past, "present": c.present, "form": c.form, "write": write,
                    **({"window_kept": c.keep} if c.keep else {})}
                   for c, write in zip(layout.caches, rewrite.written_by)],
        "layers": layer_report, "positions": repointed, "position_tables": positions.tables,
        "past_lengths": lengths, "mask_readers": mask_readers, "anchors": anchors,
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
        if layout.mask:
            self.tensors[layout.mask].shape = [batch, cache_len]
        for cache in layout.caches:
            for name in (cache.past, cache.present):
                self.tensors[name].shape = [batch, cache.heads, cache_len, cache.head_size]
        self._query = self._visible = None  # built when first needed (a tidy drops what is unused)
        self._masks: dict = {}
        self._typed_query: dict = {}
        self._old_masks = []  # what the cache-reading attention read before, then its subgraph
        self.written_by: list[str] = []  # per cache, what writes it (`writes`)

    def node(self, op, inputs, attrs=None, dtype=None, shape=None):
        out = gs.Variable(self.names(f"kv_static/{op}_out"), dtype, shape)
        self.g.nodes.append(gs.Node(op, self.names(f"kv_static/{op}"), attrs or {}, inputs, [out]))
        return out

    def const(self, prefix, value):
        return gs.Constant(self.names(f"kv_static/{prefix}"), np.asarray(value))

    def _axis(self, name: str, axis: int):
        return self.const(name, np.array([axis], np.int64))

    def _new_tokens(self):
        """[1]: S, the new tokens of this step."""
        return self.node("Shape", [self.tensors[self.layout.ids]], {"start": 1, "end": 2}, np.int64, [1])

    @property
    def query(self):
        """[B, S]: write_position[b] + t, the slot (and position) of row b's new token t."""
        if self._query is None:
            self._query = self._query_positions()
        return self._query

    def _query_positions(self):
        seq = self.node("Squeeze", [self._new_tokens(), self._axis("axis0", 0)], dtype=np.int64, shape=[])
        steps = self.node("Range", [self.const("zero", np.array(0, np.int64)), seq,
                                    self.const("one", np.array(1, np.int64))], dtype=np.int64, shape=["S"])
        rows = self.node("Unsqueeze", [self.write, self._axis("axis1", 1)], dtype=np.int64)
        cols = self.node("Unsqueeze", [steps, self._axis("axis0", 0)], dtype=np.int64)
        return self.node("Add", [rows, cols], dtype=np.int64, shape=[self.layout.batch_dim, None])

    def _visibility(self):
        """[B, S, N]: at or before the query's own slot, and a valid slot where a mask says so."""
        self._slots = self.const("slots", np.arange(self.cache_len, dtype=np.int64).reshape(1, 1, -1))
        self._query_col = self.node("Unsqueeze", [self.query, self._axis("axis2", 2)], dtype=np.int64)
        causal = self.node("LessOrEqual", [self._slots, self._query_col], dtype=np.bool_)
        if not self.layout.mask:
            return causal
        flags = self.node("Cast", [self.tensors[self.layout.mask]], {"to": TensorProto.BOOL}, np.bool_)
        valid = self.node("Unsqueeze", [flags, self._axis("axis1", 1)], dtype=np.bool_)
        return self.node("And", [causal, valid], dtype=np.bool_)

    def mask(self, window):
        """[B, 1, S, N] boolean, with the sliding window W: slot j > query - W."""
        if window not in self._masks:
            if self._visible is None:
                self._visible = self._visibility()
            shown = self._visible
            if window is not None:
                start = self.node("Sub", [self._query_col, self.const("window", np.array(window, np.int64))],
                                  dtype=np.int64)
                inside = self.node("Greater", [self._slots, start], dtype=np.bool_)
                shown = self.node("And", [shown, inside], dtype=np.bool_)
            self._masks[window] = self.node("Unsqueeze", [shown, self._axis("axis1", 1)], dtype=np.bool_,
                                            shape=[self.layout.batch_dim, 1, None, self.cache_len])
        return self._masks[window]

    def masks(self, layers: list[Layer], matched: frozenset = frozenset()) -> list[dict]:
        """Every cache-reading attention reads the whole fixed cache through the mask of its
        window; cross-attention stays as it is. The old masks are what the attention nodes read
        and what of the masks the pass matched (`matched`, by name) is still computed."""
        by_name = {layer.attention: layer for layer in layers}
        report = []
        for attention in (n for n in self.g.nodes if n.op in self.form.attention_ops):
            layer = by_name.get(attention.name)
            if layer is None:
                raise BadInput(f"{attention.op} '{attention.name}' was not fused by this pass: "
                               "its mask is not proven")
            if not layer.cross:
                self._old_masks.extend(self.form.old_masks(attention))
                self.form.remask(self, attention, layer.window)
            report.append(layer.summary())
        tensors, inside = _subgraph(self._old_masks)  # before tidy cuts what dies
        alive = [self.tensors[name] for name in matched if name in self.tensors]
        self._old_masks = (tensors | {id(t) for t in alive}, inside | {id(n) for t in alive for n in t.inputs})
        return report

    def remask_readers(self, model: onnx.ModelProto, base_dir: str | None) -> list[str]:
        """What else reads the old masks (transformers' exporter zeroes the output of a query row
        whose keys are all hidden) reads the new one of the same class, proven by evaluation
        (masks.py); any other reader of them is an error."""
        readers = _old_mask_readers(self.g, self._old_masks, self.tensors.get(self.layout.mask))
        if not readers:
            return []
        classes = _mask_classes(model, base_dir, {tensor.name for tensor, _ in readers})
        done = []
        for tensor, user in readers:
            klass = classes[tensor.name]
            if not klass.causal or klass.alignment != "lower_right" or tensor.dtype not in (None, np.bool_):
                raise BadInput(f"the mask '{tensor.name}' is also read by {user.op} '{user.name}' "
                               f"({klass.kind}), which --kv-cache static cannot give the mask over "
                               "cache slots")
            for i, t in enumerate(user.inputs):
                if t is tensor:
                    user.inputs[i] = self.mask(klass.window)
            done.append(f"{user.op} '{user.name}'")
        return done

    def writes(self) -> list[str]:
        """Each Concat(past, new) becomes the form's write of new into past at write_position
        (TensorScatter) writing the present output itself (no-op Casts and a window's Slice
        after it dropped), as TensorRT's in-place update wants. An attention op of the form's
        `cache_writers` (its remask made it write the fixed cache) writes the present itself
        the same way. `written_by` says, per cache, what writes it."""
        anchors = []
        for past, present in self.layout.pairs:
            writer, grown, chain = self._writer(self.tensors[present])
            anchors.append(f"{writer.op} '{writer.name}'")
            if writer.op == "Concat":
                self.form.write(self, writer)
                writer.name = self.names(f"kv_static/{self.form.write_op}")
            self.written_by.append(self.form.write_op if writer.op == self.form.write_op else
                                   f"{writer.op} '{writer.name}' (it writes the cache itself)")
            if chain:
                self._drop(chain, writer, grown, self.tensors[present])
        return anchors

    def _writer(self, present) -> tuple:
        """(the node that grows `present`: a Concat or one of the form's cache writers, its
        output the present is computed from, the no-op hops between)."""
        grown, chain = present, []
        while grown.inputs[0].op not in ("Concat", *self.form.cache_writers):
            chain.append(grown.inputs[0])  # no-op Casts, Identity, a window's Slice (kv_layout)
            grown = grown.inputs[0].inputs[0]
        return grown.inputs[0], grown, chain

    @staticmethod
    def _drop(chain: list, writer, grown, target) -> None:
        between = [grown] + [hop.outputs[0] for hop in chain[1:]]
        for hop in chain:
            hop.inputs.clear()
            hop.outputs.clear()
        for tensor in between:
            for user in list(tensor.outputs):
                for i, t in enumerate(user.inputs):
                    if t is tensor:
                        user.inputs[i] = target
        index = next(i for i, t in enumerate(writer.outputs) if t is grown)
        writer.outputs[index] = target

    def reexpress_past_lengths(self) -> list[str]:
        """Shape(past) read for anything but the old mask (a Reshape to past + S keys) gets the
        past length N - S: past + S is then the N slots attention reads."""
        shapes = [n for n in self.g.nodes if n.op == "Shape" and n.inputs[0].name in self.pairs.values()]
        if not shapes:
            return []
        seq = self._new_tokens()
        zeros = self.const("zeros2", np.zeros(2, np.int64))
        offset = self.node("Concat", [zeros, seq, self._axis("zero1", 0)], {"axis": 0}, np.int64, [4])
        done, full = [], {}
        for node in shapes:
            past = node.inputs[0]
            if past.name not in full:
                whole = self.node("Shape", [past], dtype=np.int64, shape=[4])
                full[past.name] = self.node("Sub", [whole, offset], dtype=np.int64, shape=[4])
            start, end = node.attrs.get("start", 0), node.attrs.get("end", np.iinfo(np.int64).max)
            node.op, node.attrs = "Slice", {}
            node.inputs.clear()
            node.inputs.extend([full[past.name], self._axis("start", start), self._axis("end", end)])
            done.append(f"Shape '{node.name}' of '{past.name}'")
        return done

    def repoint(self, positions: Positions) -> list[str]:
        """Each live position reader reads write_position + t (in the type it reads)."""
        nodes = {n.name: n for n in self.g.nodes}
        repointed = []
        for use in positions.uses:
            user = nodes.get(use.node)
            if user is None:
                continue  # it computed the old mask: gone
            if use.kind == "reduction":
                self._per_row(user, use)
            elif use.rank == 1 and user.op not in ("Gather", "RotaryEmbedding"):
                self._batch_in_front(user, use)
            else:
                user.inputs[use.index] = self._query_as(user.inputs[use.index].dtype)
            repointed.append(f"{user.op} '{user.name}'" + (" (per row)" if use.kind == "reduction" else ""))
        return repointed

    def _batch_in_front(self, user: gs.Node, use: Use) -> None:
        """Positions [S] that an Unsqueeze gives a leading axis of 1 (the batch broadcast) get the
        per-row positions [B, S] there instead: the same axes but that one."""
        axes = _constant_ints(user.inputs[1]) if user.op == "Unsqueeze" and len(user.inputs) > 1 else None
        rank = 1 + len(axes or [])
        if use.index != 0 or axes is None or 0 not in [a % rank for a in axes]:
            raise BadInput(f"positions without a batch axis ([S]) feed {user.op} '{user.name}', "
                           "which --kv-cache static cannot give per-row positions")
        user.inputs[1] = self.const("axes", np.array([a % rank for a in axes if a % rank], np.int64))
        user.inputs[0] = self._query_as(user.inputs[0].dtype)

    def _query_as(self, dtype):
        """The query positions [B, S] in `dtype` (int64 when unknown)."""
        dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.int64)
        if dtype not in self._typed_query:
            self._typed_query[dtype] = self.query if dtype == np.int64 else self.node(
                "Cast", [self.query], {"to": helper.np_dtype_to_tensor_dtype(dtype)}, dtype=dtype)
        return self._typed_query[dtype]

    def _per_row(self, reduction: gs.Node, use: Use) -> None:
        """A reduction of the positions over the batch becomes one per row: [B, 1, ..., 1] of the
        rank its result meets the positions in (kv_positions.py)."""
        if use.meets_rank is None:
            raise BadInput(f"the positions feed {reduction.op} '{reduction.name}', a reduction over "
                           "the batch whose result never meets the positions again: --kv-cache static "
                           "cannot take it per row")
        positions = self._query_as(reduction.inputs[use.index].dtype)
        per_row = self.node(reduction.op, [positions, self._axis("rows", 1)], {"keepdims": 1},
                            dtype=positions.dtype)
        shape = self.const("per_row_shape", np.array([-1] + [1] * (use.meets_rank - 1), np.int64))
        shaped = self.node("Reshape", [per_row, shape], dtype=positions.dtype)
        if any(output is reduction.outputs[0] for output in self.g.outputs):
            raise BadInput(f"{reduction.op} '{reduction.name}' of the positions is a graph output")
        for user in list(reduction.outputs[0].outputs):
            for i, t in enumerate(user.inputs):
                if t is reduction.outputs[0]:
                    user.inputs[i] = shaped
        self._forget_shapes(shaped)

    def _forget_shapes(self, tensor) -> None:
        """The shapes inferred downstream of `tensor` no longer hold (a scalar became [B, 1, 1]):
        shape inference finds them again; graph outputs keep theirs."""
        outputs, pending, seen = {id(t) for t in self.g.outputs}, [tensor], set()
        while pending:
            for user in pending.pop().outputs:
                for t in user.outputs:
                    if id(t) not in seen:
                        seen.add(id(t))
                        if id(t) not in outputs:
                            t.shape = None
                        pending.append(t)

    def require_gone(self) -> None:
        """After the rewrite nothing may still read the old meaning of the mask (its values over
        past + S positions; its shape now says N = past + S, which is right)."""
        if not self.layout.mask:
            return
        other = next((n for n in self.tensors[self.layout.mask].outputs
                      if not n.name.startswith("kv_static/") and n.op not in ("Shape", "Size")), None)
        if other is not None:
            raise BadInput(f"the attention mask is also read by {other.op} '{other.name}', which "
                           "--kv-cache static cannot give the mask over cache slots")

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
        self._record(out)
        for value in out.graph.value_info:  # stale lengths (past + S) from before the conversion
            if value.name in self.pairs or value.name in self.pairs.values():
                value.type.tensor_type.shape.dim[2].Clear()
                value.type.tensor_type.shape.dim[2].dim_value = self.cache_len
        return out

    def _record(self, out: onnx.ModelProto) -> None:
        meta = {"onnx_fuse.kv_cache.pairs": json.dumps(self.pairs),
                "onnx_fuse.kv_cache.max_cache_len": str(self.cache_len),
                "onnx_fuse.kv_cache.write_position": self.write.name,
                "onnx_fuse.kv_cache.attention_mask": self.layout.mask or "",
                **({SHARED_BUFFER: "true"} if self.form.shares_buffer else {})}
        kept = [p for p in self.model.metadata_props if p.key not in meta]
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


def _matched_masks(source: onnx.ModelProto, fused: FuseResult) -> frozenset:
    """The tensors the source computes the masks the pass matched from (by value). A target whose
    attention op takes the masking in a form of its own (GroupQueryAttention's bias, built from
    the mask input) leaves live only the part of them something else reads (transformers'
    exporter zeroes fully hidden query rows), and that reader needs the new mask too."""
    producer = {o: n for n in source.graph.node for o in n.output}
    found, pending = set(), [spec.mask.tensor.name for _, spec in fused.specs(AttentionSpec) if spec.mask]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        node = producer.get(name)
        if node is not None and node.op_type not in ("Shape", "Size"):
            pending.extend(i for i in node.input if i)
    return frozenset(found)


def _constant_ints(tensor) -> list[int] | None:
    """The values of a constant integer tensor (an initializer or a Constant node's output)."""
    if isinstance(tensor, gs.Constant):
        return [int(v) for v in np.asarray(tensor.values).reshape(-1)]
    node = tensor.inputs[0] if tensor.inputs else None
    if node is not None and node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
        return [int(v) for v in np.asarray(node.attrs["value"].values).reshape(-1)]
    return None


def _subgraph(outputs: list) -> tuple[set, set]:
    """The ids of the tensors and of the nodes that `outputs` are computed from (by value: what
    a Shape reads is not)."""
    inside, tensors, pending = set(), set(), list(outputs)
    while pending:
        tensor = pending.pop()
        if id(tensor) in tensors:
            continue
        tensors.add(id(tensor))
        for node in tensor.inputs:
            inside.add(id(node))
            if node.op not in ("Shape", "Size"):
                pending.extend(node.inputs)
    return tensors, inside


def _old_mask_readers(g: gs.Graph, old_masks: tuple, mask_input) -> list[tuple]:
    """(tensor, node): tensors of the old masks' subgraphs (`_subgraph`) computed from the mask
    input's values that a live node outside those subgraphs reads."""
    tensors, inside = old_masks
    padded = set()
    for node in g.nodes:  # graph order is topological (tidy)
        if id(node) in inside and node.op not in ("Shape", "Size") and \
                any(t is mask_input or id(t) in padded for t in node.inputs):
            padded.update(id(t) for t in node.outputs)
    return [(t, node) for node in g.nodes if id(node) not in inside and not node.name.startswith("kv_static/")
            for t in node.inputs if id(t) in tensors and id(t) in padded]


def _mask_classes(model: onnx.ModelProto, base_dir: str | None, names: set[str]) -> dict:
    from .graph import Graph, with_shapes
    from .masks import classify_mask

    graph = Graph(with_shapes(model), base_dir)
    tensors = graph.gs.tensors()
    return {name: classify_mask(graph, tensors[name], model=model) for name in names}
