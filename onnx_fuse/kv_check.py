"""The multi-step check of `--kv-cache static`: the original and the converted model driven side by
side through decode steps after a non-empty past, batch 2, rows of different valid lengths.

Each scenario runs one step of CHUNK new tokens (the converted graph at S > 1), then `steps`
single-token steps (at least W + 2 for a model with a sliding window W, so that tokens leave the
window). Logits (every output that is not a cache) are compared at every step within the dtype's
tolerance, and so is the valid part of every cache; the slots past it must come back untouched.

- "ragged": row b holds L_b tokens in slots 0..L_b-1 of the fixed cache, written at
  write_position L_b + k; the original runs each row on its own (batch 1) with its own growing
  past, the only way positions and caches mean the same for every architecture. A windowed cache
  of the original holds the last `keep` of them; the fixed cache holds them all, the earlier
  slots random (the window must hide them).
- "left_padded": the original's own batch-2 run with row 1 left-padded by 2, mirrored slot for
  slot (equal write positions, holes in the valid slots). Needs a mask input.
- "static": a model whose caches were already fixed (StaticCache): both models take the same
  interface (cache_position, a mask over the slots) and run on the same inputs, row 1 padded.

Inputs passed through (position ids, an encoder's states and mask) are fed to both models alike:
position ids are the new tokens' positions, the rest fixed over the steps (kv_positions.other_inputs).
bfloat16 models run widened to float32, as the one-step check runs them. A converted model whose
metadata_props say its presents share their pasts' buffers (SHARED_BUFFER: target ort's
GroupQueryAttention) runs with each present bound to its past's buffer, as a runtime must run it.
"""

from __future__ import annotations

import numpy as np

from .check import compare_output, run_session, run_sharing_buffers, runnable_as_float32, session_for
from .errors import BadInput
from .kv_layout import Layout
from .kv_positions import feed_dtype, other_inputs
from .widen import has_bfloat16

STEPS = 8  # single-token decode steps the check drives at least
CHUNK = 3  # new tokens of the first step
WRITE_POSITION = "write_position"
# metadata_props key: "true" when each present must share its past's buffer (the check binds them)
SHARED_BUFFER = "onnx_fuse.kv_cache.shared_buffer"
_OTHERS_SEED = 7  # one seed for the passed-through inputs: the same values at every step


def needed_slots(steps: int = STEPS, chunk: int = CHUNK) -> int:
    """The fewest cache slots the check can drive: a past of 2, the chunk, the steps."""
    return 2 + chunk + steps


def check_static(original, converted, layout: Layout, cache_len: int, *, steps: int = STEPS,
                 seed: int = 0, scenarios: tuple[str, ...] = ("ragged", "left_padded")) -> dict:
    """Drive both models (see the module docstring). Returns the report's `check`: {passed,
    outputs: {name: {max_abs, max_rel, passed}}, message, steps, chunk, scenarios}."""
    chunk = CHUNK
    shortest = layout.shortest_past
    longest = min(max(4, shortest + 2), cache_len - steps - chunk)
    if longest < max(2, shortest):
        raise BadInput(f"--max-cache-len {cache_len} leaves no room for a past of {max(2, shortest)}, "
                       f"a {chunk}-token step and {steps} single-token steps")
    lengths = [longest, max(shortest, longest - 2)]
    widen = has_bfloat16(original.model) or has_bfloat16(converted.model)
    drive = _Decode(runnable_as_float32(original), runnable_as_float32(converted), layout,
                    cache_len, seed, widen)
    plan = [chunk] + [1] * steps  # new tokens per step
    driven = {"ragged": {"valid_lengths": lengths, "first_write_positions": lengths},
              "left_padded": {"past": longest, "padding": [0, 2]},
              "static": {"past": longest, "padding": [0, 2]}}
    driven = {name: driven[name] for name in scenarios}
    try:
        for name in driven:
            getattr(drive, name)(lengths if name == "ragged" else longest, plan)
    except Exception as exc:  # a model that fails to run fails the check
        if isinstance(exc, BadInput):
            raise
        drive.problems.append(f"a model failed to run: {' '.join(str(exc).split())[:300]}")
    return _outcome(drive, driven, plan, lengths, widen)


def _outcome(drive, driven: dict, plan: list[int], lengths: list[int], widen: bool) -> dict:
    problems = drive.problems
    outputs = {name: {"max_abs": float(a), "max_rel": float(r), "passed": bool(p)}
               for name, (a, r, p) in drive.stats.items()}
    what = {"ragged": f"ragged rows of {lengths[0]} and {lengths[1]} tokens",
            "left_padded": "a left-padded batch", "static": "a padded batch over the fixed cache"}
    steps = (f"{len(plan)} decode steps agree (batch 2, a {plan[0]}-token step then {len(plan) - 1} "
             f"single-token steps; {', and '.join(what[name] for name in driven)})")
    message = steps if not problems else \
        problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    outcome = {"passed": not problems, "outputs": outputs, "message": message, "steps": len(plan),
               "chunk": plan[0], "scenarios": driven}
    return outcome | ({"checked_as": "float32"} if widen else {})


class _Decode:
    """The two models driven side by side through decode steps, differences recorded."""

    def __init__(self, original, converted, layout: Layout, cache_len: int, seed: int, widen: bool):
        self.ref, self.cand = session_for(original), session_for(converted)
        self.write = _meta(converted.model, "onnx_fuse.kv_cache.write_position") or WRITE_POSITION
        self.layout, self.cache_len, self.widen = layout, cache_len, widen
        self.presents = {present for _, present in layout.pairs}
        shares = _meta(converted.model, SHARED_BUFFER) == "true"
        self.shared = {present: past for past, present in layout.pairs} if shares else None
        self.rng = np.random.default_rng(seed)
        self.stats: dict[str, list] = {}
        self.problems: list[str] = []

    def run_converted(self, feeds: dict) -> dict:
        """The converted model on `feeds`, each present in its past's buffer if it says so."""
        if self.shared:
            return run_sharing_buffers(self.cand, feeds, self.shared)
        return run_session(self.cand, feeds)

    def record(self, name, actual, expected, where) -> None:
        diff, problem = compare_output(actual, expected)
        entry = self.stats.setdefault(name, [0.0, 0.0, True])
        entry[0], entry[1] = max(entry[0], diff.max_abs), max(entry[1], diff.max_rel)
        entry[2] = entry[2] and diff.passed
        if problem:
            self.problems.append(f"{where}: '{name}' differs: {problem}")

    def caches(self, batch: int, length: int, windowed: bool = False) -> dict:
        """Random caches of `length` tokens (a windowed cache: the last `keep` of them)."""
        return {c.past: self.rng.standard_normal(
                    (batch, c.heads, _held(c, length) if windowed else length, c.head_size)
                ).astype(feed_dtype(self.layout.dtypes[c.past], self.widen))
                for c in self.layout.caches}

    def ids(self, seq: int):
        return self.rng.integers(0, self.layout.vocab, (2, seq)).astype(self.layout.dtypes[self.layout.ids])

    def others(self, starts, seq: int) -> dict:
        return other_inputs(self.layout, np.asarray(starts), seq, np.random.default_rng(_OTHERS_SEED),
                            self.widen)

    def mask(self, shape) -> np.ndarray:
        return np.zeros(shape, self.layout.dtypes[self.layout.mask]) if self.layout.mask else None

    def ragged(self, lengths: list[int], plan: list[int]) -> None:
        """Row b holds lengths[b] tokens in the fixed cache; the original runs each row alone
        (batch 1) with its own growing past."""
        layout, done = self.layout, list(lengths)
        pasts = [self.caches(1, length, windowed=True) for length in lengths]
        fixed = self.caches(2, self.cache_len)
        for b, length in enumerate(lengths):
            for name in fixed:
                held = pasts[b][name].shape[2]
                fixed[name][b, :, length - held:length] = pasts[b][name][0]
        for step, seq in enumerate(plan):
            ids, others = self.ids(seq), self.others(done, seq)
            outs = [run_session(self.ref, {layout.ids: ids[b:b + 1], **pasts[b], **_row(others, b),
                                           **self._full_mask(1, done[b] + seq)})
                    for b in range(2)]
            feeds = {layout.ids: ids, **fixed, **others, self.write: np.array(done, np.int64)}
            if layout.mask:
                feeds[layout.mask] = self.mask((2, self.cache_len))
                for b in range(2):
                    feeds[layout.mask][b, :done[b] + seq] = 1
            got = self.run_converted(feeds)
            for b in range(2):
                self._compare(got, outs[b], fixed, b, done[b] + seq, f"ragged step {step + 1}, row {b}")
                pasts[b] = {past: outs[b][present] for past, present in layout.pairs}
            fixed = {past: got[present] for past, present in layout.pairs}
            done = [n + seq for n in done]

    def _full_mask(self, batch: int, length: int) -> dict:
        if not self.layout.mask:
            return {}
        return {self.layout.mask: np.ones((batch, length), self.layout.dtypes[self.layout.mask])}

    def _compare(self, got: dict, expected: dict, fixed: dict, b: int, valid: int, where: str,
                 rows: slice | None = None) -> None:
        """Row b (or `rows`) of the converted outputs against the original's: the caches' valid
        slots hold what the original's present holds (its last tokens), the slots after them are
        what the step was given."""
        rows = rows or slice(b, b + 1)
        for name, value in expected.items():
            if name in self.presents:
                held = value.shape[2]
                self.record(name, got[name][rows, :, valid - held:valid], value, where)
            elif got[name].ndim and got[name].shape[0] == 2:
                self.record(name, got[name][rows], value, where)
            else:  # no batch axis (an input passed to an output)
                self.record(name, got[name], value, where)
        for past, present in self.layout.pairs:
            if not np.array_equal(got[present][rows, :, valid:], fixed[past][rows, :, valid:]):
                self.problems.append(f"{where}: '{present}' changed slots past the valid {valid}")

    def left_padded(self, start: int, plan: list[int]) -> None:
        """The original's own batch-2 run with row 1 left-padded by 2, mirrored slot for slot."""
        layout = self.layout
        past = self.caches(2, start, windowed=True)
        fixed = self.caches(2, self.cache_len)
        for name in fixed:
            held = past[name].shape[2]
            fixed[name][:, :, start - held:start] = past[name]
        am_orig = np.ones((2, start), layout.dtypes[layout.mask])
        am_orig[1, :2] = 0
        for step, seq in enumerate(plan):
            ids, position = self.ids(seq), am_orig.shape[1]
            others = self.others(am_orig.sum(axis=1).astype(np.int64), seq)  # cumsum(mask) - 1
            am_orig = np.concatenate([am_orig, np.ones((2, seq), am_orig.dtype)], axis=1)
            expected = run_session(self.ref, {layout.ids: ids, layout.mask: am_orig, **past, **others})
            am = self.mask((2, self.cache_len))
            am[:, :am_orig.shape[1]] = am_orig
            got = self.run_converted({layout.ids: ids, layout.mask: am, **fixed, **others,
                                          self.write: np.array([position, position], np.int64)})
            self._compare(got, expected, fixed, 0, am_orig.shape[1], f"left-padded step {step + 1}",
                          rows=slice(0, 2))
            past = {p: expected[q] for p, q in layout.pairs}
            fixed = {p: got[q] for p, q in layout.pairs}

    def static(self, start: int, plan: list[int]) -> None:
        """Both models over the same fixed caches: slots 0..start-1 valid, row 1's first 2 padded."""
        layout = self.layout
        cache = self.caches(2, self.cache_len)
        ours = dict(cache)
        am = self.mask((2, self.cache_len))
        am[:, :start] = 1
        am[1, :2] = 0
        position = start
        for step, seq in enumerate(plan):
            am[:, position:position + seq] = 1
            feeds = {layout.ids: self.ids(seq), layout.mask: am, **self.others([position] * 2, seq)}
            expected = run_session(self.ref, {**feeds, **cache})
            got = self.run_converted({**feeds, **ours})
            for name, value in expected.items():
                self.record(name, got[name], value, f"static step {step + 1}")
            cache = {p: expected[q] for p, q in layout.pairs}
            ours = {p: got[q] for p, q in layout.pairs}
            position += seq


def _held(cache, length: int) -> int:
    return length if cache.keep is None else min(length, cache.keep)


def _row(feeds: dict, b: int) -> dict:
    """Row b of the batch-2 inputs that have a batch axis (the others as they are)."""
    return {name: value[b:b + 1] if value.ndim >= 1 and value.shape[0] == 2 else value
            for name, value in feeds.items()}


def _meta(model, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)
