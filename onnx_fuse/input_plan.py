"""Sizes for a model's symbolic input dims, for the checker's synthesized inputs.

Every symbolic input dim is a slot (input name, axis), sized in this order:
1. roles: batch (axis 0 of inputs of rank 2 and more), the past (the axis along which an input
   is concatenated with other entries: a growing KV cache, dim_relations.py; its declared size
   when static, as HF's sliding-window cache has it), image sides;
2. what the graph's equations give once those are known (dim_relations.DimFacts.solve), then the
   size of another slot of the same declared name and declared expressions ("past + seq");
3. the new tokens: the first slot of the token ids still unsized, and 2. again;
4. candidates, tried in order on the reference: a mask's length past + new first (what Hugging
   Face always feeds, whatever the export declared), anything else a size of its own first, so
   that a rewrite mixing up two axes cannot pass by accident.
Declared names are trusted only where the graph says nothing: optimum's merged decoder declares
its mask as long as the new tokens, its cached branch needs past + new.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import onnx

from .dim_relations import DimFacts, Slot
from .dims import dim_symbols, eval_dim

_PAST = 3  # a non-empty KV cache, so the cache path is exercised
_SEQ = 5
_IMAGE_SIDE = 224  # vision models with dynamic height/width usually need the trained size
_MAX_ATTEMPTS = 32  # size assignments tried on the reference before giving up
_MAX_BRANCH_INPUTS = 3  # boolean If conditions whose every combination is checked
_CONDITION_PASSTHROUGH = {"Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"}


@dataclass
class Plan:
    assignments: list[dict[Slot, int]]  # every symbolic slot sized; the most likely first
    past: int  # the past length (0: no cache)


def plan_sizes(specs: list, facts: DimFacts, batch: int) -> Plan:
    """Size assignments for the symbolic dims of `specs` (check.py's input specs: name, dtype,
    dims of int sizes and str symbols, kind). Those that follow the graph's equations come
    first; then, in case an equation assumed too much (a Slice bound within its dim), those
    without them."""
    planned = _plan(specs, facts, batch)
    unrelated = _plan(specs, DimFacts(growing=facts.growing, read=facts.read), batch)
    extra = [a for a in unrelated.assignments if a not in planned.assignments]
    return Plan((planned.assignments + extra)[:_MAX_ATTEMPTS], planned.past)


def _plan(specs: list, facts: DimFacts, batch: int) -> Plan:
    declared = {(s.name, axis): d for s in specs for axis, d in enumerate(s.dims) if isinstance(d, str)}
    known, past = _roles(specs, facts, batch)
    _settle(specs, facts, declared, known)
    seq = _new_tokens(specs, declared, known)
    _settle(specs, facts, declared, known)
    past = past or _static_cache_past(specs, seq)
    groups = _candidates(specs, declared, known, past, seq, batch)
    combos = itertools.islice(_by_deviation([len(options) for _, options in groups]), _MAX_ATTEMPTS)
    assignments = [{**known, **{slot: options[i] for (slots, options), i in zip(groups, combo)
                                for slot in slots}} for combo in combos]
    return Plan(assignments, past)


def _settle(specs: list, facts: DimFacts, declared: dict, known: dict) -> None:
    """Size what the graph's equations, then the declarations, determine; again until nothing
    more is (each round sizes at least one slot, or stops)."""
    for _ in range(len(declared) + 1):
        before = len(known)
        known.update(facts.solve(known))
        known.update(_by_declaration(specs, declared, known))
        if len(known) == before:
            return


def _roles(specs: list, facts: DimFacts, batch: int) -> tuple[dict[Slot, int], int]:
    """Batch, past and image slots; a name given a size keeps it in every slot of that name
    (the first role found wins: a Concat's past before a layout's guess)."""
    known: dict[Slot, int] = {}
    named: dict[str, int] = {}

    def assign(spec, axis: int, size: int) -> None:
        name = spec.dims[axis]
        if isinstance(name, str):
            known[spec.name, axis] = named.setdefault(name, size) if _simple(name) else size

    growing = [(s, axis) for s in specs for axis in range(len(s.dims)) if (s.name, axis) in facts.growing]
    static_past = [s.dims[axis] for s, axis in growing if isinstance(s.dims[axis], int)]
    past = min(static_past) if static_past else _PAST if growing else 0
    for spec, axis in growing:
        assign(spec, axis, past)
    for spec in specs:
        if len(spec.dims) >= 2 and _simple(spec.dims[0]):
            assign(spec, 0, batch)
        layout = _layout(spec)
        if layout == "cache" and not growing and spec.name in facts.read:  # no Concat found
            past = _PAST
            assign(spec, 2, _PAST)
        elif layout == "image":
            assign(spec, 2, _IMAGE_SIDE)
            assign(spec, 3, _IMAGE_SIDE)
    return known, past


def _layout(spec) -> str | None:
    """A 4-D float input with static dim 1: a KV cache [batch, heads, past, head_dim] when its
    last dim is static too, else an image [batch, channels, height, width]."""
    dims = spec.dims
    if len(dims) != 4 or not _is_float(spec) or not isinstance(dims[1], int) or not _simple(dims[2]):
        return None
    if isinstance(dims[3], int):
        return "cache"
    return "image" if _simple(dims[3]) else None


def _new_tokens(specs: list, declared: dict, known: dict) -> int:
    """The new tokens' count: the first slot left of the token ids (then of any input but a
    mask, whose length may include the past) gets _SEQ; a decode step whose ids are [batch, 1]
    has it fixed."""
    ordered = sorted((s for s in specs if s.kind != "mask"), key=lambda s: s.kind != "ids")
    free = [(s.name, axis) for s in ordered for axis, d in enumerate(s.dims)
            if (s.name, axis) in declared and (s.name, axis) not in known and _simple(d)]
    if free:
        known[free[0]] = _SEQ
        return _SEQ
    lengths = (s.dims[-1] for s in ordered if s.kind in ("ids", "position") and s.dims)
    return next((n for n in lengths if isinstance(n, int)), _SEQ)


def _static_cache_past(specs: list, seq: int) -> int:
    """A fixed-size cache [batch, heads, cache_len, head_dim] written at 1-D positions (Hugging
    Face's cache_position): a non-empty past that still fits in the cache."""
    static = [s.dims[2] for s in specs if len(s.dims) == 4 and _is_float(s)
              and all(isinstance(d, int) for d in s.dims[1:])]
    if static and any(s.kind == "position" and len(s.dims) == 1 for s in specs):
        return min(_PAST, max(0, min(static) - seq))
    return 0


def _by_declaration(specs: list, declared: dict, known: dict) -> dict[Slot, int]:
    """Slots sized by what the export declared: the size of a slot of the same name, or a
    declared expression of sized names. A mask's own dims take no size from other inputs'
    names: they are candidates (see _candidates)."""
    masks = {s.name for s in specs if s.kind == "mask"}
    names = _sizes_by_name(declared, known, masks)
    found = {}
    for slot, text in declared.items():
        if slot in known or slot[0] in masks and slot[1] > 0 and _simple(text):
            continue
        if all(symbol in names for symbol in dim_symbols(text)):
            found[slot] = eval_dim(text, names)
    return found


def _sizes_by_name(declared: dict, known: dict, masks: set[str]) -> dict[str, int]:
    """The size each declared name has in the sized slots, other inputs' before a mask's."""
    ordered = sorted(known.items(), key=lambda item: item[0][0] not in masks)  # later ones win
    return {declared[slot]: size for slot, size in ordered if slot in declared}


def _candidates(specs: list, declared: dict, known: dict, past: int, seq: int,
                batch: int) -> list[tuple[list[Slot], list[int]]]:
    """The slots left, grouped by declared name (a mask's apart), each group with its sizes in
    order of preference."""
    masks = {s.name for s in specs if s.kind == "mask"}
    names = _sizes_by_name(declared, known, masks)
    groups: dict[tuple, list[Slot]] = {}
    for slot, text in declared.items():
        if slot not in known:
            groups.setdefault((text, slot[0] in masks), []).append(slot)
    used = {batch, past, seq, past + seq}
    distinct = (n for n in itertools.count(seq + 1) if n not in used)
    result = []
    for (text, is_mask), slots in groups.items():
        own = next(distinct)
        if is_mask:
            options = [past + seq] + ([names[text]] if text in names else []) + [seq, own]
        else:
            options = [own, seq, past + seq]
        result.append((slots, list(dict.fromkeys(options))))
    return result


def _by_deviation(sizes: list[int]) -> Iterator[tuple[int, ...]]:
    """All index tuples (index i below sizes[i]) ordered by how far they are from all-first
    choices, so the preferred assignment is tried first and one change at a time after."""
    for budget in range(sum(sizes) - len(sizes) + 1):
        yield from _with_sum(sizes, budget)


def _with_sum(sizes: list[int], budget: int) -> Iterator[tuple[int, ...]]:
    if not sizes:
        if budget == 0:
            yield ()
        return
    for first in range(min(sizes[0] - 1, budget) + 1):
        for rest in _with_sum(sizes[1:], budget - first):
            yield (first, *rest)


def branch_inputs(model: onnx.ModelProto) -> list[str]:
    """Boolean graph inputs that are If conditions (optimum's use_cache_branch): each value
    selects another subgraph, so the check runs both."""
    producer = {out: node for node in model.graph.node for out in node.output}
    inputs = {v.name for v in model.graph.input
              if v.type.tensor_type.elem_type == onnx.TensorProto.BOOL}
    found = []
    for node in model.graph.node:
        if node.op_type != "If":
            continue
        name = node.input[0]
        while name in producer and producer[name].op_type in _CONDITION_PASSTHROUGH:
            name = producer[name].input[0]
        if name in inputs and name not in found:
            found.append(name)
    return found


def branch_cases(model: onnx.ModelProto) -> list[dict[str, bool]]:
    """The values of the If-condition inputs to check with: every combination of up to three
    of them (the first case takes every branch's then side), else all true and all false."""
    names = branch_inputs(model)
    if len(names) > _MAX_BRANCH_INPUTS:
        return [dict.fromkeys(names, True), dict.fromkeys(names, False)]
    return [dict(zip(names, values)) for values in itertools.product((True, False), repeat=len(names))]


def _simple(dim) -> bool:
    return isinstance(dim, str) and dim_symbols(dim) == (dim,)


def _is_float(spec) -> bool:
    return spec.dtype.kind == "f" or spec.dtype.name == "bfloat16"
