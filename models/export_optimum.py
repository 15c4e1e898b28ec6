#!/usr/bin/env python
"""Export tiny random-weight models with Hugging Face optimum (``optimum-onnx``) and add them to
models/manifest.json.

optimum-onnx 0.1.0 pins transformers < 4.58, so this script runs in its own venv:

    python3 -m venv /work/venvs/optimum && . /work/venvs/optimum/bin/activate
    pip install torch==2.13.0 optimum-onnx==0.1.0 onnxruntime onnx
    python models/export_optimum.py            # export + verify, update models/manifest.json
    python models/export_optimum.py --no-verify

What it writes (exporter "optimum", optimum's own TorchScript-based exporter, its default opset):

* ``optimum-llama_decode_sdpa_optimum.onnx``: ``main_export(task="text-generation-with-past")``,
  optimum's one decoder for every step: inputs input_ids, attention_mask [B, past + S],
  position_ids [B, S], past_key_values.N.key|value; outputs logits, present.N.key|value.
* ``optimum-llama_decode-merged_sdpa_optimum.onnx``: the merged decoder optimum used to ship
  (``decoder_model_merged.onnx``): the first-step decoder (no past inputs, presents out) and the
  with-past decoder joined by ``optimum.onnx.merge_decoders`` into one graph whose only node is
  an ``If`` on the extra input ``use_cache_branch`` [1] bool (then: the cached step; else: the first
  step, which ignores the past inputs). Attention lives inside the If's subgraphs.

The model is built from a config class (never downloaded), its weights redrawn as in export.py
(matrices N(0, 0.15^2), biases 0.1 N, norm scales 1 + 0.1 N; seed from the spec name), saved
with save_pretrained into a temporary directory and exported from there. Deterministic (the
script re-runs itself with PYTHONHASHSEED=0: merge_decoders' initializer names follow set order).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1234  # export.py's


def _llama_config():
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)


SPECS = {"optimum-llama": dict(arch="llama", make_config=_llama_config, model_cls=transformers.LlamaForCausalLM,
                               onnx_config="LlamaOnnxConfig")}


def build(name):
    spec = SPECS[name]
    cfg = spec["make_config"]()
    seed = SEED + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 100000
    torch.manual_seed(seed)
    model = spec["model_cls"](cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if p.ndim >= 2:
                p.copy_(noise * 0.15)
            elif pname.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval(), cfg


def export(name, out_dir):
    import onnx
    from optimum.exporters.onnx import export as onnx_export
    from optimum.exporters.onnx import main_export
    from optimum.exporters.onnx import model_configs
    from optimum.onnx import merge_decoders

    model, cfg = build(name)
    tmp = tempfile.mkdtemp(prefix=f"optimum-{name}-")
    try:
        src = os.path.join(tmp, "model")
        model.save_pretrained(src)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_export(src, os.path.join(tmp, "with_past"), task="text-generation-with-past", do_validation=False)
            oc_cls = getattr(model_configs, SPECS[name]["onnx_config"])
            first = oc_cls(model.config, task="text-generation", use_past=True, use_past_in_inputs=False)
            onnx_export(model, first, Path(tmp, "first.onnx"))
        files = {}
        p = os.path.join(out_dir, f"{name}_decode_sdpa_optimum.onnx")
        onnx.save(onnx.load(os.path.join(tmp, "with_past", "model.onnx")), p)
        files[os.path.basename(p)] = "decode"
        pm = os.path.join(out_dir, f"{name}_decode-merged_sdpa_optimum.onnx")
        merge_decoders(decoder=os.path.join(tmp, "first.onnx"),
                       decoder_with_past=os.path.join(tmp, "with_past", "model.onnx"), save_path=pm)
        onnx.save(onnx.load(pm), pm)
        files[os.path.basename(pm)] = "decode_merged"
        return files, cfg
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def truth(name, cfg, kind, path):
    import onnx

    m = onnx.load(path)
    layers = cfg.num_hidden_layers
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    merged = kind == "decode_merged"
    return {
        "spec": name, "arch": SPECS[name]["arch"], "kind": kind, "attn_implementation": "sdpa",
        "layers": layers, "q_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
        "head_size": cfg.head_dim, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        # merged: each branch holds a full decoder: 2 per layer in the file, 1 per layer run
        "attention_cores": 2 * layers if merged else layers,
        "rope_applications": (4 if merged else 2) * layers,
        "kv_cache_writes": 2 * layers,  # the with-past branch's Concats (first step: present = new K/V)
        "causal": True, "gqa": True, "position_embedding": "rope", "attention_scale": cfg.head_dim ** -0.5,
        "rotary_dim": cfg.head_dim, "rope_interleaved": False, "exporter": "optimum", "opset": opset,
        "inputs": [i.name for i in m.graph.input], "outputs": [o.name for o in m.graph.output],
        "dtype": "float32", "cache": "growing", "attention_sinks": False, "moe": None, "qk_norm": False,
        "rope_scaling": None, "cross_attention_cores": 0, "subgraph": merged, "known_exporter_bugs": [],
        "optimum_onnx_version": __import__("importlib.metadata").metadata.version("optimum-onnx"),
        "transformers_version": transformers.__version__,
        "notes": ("optimum decoder (text-generation-with-past): position_ids is an input; attention_mask covers "
                  "past + new tokens" if not merged else
                  "optimum merged decoder: one If on use_cache_branch; then-branch = decoder with past "
                  "(Concat caches), else-branch = first-step decoder (past inputs unused, present = new K/V); "
                  "attention_cores/rope_applications count both branches"),
    }


def verify(name, kind, path):
    """onnx.checker + onnxruntime vs PyTorch (transformers of this venv), batch 2 with a
    left-padded row, past 9 (+ 1 token) and past 6 (+ 4); merged: both branches."""
    import onnx
    import onnxruntime as ort
    from transformers import DynamicCache

    onnx.checker.check_model(path, full_check=True)
    model, cfg = build(name)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    res = []
    g = torch.Generator().manual_seed(7)
    cases = [(2, 1, 9, 3), (2, 4, 6, 2), (1, 1, 1, 0)]
    if kind == "decode_merged":
        cases += [(2, 11, 0, 3), (1, 5, 0, 0)]  # first step (use_cache_branch False)
    for b, s, past, pad in cases:
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
        mask = torch.ones(b, past + s, dtype=torch.int64)
        if pad and b > 1:
            mask[1, :pad] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -s:]  # what optimum's ORTModel passes
        kv = [torch.randn(b, cfg.num_key_value_heads, past, cfg.head_dim, generator=g) for _ in range(2 * cfg.num_hidden_layers)]
        cache = DynamicCache()
        if past:
            for i in range(cfg.num_hidden_layers):
                cache.update(kv[2 * i].clone(), kv[2 * i + 1].clone(), i)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        ref = [out.logits.numpy()]
        for i in range(cfg.num_hidden_layers):
            ref += [out.past_key_values.layers[i].keys.numpy(), out.past_key_values.layers[i].values.numpy()] \
                if hasattr(out.past_key_values, "layers") else [t.numpy() for t in out.past_key_values[i]]
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        for i in range(cfg.num_hidden_layers):
            k = kv[2 * i] if past else torch.zeros(b, cfg.num_key_value_heads, 0 if kind != "decode_merged" else 1, cfg.head_dim)
            v = kv[2 * i + 1] if past else torch.zeros_like(k)
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k.numpy(), v.numpy()
        if "use_cache_branch" in names:
            feed["use_cache_branch"] = np.array([past > 0])
        got = sess.run(None, {k: v for k, v in feed.items() if k in names})
        valid = mask[:, -s:].numpy().astype(bool)
        d = [float(np.abs(r - o)[valid].max()) if j == 0 else float(np.abs(r - o).max())
             for j, (r, o) in enumerate(zip(ref, got))]
        res.append(dict(batch=b, seq=s, past=past, max_abs_diff=max(d)))
    ok = all(r["max_abs_diff"] < 1e-3 for r in res)
    return ok, res


def main(argv=None):
    # optimum.onnx.merge_decoders names the shared initializers in set order: without a fixed hash
    # seed the merged file differs from run to run (names only)
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    mpath = os.path.join(args.out, "manifest.json")
    manifest = json.load(open(mpath)) if os.path.exists(mpath) else {"files": {}, "skipped": []}
    n_fail = 0
    for name in SPECS:
        files, cfg = export(name, args.out)
        for fname, kind in files.items():
            path = os.path.join(args.out, fname)
            entry = truth(name, cfg, kind, path)
            if not args.no_verify:
                ok, res = verify(name, kind, path)
                entry["ort_cpu_runs"] = True
                print(f"{fname:55} {os.path.getsize(path) / 1024:6.0f} KiB  "
                      + " ".join(f"{r['max_abs_diff']:.1e}" for r in res) + ("  OK" if ok else "  FAIL"))
                n_fail += not ok
            manifest["files"][fname] = entry
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest.setdefault("versions", {})["optimum_venv"] = {
        "transformers": transformers.__version__, "torch": torch.__version__,
        "optimum-onnx": __import__("importlib.metadata").metadata.version("optimum-onnx")}
    with open(mpath, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
