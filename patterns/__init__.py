"""The fusion rules, one module per fusion family (installed as onnx_fuse.patterns)."""

from .attention import RULES as ATTENTION_RULES
from .attention_op import RULES as ATTENTION_OP_RULES
from .kv_cache import RULES as KV_CACHE_RULES
from .rope import RULES as ROPE_RULES

RULES = [*ATTENTION_RULES, *ATTENTION_OP_RULES, *ROPE_RULES, *KV_CACHE_RULES]
