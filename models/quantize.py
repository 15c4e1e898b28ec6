#!/usr/bin/env python
"""Quantize committed models with NVIDIA ModelOpt's ONNX quantizer (INT8 and FP8, Q/DQ).

Each source model in ``SOURCES`` is calibrated on CPU (onnxruntime) with data made here: token
ids within the vocabulary, 0/1 attention masks with left-padded rows, a non-empty past for the
decoder, pixels for ViT. The sequences are 32 tokens long: ModelOpt leaves a MatMul whose output
or reduction dim is below 16 (or 1: a decode step) without Q/DQ, so the attention products of
shorter calibration runs would not be quantized at all. Output: ``models/quantized/<source
stem>_<mode>.onnx`` and ``models/quantized/manifest.json`` (``quantization``: mode, calibration,
where the Q/DQ pairs sit, made by ModelOpt or by hand; ``source``: the file it was made from,
whose ground truth in ``models/manifest.json`` still holds).

ModelOpt pins an older onnx and a CUDA onnxruntime; it runs in a venv of its own, with the CPU
torch installed first so that pip does not pull a CUDA one::

    python3 -m venv /work/venvs/quant-modelopt && . /work/venvs/quant-modelopt/bin/activate
    pip install torch==2.13.0 && pip install nvidia-modelopt==0.47.0 onnx onnxruntime \\
        onnx-graphsurgeon onnxslim onnxconverter-common==1.16.0 ml_dtypes onnxscript polygraphy lief cppimport
    python models/quantize.py

Both modes run on CPU here (ModelOpt 0.47.0, onnxruntime 1.32.0), so every file is made by
ModelOpt; none is built by hand.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "quantized")
MODES = ("int8", "fp8")
SEQ, PAST, BATCH, VOCAB = 32, 16, 8, 256
# Where ModelOpt 0.47.0 puts the Q/DQ pairs of an attention core it quantizes (read from its
# output: one pair per input of both attention MatMuls, plus one on the block's output).
PLACEMENT = ("one QuantizeLinear/DequantizeLinear pair on each input of the Q·Kᵀ MatMul (Q after "
             "its head transpose, Kᵀ after its transpose) and of the probabilities·V MatMul (the "
             "softmax output, V after its head transpose), per tensor, zero point 0; weights per "
             "channel; the model converted to float16 (ModelOpt's default high-precision type)")
# Llama's eager attention casts the scores between the mask Add and the Softmax; ModelOpt then
# takes that Add for an ordinary one and quantizes its input, the scaled scores: a Q/DQ pair that
# TensorRT's MHA fusion does not take. One file keeps that placement (onnx-fuse must refuse it,
# with the reason); the others exclude Add from quantization, as a TensorRT user would.
NO_ADD = ("--op_types_to_exclude", "Add")
SCORES_QDQ = "; also a pair on the scaled scores before the mask Add (ModelOpt quantizes that Add's input)"
# (source, kind, modes, extra ModelOpt arguments, file suffix, what the placement adds)
SOURCES = [
    ("bert_encoder_eager_torchscript.onnx", "text", MODES, (), "", ""),
    ("vit_encoder_eager_torchscript.onnx", "image", MODES, (), "", ""),
    ("llama-gqa_prefill_eager_torchscript.onnx", "text", MODES, NO_ADD, "", "; Add excluded"),
    ("llama-gqa_decode_eager_torchscript.onnx", "decode", MODES, NO_ADD, "", "; Add excluded"),
    ("llama-gqa_prefill_eager_torchscript.onnx", "text", ("int8",), (), "-scores-qdq", SCORES_QDQ),
]


def calibration(kind: str, rng: np.random.Generator, cache_shape=None) -> dict[str, np.ndarray]:
    if kind == "image":
        return {"pixel_values": rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32)}
    past = PAST if kind == "decode" else 0
    mask = np.ones((BATCH, past + SEQ), np.int64)
    mask[1::2, :5] = 0  # left padding on every other row
    data = {"input_ids": rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int64), "attention_mask": mask}
    for name, (heads, head_size) in (cache_shape or {}).items():
        data[name] = rng.standard_normal((BATCH, heads, past, head_size)).astype(np.float32)
    return data


def cache_inputs(path: str) -> dict[str, tuple[int, int]]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    caches = {}
    for tensor in model.graph.input:
        if tensor.name.startswith("past_key_values"):
            dims = tensor.type.tensor_type.shape.dim
            caches[tensor.name] = (dims[1].dim_value, dims[3].dim_value)
    return caches


def quantize(source: str, kind: str, mode: str, extra: tuple, suffix: str, work: str) -> str:
    # ModelOpt writes inferred shapes back into the file it is given: give it a copy.
    path = os.path.join(work, source)
    shutil.copyfile(os.path.join(HERE, source), path)
    rng = np.random.default_rng(1234)
    calib = os.path.join(work, f"{source}.npz")
    np.savez(calib, **calibration(kind, rng, cache_inputs(path) if kind == "decode" else None))
    stem = source[: -len(".onnx")]
    output = os.path.join(OUT, f"{stem}_{mode}{suffix}.onnx")
    command = [sys.executable, "-m", "modelopt.onnx.quantization", "--onnx_path", path,
               "--quantize_mode", mode, "--calibration_data_path", calib, "--calibration_method", "max",
               "--calibration_eps", "cpu", "--output_path", output, *extra]
    log = subprocess.run(command, capture_output=True, text=True, cwd=work)
    if log.returncode != 0 or not os.path.exists(output):
        raise SystemExit(f"ModelOpt failed on {source} ({mode}):\n{log.stdout[-2000:]}{log.stderr[-2000:]}")
    return output


def entry(source: str, kind: str, mode: str, extra: tuple, placement: str) -> dict:
    import modelopt

    return {
        "source": source,
        "quantization": {
            "mode": mode,
            "made_by": f"ModelOpt {modelopt.__version__} (python -m modelopt.onnx.quantization)",
            "calibration": (f"max, CPU, {BATCH} samples of {SEQ} tokens" + (f" after a past of {PAST}" if kind == "decode" else "")
                            if kind != "image" else f"max, CPU, {BATCH} random images"),
            "arguments": " ".join(extra),
            "placement": PLACEMENT + placement,
            "attention_fusable": placement != SCORES_QDQ,
            "by_hand": False,
        },
    }


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    manifest = {"files": {}}
    with tempfile.TemporaryDirectory() as work:
        for source, kind, modes, extra, suffix, placement in SOURCES:
            for mode in modes:
                output = quantize(source, kind, mode, extra, suffix, work)
                manifest["files"][os.path.basename(output)] = entry(source, kind, mode, extra, placement)
                print(f"{os.path.basename(output)}: {os.path.getsize(output)} bytes")
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
