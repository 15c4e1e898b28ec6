"""Proof that a rewritten model computes what its source did: both run in onnxruntime on the
same inputs (the caller's, every feed of an inputs file, or synthesized ones that respect the
model: one set per branch of an If the inputs select), every output compared, within the dtype's
tolerance or the caller's (tolerances.py).

A bfloat16 source is checked as float32 (widen.py): onnxruntime's CPU provider cannot run it, its
float32 copy it can; source and result are widened alike and compared with float32's tolerance,
and the verdict says `checked_as: float32`.

A repair of exporter-broken ops (repair.py) is proven before the pass: the repaired model equals
the source at batch 1 (where an export with batch-1 caches runs), and at batch 2, a padded row
included, every row equals the source run on that row alone; it then becomes the source.
"""

from __future__ import annotations

import numpy as np
import onnx

from . import progress
from .errors import CheckFailed, first_line
from .model_io import SourceModel


class Prover:
    """Runs the source once per input set and compares each rewritten model with it.

    inputs:     None (synthesized, `batch` rows, one set per If branch the inputs select), one
                feed {name: array}, or a list of feeds (Polygraphy's input files hold one per
                iteration): every set must agree.
    tolerances: overrides of the dtype tolerances (tolerances.Tolerances), or None.
    """

    def __init__(self, source: SourceModel, inputs: dict | list | None, tolerances=None,
                 batch: int = 2):
        from .widen import has_bfloat16

        self.source, self.tolerances, self.batch = source, tolerances, batch
        self.feeds = [inputs] if isinstance(inputs, dict) else inputs
        self.checked_as = "float32" if has_bfloat16(source.model) else None
        self.cases = None  # check.InputCase per input set, the source's outputs included
        self._reference = None
        self.last: dict | None = None

    def require(self, model: onnx.ModelProto, what: str, base_dir: str | None = None) -> None:
        """Raise CheckFailed unless `model` (external data in `base_dir`, default the source's)
        agrees with the source on every input set."""
        from .check import check_case, merge_results

        progress.phase("check", what)
        reference, cases = self.reference(), self.input_cases()
        candidate = self.runnable(model, base_dir)
        outcome = merge_results([check_case(reference, candidate, c, self.tolerances) for c in cases],
                                [c.label or f"feed {i}" for i, c in enumerate(cases)])
        outcome.checked_as = self.checked_as
        self.last = outcome.to_json()
        # What it ran on (the first set's shapes): says what --check-batch or --inputs gave.
        self.last["inputs"] = {name: list(np.shape(value)) for name, value in cases[0].inputs.items()}
        self.last["input_sets"] = len(cases)
        if not outcome.passed:
            raise CheckFailed(f"{what} does not match the input model: {outcome.message}", self.last)

    def require_repair(self, repaired: onnx.ModelProto) -> None:
        """Prove `repaired` against the source (see module docstring), then rewrite and check
        against it instead: raises CheckFailed if it differs."""
        from .check import ModelRef, check_case, merge_results, synthesize_cases

        original, candidate = self.reference(), self.runnable(repaired)
        single = synthesize_cases(original, batch=1)
        results = [check_case(original, candidate, case) for case in single]
        results += [_rows_alone(original, candidate, case)
                    for case in synthesize_cases(candidate, batch=max(self.batch, 2))]
        labels = [f"batch 1 {c.label}".strip() for c in single] + ["batch 2, row by row"] * (
            len(results) - len(single))
        outcome = merge_results(results, labels)
        outcome.checked_as = self.checked_as
        self.last = outcome.to_json()
        if not outcome.passed:
            raise CheckFailed(f"the repaired model does not match the input model: {outcome.message}",
                              self.last)
        self.source = SourceModel(repaired, self.source.base_dir, self.source.path)
        self.cases, self._reference = None, ModelRef(candidate.model, candidate.base_dir)

    def runnable(self, model: onnx.ModelProto, base_dir: str | None = None):
        """`model` as onnxruntime's CPU provider can run it (widened when the source is bf16)."""
        from .check import ModelRef, runnable_as_float32

        ref = ModelRef(model, base_dir if base_dir is not None else self.source.base_dir)
        return runnable_as_float32(ref) if self.checked_as else ref

    def reference(self):
        if self._reference is None:
            self._reference = self.runnable(self.source.model)
        return self._reference

    def input_cases(self) -> list:
        """The input sets with the source's outputs on them (computed once)."""
        from .check import CheckError, InputCase, run_model, synthesize_cases
        from .widen import widened_inputs

        if self.cases is None:
            reference = self.reference()
            if self.feeds is None:
                cases = synthesize_cases(reference, batch=self.batch)
            else:
                cases = [InputCase(widened_inputs(feed) if self.checked_as else feed)
                         for feed in self.feeds]
            for case in cases:
                if case.outputs is None:
                    try:
                        case.outputs = run_model(reference, case.inputs)
                    except Exception as exc:  # onnxruntime raises many unrelated exception types
                        raise CheckError(f"the input model failed to run: {first_line(exc)}") from None
            self.cases = cases
        return self.cases


def _rows_alone(original, candidate, case):
    """`candidate` on the batch of `case` against `original` on each of its rows alone."""
    from .check import CheckError, CheckResult, compare_outputs, input_specs, merge_results, run_model

    try:
        full = run_model(candidate, case.inputs)
    except Exception as exc:  # onnxruntime raises many unrelated exception types
        return CheckResult(False, {}, f"the repaired model failed to run: {first_line(exc)}")
    batched = {s.name for s in input_specs(original.model) if s.dims and isinstance(s.dims[0], str)}
    batch = max((case.inputs[name].shape[0] for name in batched if name in case.inputs), default=1)
    results = []
    for row in range(batch):
        inputs = {name: value[row:row + 1] if name in batched else value
                  for name, value in case.inputs.items()}
        try:
            expected = run_model(original, inputs)
        except Exception as exc:
            raise CheckError(f"the input model failed to run on one row: {first_line(exc)}") from None
        actual = {name: value[row:row + 1] if value.ndim and value.shape[0] == batch else value
                  for name, value in full.items()}
        results.append(compare_outputs(original.model, inputs, expected, actual))
    return merge_results(results, [f"row {row}" for row in range(batch)])
