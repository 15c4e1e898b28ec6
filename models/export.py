#!/usr/bin/env python
"""Build tiny random-weight Hugging Face models and export them to ONNX.

Every model spec in ``REGISTRY`` is built from a config class (never downloaded),
seeded deterministically, and exported with BOTH torch.onnx exporters:

* TorchScript exporter: ``torch.onnx.export(..., dynamo=False, opset_version=17, dynamic_axes=...)``
* dynamo exporter:      ``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`` (default opset)

for every attention implementation ("eager", "sdpa") and every kind the spec
supports ("prefill"/"decode" for decoders, "encoder" for encoders).

Ground truth for each file (taken from the model config, not from the graph)
is written to ``manifest.json``.  After exporting, every file is checked with
``onnx.checker`` and run in onnxruntime against the PyTorch model (unless
``--no-verify``).

Usage::

    python models/export.py [--out models/] [--only NAME ...] [--exporters torchscript dynamo]
                            [--attn eager sdpa] [--no-verify] [--no-export]

To add an architecture, add a ``ModelSpec`` to ``REGISTRY`` (see the
"Registry" section).  Decoder specs list kinds ("prefill", "decode"); encoder
specs use kind "encoder" with ``input_kind`` "text" (input_ids + attention_mask)
or "image" (pixel_values).  Combinations that cannot be exported are recorded in
the manifest's ``skipped`` list (automatically on exception, or declared via
``known_skips``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import transformers
from transformers import DynamicCache

# "torchvision is not installed. Skipping torchvision::nms" etc.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

HERE = os.path.dirname(os.path.abspath(__file__))

TORCHSCRIPT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
TOL = 1e-3  # max abs diff ONNX Runtime vs PyTorch
SEED = 1234

# --------------------------------------------------------------------------------------
# Tiny default dimensions shared by all specs
# --------------------------------------------------------------------------------------
HIDDEN = 64
LAYERS = 2
Q_HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 128
VOCAB = 256
MAX_POS = 128


# --------------------------------------------------------------------------------------
# Spec definition
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelSpec:
    """One architecture.  ``make_config(attn_impl)`` returns a transformers config,
    ``model_cls`` is instantiated with it."""

    name: str  # file-name prefix, e.g. "llama-gqa"
    arch: str  # model_type-ish architecture label recorded in the manifest
    make_config: Callable[[str], Any]
    model_cls: type
    kinds: tuple[str, ...]  # subset of ("prefill", "decode") or ("encoder",)
    causal: bool
    # "rope" (rotary: 2 RoPE applications -- q and k -- per layer), "learned_absolute", ...
    position_embedding: str
    input_kind: str = "text"  # "text" | "image"
    attn_impls: tuple[str, ...] = ("eager", "sdpa")
    notes: str = ""
    # Optional hook returning extra ground-truth fields (e.g. sliding_window) from the config.
    extra_truth: Callable[[Any], dict] | None = None
    # Built by a plain `export.py` run; False = only with --only NAME (opt-in extras).
    in_default_set: bool = True
    # (kind, attn_impl, exporter) -> reason, for combinations known not to export.
    known_skips: dict[tuple[str, str, str], str] = dataclasses.field(default_factory=dict)
    # Optional override of the attention scale (default 1/sqrt(head_size)), e.g. Gemma 2's
    # query_pre_attn_scalar.
    attention_scale: Callable[[Any], float] | None = None

    def config(self, attn_impl: str):
        cfg = self.make_config(attn_impl)
        # transformers 5: the attention implementation lives on the config
        cfg._attn_implementation = attn_impl
        return cfg


def _cfg_get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def ground_truth(spec: ModelSpec, cfg, kind: str) -> dict:
    layers = _cfg_get(cfg, "num_hidden_layers", "n_layer")
    q_heads = _cfg_get(cfg, "num_attention_heads", "n_head")
    kv_heads = _cfg_get(cfg, "num_key_value_heads", default=q_heads)
    hidden = _cfg_get(cfg, "hidden_size", "n_embd")
    head_size = _cfg_get(cfg, "head_dim", default=hidden // q_heads)
    truth = {
        "arch": spec.arch,
        "kind": kind,
        "attn_implementation": cfg._attn_implementation,
        "layers": layers,
        "q_heads": q_heads,
        "kv_heads": kv_heads,
        "head_size": head_size,
        "hidden_size": hidden,
        "vocab_size": getattr(cfg, "vocab_size", None) if spec.input_kind == "text" else None,
        "attention_cores": layers,
        "rope_applications": 2 * layers if spec.position_embedding == "rope" else 0,
        "kv_cache_writes": 2 * layers if kind == "decode" else 0,
        "causal": spec.causal,
        "gqa": kv_heads != q_heads,
        "position_embedding": spec.position_embedding,
        # softmax(Q K^T * attention_scale): all current specs use 1/sqrt(head_size)
        "attention_scale": spec.attention_scale(cfg) if spec.attention_scale else head_size ** -0.5,
    }
    if spec.extra_truth is not None:
        truth.update(spec.extra_truth(cfg))
    return truth


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------
def _llama_config(attn_impl):
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
        attn_implementation=attn_impl,
    )


def _qwen2_config(attn_impl):
    return transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
        use_sliding_window=False,
        attn_implementation=attn_impl,
    )


def _qwen3_config(attn_impl):
    return transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
        use_sliding_window=False,
        attn_implementation=attn_impl,
    )


def _gpt2_config(attn_impl):
    return transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=Q_HEADS,
        n_inner=INTERMEDIATE,
        n_positions=MAX_POS,
        attn_implementation=attn_impl,
    )


def _bert_config(attn_impl):
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=Q_HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POS,
        attn_implementation=attn_impl,
    )


def _vit_config(attn_impl):
    return transformers.ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=Q_HEADS,
        intermediate_size=INTERMEDIATE,
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_labels=10,
        attn_implementation=attn_impl,
    )


REGISTRY: list[ModelSpec] = [
    ModelSpec(
        name="llama-gqa",
        arch="llama",
        make_config=_llama_config,
        model_cls=transformers.LlamaForCausalLM,
        kinds=("prefill", "decode"),
        causal=True,
        position_embedding="rope",
    ),
    ModelSpec(
        name="qwen2-gqa",
        arch="qwen2",
        make_config=_qwen2_config,
        model_cls=transformers.Qwen2ForCausalLM,
        kinds=("prefill", "decode"),
        causal=True,
        position_embedding="rope",
        notes="q/k/v projections have bias",
    ),
    ModelSpec(
        name="qwen3-gqa",
        arch="qwen3",
        make_config=_qwen3_config,
        model_cls=transformers.Qwen3ForCausalLM,
        kinds=("prefill", "decode"),
        causal=True,
        position_embedding="rope",
        notes="per-head RMSNorm on q and k (q_norm/k_norm) before RoPE, no qkv bias",
        extra_truth=lambda c: {"qk_norm": True},
        in_default_set=False,  # opt-in (--only qwen3-gqa): keeps the committed set under ~20 MB
    ),
    ModelSpec(
        name="gpt2",
        arch="gpt2",
        make_config=_gpt2_config,
        model_cls=transformers.GPT2LMHeadModel,
        kinds=("prefill", "decode"),
        causal=True,
        position_embedding="learned_absolute",
        notes="fused c_attn (Conv1D) qkv projection, learned absolute positions",
    ),
    ModelSpec(
        name="bert",
        arch="bert",
        make_config=_bert_config,
        model_cls=transformers.BertModel,
        kinds=("encoder",),
        causal=False,
        position_embedding="learned_absolute",
        notes="BertModel (no head): outputs last_hidden_state and pooler_output",
    ),
    ModelSpec(
        name="vit",
        arch="vit",
        make_config=_vit_config,
        model_cls=transformers.ViTForImageClassification,
        kinds=("encoder",),
        causal=False,
        position_embedding="learned_absolute",
        input_kind="image",
        notes="ViTForImageClassification, 32x32 image, patch 8 -> 16 patches + CLS = 17 tokens",
        extra_truth=lambda c: {"image_size": c.image_size, "patch_size": c.patch_size,
                               "tokens": (c.image_size // c.patch_size) ** 2 + 1, "num_labels": c.num_labels},
    ),
]

# Future entries (not yet implemented): Mistral with sliding window, Gemma 2, Phi-3,
# GPT-NeoX, GPT-J, T5/BART, Whisper encoder, StaticCache decode exports.


# --------------------------------------------------------------------------------------
# Wrappers: flat tensor in / flat tensor out
# --------------------------------------------------------------------------------------
class PrefillWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


def _build_dynamic_cache(config, past: tuple[torch.Tensor, ...]) -> DynamicCache:
    """Build a DynamicCache that already holds ``past`` (k0, v0, k1, v1, ...), so that
    the model's cache.update is exactly ``Concat(past, new)`` along the sequence axis."""
    cache = DynamicCache(config=config)
    n_layers = len(past) // 2
    for i in range(n_layers):
        k, v = past[2 * i], past[2 * i + 1]
        layer = cache.layers[i]
        layer.lazy_initialization(k, v)
        layer.keys = k
        layer.values = v
    return cache


class DecodeWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *past):
        cache = _build_dynamic_cache(self.model.config, past)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present.append(layer.keys)
            present.append(layer.values)
        return (out.logits, *present)


class TextEncoderWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output


class ImageEncoderWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


# --------------------------------------------------------------------------------------
# Example / verification inputs
# --------------------------------------------------------------------------------------
def _kv_shape(cfg, batch, past_len):
    q_heads = _cfg_get(cfg, "num_attention_heads", "n_head")
    kv_heads = _cfg_get(cfg, "num_key_value_heads", default=q_heads)
    hidden = _cfg_get(cfg, "hidden_size", "n_embd")
    head_dim = _cfg_get(cfg, "head_dim", default=hidden // q_heads)
    return (batch, kv_heads, past_len, head_dim)


def make_inputs(spec: ModelSpec, cfg, kind: str, batch: int, seq: int, past: int = 0,
                pad: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Ordered dict of named inputs.  Row 1 is left-padded by ``pad`` tokens."""
    g = torch.Generator().manual_seed(seed)
    if spec.input_kind == "image":
        return {"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)}
    vocab = cfg.vocab_size
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int64)}
    total = past + seq
    mask = torch.ones(batch, total, dtype=torch.int64)
    if pad and batch > 1:
        mask[1, :pad] = 0
    inputs["attention_mask"] = mask
    if kind == "decode":
        n_layers = _cfg_get(cfg, "num_hidden_layers", "n_layer")
        for i in range(n_layers):
            inputs[f"past_key_values.{i}.key"] = torch.randn(*_kv_shape(cfg, batch, past), generator=g)
            inputs[f"past_key_values.{i}.value"] = torch.randn(*_kv_shape(cfg, batch, past), generator=g)
    return inputs


def output_names(spec: ModelSpec, cfg, kind: str) -> list[str]:
    if kind == "encoder":
        return ["logits"] if spec.input_kind == "image" else ["last_hidden_state", "pooler_output"]
    names = ["logits"]
    if kind == "decode":
        for i in range(_cfg_get(cfg, "num_hidden_layers", "n_layer")):
            names += [f"present.{i}.key", f"present.{i}.value"]
    return names


DYNAMIC_AXES_DOC = {
    "batch": "dim 0 of every input/output",
    "sequence_length": "new tokens this call (input_ids dim 1; prefill/encoder attention_mask dim 1; logits dim 1)",
    "past_sequence_length": "decode: past_key_values.* dim 2",
    "total_sequence_length": "decode: attention_mask dim 1 and present.* dim 2 (= past + sequence); the dynamo "
                             "exporter names present.* dim 2 'past_sequence_length + sequence_length'",
    "image models": "only batch is dynamic (image size fixed by the config)",
}


def dynamic_axes_ts(input_names, out_names, kind, input_kind) -> dict:
    """TorchScript-exporter dynamic_axes with meaningful names."""
    ax: dict[str, dict[int, str]] = {}
    if input_kind == "image":
        ax["pixel_values"] = {0: "batch"}
        ax["logits"] = {0: "batch"}
        return ax
    for n in input_names:
        if n == "input_ids":
            ax[n] = {0: "batch", 1: "sequence_length"}
        elif n == "attention_mask":
            ax[n] = {0: "batch", 1: "total_sequence_length" if kind == "decode" else "sequence_length"}
        elif n.startswith("past_key_values"):
            ax[n] = {0: "batch", 2: "past_sequence_length"}
    for n in out_names:
        if n == "logits" or n == "last_hidden_state":
            ax[n] = {0: "batch", 1: "sequence_length"}
        elif n == "pooler_output":
            ax[n] = {0: "batch"}
        elif n.startswith("present"):
            ax[n] = {0: "batch", 2: "total_sequence_length"}
    return ax


def dynamic_shapes_dynamo(input_names, kind, input_kind) -> tuple:
    """dynamo-exporter dynamic_shapes (positional, matching the wrapper signature)."""
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=1024)
    if input_kind == "image":
        return ({0: batch},)
    seq = Dim("sequence_length", min=1, max=4096)
    if kind != "decode":
        return tuple({0: batch, 1: seq} for _ in input_names)
    past = Dim("past_sequence_length", min=1, max=4096)
    # total = past + seq cannot be expressed as a derived Dim (derived dims have a single
    # root); the mask length gets its own Dim -- the traced graph never equates it with
    # past + seq (the mask is indexed, not broadcast against the cache).
    total = Dim("total_sequence_length", min=2, max=8192)
    # The decode wrapper takes the past tensors as *past -> one nested tuple entry.
    past_shapes = tuple({0: batch, 2: past} for _ in input_names[2:])
    return ({0: batch, 1: seq}, {0: batch, 1: total}, past_shapes)


# --------------------------------------------------------------------------------------
# Build / export
# --------------------------------------------------------------------------------------
def build_model(spec: ModelSpec, attn_impl: str):
    cfg = spec.config(attn_impl)
    # Seed depends only on the spec name, so eager/sdpa variants share identical weights.
    seed = SEED + int(hashlib.sha256(spec.name.encode()).hexdigest()[:8], 16) % 100000
    torch.manual_seed(seed)
    model = spec.model_cls(cfg)
    randomize_parameters(model, seed)
    model.eval()
    return model, cfg


def randomize_parameters(model: nn.Module, seed: int) -> None:
    """Hugging Face init leaves biases at 0 and norm weights at 1 (the dynamo exporter's
    optimizer then even de-duplicates all the identical norm weights into one
    initializer), and std-0.02 matrices give near-uniform attention.  Re-draw every
    parameter so that biases, norm scales and masking all matter numerically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if p.ndim >= 2:
                p.copy_(noise * 0.15)
            elif name.endswith("weight"):  # norm scale
                p.copy_(1.0 + 0.1 * noise)
            else:  # biases, CLS token etc.
                p.copy_(0.1 * noise)


def wrap(spec: ModelSpec, model, kind: str) -> nn.Module:
    if kind == "prefill":
        return PrefillWrapper(model).eval()
    if kind == "decode":
        return DecodeWrapper(model).eval()
    if spec.input_kind == "image":
        return ImageEncoderWrapper(model).eval()
    return TextEncoderWrapper(model).eval()


# Example inputs used for tracing.  Batch 3 (not 2) so that the batch-2 verification
# below also proves the batch axis is really dynamic.
EXAMPLE = {"prefill": dict(batch=3, seq=8), "decode": dict(batch=3, seq=3, past=5), "encoder": dict(batch=3, seq=8)}
# Main verification shape: batch 2, a sequence length != the example, row 1 left-padded.
VERIFY = {"prefill": dict(batch=2, seq=11, pad=3), "decode": dict(batch=2, seq=1, past=9, pad=3),
          "encoder": dict(batch=2, seq=13, pad=4)}
# Additional verification shapes (run in addition to VERIFY).
VERIFY_EXTRA = {
    "prefill": [dict(batch=1, seq=5)],
    "decode": [dict(batch=2, seq=4, past=6, pad=2), dict(batch=1, seq=1, past=1)],
    "encoder": [dict(batch=1, seq=5, pad=0)],
}


def file_name(spec, kind, attn, exporter):
    return f"{spec.name}_{kind}_{attn}_{exporter}.onnx"


_DROP_METADATA = {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.name_scopes"}


def _strip_metadata(path: str) -> None:
    """The dynamo exporter stores per-node python stack traces containing absolute
    paths of this machine; drop them (size + reproducibility), and the class
    hierarchy / name scopes, which duplicate 'namespace'.  'namespace' (which
    nn.Module, e.g. ``model.model.layers.0.self_attn``, each node came from)
    and 'pkg.torch.onnx.fx_node' are kept."""
    import onnx

    m = onnx.load(path)
    for node in m.graph.node:
        keep = [p for p in node.metadata_props if p.key not in _DROP_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.save(m, path)


def export_one(spec: ModelSpec, kind: str, attn: str, exporter: str, out_dir: str) -> dict:
    model, cfg = build_model(spec, attn)
    wrapper = wrap(spec, model, kind)
    ex = make_inputs(spec, cfg, kind, **EXAMPLE[kind], seed=1)
    in_names = list(ex.keys())
    out_names = output_names(spec, cfg, kind)
    args = tuple(ex.values())
    path = os.path.join(out_dir, file_name(spec, kind, attn, exporter))
    if os.path.exists(path):
        os.remove(path)
    info: dict[str, Any] = {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                wrapper, args, path,
                dynamo=False,
                opset_version=TORCHSCRIPT_OPSET,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=dynamic_axes_ts(in_names, out_names, kind, spec.input_kind),
                do_constant_folding=True,
            )
        else:
            prog = torch.onnx.export(
                wrapper, args,
                dynamo=True,
                input_names=in_names,
                output_names=out_names,
                dynamic_shapes=dynamic_shapes_dynamo(in_names, kind, spec.input_kind),
                optimize=True,
            )
            prog.save(path, external_data=False)
            _strip_metadata(path)
    import onnx

    m = onnx.load(path)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    native_attn = sum(1 for n in m.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx"))
    info.update(
        opset=opset,
        inputs=[i.name for i in m.graph.input],
        outputs=[o.name for o in m.graph.output],
        native_attention_ops=native_attn,
        size_bytes=os.path.getsize(path),
    )
    return info


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------
def _torch_outputs(wrapper, inputs):
    with torch.no_grad():
        out = wrapper(*inputs.values())
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [o.detach().numpy() for o in out]


def structure_check(path: str, entry: dict) -> list[str]:
    """Cheap consistency check of the config-derived ground truth against the graph:
    Softmax (+ native Attention) count == attention_cores, and the number of Concat
    nodes fed directly by a past_key_values input == kv_cache_writes.  (Valid for
    the current unfused exports; not a general attention detector.)"""
    import onnx

    m = onnx.load(path)
    nodes = list(m.graph.node)
    n_softmax = sum(n.op_type == "Softmax" for n in nodes) + entry.get("native_attention_ops", 0)
    past = {i.name for i in m.graph.input if i.name.startswith("past_key_values")}
    n_kv = sum(n.op_type == "Concat" and any(i in past for i in n.input) for n in nodes)
    problems = []
    if n_softmax != entry["attention_cores"]:
        problems.append(f"softmax {n_softmax} != attention_cores {entry['attention_cores']}")
    if n_kv != entry["kv_cache_writes"]:
        problems.append(f"past Concat {n_kv} != kv_cache_writes {entry['kv_cache_writes']}")
    if [i.name for i in m.graph.input] != entry["inputs"] or [o.name for o in m.graph.output] != entry["outputs"]:
        problems.append("graph inputs/outputs differ from manifest")
    return problems


def verify_one(spec: ModelSpec, kind: str, attn: str, path: str) -> dict:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(path, full_check=True)
    model, cfg = build_model(spec, attn)
    wrapper = wrap(spec, model, kind)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    sess_inputs = [i.name for i in sess.get_inputs()]
    results = []
    shapes = [VERIFY[kind]] + VERIFY_EXTRA.get(kind, [])
    for shp in shapes:
        inp = make_inputs(spec, cfg, kind, **shp, seed=7)
        ref = _torch_outputs(wrapper, inp)
        feed = {k: v.numpy() for k, v in inp.items() if k in sess_inputs}
        got = sess.run(None, feed)
        # Output rows of left-padding query positions are undefined (a fully masked
        # softmax row: eager gives a uniform average, torch SDPA gives zeros, the
        # ONNX lowering something else), so the first output (logits /
        # last_hidden_state) is compared on real-token positions only; the diff
        # on padded rows is reported for information.
        valid = None
        if "attention_mask" in inp and ref[0].ndim == 3:
            valid = inp["attention_mask"][:, -ref[0].shape[1]:].numpy().astype(bool)
        diffs, pad_diff = [], 0.0
        for j, (r, g) in enumerate(zip(ref, got)):
            if r.shape != g.shape or not r.size:
                diffs.append(float("inf") if r.shape != g.shape else 0.0)
                continue
            d = np.abs(r - g)
            if j == 0 and valid is not None:
                if (~valid).any():
                    pad_diff = float(np.nan_to_num(d[~valid], nan=np.inf).max())
                d = d[valid]
            diffs.append(float(np.nan_to_num(d, nan=np.inf).max()))
        nan = any(np.isnan(g).any() for g in got) or any(np.isnan(r).any() for r in ref)
        shape_ok = all(r.shape == g.shape for r, g in zip(ref, got))
        results.append(dict(shape=shp, logits_max_abs_diff=diffs[0], max_abs_diff_all=max(diffs),
                            padded_rows_diff=pad_diff, nan=bool(nan), shape_ok=shape_ok))
    ok = all(r["max_abs_diff_all"] < TOL and not r["nan"] and r["shape_ok"] for r in results)
    return dict(ok=ok, checks=results)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def _fmt_shape(d: dict) -> str:
    return "x".join(f"{k}{v}" for k, v in d.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--only", nargs="*", default=None, help="spec names to (re)build")
    ap.add_argument("--exporters", nargs="*", default=list(EXPORTERS), choices=EXPORTERS)
    ap.add_argument("--attn", nargs="*", default=None, help="restrict attention implementations")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--no-export", action="store_true", help="only verify files listed in the manifest")
    ap.add_argument("--verbose", action="store_true", help="show exporter output")
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(args.out, exist_ok=True)
    manifest_path = os.path.join(args.out, "manifest.json")
    manifest = {"files": {}, "skipped": []}
    full_run = args.only is None and args.attn is None and set(args.exporters) == set(EXPORTERS)
    # A full export run rebuilds the manifest from scratch; partial runs update it in place.
    if os.path.exists(manifest_path) and (args.no_export or not full_run):
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest.setdefault("files", {})
        manifest.setdefault("skipped", [])

    specs = [s for s in REGISTRY if (s.in_default_set if args.only is None else s.name in args.only)]
    if args.only:
        unknown = set(args.only) - {s.name for s in REGISTRY}
        if unknown:
            ap.error(f"unknown spec(s): {sorted(unknown)}; known: {[s.name for s in REGISTRY]}")

    jobs = []
    for spec in specs:
        for kind in spec.kinds:
            for attn in spec.attn_impls:
                if args.attn and attn not in args.attn:
                    continue
                for exporter in args.exporters:
                    jobs.append((spec, kind, attn, exporter))

    if not args.no_export:
        for spec, kind, attn, exporter in jobs:
            fname = file_name(spec, kind, attn, exporter)
            manifest["files"].pop(fname, None)
            manifest["skipped"] = [s for s in manifest["skipped"] if s["file"] != fname]
            known = spec.known_skips.get((kind, attn, exporter))
            if known:
                print(f"[skip] {fname}: {known} (known)", flush=True)
                manifest["skipped"].append(dict(file=fname, spec=spec.name, arch=spec.arch, kind=kind,
                                                attn_implementation=attn, exporter=exporter, reason=known))
                continue
            t0 = time.time()
            buf = io.StringIO()
            try:
                ctx = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(buf)
                with ctx:
                    info = export_one(spec, kind, attn, exporter, args.out)
            except Exception as e:  # noqa: BLE001
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                print(f"[skip] {fname}: {reason}", flush=True)
                if args.verbose:
                    traceback.print_exc()
                manifest["skipped"].append(dict(file=fname, spec=spec.name, arch=spec.arch, kind=kind,
                                                attn_implementation=attn, exporter=exporter, reason=reason))
                continue
            _, cfg = build_model(spec, attn)
            entry = {"spec": spec.name, **ground_truth(spec, cfg, kind)}
            entry.update(exporter=exporter, opset=info["opset"], inputs=info["inputs"], outputs=info["outputs"])
            if exporter == "dynamo":
                entry["dynamo_optimize"] = True
            if info["native_attention_ops"]:
                entry["native_attention_ops"] = info["native_attention_ops"]
            if spec.notes:
                entry["notes"] = spec.notes
            manifest["files"][fname] = entry
            print(f"[export] {fname}: opset {info['opset']}, {info['size_bytes'] / 1024:.0f} KiB, "
                  f"{time.time() - t0:.1f}s", flush=True)

    manifest["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": __import__("onnx").__version__,
        "onnxscript": __import__("onnxscript").__version__,
        "onnxruntime_verified_with": __import__("onnxruntime").__version__,
        "python": sys.version.split()[0],
    }
    manifest["torchscript_opset"] = TORCHSCRIPT_OPSET
    manifest["dynamo_opsets"] = sorted({e["opset"] for e in manifest["files"].values() if e["exporter"] == "dynamo"})
    manifest["seed"] = SEED
    manifest["dynamic_axes"] = DYNAMIC_AXES_DOC
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest["skipped"] = sorted(manifest["skipped"], key=lambda s: s["file"])
    keys = ("versions", "torchscript_opset", "dynamo_opsets", "seed", "dynamic_axes", "files", "skipped")
    ordered = {k: manifest[k] for k in keys}
    with open(manifest_path, "w") as f:
        json.dump(ordered, f, indent=2)
        f.write("\n")

    if args.no_verify:
        return 0
    by_name = {s.name: s for s in REGISTRY}
    rows = []
    for fname, entry in manifest["files"].items():
        spec_name = entry.get("spec", fname.split("_")[0])
        if spec_name not in by_name or (args.only and spec_name not in args.only):
            continue
        spec = by_name[spec_name]
        path = os.path.join(args.out, fname)
        try:
            res = verify_one(spec, entry["kind"], entry["attn_implementation"], path)
            problems = structure_check(path, entry)
            if problems:
                res["ok"] = False
                res["error"] = "; ".join(problems)
        except Exception as e:  # noqa: BLE001
            res = dict(ok=False, checks=[], error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append((fname, entry, res))

    print()
    hdr = f"{'file':52} {'opset':>5} {'KiB':>6}  {'max|diff| per check':34} result"
    print(hdr)
    print("-" * len(hdr))
    n_fail = 0
    for fname, entry, res in rows:
        size = os.path.getsize(os.path.join(args.out, fname)) / 1024
        diffs = " ".join(f"{c['max_abs_diff_all']:.1e}" + ("(NaN)" if c["nan"] else "")
                         + (f"[pad {c['padded_rows_diff']:.0e}]" if c["padded_rows_diff"] > 1e-3 else "")
                         for c in res["checks"])
        status = "OK" if res["ok"] else "FAIL " + res.get("error", "")
        n_fail += not res["ok"]
        print(f"{fname:52} {entry['opset']:>5} {size:6.0f}  {diffs:34} {status}")
    print(f"\nchecks: {' | '.join(f'{k}: ' + ', '.join(_fmt_shape(x) for x in [VERIFY[k]] + VERIFY_EXTRA.get(k, [])) for k in VERIFY)}")
    print("values are max |onnxruntime - torch| over all outputs; [pad X] = diff on rows of left-padding query")
    print("positions (undefined: fully masked softmax row), excluded from the comparison")
    for sk in manifest["skipped"]:
        print(f"skipped {sk['file']}: {sk['reason']}")
    print(f"{len(rows)} verified, {n_fail} failed, {len(manifest['skipped'])} skipped")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
