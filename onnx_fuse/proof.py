"""Proof that a rewritten model computes what its source did: both run in onnxruntime on the
same inputs (the caller's, or synthesized ones that respect the model), every output compared."""

from __future__ import annotations

import numpy as np
import onnx

from . import progress
from .errors import CheckFailed
from .model_io import SourceModel


class Prover:
    """Runs the source once per feed and compares each rewritten model with it.

    inputs:     None (synthesized, `batch` rows), one feed {name: array}, or a list of feeds
                (Polygraphy's input files hold one per iteration): every feed must agree.
    tolerances: overrides of the dtype tolerances (tolerances.Tolerances), or None.
    """

    def __init__(self, source: SourceModel, inputs: dict | list | None, tolerances=None,
                 batch: int = 2):
        self.source, self.tolerances, self.batch = source, tolerances, batch
        self.feeds = [inputs] if isinstance(inputs, dict) else inputs
        self.reference_outputs: list | None = None
        self.last: dict | None = None

    def require(self, model: onnx.ModelProto, what: str, base_dir: str | None = None) -> None:
        """CheckFailed unless `model` (external data in `base_dir`, default the source's) agrees
        with the source on every feed."""
        from .check import ModelRef, check_equivalent

        progress.phase("check", what)
        reference = ModelRef(self.source.model, self.source.base_dir)
        references = self._reference_outputs(reference)
        candidate = ModelRef(model, base_dir if base_dir is not None else self.source.base_dir)
        outcomes = [check_equivalent(reference, candidate, feed,
                                     reference_outputs=outputs, tolerances=self.tolerances)
                    for feed, outputs in zip(self.feeds, references)]
        self.last = _combined(outcomes)
        # What it ran on (the first feed's shapes): says what --check-batch or --inputs gave.
        self.last["inputs"] = {name: list(np.shape(value)) for name, value in self.feeds[0].items()}
        if not self.last["passed"]:
            raise CheckFailed(f"{what} does not match the input model: {self.last['message']}",
                              self.last)

    def _reference_outputs(self, reference) -> list:
        from .check import CheckError, run_model, synthesize_inputs

        if self.feeds is None:
            self.feeds = [synthesize_inputs(reference, batch=self.batch)]
        if self.reference_outputs is None:
            try:
                self.reference_outputs = [run_model(reference, feed) for feed in self.feeds]
            except Exception as exc:  # onnxruntime raises many unrelated exception types
                lines = str(exc).strip().splitlines()
                raise CheckError("the input model failed to run: "
                                 + (lines[0] if lines else type(exc).__name__)) from None
        return self.reference_outputs


def _combined(outcomes: list) -> dict:
    """One verdict over several feeds: the first failing feed's result (which feed it was in the
    message), else the one whose outputs differ most."""
    if len(outcomes) == 1:
        return outcomes[0].to_json()
    failed = [(i, o) for i, o in enumerate(outcomes) if not o.passed]
    index, chosen = failed[0] if failed else max(
        enumerate(outcomes), key=lambda item: max((d.max_abs for d in item[1].outputs.values()),
                                                  default=0.0))
    combined = chosen.to_json()
    combined["feeds"] = len(outcomes)
    combined["message"] = (f"feed {index} of {len(outcomes)}: {chosen.message}" if failed
                           else f"{len(outcomes)} feeds: {chosen.message}")
    return combined
