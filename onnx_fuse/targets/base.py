"""What a target is: the extension point for a new kind of output.

A target turns the specs that rules produce (specs.py: what a match computes) into nodes. It
declares the default-domain opset and the other domains its nodes need, which specs it can
express (a spec it cannot express becomes an `unfused` entry with the target's reason, decided
before anything is emitted), how the written model is proven equal to the original, and the
static contract check of the runtime it is for (TensorRT's parser, say).

Adding a target: subclass Target in a module of its own under targets/, fill in the class
attributes, write one emitter per spec type it expresses (`emitters`), override `refusal` for
what those emitters cannot say (a mask kind, a window, sinks), and register it in
targets/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import onnx

from ..errors import BadInput
from ..rewrite import Reject, Rewrite
from .views import emit_views


@dataclass(frozen=True)
class Proof:
    """How a target's output is proven equal to its input.

    kind "onnxruntime": onnxruntime runs the written model as it is.
    kind "functions":   the emitted custom ops carry model-local function bodies in standard ops,
                        which onnxruntime runs in their place.
    kind "none":        onnxruntime cannot run the output; `reason` says why (fuse refuses to
                        write such a model unless the check is turned off).
    """

    kind: str
    reason: str = ""


ONNXRUNTIME = Proof("onnxruntime")


class Target:
    name: ClassVar[str]
    floor_opset: ClassVar[int]  # default-domain opset the emitted ops need
    domains: ClassVar[dict[str, int]] = {}  # other opset imports the emitted nodes need
    proof: ClassVar[Proof] = ONNXRUNTIME
    # Whether `--kv-cache static` can write its fixed caches for this target (the standard form,
    # TensorScatter and masked Attention, or the target's `static_form`).
    static_cache: ClassVar[bool] = False
    # spec type -> emitter(spec, rewrite); a spec of another type is left as primitive ops.
    emitters: ClassVar[dict[type, Callable[[Any, Rewrite], None]]] = {}
    # The report key under which `contract` entries appear (the runtime they are checked for).
    contract_name: ClassVar[str] = "tensorrt"
    # Whether the emitters keep a quantized spec's Q/DQ pairs (its `quant`); a target that does not
    # leaves such specs as they are, so no quantization is ever dropped silently.
    keeps_quantization: ClassVar[bool] = False
    # The fused ops this target writes, as (domain, op_type). A rule that describes such an op
    # already in the model (Rule.written_op: an exporter's ONNX Attention) leaves it as it is for
    # this target: rewriting an op into itself is no fusion. The report lists it under `kept`.
    own_ops: ClassVar[frozenset[tuple[str, str]]] = frozenset()

    def static_form(self):
        """How `--kv-cache static` writes and reads this target's fixed caches
        (kv_static.StandardForm's interface), or None for the standard ops' form."""
        return None

    def configured(self, options: dict) -> "Target":
        """This target with the user's options for it (e.g. {"cp_ranks": 2}); BadInput for an
        option it does not take. A target without options is its own configuration."""
        if options:
            raise BadInput(f"target {self.name} takes no option {', '.join(sorted(options))}")
        return self

    def notes(self) -> list[str]:
        """What the user must know to run the output (a build flag, a hardware requirement):
        the report's `target_notes`."""
        return []

    def refusal(self, spec) -> str | None:
        """Why this target cannot express `spec`, or None if it can."""
        if type(spec) not in self.emitters:
            return f"target {self.name} keeps this as primitive ops"
        if getattr(spec, "quant", None) is not None and not self.keeps_quantization:
            return f"target {self.name} does not write quantized attention (its Q/DQ pairs); left as it is"
        return None

    def spec_opset(self, spec) -> int:
        """The default-domain opset what this target emits for `spec` needs beyond floor_opset
        (0: none): by default the spec's own `min_opset` (TensorScatter's 24), which a target
        whose op for that spec needs no newer standard op overrides."""
        return getattr(spec, "min_opset", 0)

    def emit(self, spec, rw: Rewrite) -> None:
        """Add the nodes that compute what `spec` describes to `rw` (they take over its output)."""
        reason = self.refusal(spec)
        if reason is not None:
            raise Reject(reason)
        if getattr(spec, "views", None) is not None:  # stand-ins the source's op computed inside it
            emit_views(spec, rw)
        self.emitters[type(spec)](spec, rw)

    def finish(self, graph, result) -> None:
        """Called once after every rule ran and before the graph is tidied and exported: a
        rewrite that spans fusions of several rules (a RoPE folded into the attention op that
        reads it). `result` is the pass's PassResult; the default does nothing."""

    def contract(self, model: onnx.ModelProto) -> list[dict]:
        """The static check of the written model against the runtime's contract: one entry
        {node, op, problems} per node it has rules for; an empty `problems` meets them."""
        return []
