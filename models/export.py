#!/usr/bin/env python
"""Build tiny random-weight Hugging Face models and export them to ONNX.

Every model spec in ``REGISTRY`` is built from a config class (never downloaded),
seeded deterministically, and exported with BOTH torch.onnx exporters:

* TorchScript exporter: ``torch.onnx.export(..., dynamo=False, opset_version=17, dynamic_axes=...)``
* dynamo exporter:      ``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`` (default opset)

for every attention implementation ("eager", "sdpa") and every kind the spec
supports ("prefill"/"decode" for decoders, "decode_static" for HF StaticCache
decoding, "encoder" for encoders, "seq2seq" for a full encoder-decoder forward).

Ground truth for each file (taken from the model config, not from the graph)
is written to ``manifest.json``.  After exporting, every file is checked with
``onnx.checker`` and run in onnxruntime against the PyTorch model (unless
``--no-verify``).

Usage::

    python models/export.py [--out models/] [--only NAME ...] [--exporters torchscript dynamo]
                            [--attn eager sdpa] [--no-verify] [--no-export]

To add an architecture, add a ``ModelSpec`` to ``REGISTRY`` (see the
"Registry" section).  Decoder specs list kinds ("prefill", "decode"); encoder
specs use kind "encoder" with ``input_kind`` "text" (input_ids + attention_mask),
"image" (pixel_values) or "audio" (input_features).  Combinations that cannot be exported are recorded in
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
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

# "torchvision is not installed. Skipping torchvision::nms" etc.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

HERE = os.path.dirname(os.path.abspath(__file__))

TORCHSCRIPT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
# + transformers' own exporter (specs opt in through ModelSpec.exporters); "optimum" files are
# written by models/export_optimum.py (its own venv) and only kept in the manifest here
ALL_EXPORTERS = EXPORTERS + ("transformers",)
TOL = 1e-3  # max abs diff ONNX Runtime vs PyTorch
# sliding-window specs: min max|ONNX - PyTorch without the window| (proves the window is applied)
WINDOW_EFFECT_MIN = 1e-2
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
    # Rotary details (rope specs only): rotary_dim(cfg) (default: head_size, i.e. full rotary)
    # and whether the rotation pairs are interleaved (GPT-J rotate_every_two: (x0,x1),(x2,x3)...)
    # rather than split into halves (rotate_half: (x_i, x_{i+d/2})).
    rotary_dim: Callable[[Any], int] | None = None
    rope_interleaved: bool = False
    # Sliding-window decoders (Mistral, Gemma 2): "decode" keeps the FULL cache (plain
    # DynamicLayers, present = Concat(past, new) of length past+seq) and the window is applied
    # by the attention mask only, instead of HF's DynamicSlidingWindowLayer which would crop
    # present.* to the last window-1 tokens.  Verification also checks that the window
    # changes the outputs (ONNX vs the same weights with the window disabled).
    sliding_window: bool = False
    # decode_static: fixed cache length (cache tensors [batch, kv_heads, cache_len, head_dim]).
    cache_len: int = 0
    # Attention implementations that export and verify but are left out of the committed set
    # (size): built only when named with --attn, e.g. `--only gptj --attn sdpa`.
    optional_attn_impls: tuple[str, ...] = ()
    # --- 2025-26 batch (see "Registry: 2025-26 architectures, caches, exporters, dtypes") ---
    # parameter/activation dtype of the exported model ("float32" | "bfloat16" | "float16")
    dtype: str = "float32"
    # exporters this spec is built with (subset of EXPORTERS; "transformers" = transformers'
    # own ONNX exporter, which writes prefill and decode in one call)
    exporters: tuple[str, ...] = ("torchscript", "dynamo")
    # opset per exporter (None: torchscript 17, dynamo the exporter's default)
    opsets: dict[str, int] = dataclasses.field(default_factory=dict)
    # decode cache kind: "growing" (full DynamicLayers: present = Concat(past, new)) or
    # "sliding_window" (HF DynamicSlidingWindowLayer on the sliding layers: present =
    # Concat(past, new)[:, :, -(W-1):], past of length W-1, positions from the mask length)
    cache: str = "growing"
    # config attribute holding the window (ModernBERT: local_attention), for the window check
    window_attr: str = "sliding_window"
    # (kind, attn, exporter) -> list of problems in what the exporter wrote (recorded in the
    # manifest's known_exporter_bugs; the file is kept as written)
    known_exporter_bugs: dict[tuple[str, str, str], list[str]] = dataclasses.field(default_factory=dict)
    # (kind, attn, exporter) -> oddities of a working file (recorded as exporter_quirks)
    exporter_quirks: dict[tuple[str, str, str], list[str]] = dataclasses.field(default_factory=dict)
    # verification shapes overriding VERIFY/VERIFY_EXTRA for a kind
    verify_shapes: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    # (kind, attn) combinations that export and verify but are left out of the committed set
    # (size: near-duplicates of a committed file); built only when named with --attn
    optional_combos: tuple[tuple[str, str], ...] = ()
    # attention implementations per exporter where they differ from attn_impls
    # (e.g. transformers' exporter only with sdpa)
    exporter_attn: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # specs of the 2025-26 batch record the extended ground truth (_truth_2026)
    in_2026_batch: bool = False

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


def _attn_dims(cfg) -> tuple[int, int, int, int, int]:
    """(layers, q_heads, kv_heads, qk head size, v head size) of the (decoder) self-attention,
    from the config: MLA (DeepSeek-V3) has qk = nope + rope and its own v_head_dim; GPTBigCode
    multi_query has one kv head; encoder-decoders use the decoder's fields."""
    layers = _cfg_get(cfg, "decoder_layers", "num_hidden_layers", "n_layer")
    q_heads = _cfg_get(cfg, "decoder_attention_heads", "num_attention_heads", "n_head")
    kv_heads = _cfg_get(cfg, "num_key_value_heads", default=q_heads)
    if getattr(cfg, "multi_query", False):
        kv_heads = 1
    hidden = _cfg_get(cfg, "d_model", "hidden_size", "n_embd")
    head = _cfg_get(cfg, "head_dim", default=hidden // q_heads)
    if getattr(cfg, "qk_rope_head_dim", None):  # MLA
        head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        return layers, q_heads, kv_heads, head, cfg.v_head_dim
    return layers, q_heads, kv_heads, head, head


def _cache_dims(cfg) -> tuple[int, int, int]:
    """(heads, key size, value size) of one layer's cache tensors.  transformers 5.x caches
    DeepSeek-V3's multi-head latent attention compressed: "keys" = the normalised latent
    [B, 1, T, kv_lora_rank], "values" = the rotated shared k_pe [B, 1, T, qk_rope_head_dim];
    K/V per head are re-projected (kv_b_proj) from the cache in every step."""
    if getattr(cfg, "kv_lora_rank", None) and getattr(cfg, "qk_rope_head_dim", None):
        return 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    _, _, kv_heads, hk, hv = _attn_dims(cfg)
    return kv_heads, hk, hv


def ground_truth(spec: ModelSpec, cfg, kind: str) -> dict:
    layers = _cfg_get(cfg, "num_hidden_layers", "n_layer")
    q_heads = _cfg_get(cfg, "num_attention_heads", "n_head")
    kv_heads = _cfg_get(cfg, "num_key_value_heads", default=q_heads)
    hidden = _cfg_get(cfg, "hidden_size", "n_embd")
    head_size = _cfg_get(cfg, "head_dim", default=hidden // q_heads)
    if spec.in_2026_batch:
        layers, q_heads, kv_heads, head_size, _ = _attn_dims(cfg)
        hidden = _cfg_get(cfg, "d_model", "hidden_size", "n_embd")
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
        "kv_cache_writes": 2 * layers if kind in ("decode", "decode_static") else 0,
        "causal": spec.causal,
        "gqa": kv_heads != q_heads,
        "position_embedding": spec.position_embedding,
        # softmax(Q K^T * attention_scale): all current specs use 1/sqrt(head_size)
        "attention_scale": spec.attention_scale(cfg) if spec.attention_scale else head_size ** -0.5,
    }
    if spec.position_embedding == "rope":
        # partial rotary: only the first rotary_dim channels of each head are rotated (the
        # rest pass through); still 2 RoPE applications (q and k) per layer.
        truth["rotary_dim"] = spec.rotary_dim(cfg) if spec.rotary_dim else head_size
        truth["rope_interleaved"] = spec.rope_interleaved
    if spec.sliding_window:
        truth["sliding_window"] = cfg.sliding_window
        truth["sliding_window_semantics"] = (
            "query at absolute position p attends keys at positions p-sliding_window+1 .. p "
            "(sliding_window keys including itself), on top of causal + padding masking")
        types = list(getattr(cfg, "layer_types", None) or ["sliding_attention"] * layers)
        truth["layer_types"] = types
        truth["sliding_window_layers"] = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if kind == "decode_static":
        truth["cache_len"] = spec.cache_len
        truth["kv_cache_write_index"] = (
            "cache_position input [sequence_length] (int64, shared by all batch rows): the new K/V of "
            "token j is written to slot cache_position[j] of axis 2 (HF StaticLayer index_copy_); "
            "cache_position is also the RoPE position and cache_position[0] the causal-mask query offset")
    if spec.in_2026_batch:
        truth.update(_truth_2026(spec, cfg, kind))
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


# Smaller dimensions for the second batch of specs (keeps each file ~150-250 KB).
S_HIDDEN = 32
S_Q_HEADS = 4
S_KV_HEADS = 2
S_HEAD_DIM = 8
S_INTERMEDIATE = 64
S_VOCAB = 64
S_MAX_POS = 64
SLIDING_WINDOW = 4  # < every test length: verification uses seq 11 / past 9 + 1


def _mistral_config(attn_impl):
    return transformers.MistralConfig(
        vocab_size=S_VOCAB,
        hidden_size=S_HIDDEN,
        intermediate_size=S_INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=S_Q_HEADS,
        num_key_value_heads=S_KV_HEADS,
        head_dim=S_HEAD_DIM,
        max_position_embeddings=S_MAX_POS,
        sliding_window=SLIDING_WINDOW,
        tie_word_embeddings=False,
        attn_implementation=attn_impl,
    )


def _gemma2_config(attn_impl):
    return transformers.Gemma2Config(
        vocab_size=S_VOCAB,
        hidden_size=S_HIDDEN,
        intermediate_size=S_INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=S_Q_HEADS,
        num_key_value_heads=S_KV_HEADS,
        head_dim=S_HEAD_DIM,
        max_position_embeddings=S_MAX_POS,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=16,  # scale 16**-0.5 = 0.25, not head_dim**-0.5 = 0.354
        attn_implementation=attn_impl,
    )


def _phi3_config(attn_impl):
    return transformers.Phi3Config(
        vocab_size=S_VOCAB,
        hidden_size=S_HIDDEN,
        intermediate_size=S_INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=S_Q_HEADS,
        num_key_value_heads=S_KV_HEADS,
        max_position_embeddings=S_MAX_POS,
        original_max_position_embeddings=S_MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=attn_impl,
    )


def _gpt_neox_config(attn_impl):
    return transformers.GPTNeoXConfig(
        vocab_size=S_VOCAB,
        hidden_size=S_HIDDEN,
        intermediate_size=S_INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,  # head_dim 16
        max_position_embeddings=S_MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=False,
        attn_implementation=attn_impl,
    )


def _gptj_config(attn_impl):
    return transformers.GPTJConfig(
        vocab_size=S_VOCAB,
        n_embd=S_HIDDEN,
        n_layer=LAYERS,
        n_head=2,  # head_dim 16
        n_inner=S_INTERMEDIATE,
        n_positions=S_MAX_POS,
        rotary_dim=8,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        attn_implementation=attn_impl,
    )


def _t5_config(attn_impl):
    return transformers.T5Config(
        vocab_size=S_VOCAB,
        d_model=S_HIDDEN,
        d_kv=S_HEAD_DIM,
        d_ff=S_INTERMEDIATE,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=S_Q_HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="relu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation=attn_impl,
    )


def _whisper_config(attn_impl):
    return transformers.WhisperConfig(
        vocab_size=S_VOCAB,
        num_mel_bins=8,
        d_model=S_HIDDEN,
        encoder_layers=2,
        encoder_attention_heads=S_Q_HEADS,
        encoder_ffn_dim=S_INTERMEDIATE,
        decoder_layers=1,
        decoder_attention_heads=S_Q_HEADS,
        decoder_ffn_dim=S_INTERMEDIATE,
        max_source_positions=16,  # -> input_features frames = 2 * 16 = 32
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        attn_implementation=attn_impl,
    )


def _llama_small_config(attn_impl):
    return transformers.LlamaConfig(
        vocab_size=S_VOCAB,
        hidden_size=S_HIDDEN,
        intermediate_size=S_INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=S_Q_HEADS,
        num_key_value_heads=S_KV_HEADS,
        head_dim=S_HEAD_DIM,
        max_position_embeddings=S_MAX_POS,
        tie_word_embeddings=False,
        attn_implementation=attn_impl,
    )


def _qwen2_small_config(attn_impl):
    return transformers.Qwen2Config(
        vocab_size=S_VOCAB,
        hidden_size=S_HIDDEN,
        intermediate_size=S_INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=S_Q_HEADS,
        num_key_value_heads=S_KV_HEADS,
        max_position_embeddings=S_MAX_POS,
        tie_word_embeddings=False,
        use_sliding_window=False,
        attn_implementation=attn_impl,
    )


def _partial_rotary_dim(c):
    return int((c.hidden_size // c.num_attention_heads) * c.rope_parameters["partial_rotary_factor"])


def _t5_truth(c):
    enc, dec = c.num_layers, c.num_decoder_layers
    return {
        "layers": enc + dec,
        "encoder_layers": enc,
        "decoder_layers": dec,
        # encoder self + decoder self + decoder cross
        "attention_cores": enc + 2 * dec,
        "self_attention_cores": enc + dec,
        "cross_attention_cores": dec,
        "causal_attention_cores": dec,  # decoder self-attention only
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "position_bias": ("relative position bias [1, heads, q, k] (Gather of relative_attention_bias by "
                          "bucket) added to the scores of every self-attention (computed in layer 0 of each "
                          "stack, shared by the later layers); cross-attention adds a zero bias"),
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        # decoder output * d_model**-0.5 before the (tied) lm_head
        "scale_decoder_outputs": bool(c.scale_decoder_outputs),
    }


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

# Second batch: smaller dimensions (S_*), see models/README.md.
REGISTRY += [
    ModelSpec(
        name="mistral-swa",
        arch="mistral",
        make_config=_mistral_config,
        model_cls=transformers.MistralForCausalLM,
        kinds=("prefill", "decode"),
        causal=True,
        position_embedding="rope",
        sliding_window=True,
        notes=f"sliding_window={SLIDING_WINDOW} on every layer (mask only; decode keeps the full cache)",
    ),
    ModelSpec(
        name="gemma2",
        arch="gemma2",
        make_config=_gemma2_config,
        model_cls=transformers.Gemma2ForCausalLM,
        kinds=("prefill", "decode"),
        causal=True,
        position_embedding="rope",
        attn_impls=("eager",),  # HF: _supports_sdpa = False (sdpa has no softcapping)
        sliding_window=True,
        attention_scale=lambda c: float(c.query_pre_attn_scalar) ** -0.5,
        notes="layer 0 sliding window, layer 1 global; attention logit softcap tanh(s/50)*50 between "
              "scaling and masking; final logit softcap 30; scale query_pre_attn_scalar**-0.5",
        extra_truth=lambda c: {"softcap": c.attn_logit_softcapping,
                               "final_logit_softcapping": c.final_logit_softcapping,
                               "query_pre_attn_scalar": c.query_pre_attn_scalar},
    ),
    ModelSpec(
        name="phi3-partial",
        arch="phi3",
        make_config=_phi3_config,
        model_cls=transformers.Phi3ForCausalLM,
        kinds=("prefill", "decode"),
        causal=True,
        position_embedding="rope",
        rotary_dim=_partial_rotary_dim,
        notes="fused qkv_proj (one MatMul, sliced into q/k/v), fused gate_up_proj; "
              "partial_rotary_factor 0.5 (rotate_half on the first rotary_dim channels)",
        extra_truth=lambda c: {"partial_rotary_factor": c.rope_parameters["partial_rotary_factor"],
                               "fused_qkv": True},
        optional_attn_impls=("sdpa",),  # exports + verifies; left out of the committed set (size)
    ),
    ModelSpec(
        name="gptneox",
        arch="gpt_neox",
        make_config=_gpt_neox_config,
        model_cls=transformers.GPTNeoXForCausalLM,
        kinds=("prefill", "decode"),
        causal=True,
        position_embedding="rope",
        rotary_dim=_partial_rotary_dim,
        notes="fused query_key_value with per-head [q|k|v] layout (view [B,S,heads,3*head] then chunk); "
              "rotary_pct 0.25; parallel residual",
        extra_truth=lambda c: {"partial_rotary_factor": c.rope_parameters["partial_rotary_factor"],
                               "fused_qkv": True},
        optional_attn_impls=("sdpa",),  # exports + verifies; left out of the committed set (size)
    ),
    ModelSpec(
        name="gptj",
        arch="gptj",
        make_config=_gptj_config,
        model_cls=transformers.GPTJForCausalLM,
        kinds=("prefill", "decode"),
        causal=True,
        position_embedding="rope",
        rotary_dim=lambda c: c.rotary_dim,
        rope_interleaved=True,
        notes="rotary_dim 8 < head_dim 16, interleaved rotary (rotate_every_two, sin/cos gathered from "
              "the embed_positions buffer and repeat_interleave'd); separate q/k/v projections",
        optional_attn_impls=("sdpa",),  # exports + verifies; left out of the committed set (size)
    ),
    ModelSpec(
        name="t5",
        arch="t5",
        make_config=_t5_config,
        model_cls=transformers.T5ForConditionalGeneration,
        kinds=("seq2seq",),
        causal=True,
        position_embedding="relative_bias",
        attention_scale=lambda c: 1.0,
        notes="full encoder-decoder forward without cache: input_ids, attention_mask, decoder_input_ids -> "
              "logits; no attention scaling (1.0); tied embeddings (decoder output scaled by d_model**-0.5 "
              "before lm_head)",
        extra_truth=_t5_truth,
    ),
    ModelSpec(
        name="whisper",
        arch="whisper",
        make_config=_whisper_config,
        model_cls=transformers.models.whisper.modeling_whisper.WhisperEncoder,
        kinds=("encoder",),
        causal=False,
        position_embedding="learned_absolute",
        input_kind="audio",
        attention_scale=lambda c: (c.d_model // c.encoder_attention_heads) ** -0.5,
        notes="WhisperEncoder only: 2 Conv1d (stride 1, 2) + GELU, positions, 2 layers; q is scaled by "
              "head_dim**-0.5 right after q_proj (incl. bias), the attention call then uses scale 1.0; "
              "k_proj has no bias",
        extra_truth=lambda c: {"layers": c.encoder_layers, "attention_cores": c.encoder_layers,
                               "q_heads": c.encoder_attention_heads, "kv_heads": c.encoder_attention_heads,
                               "head_size": c.d_model // c.encoder_attention_heads,
                               "num_mel_bins": c.num_mel_bins, "frames": 2 * c.max_source_positions,
                               "tokens": c.max_source_positions, "scale_applied_to": "query"},
        optional_attn_impls=("sdpa",),  # exports + verifies; left out of the committed set (size)
    ),
    ModelSpec(
        name="llama-static",
        arch="llama",
        make_config=_llama_small_config,
        model_cls=transformers.LlamaForCausalLM,
        kinds=("decode_static",),
        causal=True,
        position_embedding="rope",
        cache_len=16,
        notes="HF StaticCache layers (index_copy_ into [B, kv_heads, cache_len, head_dim]) built from the "
              "cache inputs; attention over all cache_len slots, masked by causal(cache_position) + attention_mask",
    ),
    ModelSpec(
        name="qwen2-static",
        arch="qwen2",
        make_config=_qwen2_small_config,
        model_cls=transformers.Qwen2ForCausalLM,
        kinds=("decode_static",),
        causal=True,
        position_embedding="rope",
        cache_len=16,
        notes="q/k/v bias; HF StaticCache layers (index_copy_ into [B, kv_heads, cache_len, head_dim]) built "
              "from the cache inputs; attention over all cache_len slots",
        optional_attn_impls=("sdpa",),  # exports + verifies; left out of the committed set (size)
    ),
]


# --------------------------------------------------------------------------------------
# Registry: 2025-26 architectures, caches, exporters, dtypes and opsets
# --------------------------------------------------------------------------------------
# All use the small dimensions (S_*): hidden 32, 2 layers, 4 query heads, head_dim 8,
# vocab 64, unless noted.  Their manifest entries carry the extended ground truth of
# _truth_2026 (dtype, cache kind, attention sinks, MoE, q/k norm, rope scaling, ...).

def _rope_scaling(cfg):
    """rope_type of the config's rope_parameters (None for plain RoPE; a {layer_type: type}
    dict when the layer types have their own parameters, e.g. Gemma 3 / ModernBERT)."""
    rp = getattr(cfg, "rope_parameters", None)
    if not isinstance(rp, dict):
        return None
    if "rope_type" in rp:
        return None if rp["rope_type"] == "default" else rp["rope_type"]
    types = {k: v.get("rope_type", "default") for k, v in rp.items() if isinstance(v, dict)}
    return None if set(types.values()) <= {"default"} else types


def _truth_2026(spec: ModelSpec, cfg, kind: str) -> dict:
    layers, q_heads, kv_heads, head, v_head = _attn_dims(cfg)
    if kind in ("prefill", "encoder", "seq2seq"):
        cache = "none"
    elif kind == "decode_static":
        cache = "static"
    else:
        cache = spec.cache
    t = {
        "dtype": spec.dtype,
        "cache": cache,
        "attention_sinks": False,
        "moe": None,
        "qk_norm": False,
        "rope_scaling": _rope_scaling(cfg) if spec.position_embedding == "rope" else None,
        "cross_attention_cores": 0,
        "subgraph": False,
        "known_exporter_bugs": [],
    }
    if v_head != head:
        t["v_head_size"] = v_head
    if isinstance(getattr(cfg, "rope_parameters", None), dict):
        t["rope_parameters"] = cfg.rope_parameters
    if cache == "sliding_window":
        w = getattr(cfg, spec.window_attr)
        t["present_length"] = f"min(past_sequence_length + sequence_length, {w - 1}) (sliding_window - 1)"
        t["kv_cache_semantics"] = (
            "HF DynamicSlidingWindowLayer: present = Concat(past, new, axis 2)[:, :, -(W-1):]; attention "
            "sees the full Concat (past + new); the absolute position offset is attention_mask.shape[1] - "
            "sequence_length (the past tensors hold only the last W-1 tokens)")
    return t


def _moe(experts, top_k, router, router_softmax, moe_layers, shared=0, **extra):
    return {"experts": experts, "top_k": top_k, "router": router, "router_softmax": router_softmax,
            "moe_layers": moe_layers, "shared_experts": shared, "experts_implementation": "batched_mm",
            **extra}


def _sliding_truth(c, layers=None):
    types = list(c.layer_types)
    return {"layer_types": types, "sliding_window_layers": [i for i, t in enumerate(types) if t == "sliding_attention"]}


def _gemma3_config(attn_impl):
    return transformers.Gemma3TextConfig(
        vocab_size=S_VOCAB, hidden_size=S_HIDDEN, intermediate_size=S_INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=S_Q_HEADS, num_key_value_heads=S_KV_HEADS, head_dim=S_HEAD_DIM,
        max_position_embeddings=S_MAX_POS, sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn_impl)


def _gpt_oss_config(attn_impl):
    return transformers.GptOssConfig(
        vocab_size=S_VOCAB, hidden_size=S_HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=S_Q_HEADS, num_key_value_heads=S_KV_HEADS, head_dim=S_HEAD_DIM,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=S_MAX_POS,
        sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 150000.0},
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation=attn_impl, experts_implementation="batched_mm")


def _deepseek_v3_config(attn_impl):
    return transformers.DeepseekV3Config(
        vocab_size=S_VOCAB, hidden_size=S_HIDDEN, intermediate_size=S_INTERMEDIATE, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=S_Q_HEADS, num_key_value_heads=S_Q_HEADS,
        n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=S_MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_interleave=True,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation=attn_impl, experts_implementation="batched_mm")


def _qwen3_moe_config(attn_impl):
    return transformers.Qwen3MoeConfig(
        vocab_size=S_VOCAB, hidden_size=S_HIDDEN, intermediate_size=S_INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=S_Q_HEADS, num_key_value_heads=S_KV_HEADS, moe_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        max_position_embeddings=S_MAX_POS, tie_word_embeddings=False, use_sliding_window=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation=attn_impl, experts_implementation="batched_mm")


def _cohere_config(attn_impl):
    return transformers.CohereConfig(
        vocab_size=S_VOCAB, hidden_size=S_HIDDEN, intermediate_size=S_INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=S_Q_HEADS, num_key_value_heads=S_KV_HEADS, max_position_embeddings=S_MAX_POS,
        logit_scale=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn_impl)


def _glm4_config(attn_impl):
    return transformers.Glm4Config(
        vocab_size=S_VOCAB, hidden_size=S_HIDDEN, intermediate_size=S_INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=S_Q_HEADS, num_key_value_heads=S_KV_HEADS, head_dim=S_HEAD_DIM,
        max_position_embeddings=S_MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=[2], attn_implementation=attn_impl)


def _modernbert_config(attn_impl):
    return transformers.ModernBertConfig(
        vocab_size=S_VOCAB, hidden_size=S_HIDDEN, intermediate_size=S_INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=S_Q_HEADS, max_position_embeddings=S_MAX_POS, local_attention=SLIDING_WINDOW,
        layer_types=["full_attention", "sliding_attention"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        attn_implementation=attn_impl)


def _llama31_config(attn_impl):
    c = _llama_small_config(attn_impl)
    c.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return c


LONGROPE_ORIGINAL = 8  # < the verification lengths 11 and 10, > 5 and 2: both factor sets are tested


def _phi3_longrope_config(attn_impl):
    return transformers.Phi3Config(
        vocab_size=S_VOCAB, hidden_size=S_HIDDEN, intermediate_size=S_INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=S_Q_HEADS, num_key_value_heads=S_KV_HEADS, max_position_embeddings=S_MAX_POS,
        original_max_position_embeddings=LONGROPE_ORIGINAL,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.25, 1.5, 2.0], "long_factor": [1.0, 3.0, 9.0, 27.0],
                         "original_max_position_embeddings": LONGROPE_ORIGINAL},
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn_impl)


def _gpt_bigcode_config(attn_impl):
    return transformers.GPTBigCodeConfig(
        vocab_size=S_VOCAB, n_embd=S_HIDDEN, n_layer=2, n_head=S_Q_HEADS, n_inner=S_INTERMEDIATE,
        n_positions=S_MAX_POS, multi_query=True, bos_token_id=1, eos_token_id=2, attn_implementation=attn_impl)


def _whisper_dec_config(attn_impl):
    c = _whisper_config(attn_impl)
    c.decoder_layers = 2
    c.max_target_positions = 32
    return c


def _bart_config(attn_impl):
    return transformers.BartConfig(
        vocab_size=S_VOCAB, d_model=S_HIDDEN, encoder_layers=1, decoder_layers=2, encoder_attention_heads=S_Q_HEADS,
        decoder_attention_heads=S_Q_HEADS, encoder_ffn_dim=S_INTERMEDIATE, decoder_ffn_dim=S_INTERMEDIATE,
        max_position_embeddings=S_MAX_POS, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None, attn_implementation=attn_impl)


def _decoder_cross_truth(c):
    layers = c.decoder_layers
    return {"layers": layers, "attention_cores": 2 * layers, "self_attention_cores": layers,
            "cross_attention_cores": layers, "causal_attention_cores": layers, "kv_cache_writes": 2 * layers,
            "cross_kv": "computed from encoder_hidden_states every step (not cached as inputs)"}


_NEW = dict(in_2026_batch=True)
_SW_CACHE_SHAPES = {"decode": [dict(batch=2, seq=4, past=6, pad=2), dict(batch=1, seq=1, past=SLIDING_WINDOW)]}

REGISTRY += [
    ModelSpec(
        name="gemma3", arch="gemma3_text", optional_combos=(("prefill", "sdpa"),),
        exporter_quirks={(k, "sdpa", "transformers"): [
            "the sliding layer's DynamicSlidingWindowLayer._sliding_window_tensor (int64 scalar, the window) is a "
            "graph input input.cache.layers.0._sliding_window_tensor that only feeds an Identity to the output "
            "(output.)cache.layers.0._sliding_window_tensor: callers must feed it (4)",
            "the sliding layer's cache is not cropped: present = Concat(past, new) of length past + S on both layers; "
            "the window is applied by the mask only"] for k in ("prefill", "decode")}, exporters=("torchscript", "dynamo", "transformers"), exporter_attn={"transformers": ("sdpa",)}, make_config=_gemma3_config, model_cls=transformers.Gemma3ForCausalLM,
        kinds=("prefill", "decode"), causal=True, position_embedding="rope", sliding_window=True,
        attention_scale=lambda c: float(c.query_pre_attn_scalar) ** -0.5,
        notes="layer 0 sliding (window 4, rope_theta 1e4), layer 1 global (rope_theta 1e6): two cos/sin tables; "
              "per-head RMSNorm (1 + w) on q and k before RoPE; scale query_pre_attn_scalar**-0.5; "
              "embeddings scaled by sqrt(hidden)",
        extra_truth=lambda c: {"qk_norm": True, "query_pre_attn_scalar": c.query_pre_attn_scalar,
                               "rope_theta_per_layer_type": {k: v["rope_theta"] for k, v in c.rope_parameters.items()}},
        **_NEW),
    ModelSpec(
        name="gpt-oss", arch="gpt_oss", make_config=_gpt_oss_config, model_cls=transformers.GptOssForCausalLM,
        kinds=("prefill", "decode"), causal=True, position_embedding="rope", sliding_window=True,
        attn_impls=("eager",),  # HF: _supports_sdpa = False (sinks)
        notes="learned per-head attention sinks (a sink logit concatenated to the scores before the Softmax, "
              "dropped after it); MoE (router Linear -> TopK -> Softmax over the top-k, batched_mm experts, "
              "clamped SwiGLU); layer 0 sliding (window 4), layer 1 full; YaRN rope; q/k/v/o bias",
        extra_truth=lambda c: {"attention_sinks": True,
                               "moe": _moe(c.num_local_experts, c.num_experts_per_tok, "topk_then_softmax", 2, [0, 1]),
                               **_sliding_truth(c)},
        **_NEW),
    ModelSpec(
        name="deepseek-v3", arch="deepseek_v3", optional_combos=(("prefill", "sdpa"),), make_config=_deepseek_v3_config,
        model_cls=transformers.DeepseekV3ForCausalLM, kinds=("prefill", "decode"), causal=True,
        position_embedding="rope", rotary_dim=lambda c: c.qk_rope_head_dim, rope_interleaved=True,
        attention_scale=lambda c: (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5,
        notes="multi-head latent attention: q = q_b(norm(q_a(x))), kv = kv_b(norm(kv_a(x)[:kv_lora_rank])); "
              "q/k head = nope 8 + rope 4 = 12, v head 8; the rotary part of K (k_pe, 1 head) is computed once and "
              "expanded across the 4 heads; rope_interleave: pairs (x0,x1),(x2,x3) rotated on x[..., 0::2] / x[..., 1::2] "
              "with the first half of cos/sin, the result written as halves cat(x1*cos - x2*sin, x2*cos + x1*sin) "
              "(on the 4 rope channels only, the last 4 of each q/k head); the cache holds the compressed latent "
              "and the rotated k_pe (see cache_layout); layer 0 dense MLP, layer 1 MoE with "
              "sigmoid router (grouped top-k, no Softmax) + 1 shared expert",
        extra_truth=lambda c: {"mla": {"q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
                                       "qk_nope_head_dim": c.qk_nope_head_dim, "qk_rope_head_dim": c.qk_rope_head_dim,
                                       "v_head_dim": c.v_head_dim, "k_rope_shared_across_heads": True,
                                       "rotary_channels": "last qk_rope_head_dim channels of each q/k head"},
                               "cache_layout": "MLA latent cache (transformers 5.x): present.i.key = "
                                               "kv_a_layernorm(latent) [B, 1, T, kv_lora_rank 16], present.i.value = "
                                               "rotated k_pe [B, 1, T, qk_rope_head_dim 4]; kv_b_proj re-expands "
                                               "K (nope 8 + shared rope 4) and V (8) for 4 heads every step",
                               "cache_heads": 1, "cache_key_size": c.kv_lora_rank, "cache_value_size": c.qk_rope_head_dim,
                               "moe": _moe(c.n_routed_experts, c.num_experts_per_tok, "sigmoid_grouped_topk", 0,
                                           [1], shared=c.n_shared_experts, n_group=c.n_group,
                                           topk_group=c.topk_group)},
        **_NEW),
    ModelSpec(
        name="qwen3-moe", arch="qwen3_moe", optional_combos=(("prefill", "sdpa"),), exporters=("torchscript", "dynamo", "transformers"), exporter_attn={"transformers": ("sdpa",)}, make_config=_qwen3_moe_config, model_cls=transformers.Qwen3MoeForCausalLM,
        kinds=("prefill", "decode"), causal=True, position_embedding="rope",
        notes="per-head RMSNorm on q and k (q_norm/k_norm) before RoPE; every layer MoE: router Linear -> Softmax "
              "(float32) -> TopK -> renormalise, batched_mm experts",
        extra_truth=lambda c: {"qk_norm": True,
                               "moe": _moe(c.num_experts, c.num_experts_per_tok, "softmax_then_topk", 2, [0, 1])},
        **_NEW),
    ModelSpec(
        name="cohere", arch="cohere", make_config=_cohere_config, model_cls=transformers.CohereForCausalLM,
        known_exporter_bugs={("prefill", "eager", "torchscript"): [
            "TorchScript writes the interleaved rotary's Mul with operands [.., 4] and [.., 8] (the traced "
            "stack/flatten of rotate_half): onnxruntime fails at every shape ('Attempting to broadcast an axis by "
            "a dimension other than 1. 4 by 8'); the decode export fails outright"]},
        kinds=("prefill", "decode"), causal=True, position_embedding="rope", rope_interleaved=True,
        attn_impls=("eager",),
        notes="interleaved rotary on the full head (rotate_half on x[..., ::2] / x[..., 1::2], stack + flatten; "
              "cos/sin repeat_interleave'd); LayerNorm without bias; parallel attention + MLP; logits * 0.25; "
              "tied embeddings",
        extra_truth=lambda c: {"logit_scale": c.logit_scale},
        **_NEW),
    ModelSpec(
        name="glm4", arch="glm4", make_config=_glm4_config, model_cls=transformers.Glm4ForCausalLM,
        kinds=("prefill", "decode"), causal=True, position_embedding="rope", rope_interleaved=True,
        rotary_dim=lambda c: int(c.head_dim * c.rope_parameters["partial_rotary_factor"]), attn_impls=("eager",),
        notes="partial (rotary_dim 4 of 8) AND interleaved rotary: cos/sin computed for 4 channels, "
              "repeat_interleave'd, rotate_half on x[..., 0:4:2] / x[..., 1:4:2]; q/k/v bias; fused gate_up_proj; "
              "post-attention and post-MLP RMSNorms",
        extra_truth=lambda c: {"partial_rotary_factor": c.rope_parameters["partial_rotary_factor"]},
        **_NEW),
    ModelSpec(
        name="modernbert", arch="modernbert", make_config=_modernbert_config, model_cls=transformers.ModernBertModel,
        kinds=("encoder",), causal=False, position_embedding="rope", sliding_window=True,
        window_attr="local_attention",
        notes="encoder with RoPE (global layers rope_theta 160000, local 10000); layer 0 global, layer 1 local "
              "(|i - j| <= local_attention // 2 = 2) on top of the padding mask; LayerNorm without bias; "
              "output last_hidden_state only",
        extra_truth=lambda c: {"sliding_window": None,  # not a causal window: see local_window
                               "local_window": {"type": "bidirectional", "half_width": c.local_attention // 2,
                                                "local_attention": c.local_attention},
                               "sliding_window_semantics": "bidirectional local window on the local layers: query i "
                                                           "attends keys j with |i - j| <= local_attention // 2 "
                                                           "(plus padding); no causal window",
                               "local_attention": c.local_attention, "causal": False,
                               "rope_theta_per_layer_type": {k: v["rope_theta"] for k, v in c.rope_parameters.items()},
                               **_sliding_truth(c)},
        **_NEW),
    ModelSpec(
        name="llama31", arch="llama", exporters=("torchscript", "dynamo", "transformers"), exporter_attn={"transformers": ("sdpa",)}, make_config=_llama31_config, model_cls=transformers.LlamaForCausalLM,
        kinds=("prefill", "decode"), causal=True, position_embedding="rope", attn_impls=("sdpa",),
        notes="rope_scaling llama3 (factor 8, low/high_freq_factor 1/4, original_max_position_embeddings 16): "
              "the inv_freq table is rescaled at init, the graph computes cos/sin from it as usual",
        **_NEW),
    ModelSpec(
        name="phi3-longrope", arch="phi3", make_config=_phi3_longrope_config, model_cls=transformers.Phi3ForCausalLM,
        kinds=("prefill", "decode"), causal=True, position_embedding="rope", attn_impls=("eager",),
        notes=f"rope_scaling longrope: inv_freq = Where(max(position_ids) + 1 > {LONGROPE_ORIGINAL}, long, short) "
              "per call, cos/sin scaled by sqrt(1 + ln(64/8)/ln(8)); verification covers both sides",
        extra_truth=lambda c: {"longrope_switch": f"max(position_ids) + 1 > {LONGROPE_ORIGINAL} -> long_factor",
                               "rope_attention_factor": float(np.sqrt(1 + np.log(c.max_position_embeddings
                                                                                   / LONGROPE_ORIGINAL)
                                                                      / np.log(LONGROPE_ORIGINAL)))},
        **_NEW),
    ModelSpec(
        name="gpt-bigcode-mqa", arch="gpt_bigcode", optional_combos=(("prefill", "sdpa"), ("decode", "eager")), make_config=_gpt_bigcode_config,
        model_cls=transformers.GPTBigCodeForCausalLM, kinds=("prefill", "decode"), causal=True,
        position_embedding="learned_absolute",
        notes="multi-query attention (multi_query=True: 1 kv head of 8 shared by 4 query heads); fused c_attn "
              "Linear [hidden + 2 * head] split into q / k / v; learned positions",
        extra_truth=lambda c: {"kv_heads": 1, "gqa": True, "mqa": True},
        **_NEW),
    ModelSpec(
        name="mistral-swcache", arch="mistral", optional_combos=(("decode", "eager"),), make_config=_mistral_config, model_cls=transformers.MistralForCausalLM,
        kinds=("decode",), causal=True, position_embedding="rope", cache="sliding_window",
        notes="HF's own sliding-window cache (DynamicSlidingWindowLayer, window 4): past holds the last 3 tokens, "
              "present = Slice(Concat(past, new))[-3:]; attention over the Concat; positions offset = "
              "attention_mask length - sequence_length",
        extra_truth=lambda c: {"sliding_window": c.sliding_window, "layer_types": ["sliding_attention"] * 2,
                               "sliding_window_layers": [0, 1]},
        verify_shapes=_SW_CACHE_SHAPES, **_NEW),
    ModelSpec(
        name="whisper-dec", arch="whisper", make_config=_whisper_dec_config,
        model_cls=transformers.WhisperForConditionalGeneration, kinds=("decode_cross",), causal=True,
        position_embedding="learned_absolute", attn_impls=("eager",),
        attention_scale=lambda c: (c.d_model // c.decoder_attention_heads) ** -0.5,
        notes="Whisper decoder step: self-attention with a growing cache + cross-attention to "
              "encoder_hidden_states (K/V projected every step); no decoder attention_mask (positions from the "
              "past length); q scaled after q_proj",
        extra_truth=lambda c: {**_decoder_cross_truth(c), "scale_applied_to": "query"},
        **_NEW),
    ModelSpec(
        name="bart-dec", arch="bart", make_config=_bart_config,
        model_cls=transformers.BartForConditionalGeneration, kinds=("decode_cross",), causal=True,
        position_embedding="learned_absolute", attn_impls=("sdpa",),
        notes="BART decoder step: decoder attention_mask [B, past + S], encoder_hidden_states + "
              "encoder_attention_mask for the cross-attention; learned positions (offset 2) from the past length; "
              "scale head_dim**-0.5 passed to the attention call (not applied to q_proj, unlike Whisper)",
        extra_truth=_decoder_cross_truth,
        **_NEW),
]


def _gpt2_small_config(attn_impl):
    return transformers.GPT2Config(
        vocab_size=S_VOCAB, n_embd=S_HIDDEN, n_layer=LAYERS, n_head=S_Q_HEADS, n_inner=S_INTERMEDIATE,
        n_positions=S_MAX_POS, bos_token_id=1, eos_token_id=2, attn_implementation=attn_impl)


_SMALL_LLAMA_NOTE = "small Llama (hidden 32, GQA 4/2, head_dim 8, vocab 64): same architecture as llama-gqa"

# dtypes and opsets: variants of existing architectures (small dimensions)
REGISTRY += [
    ModelSpec(
        name="llama-gqa-bf16", arch="llama", make_config=_llama_small_config, model_cls=transformers.LlamaForCausalLM,
        kinds=("prefill", "decode"), causal=True, position_embedding="rope", attn_impls=("sdpa",),
        dtype="bfloat16", notes=_SMALL_LLAMA_NOTE + "; bfloat16 weights, caches and logits", **_NEW),
    ModelSpec(
        name="gemma3-bf16", arch="gemma3_text", make_config=_gemma3_config, model_cls=transformers.Gemma3ForCausalLM,
        kinds=("decode",), causal=True, position_embedding="rope", sliding_window=True, attn_impls=("eager",),
        attention_scale=lambda c: float(c.query_pre_attn_scalar) ** -0.5, dtype="bfloat16",
        notes="gemma3 in bfloat16 (sliding + global layers, q/k norm)",
        extra_truth=lambda c: {"qk_norm": True, "query_pre_attn_scalar": c.query_pre_attn_scalar}, **_NEW),
    ModelSpec(
        name="llama-gqa-fp16", arch="llama", make_config=_llama_small_config, model_cls=transformers.LlamaForCausalLM,
        kinds=("decode",), causal=True, position_embedding="rope", attn_impls=("sdpa",), dtype="float16",
        notes=_SMALL_LLAMA_NOTE + "; float16 weights, caches and logits", **_NEW),
    ModelSpec(
        name="llama-gqa-op23", arch="llama", make_config=_llama_small_config, model_cls=transformers.LlamaForCausalLM,
        known_exporter_bugs={("decode", a, "dynamo"): [
            "opset-23 RotaryEmbedding gets cos/sin caches of batch 1 ([1, S, rotary_dim/2], from the [1, S] "
            "position ids, never expanded to the batch): onnxruntime rejects batch > 1 ('cos_cache and sin_cache "
            "are expected to have the same shape as input x'); runs at batch 1"] for a in ("eager", "sdpa")},
        kinds=("decode",), causal=True, position_embedding="rope", exporters=("dynamo",), opsets={"dynamo": 23},
        notes=_SMALL_LLAMA_NOTE + "; dynamo at opset 23: torch.onnx writes ONNX Attention for sdpa and "
              "RotaryEmbedding for the rotary (kept as the exporter wrote them)", **_NEW),
    ModelSpec(
        name="gpt2-op23", arch="gpt2", make_config=_gpt2_small_config, model_cls=transformers.GPT2LMHeadModel,
        kinds=("decode",), causal=True, position_embedding="learned_absolute", attn_impls=("sdpa",),
        exporters=("dynamo",), opsets={"dynamo": 23},
        notes="small GPT-2 (hidden 32, 4 heads, vocab 64); dynamo at opset 23 (sdpa -> ONNX Attention)", **_NEW),
    ModelSpec(
        name="llama-gqa-op18", arch="llama", make_config=_llama_small_config, model_cls=transformers.LlamaForCausalLM,
        kinds=("decode",), causal=True, position_embedding="rope", attn_impls=("sdpa",), exporters=("dynamo",),
        opsets={"dynamo": 18}, notes=_SMALL_LLAMA_NOTE + "; dynamo at opset 18", **_NEW),
]


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


def _build_dynamic_cache(config, past: tuple[torch.Tensor, ...], full_layers: bool = False) -> DynamicCache:
    """Build a DynamicCache that already holds ``past`` (k0, v0, k1, v1, ...), so that
    the model's cache.update is exactly ``Concat(past, new)`` along the sequence axis.

    ``full_layers``: use plain DynamicLayers even if the config has sliding-window layers
    (DynamicCache(config=...) would create DynamicSlidingWindowLayers, which crop the stored
    states to window-1 tokens and track the length in a python counter)."""
    n_layers = len(past) // 2
    if full_layers:
        cache = DynamicCache()
        cache.layers = [DynamicLayer() for _ in range(n_layers)]
    else:
        cache = DynamicCache(config=config)
    for i in range(n_layers):
        k, v = past[2 * i], past[2 * i + 1]
        layer = cache.layers[i]
        layer.lazy_initialization(k, v)
        layer.keys = k
        layer.values = v
    return cache


class DecodeWrapper(nn.Module):
    def __init__(self, model, full_layers: bool = False, sliding_cache: bool = False):
        super().__init__()
        self.model = model
        self.full_layers = full_layers
        self.sliding_cache = sliding_cache

    def forward(self, input_ids, attention_mask, *past):
        cache = _build_dynamic_cache(self.model.config, past, self.full_layers)
        if self.sliding_cache:
            # HF DynamicSlidingWindowLayer: the past holds only the last W-1 tokens; the number of
            # tokens seen so far (positions, mask offsets) is the mask length minus the new tokens.
            seen = attention_mask.shape[1] - input_ids.shape[1]
            for layer in cache.layers:
                if getattr(layer, "is_sliding", False):
                    layer.cumulative_length = seen
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present.append(layer.keys)
            present.append(layer.values)
        return (out.logits, *present)


class _InputIndexedStaticLayer(StaticLayer):
    """An HF StaticLayer over caller-provided cache tensors whose write slots are the
    wrapper's ``cache_position`` input (HF's StaticLayer derives them from an internal
    ``cumulative_length`` counter; here that counter is ``cache_position[0]``, which the
    mask code uses as the query offset)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache_position: torch.Tensor):
        super().__init__(max_cache_len=keys.shape[2])
        self.device = keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.keys, self.values = keys, values
        self.cache_position = cache_position
        self.cumulative_length = cache_position[0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        # same in-place write as StaticLayer.update, at the given slots
        self.keys.index_copy_(2, self.cache_position, key_states)
        self.values.index_copy_(2, self.cache_position, value_states)
        return self.keys, self.values


class StaticDecodeWrapper(nn.Module):
    """decode_static: (input_ids, attention_mask [B, cache_len], cache_position [S], *caches)
    -> (logits, *updated caches).  The caches are cloned first so that the ONNX graph is
    functional (cache inputs -> index write -> present outputs) and PyTorch references do not
    mutate their inputs."""

    def __init__(self, model, cache_len: int):
        super().__init__()
        self.model = model
        self.cache_len = cache_len

    def forward(self, input_ids, attention_mask, cache_position, *past):
        cache = StaticCache(config=self.model.config, max_cache_len=self.cache_len)
        cache.layers = [_InputIndexedStaticLayer(past[2 * i].clone(), past[2 * i + 1].clone(), cache_position)
                        for i in range(len(past) // 2)]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=cache_position.unsqueeze(0), cache=cache, use_cache=True)
        present = []
        for layer in cache.layers:
            present.append(layer.keys)
            present.append(layer.values)
        return (out.logits, *present)


class CrossDecodeWrapper(nn.Module):
    """decode_cross: one decoder step of an encoder-decoder model with a growing self-attention
    cache and cross-attention to ``encoder_hidden_states`` (the cross K/V are projected from it
    in the step, not passed as cache inputs).  ``masks``: the model takes a decoder
    attention_mask [B, past + S] and an encoder_attention_mask [B, S_enc] (BART); Whisper
    takes neither."""

    def __init__(self, model, masks: bool):
        super().__init__()
        self.model = model
        self.masks = masks

    def _run(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, past):
        from transformers import EncoderDecoderCache
        self_cache = _build_dynamic_cache(None, past, full_layers=True)
        cache = EncoderDecoderCache(self_cache, DynamicCache())
        kw = dict(decoder_attention_mask=attention_mask, attention_mask=encoder_attention_mask) if self.masks else {}
        out = self.model(encoder_outputs=(encoder_hidden_states,), decoder_input_ids=input_ids, cache=cache,
                         use_cache=True, **kw)
        present = []
        for layer in out.cache.self_attention_cache.layers:
            present.append(layer.keys)
            present.append(layer.values)
        return (out.logits, *present)


class CrossDecodeMaskWrapper(CrossDecodeWrapper):
    def __init__(self, model):
        super().__init__(model, masks=True)

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, *past):
        return self._run(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, past)


class CrossDecodeNoMaskWrapper(CrossDecodeWrapper):
    def __init__(self, model):
        super().__init__(model, masks=False)

    def forward(self, input_ids, encoder_hidden_states, *past):
        return self._run(input_ids, None, encoder_hidden_states, None, past)


class Seq2SeqWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         decoder_input_ids=decoder_input_ids, use_cache=False)
        return out.logits


class AudioEncoderWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_features):
        return self.model(input_features=input_features).last_hidden_state


class TextEncoderWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if getattr(out, "pooler_output", None) is None:  # ModernBERT: no pooler
            return out.last_hidden_state
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


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(spec: ModelSpec, cfg, kind: str, batch: int, seq: int = 0, past: int = 0,
                pad: int = 0, seed: int = 0, dec_seq: int = 0, enc_seq: int = 0) -> dict[str, torch.Tensor]:
    """Ordered dict of named inputs.  Row 1 is left-padded by ``pad`` tokens.  Floating inputs
    (caches, features, encoder states) are in the spec's dtype."""
    inputs = _make_inputs_f32(spec, cfg, kind, batch, seq, past, pad, seed, dec_seq, enc_seq)
    dt = _TORCH_DTYPES[spec.dtype]
    return {k: (v.to(dt) if v.is_floating_point() else v) for k, v in inputs.items()}


def _make_inputs_f32(spec, cfg, kind, batch, seq, past, pad, seed, dec_seq, enc_seq):
    g = torch.Generator().manual_seed(seed)
    if kind == "decode_cross":
        layers, _, kv_heads, hk, hv = _attn_dims(cfg)
        inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=g, dtype=torch.int64)}
        if spec.name.startswith("bart"):
            mask = torch.ones(batch, past + seq, dtype=torch.int64)
            if pad and batch > 1:
                mask[1, :pad] = 0
            inputs["attention_mask"] = mask
        inputs["encoder_hidden_states"] = torch.randn(batch, enc_seq, cfg.d_model, generator=g)
        if spec.name.startswith("bart"):
            emask = torch.ones(batch, enc_seq, dtype=torch.int64)
            if pad and batch > 1:
                emask[1, :min(pad, enc_seq - 1)] = 0
            inputs["encoder_attention_mask"] = emask
        for i in range(layers):
            inputs[f"past_key_values.{i}.key"] = torch.randn(batch, kv_heads, past, hk, generator=g)
            inputs[f"past_key_values.{i}.value"] = torch.randn(batch, kv_heads, past, hv, generator=g)
        return inputs
    if spec.input_kind == "image":
        return {"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)}
    if spec.input_kind == "audio":
        frames = 2 * cfg.max_source_positions
        return {"input_features": torch.randn(batch, cfg.num_mel_bins, frames, generator=g)}
    vocab = cfg.vocab_size
    if kind == "decode_static":
        # caches: random in EVERY slot (also the not-yet-written ones, which must be masked out)
        L = spec.cache_len
        assert past + seq <= L, (past, seq, L)
        inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int64)}
        mask = torch.zeros(batch, L, dtype=torch.int64)
        mask[:, : past + seq] = 1
        if pad and batch > 1:
            mask[1, :pad] = 0
        inputs["attention_mask"] = mask
        inputs["cache_position"] = torch.arange(past, past + seq, dtype=torch.int64)
        for i in range(_cfg_get(cfg, "num_hidden_layers", "n_layer")):
            inputs[f"past_key_values.{i}.key"] = torch.randn(*_kv_shape(cfg, batch, L), generator=g)
            inputs[f"past_key_values.{i}.value"] = torch.randn(*_kv_shape(cfg, batch, L), generator=g)
        return inputs
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int64)}
    total = past + seq
    mask = torch.ones(batch, total, dtype=torch.int64)
    if pad and batch > 1:
        mask[1, :pad] = 0
    inputs["attention_mask"] = mask
    if kind == "decode":
        n_layers = _attn_dims(cfg)[0]
        kv_heads, hk, hv = _cache_dims(cfg)
        types = list(getattr(cfg, "layer_types", None) or ["sliding_attention"] * n_layers)
        for i in range(n_layers):
            n = past
            if spec.cache == "sliding_window" and types[i] == "sliding_attention":
                n = min(past, getattr(cfg, spec.window_attr) - 1)  # the layer keeps the last W-1 tokens
            inputs[f"past_key_values.{i}.key"] = torch.randn(batch, kv_heads, n, hk, generator=g)
            inputs[f"past_key_values.{i}.value"] = torch.randn(batch, kv_heads, n, hv, generator=g)
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, dec_seq), generator=g, dtype=torch.int64)
    return inputs


def output_names(spec: ModelSpec, cfg, kind: str) -> list[str]:
    if kind == "encoder":
        if spec.input_kind == "audio" or spec.arch == "modernbert":
            return ["last_hidden_state"]
        return ["logits"] if spec.input_kind == "image" else ["last_hidden_state", "pooler_output"]
    names = ["logits"]
    if kind in ("decode", "decode_static", "decode_cross"):
        for i in range(_attn_dims(cfg)[0]):
            names += [f"present.{i}.key", f"present.{i}.value"]
    return names


DYNAMIC_AXES_DOC = {
    "batch": "dim 0 of every input/output",
    "sequence_length": "new tokens this call (input_ids dim 1; prefill/encoder attention_mask dim 1; logits dim 1)",
    "past_sequence_length": "decode: past_key_values.* dim 2",
    "total_sequence_length": "decode: attention_mask dim 1 and present.* dim 2 (= past + sequence); the dynamo "
                             "exporter names present.* dim 2 'past_sequence_length + sequence_length'",
    "image models": "only batch is dynamic (image size fixed by the config)",
    "audio models": "only batch is dynamic (input_features [batch, num_mel_bins, frames]; frames = "
                    "2 * max_source_positions, fixed)",
    "encoder_sequence_length": "seq2seq: input_ids / attention_mask dim 1 (encoder tokens)",
    "decoder_sequence_length": "seq2seq: decoder_input_ids dim 1 and logits dim 1",
    "decode_static": "batch and sequence_length (input_ids dim 1, cache_position dim 0, logits dim 1) are "
                     "dynamic; the cache length (attention_mask dim 1, past_key_values.*/present.* dim 2) is "
                     "fixed to cache_len",
}


def dynamic_axes_ts(input_names, out_names, kind, input_kind, sliding_cache: bool = False) -> dict:
    """TorchScript-exporter dynamic_axes with meaningful names."""
    ax: dict[str, dict[int, str]] = {}
    if input_kind == "image":
        ax["pixel_values"] = {0: "batch"}
        ax["logits"] = {0: "batch"}
        return ax
    if input_kind == "audio":
        return {"input_features": {0: "batch"}, "last_hidden_state": {0: "batch"}}
    if kind == "seq2seq":
        enc = {0: "batch", 1: "encoder_sequence_length"}
        dec = {0: "batch", 1: "decoder_sequence_length"}
        return {"input_ids": enc, "attention_mask": dict(enc), "decoder_input_ids": dec, "logits": dict(dec)}
    if kind == "decode_cross":
        ax = {"input_ids": {0: "batch", 1: "sequence_length"}, "attention_mask": {0: "batch", 1: "total_sequence_length"},
              "encoder_hidden_states": {0: "batch", 1: "encoder_sequence_length"},
              "encoder_attention_mask": {0: "batch", 1: "encoder_sequence_length"},
              "logits": {0: "batch", 1: "sequence_length"}}
        ax = {k: v for k, v in ax.items() if k in input_names or k in out_names}
        for n in input_names:
            if n.startswith("past_key_values"):
                ax[n] = {0: "batch", 2: "past_sequence_length"}
        for n in out_names:
            if n.startswith("present"):
                ax[n] = {0: "batch", 2: "total_sequence_length"}
        return ax
    if kind == "decode_static":
        ax = {"input_ids": {0: "batch", 1: "sequence_length"}, "attention_mask": {0: "batch"},
              "cache_position": {0: "sequence_length"}, "logits": {0: "batch", 1: "sequence_length"}}
        for n in list(input_names) + list(out_names):
            if n.startswith(("past_key_values", "present")):
                ax[n] = {0: "batch"}
        return ax
    for n in input_names:
        if n.startswith("past_key_values") and kind == "decode" and sliding_cache:
            ax[n] = {0: "batch"}  # steady state: W-1 long
            continue
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
            ax[n] = {0: "batch"} if sliding_cache else {0: "batch", 2: "total_sequence_length"}
    return ax


def dynamic_shapes_dynamo(input_names, kind, input_kind, sliding_cache: bool = False) -> tuple:
    """dynamo-exporter dynamic_shapes (positional, matching the wrapper signature)."""
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=1024)
    if input_kind in ("image", "audio"):
        return ({0: batch},)
    if kind == "decode_cross":
        seq = Dim("sequence_length", min=1, max=4096)
        past = Dim("past_sequence_length", min=1, max=4096)
        enc = Dim("encoder_sequence_length", min=1, max=4096)
        total = Dim("total_sequence_length", min=2, max=8192)
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                  "encoder_hidden_states": {0: batch, 1: enc}, "encoder_attention_mask": {0: batch, 1: enc}}
        fixed = tuple(shapes[n] for n in input_names if not n.startswith("past_key_values"))
        return fixed + (tuple({0: batch, 2: past} for n in input_names if n.startswith("past_key_values")),)
    if kind == "seq2seq":
        enc = Dim("encoder_sequence_length", min=1, max=4096)
        dec = Dim("decoder_sequence_length", min=1, max=4096)
        return ({0: batch, 1: enc}, {0: batch, 1: enc}, {0: batch, 1: dec})
    seq = Dim("sequence_length", min=1, max=4096)
    if kind == "decode_static":
        past_shapes = tuple({0: batch} for _ in input_names[3:])
        return ({0: batch, 1: seq}, {0: batch}, {0: seq}, past_shapes)
    if kind != "decode":
        return tuple({0: batch, 1: seq} for _ in input_names)
    if sliding_cache:
        # HF DynamicSlidingWindowLayer in its steady state: the past is W-1 long (static), the
        # mask covers every token seen (>= W, so the layer is "full": a python branch in HF)
        total = Dim("total_sequence_length", min=SLIDING_WINDOW + 1, max=8192)
        return ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch} for _ in input_names[2:]))
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
    if spec.dtype != "float32":
        model.to(_TORCH_DTYPES[spec.dtype])
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
        return DecodeWrapper(model, full_layers=spec.sliding_window and spec.cache == "growing",
                             sliding_cache=spec.cache == "sliding_window").eval()
    if kind == "decode_cross":
        return (CrossDecodeMaskWrapper(model) if spec.name.startswith("bart") else CrossDecodeNoMaskWrapper(model)).eval()
    if kind == "decode_static":
        return StaticDecodeWrapper(model, spec.cache_len).eval()
    if kind == "seq2seq":
        return Seq2SeqWrapper(model).eval()
    if spec.input_kind == "image":
        return ImageEncoderWrapper(model).eval()
    if spec.input_kind == "audio":
        return AudioEncoderWrapper(model).eval()
    return TextEncoderWrapper(model).eval()


# Example inputs used for tracing.  Batch 3 (not 2) so that the batch-2 verification
# below also proves the batch axis is really dynamic.
EXAMPLE = {"prefill": dict(batch=3, seq=8), "decode": dict(batch=3, seq=3, past=5), "encoder": dict(batch=3, seq=8),
           "seq2seq": dict(batch=3, seq=8, dec_seq=5), "decode_static": dict(batch=3, seq=3, past=5),
           "decode_cross": dict(batch=3, seq=3, past=5, enc_seq=6)}
# Main verification shape: batch 2, a sequence length != the example, row 1 left-padded.
VERIFY = {"prefill": dict(batch=2, seq=11, pad=3), "decode": dict(batch=2, seq=1, past=9, pad=3),
          "encoder": dict(batch=2, seq=13, pad=4), "seq2seq": dict(batch=2, seq=11, pad=3, dec_seq=7),
          "decode_static": dict(batch=2, seq=1, past=9, pad=3),
          "decode_cross": dict(batch=2, seq=1, past=9, pad=3, enc_seq=7)}
# Additional verification shapes (run in addition to VERIFY).
VERIFY_EXTRA = {
    "prefill": [dict(batch=1, seq=5)],
    "decode": [dict(batch=2, seq=4, past=6, pad=2), dict(batch=1, seq=1, past=1)],
    "encoder": [dict(batch=1, seq=5, pad=0)],
    "seq2seq": [dict(batch=1, seq=5, dec_seq=1)],
    "decode_cross": [dict(batch=2, seq=4, past=6, pad=2, enc_seq=5), dict(batch=1, seq=1, past=1, enc_seq=3)],
    # (cache_len 16) a 4-token chunk, the first token, and a write into the last slot
    "decode_static": [dict(batch=2, seq=4, past=6, pad=2), dict(batch=1, seq=1, past=0),
                      dict(batch=2, seq=1, past=15, pad=1)],
}


def file_name(spec, kind, attn, exporter):
    # kinds with an underscore ("decode_static") use a dash in file names, so that the name
    # still splits as <spec>_<kind>_<attn>_<exporter>
    return f"{spec.name}_{kind.replace('_', '-')}_{attn}_{exporter}.onnx"


_DROP_METADATA = {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.name_scopes"}


def _strip_metadata(path: str) -> None:
    """The dynamo exporter stores per-node python stack traces containing absolute
    paths of this machine; drop them (size + reproducibility), and the class
    hierarchy / name scopes, which duplicate 'namespace', and memory addresses
    (``<function sym_max at 0x...>``) from the kept values.  'namespace' (which
    nn.Module, e.g. ``model.model.layers.0.self_attn``, each node came from)
    and 'pkg.torch.onnx.fx_node' are kept."""
    import onnx

    import re

    m = onnx.load(path)
    for node in m.graph.node:
        keep = [p for p in node.metadata_props if p.key not in _DROP_METADATA]
        for p in keep:  # "<function sym_max at 0x7f...>": a memory address, different every run
            p.value = re.sub(r" at 0x[0-9a-f]+>", ">", p.value)
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.save(m, path)


# --------------------------------------------------------------------------------------
# transformers' own ONNX exporter (transformers.exporters.OnnxExporter, transformers >= 5.x)
# --------------------------------------------------------------------------------------
_HF_EXPORT_CACHE: dict[tuple[str, str], str] = {}


def _hf_sample_inputs(cfg):
    """generate() inputs for OnnxExporter.export_for_generation: batch 2, 5 tokens, row 1
    left-padded by 2 (an all-ones mask is dropped by generate, and so would be the graph's
    attention_mask input)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def export_transformers(spec: ModelSpec, attn: str) -> str:
    """Export prefill + decode with transformers' OnnxExporter.export_for_generation
    (OnnxConfig(dynamic=True), multi_token_decode=True so the decode step takes S >= 1 new
    tokens).  Returns the directory written by ExportedModel.save_pretrained
    (prefill.onnx/decode.onnx with weights in .data sidecars)."""
    import tempfile
    from transformers.exporters import OnnxConfig, OnnxExporter

    key = (spec.name, attn)
    if key in _HF_EXPORT_CACHE:
        return _HF_EXPORT_CACHE[key]
    model, cfg = build_model(spec, attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.max_new_tokens = 2
    model.generation_config.do_sample = False
    d = tempfile.mkdtemp(prefix=f"hfexport-{spec.name}-")
    ex = OnnxExporter().export_for_generation(model, _hf_sample_inputs(cfg), config=OnnxConfig(dynamic=True),
                                              multi_token_decode=True)
    ex.save_pretrained(d)
    _HF_EXPORT_CACHE[key] = d
    return d


class TransformersExportRef(nn.Module):
    """PyTorch reference for the files of transformers' exporter: named inputs input_ids,
    attention_mask, position_ids (+ input.cache.layers.N.keys|values for decode); outputs
    logits and the cache layers ((output.)cache.layers.N.keys|values)."""

    def __init__(self, model, kind):
        super().__init__()
        self.model = model
        self.kind = kind

    def onnx_inputs(self, inp: dict) -> dict:
        ids, mask = inp["input_ids"], inp["attention_mask"]
        seq = ids.shape[1]
        past = mask.shape[1] - seq
        out = {"input_ids": ids, "attention_mask": mask,
               "position_ids": torch.arange(past, past + seq).unsqueeze(0).expand(ids.shape[0], -1).contiguous()}
        for k, v in inp.items():
            if k.startswith("past_key_values."):
                _, i, kv = k.split(".")
                out[f"input.cache.layers.{i}.{'keys' if kv == 'key' else 'values'}"] = v
        # Gemma 3: the sliding layers' _sliding_window_tensor buffer (int64 scalar) leaks into the
        # graph as an input, passed through (Identity) to an output of the same name
        w = getattr(self.model.config, "sliding_window", None)
        for i in range(self.model.config.num_hidden_layers):
            if w:
                out[f"input.cache.layers.{i}._sliding_window_tensor"] = torch.tensor(w, dtype=torch.int64)
        return out

    def forward(self, input_ids, attention_mask, position_ids, *past):
        # the exported graphs keep every layer's full cache (present = Concat(past, new), also
        # for Gemma 3's sliding layer), so the reference uses plain DynamicLayers
        cache = _build_dynamic_cache(self.model.config, past[: 2 * self.model.config.num_hidden_layers],
                                     full_layers=True)
        if self.kind != "decode":
            cache = DynamicCache()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_one(spec: ModelSpec, kind: str, attn: str, exporter: str, out_dir: str) -> dict:
    if exporter == "transformers":
        return _export_one_transformers(spec, kind, attn, out_dir)
    model, cfg = build_model(spec, attn)
    wrapper = wrap(spec, model, kind)
    ex = make_inputs(spec, cfg, kind, **EXAMPLE[kind], seed=1)
    in_names = list(ex.keys())
    out_names = output_names(spec, cfg, kind)
    args = tuple(ex.values())
    sliding_cache = kind == "decode" and spec.cache == "sliding_window"
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
                opset_version=spec.opsets.get("torchscript", TORCHSCRIPT_OPSET),
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=dynamic_axes_ts(in_names, out_names, kind, spec.input_kind, sliding_cache),
                do_constant_folding=True,
            )
        else:
            prog = torch.onnx.export(
                wrapper, args,
                dynamo=True,
                input_names=in_names,
                output_names=out_names,
                dynamic_shapes=dynamic_shapes_dynamo(in_names, kind, spec.input_kind, sliding_cache),
                optimize=True,
                **({"opset_version": spec.opsets["dynamo"]} if "dynamo" in spec.opsets else {}),
            )
            prog.save(path, external_data=False)
            _strip_metadata(path)
    import onnx

    info.update(_export_info(path))
    return info


def _export_info(path: str) -> dict:
    import onnx

    m = onnx.load(path)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    native_attn = sum(1 for n in m.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx"))
    return dict(opset=opset, inputs=[i.name for i in m.graph.input], outputs=[o.name for o in m.graph.output],
                native_attention_ops=native_attn, size_bytes=os.path.getsize(path),
                subgraph=any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                             for n in m.graph.node for a in n.attribute))


def _export_one_transformers(spec: ModelSpec, kind: str, attn: str, out_dir: str) -> dict:
    import onnx

    d = export_transformers(spec, attn)
    src = os.path.join(d, "prefill.onnx" if kind == "prefill" else "decode.onnx")
    path = os.path.join(out_dir, file_name(spec, kind, attn, "transformers"))
    m = onnx.load(src)  # pulls the .data sidecar in: the committed file has its weights inline
    onnx.save(m, path)
    _strip_metadata(path)
    return _export_info(path)


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------
def _torch_outputs(wrapper, inputs):
    with torch.no_grad():
        out = wrapper(*inputs.values())
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [o.detach().float().numpy() if o.is_floating_point() else o.detach().numpy() for o in out]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """torch -> numpy, bfloat16 as ml_dtypes.bfloat16 (what onnxruntime takes)."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# max |onnxruntime - torch| allowed, relative to max(1, max |torch|) for the low-precision dtypes
DTYPE_TOL = {"float32": TOL, "float16": 2e-2, "bfloat16": 8e-2}


def structure_check(path: str, entry: dict) -> list[str]:
    """Cheap consistency check of the config-derived ground truth against the graph:
    Softmax (+ native Attention) count == attention_cores, and the number of Concat
    nodes fed directly by a past_key_values input == kv_cache_writes (decode_static:
    ScatterND/ScatterElements nodes whose data input is a past_key_values input, possibly
    through Transpose/Identity).  (Valid for the current unfused exports; not a general
    attention detector.)"""
    import onnx

    m = onnx.load(path)
    nodes = list(m.graph.node)
    n_softmax = sum(n.op_type == "Softmax" for n in nodes) + entry.get("native_attention_ops", 0)
    n_softmax_expected = entry["attention_cores"] + ((entry.get("moe") or {}).get("router_softmax", 0))
    past = {i.name for i in m.graph.input if i.name.startswith(("past_key_values", "input.cache."))}
    if entry["kind"] == "decode_static":
        producer = {o: n for n in nodes for o in n.output}

        def from_past(name):
            while name not in past and name in producer and producer[name].op_type in ("Transpose", "Identity"):
                name = producer[name].input[0]
            return name in past

        op = "Scatter"
        n_kv = sum(n.op_type in ("ScatterND", "ScatterElements") and from_past(n.input[0]) for n in nodes)
    else:
        op = "Concat"
        n_kv = sum(n.op_type == "Concat" and any(i in past for i in n.input) for n in nodes)
    problems = []
    if n_softmax != n_softmax_expected:
        problems.append(f"softmax {n_softmax} != attention_cores {entry['attention_cores']} (+ MoE router softmax)")
    if n_kv != entry["kv_cache_writes"]:
        problems.append(f"past {op} {n_kv} != kv_cache_writes {entry['kv_cache_writes']}")
    if [i.name for i in m.graph.input] != entry["inputs"] or [o.name for o in m.graph.output] != entry["outputs"]:
        problems.append("graph inputs/outputs differ from manifest")
    return problems


def verify_one(spec: ModelSpec, kind: str, attn: str, path: str) -> dict:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(path, full_check=True)
    model, cfg = build_model(spec, attn)
    if path.endswith("_transformers.onnx"):
        wrapper = TransformersExportRef(model, kind)
    else:
        wrapper = wrap(spec, model, kind)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    shapes = [VERIFY[kind]] + spec.verify_shapes.get(kind, VERIFY_EXTRA.get(kind, []))
    exporter = os.path.basename(path)[:-len(".onnx")].rsplit("_", 1)[1]
    bugs = spec.known_exporter_bugs.get((kind, attn, exporter))
    if bugs:
        # a file the exporter wrote broken is kept as written; it is compared at batch 1 only
        # (where it runs, if it runs at all) and marked
        shapes = [dict(shp, batch=1, pad=0) for shp in shapes]
    try:
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        sess_inputs = [i.name for i in sess.get_inputs()]
        inp0 = make_inputs(spec, cfg, kind, **shapes[0], seed=7)
        if path.endswith("_transformers.onnx"):
            inp0 = wrapper.onnx_inputs(inp0)
        sess.run(None, {k: _to_numpy(v) for k, v in inp0.items() if k in sess_inputs})
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0][:300]
        # onnxruntime's CPU provider has no bfloat16 kernels for most ops: recorded, not a failure
        return dict(ok=spec.dtype == "bfloat16" or bool(bugs), checks=[], ort_cpu_runs=False,
                    error=f"onnxruntime CPU cannot run it: {type(e).__name__}: {msg}"
                          + (" (known exporter bug)" if bugs else ""))
    tol = DTYPE_TOL[spec.dtype]
    results = []
    for shp in shapes:
        inp = make_inputs(spec, cfg, kind, **shp, seed=7)
        if path.endswith("_transformers.onnx"):
            inp = wrapper.onnx_inputs(inp)
        ref = _torch_outputs(wrapper, inp)
        feed = {k: _to_numpy(v) for k, v in inp.items() if k in sess_inputs}
        out_names_ort = [o.name for o in sess.get_outputs()]
        got = [np.asarray(g, dtype=np.float32) if g.dtype.kind == "V" or str(g.dtype) == "bfloat16" else g
               for g, n in zip(sess.run(None, feed), out_names_ort) if "_sliding_window_tensor" not in n]
        got = [g.astype(np.float32) if g.dtype == np.float16 else g for g in got]
        # Output rows of left-padding query positions are undefined (a fully masked
        # softmax row: eager gives a uniform average, torch SDPA gives zeros, the
        # ONNX lowering something else), so the first output (logits /
        # last_hidden_state) is compared on real-token positions only; the diff
        # on padded rows is reported for information.
        valid = None
        if kind == "decode_static":
            valid = inp["attention_mask"][:, inp["cache_position"]].numpy().astype(bool)
        elif kind != "seq2seq" and "attention_mask" in inp and ref[0].ndim == 3:
            # (seq2seq: the mask is the encoder's; no decoder query row is fully masked)
            valid = inp["attention_mask"][:, -ref[0].shape[1]:].numpy().astype(bool)
        diffs, pad_diff = [], 0.0
        for j, (r, g) in enumerate(zip(ref, got)):
            if r.shape != g.shape or not r.size:
                diffs.append(float("inf") if r.shape != g.shape else 0.0)
                continue
            d = np.abs(r - g)
            if spec.dtype != "float32":
                d = d / max(1.0, float(np.abs(r).max()))
            if j == 0 and valid is not None:
                if (~valid).any():
                    pad_diff = float(np.nan_to_num(d[~valid], nan=np.inf).max())
                d = d[valid]
            diffs.append(float(np.nan_to_num(d, nan=np.inf).max()))
        nan = any(np.isnan(g).any() for g in got) or any(np.isnan(r).any() for r in ref)
        shape_ok = all(r.shape == g.shape for r, g in zip(ref, got))
        res = dict(shape=shp, logits_max_abs_diff=diffs[0], max_abs_diff_all=max(diffs),
                   padded_rows_diff=pad_diff, nan=bool(nan), shape_ok=shape_ok)
        if spec.sliding_window and spec.cache == "growing" and shp is shapes[0]:
            # Does the exported graph really apply the window?  Compare the ONNX logits with the
            # same weights and the window disabled (sliding_window larger than any length): they
            # must differ (the test lengths exceed the window).
            saved = getattr(model.config, spec.window_attr)
            setattr(model.config, spec.window_attr, 1 << 20)
            try:
                ref_nowin = _torch_outputs(wrapper, inp)
            finally:
                setattr(model.config, spec.window_attr, saved)
            d = np.abs(ref_nowin[0] - got[0])
            res["window_effect"] = float((d[valid] if valid is not None else d).max())
        results.append(res)
    ok = all(r["max_abs_diff_all"] < tol and not r["nan"] and r["shape_ok"]
             and r.get("window_effect", 1.0) > WINDOW_EFFECT_MIN for r in results)
    out = dict(ok=ok, checks=results, ort_cpu_runs=True if not bugs else "batch 1 only")
    if bugs:
        out["error"] = "known exporter bug: verified at batch 1 only"
    if any(r.get("window_effect", 1.0) <= WINDOW_EFFECT_MIN for r in results):
        out["error"] = "sliding window has no effect on the outputs"
    return out


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def _fmt_shape(d: dict) -> str:
    return "x".join(f"{k}{v}" for k, v in d.items())


def main(argv=None):
    # transformers iterates sets of strings while tracing (ModernBERT: `for layer_type in
    # set(config.layer_types)` computes its two RoPE tables in set order), so the graphs depend on
    # the string hash seed: fix it by re-running under PYTHONHASHSEED=0
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--only", nargs="*", default=None, help="spec names to (re)build")
    ap.add_argument("--exporters", nargs="*", default=list(ALL_EXPORTERS), choices=ALL_EXPORTERS)
    ap.add_argument("--attn", nargs="*", default=None, help="restrict attention implementations")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--no-export", action="store_true", help="only verify files listed in the manifest")
    ap.add_argument("--verbose", action="store_true", help="show exporter output")
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(args.out, exist_ok=True)
    manifest_path = os.path.join(args.out, "manifest.json")
    manifest = {"files": {}, "skipped": []}
    full_run = args.only is None and args.attn is None and set(args.exporters) == set(ALL_EXPORTERS)
    # A full export run rebuilds the manifest from scratch; partial runs update it in place.
    if os.path.exists(manifest_path) and (args.no_export or not full_run):
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest.setdefault("files", {})
        manifest.setdefault("skipped", [])
    elif os.path.exists(manifest_path):
        # a full run rebuilds everything it exports; the optimum files come from export_optimum.py
        with open(manifest_path) as f:
            old = json.load(f)
        manifest["files"] = {k: v for k, v in old.get("files", {}).items() if v.get("exporter") == "optimum"}
        manifest["skipped"] = [x for x in old.get("skipped", []) if x.get("exporter") == "optimum"]

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
                if not args.attn and attn in spec.optional_attn_impls:
                    continue
                for exporter in args.exporters:
                    if not args.attn and (kind, attn) in spec.optional_combos and exporter != "transformers":
                        continue
                    if exporter in spec.exporters and attn in spec.exporter_attn.get(exporter, (attn,)):
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
            if exporter in ("dynamo", "transformers"):
                entry["dynamo_optimize"] = True
            if spec.in_2026_batch:
                entry["known_exporter_bugs"] = list(spec.known_exporter_bugs.get((kind, attn, exporter), []))
                entry["subgraph"] = info.get("subgraph", False)
                if spec.exporter_quirks.get((kind, attn, exporter)):
                    entry["exporter_quirks"] = list(spec.exporter_quirks[(kind, attn, exporter)])
            if info["native_attention_ops"]:
                entry["native_attention_ops"] = info["native_attention_ops"]
            if spec.notes:
                entry["notes"] = spec.notes
            manifest["files"][fname] = entry
            print(f"[export] {fname}: opset {info['opset']}, {info['size_bytes'] / 1024:.0f} KiB, "
                  f"{time.time() - t0:.1f}s", flush=True)

    optimum_venv = manifest.get("versions", {}).get("optimum_venv")  # written by export_optimum.py
    manifest["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": __import__("onnx").__version__,
        "onnxscript": __import__("onnxscript").__version__,
        "onnxruntime_verified_with": __import__("onnxruntime").__version__,
        "python": sys.version.split()[0],
    }
    if optimum_venv:
        manifest["versions"]["optimum_venv"] = optimum_venv
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
        if entry.get("dtype") is not None or res.get("ort_cpu_runs", True) is not True:
            entry["ort_cpu_runs"] = res.get("ort_cpu_runs", False)
            if res.get("ort_cpu_runs", True) is False:
                entry["ort_cpu_error"] = res.get("error", "")
            else:
                entry.pop("ort_cpu_error", None)
    with open(manifest_path, "w") as f:  # ort_cpu_runs recorded
        json.dump({k: manifest[k] for k in keys}, f, indent=2)
        f.write("\n")

    print()
    hdr = f"{'file':60} {'opset':>5} {'KiB':>6}  {'max|diff| per check':34} result"
    print(hdr)
    print("-" * len(hdr))
    n_fail = 0
    for fname, entry, res in rows:
        size = os.path.getsize(os.path.join(args.out, fname)) / 1024
        diffs = " ".join(f"{c['max_abs_diff_all']:.1e}" + ("(NaN)" if c["nan"] else "")
                         + (f"[pad {c['padded_rows_diff']:.0e}]" if c["padded_rows_diff"] > 1e-3 else "")
                         + (f"[win {c['window_effect']:.1e}]" if "window_effect" in c else "")
                         for c in res["checks"])
        status = ("OK" if res["ok"] else "FAIL") + (" " + res["error"] if res.get("error") else "")
        n_fail += not res["ok"]
        print(f"{fname:60} {entry['opset']:>5} {size:6.0f}  {diffs:34} {status}")
    print(f"\nchecks: {' | '.join(f'{k}: ' + ', '.join(_fmt_shape(x) for x in [VERIFY[k]] + VERIFY_EXTRA.get(k, [])) for k in VERIFY)}")
    print("values are max |onnxruntime - torch| over all outputs; [pad X] = diff on rows of left-padding query")
    print("positions (undefined: fully masked softmax row), excluded from the comparison; [win X] = max |onnxruntime -")
    print(f"torch with the sliding window disabled| (must be > {WINDOW_EFFECT_MIN}: the window is applied)")
    for sk in manifest["skipped"]:
        print(f"skipped {sk['file']}: {sk['reason']}")
    print(f"{len(rows)} verified, {n_fail} failed, {len(manifest['skipped'])} skipped")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
