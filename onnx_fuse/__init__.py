"""onnx-fuse: find attention, mask, RoPE and KV-cache subgraphs in exported transformer models
and rewrite them into fused ops, proving each result equal to its input."""

import os as _os

# The fusion rules live in patterns/ beside this package and are installed as
# onnx_fuse.patterns (pyproject's package-dir). Run from a source checkout (the repository root
# first on sys.path, e.g. `python -m onnx_fuse.cli` there), the package finds them beside it.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "patterns")) and _os.path.isfile(
        _os.path.join(_os.path.dirname(_here), "patterns", "__init__.py")):
    __path__.append(_os.path.dirname(_here))

from .api import fuse  # noqa: E402
from .errors import BadInput, CheckFailed  # noqa: E402
from .result import FuseResult  # noqa: E402
from .tolerances import Tolerances  # noqa: E402

__all__ = ["fuse", "FuseResult", "BadInput", "CheckFailed", "Tolerances"]
__version__ = "0.1.0"
