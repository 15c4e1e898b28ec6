"""Proof that a rewritten model computes what its source did: both run in onnxruntime on the
same inputs (the caller's, or synthesized ones that respect the model), every output compared."""

from __future__ import annotations

import onnx

from .errors import CheckFailed
from .model_io import SourceModel


class Prover:
    """Runs the source once and compares each rewritten model with it."""

    def __init__(self, source: SourceModel, inputs: dict | None):
        self.source, self.inputs = source, inputs
        self.reference_outputs = None
        self.last: dict | None = None

    def require(self, model: onnx.ModelProto, what: str) -> None:
        from .check import CheckError, ModelRef, check_equivalent, run_model, synthesize_inputs

        reference = ModelRef(self.source.model, self.source.base_dir)
        if self.inputs is None:
            self.inputs = synthesize_inputs(reference)
        if self.reference_outputs is None:
            try:
                self.reference_outputs = run_model(reference, self.inputs)
            except Exception as exc:  # onnxruntime raises many unrelated exception types
                lines = str(exc).strip().splitlines()
                raise CheckError("the input model failed to run: "
                                 + (lines[0] if lines else type(exc).__name__)) from None
        outcome = check_equivalent(reference, ModelRef(model, self.source.base_dir), self.inputs,
                                   reference_outputs=self.reference_outputs)
        self.last = outcome.to_json()
        if not outcome.passed:
            raise CheckFailed(f"{what} does not match the input model: {outcome.message}",
                              self.last)
