"""onnx-fuse: find attention, mask, RoPE and KV-cache subgraphs in exported transformer models
and rewrite them into fused ops, proving each result equal to its input."""

from .errors import BadInput, CheckFailed
from .fuse import FuseResult, fuse

__all__ = ["fuse", "FuseResult", "BadInput", "CheckFailed"]
__version__ = "0.1.0"
