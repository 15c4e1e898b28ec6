#!/usr/bin/env python
"""Fingerprints of what onnx-fuse writes for every committed model, to show that a change of the
engine's structure changes no output: record them before the change, compare after.

    python benchmarks/fingerprints.py record benchmarks/out/before.json
    python benchmarks/fingerprints.py compare benchmarks/out/before.json

Each model is fused for every configuration below (no check: the check never changes what is
written) and the SHA-256 of the serialized output, or the error line, is recorded. `compare`
prints every model/configuration whose output differs and exits 1 if any does.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, os.pardir, "models")
sys.path.insert(0, os.path.join(HERE, os.pardir))

CONFIGS = {
    "onnx": dict(target="onnx"),
    "onnx-max-positions-64": dict(target="onnx", max_positions=64),
    "primitive-trt": dict(target="primitive-trt"),
    "kv-static-64": dict(target="onnx", kv_cache="static", max_cache_len=64),
    "ort": dict(target="ort"),
    "trt11": dict(target="trt11"),
    "trt-plugin": dict(target="trt-plugin"),
    "trt11-kv-static-16": dict(target="trt11", kv_cache="static", max_cache_len=16),
    "trt-plugin-kv-static-16": dict(target="trt-plugin", kv_cache="static", max_cache_len=16),
    "ort-kv-static-64": dict(target="ort", kv_cache="static", max_cache_len=64),
}


def fingerprint(path: str, options: dict) -> str:
    import onnx_fuse

    try:
        result = onnx_fuse.fuse(path, check=False, **options)
    except onnx_fuse.BadInput as exc:
        return f"refused: {str(exc).splitlines()[0]}"
    return hashlib.sha256(result.model.SerializeToString(deterministic=True)).hexdigest()


def fingerprints() -> dict:
    manifest = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
    found = {}
    for name in sorted(manifest):
        for config, options in CONFIGS.items():
            if "kv-static" in config and manifest[name]["kind"] != "decode":
                continue
            found[f"{name} [{config}]"] = fingerprint(os.path.join(MODELS, name), options)
            print(f"{name} [{config}]: {found[f'{name} [{config}]'][:16]}", flush=True)
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("record", "compare"):
        print(__doc__)
        return 2
    command, path = argv
    if command == "record":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        json.dump(fingerprints(), open(path, "w"), indent=1, sort_keys=True)
        return 0
    before, after = json.load(open(path)), fingerprints()
    differ = [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    for key in differ:
        print(f"DIFFERS {key}: {before.get(key)} -> {after.get(key)}")
    print(f"{len(after) - len(differ)} of {len(after)} outputs identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
