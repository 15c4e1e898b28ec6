"""Export the benchmark graphs: the tiny random-weight Llama (GQA) of models/export.py with
32 and 80 layers, decode (past key/values in, present out), TorchScript exporter, opset 17.

Needs torch and transformers (run with a Python that has them, e.g. /work/venv-export);
bench_fuse.py calls this script itself when a cached file is missing.

    python benchmarks/build_models.py OUT_DIR LAYERS [LAYERS ...]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def model_path(out_dir: str, layers: int) -> str:
    return os.path.join(out_dir, f"llama-gqa_decode_eager_torchscript_{layers}l.onnx")


def build(out_dir: str, layers: int) -> str:
    sys.path.insert(0, os.path.join(HERE, os.pardir, "models"))
    import export  # models/export.py

    export.LAYERS = layers  # the config builders read the module global at call time
    spec = next(s for s in export.REGISTRY if s.name == "llama-gqa")
    target = model_path(out_dir, layers)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        export.export_one(spec, "decode", "eager", "torchscript", tmp)
        written = os.path.join(tmp, export.file_name(spec, "decode", "eager", "torchscript"))
        shutil.move(written, target)
    return target


if __name__ == "__main__":
    out = sys.argv[1]
    for n in sys.argv[2:]:
        print(build(out, int(n)))
