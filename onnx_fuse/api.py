"""`onnx_fuse.fuse`: the entry point of the Python API and of the command.

It composes the steps: the fusion pass (fuse.py), then, with `kv_cache="static"`, the conversion
of growing caches into fixed ones (kv_static.py), which reads the pass's typed results.
"""

from __future__ import annotations

import gc

from .errors import BadInput
from .fuse import fuse_source
from .graph import Options
from .model_io import as_source
from .proof import Prover
from .result import FuseResult
from .targets import get_target


def fuse(model, target: str = "onnx", check: bool = True, inputs: dict | None = None,
         *, apply: bool = True, max_positions: int | None = None, kv_cache: str | None = None,
         max_cache_len: int | None = None) -> FuseResult:
    """Fuse `model` (a path or an onnx.ModelProto) for `target`.

    With `check` (the default) the result is run against the input in onnxruntime and a
    disagreement raises CheckFailed, so a wrong model is never returned. `apply=False` only
    reports what would fuse. `max_positions` bounds the positions RoPE caches cover where the
    graph does not (cos/sin computed from the positions). Raises BadInput for models that cannot
    be used. `kv_cache="static"` also converts caches that grow by Concat to fixed caches of
    `max_cache_len` slots written by TensorScatter (kv_static.py; its check drives decode steps).
    """
    chosen = get_target(target)
    if check and chosen.proof.kind == "none":
        raise BadInput(f"target {chosen.name}'s output cannot be checked in onnxruntime "
                       f"({chosen.proof.reason}): pass --no-check to write it unchecked")
    # The graph is hundreds of thousands of small objects that live until the pass ends: the
    # cyclic garbage collector would rescan them over and over (time growing faster than the
    # graph), so it is paused for the pass and whatever became garbage is collected after.
    collecting = gc.isenabled()
    gc.disable()
    try:
        if kv_cache is not None:
            return _fuse_static(model, chosen, check, inputs, apply, kv_cache, max_cache_len,
                                max_positions)
        source = as_source(model)
        prover = Prover(source, inputs) if check else None
        return fuse_source(source, chosen, Options(max_positions=max_positions, check=check), prover,
                           apply)
    finally:
        if collecting:
            gc.enable()


def _fuse_static(model, target, check: bool, inputs, apply: bool, mode: str,
                 max_cache_len: int | None, max_positions: int | None) -> FuseResult:
    """Fuse, then turn the caches that grow by Concat into fixed caches of max_cache_len slots."""
    from . import kv_static

    if mode != "static":
        raise BadInput(f"unknown --kv-cache mode '{mode}' (known: static)")
    if inputs is not None or not apply:
        raise BadInput("--kv-cache static rewrites the model and checks it over decode steps "
                       "with inputs of its own (no --inputs, no inspect)")
    if not target.static_cache:
        raise BadInput(f"--kv-cache static is not available for target {target.name}")
    if max_cache_len is None:
        raise BadInput("--kv-cache static needs --max-cache-len N")
    source = as_source(model)
    layout = kv_static.plan(source, max_cache_len, check)
    options = Options(max_positions=max_positions or max_cache_len, check=check)
    fused = fuse_source(source, target, options, Prover(source, None) if check else None)
    return kv_static.make_static(source, fused, target, layout, max_cache_len, check)
