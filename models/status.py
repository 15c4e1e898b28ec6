#!/usr/bin/env python
"""Working tool for models/STATUS.md (delete with it): run the onnx-fuse CLI on model files and
tabulate what happened.

    python models/status.py FILE.onnx ... [--out models/STATUS.md] [--json status.json]

Per file: `onnx-fuse fuse M -o TMP --report R` (default target onnx, no flags); decode files
(a `past_key_values`/`input.cache` input) also `--kv-cache static --max-cache-len 64`; every
file also `--max-positions 64` (RoPE computed from positions fuses only with it). Recorded:
exit code, counts (attention, rope, kv_cache), unfused candidates with their distinct reasons,
the check message (or the one stderr line when the exit code is not 0). Nothing in the engine
is changed by this script.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

import onnx


def _is_decode(path):
    m = onnx.load(path, load_external_data=False)
    return any(i.name.startswith(("past_key_values", "input.cache.")) for i in m.graph.input)


def run(path, extra, timeout=900):
    with tempfile.TemporaryDirectory() as d:
        out, rep = os.path.join(d, "x.onnx"), os.path.join(d, "r.json")
        t0 = time.time()
        try:
            p = subprocess.run(["onnx-fuse", "fuse", path, "-o", out, "--report", rep, *extra],
                               capture_output=True, text=True, timeout=timeout)
            rc, err = p.returncode, (p.stderr.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            rc, err = "timeout", f"timed out after {timeout} s"
        res = {"rc": rc, "seconds": round(time.time() - t0, 1), "stderr": err if rc != 0 else ""}
        if os.path.exists(rep):
            r = json.load(open(rep))
            res["counts"] = r.get("counts", {})
            reasons = collections.Counter(f"{u.get('pattern')}: {u.get('reason')}" for u in r.get("unfused", []))
            res["unfused"] = len(r.get("unfused", []))
            res["reasons"] = dict(reasons)
            res["check"] = (r.get("check") or {}).get("message", "")
            res["kv_cache"] = r.get("kv_cache")
        return res


def _counts(c):
    keys = sorted(c)
    short = {"attention": "att", "rope": "rope", "kv_cache": "kv"}
    return ", ".join(f"{short.get(k, k)} {c[k]}" for k in keys) or "-"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = {}
    for f in args.files:
        name = os.path.basename(f)
        rows[name] = {"default": run(f, []), "maxpos64": run(f, ["--max-positions", "64"])}
        if _is_decode(f):
            rows[name]["static64"] = run(f, ["--kv-cache", "static", "--max-cache-len", "64"])
        print(name, json.dumps(rows[name])[:400], flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
