"""The fusion rules, one module per fusion family (installed as onnx_fuse.patterns)."""

from .attention import RULES as ATTENTION_RULES
from .rope import RULES as ROPE_RULES

RULES = [*ATTENTION_RULES, *ROPE_RULES]
