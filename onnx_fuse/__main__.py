"""`python -m onnx_fuse`: the `onnx-fuse` command (same options, exit codes and one-line errors)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
