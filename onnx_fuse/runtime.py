"""onnxruntime sessions as every part of the tool opens them: CPU, quiet, and able to find a
model's external data in the directory it came from. onnxruntime is imported here only when a
session is made, which keeps the command's start-up lean."""

from __future__ import annotations

import os


def session(model_bytes: bytes, base_dir: str | None = None, optimize: bool = False):
    """An InferenceSession for a serialized model whose external data (if any) is in base_dir."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 4  # errors reach the caller as exceptions, not as log lines
    if base_dir is not None:
        # Where onnxruntime looks for the external data of a model given as bytes. (A temporary
        # folder with symlinks to the data does not work: recent onnxruntime resolves the links
        # and rejects the data as outside the model folder.)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         os.path.abspath(base_dir))
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
