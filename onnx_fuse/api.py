"""`onnx_fuse.fuse`: the entry point of the Python API and of the command.

It composes the steps: the fusion pass (fuse.py), then, with `kv_cache="static"`, the conversion
of growing caches into fixed ones (kv_static.py), which reads the pass's typed results.
"""

from __future__ import annotations

import gc

from . import progress
from .errors import BadInput
from .fuse import fuse_source
from .graph import Options
from .interop import accept
from .model_io import SourceModel
from .proof import Prover
from .result import FuseResult
from .targets import get_target
from .tolerances import Tolerances


def fuse(model, target: str = "onnx", check: bool = True, inputs: dict | list | None = None,
         *, apply: bool = True, max_positions: int | None = None, kv_cache: str | None = None,
         max_cache_len: int | None = None, tolerances: Tolerances | None = None,
         check_batch: int | None = None, target_options: dict | None = None) -> FuseResult:
    """Fuse `model` for `target`. `model` is a path, an onnx.ModelProto, an onnx_ir.Model or a
    torch.onnx.ONNXProgram; `result.model` is of the same kind, `result.proto` the ModelProto.

    With `check` (the default) the result is run against the input in onnxruntime and a
    disagreement raises CheckFailed, so a wrong model is never returned. The check runs on
    `inputs` (one feed {name: array} or a list of feeds, each checked) or on synthesized ones
    of `check_batch` rows (default 2), within the dtype's tolerance or `tolerances`
    (tolerances.Tolerances: global and per-output atol/rtol). `apply=False` only
    reports what would fuse. `max_positions` bounds the positions RoPE caches cover where the
    graph does not (cos/sin computed from the positions). Raises BadInput for models that cannot
    be used. `kv_cache="static"` also converts caches that grow by Concat to fixed caches of
    `max_cache_len` slots written by TensorScatter (kv_static.py; its check drives decode steps).
    `target_options` configure the target (trt11: {"cp_ranks": N, "decomposable": True}).
    """
    chosen = get_target(target).configured(target_options or {})
    if check and chosen.proof.kind == "none":
        raise BadInput(f"target {chosen.name}'s output cannot be checked in onnxruntime "
                       f"({chosen.proof.reason}): pass --no-check to write it unchecked")
    # The graph is hundreds of thousands of small objects that live until the pass ends: the
    # cyclic garbage collector would rescan them over and over (time growing faster than the
    # graph), so it is paused for the pass and whatever became garbage is collected after.
    collecting = gc.isenabled()
    gc.disable()
    try:
        source, give_back = accept(model)
        progress.model_size(len(source.model.graph.node))
        if kv_cache is not None:
            if tolerances is not None or check_batch is not None:
                raise BadInput("--kv-cache static checks over decode steps of its own: no "
                               "--atol/--rtol/--check-batch")
            return give_back(_fuse_static(source, chosen, check, inputs, apply, kv_cache,
                                          max_cache_len, max_positions))
        prover = check_prover(source, inputs, tolerances, check_batch) if check else None
        options = Options(max_positions=max_positions, check=check)
        return give_back(fuse_source(source, chosen, options, prover, apply))
    finally:
        if collecting:
            gc.enable()


def check_prover(source: SourceModel, inputs, tolerances: Tolerances | None = None,
                 check_batch: int | None = None) -> Prover:
    """The check's prover for `source` (the fuse pass's, and the check command's), its options
    validated against the model."""
    if check_batch is not None:
        if inputs is not None:
            raise BadInput("--check-batch sizes synthesized inputs; it cannot go with --inputs")
        if check_batch < 1:
            raise BadInput(f"--check-batch must be at least 1, got {check_batch}")
    if tolerances is not None:
        tolerances.require_outputs([output.name for output in source.model.graph.output])
    return Prover(source, inputs, tolerances, check_batch or 2)


def _fuse_static(source: SourceModel, target, check: bool, inputs, apply: bool, mode: str,
                 max_cache_len: int | None, max_positions: int | None) -> FuseResult:
    """Fuse, then turn the caches that grow into fixed caches of max_cache_len slots (caches
    already fixed keep theirs), checked over decode steps (kv_static.py)."""
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
    layout = kv_static.plan(source, max_cache_len, check)
    options = Options(max_positions=max_positions or max_cache_len, check=check)
    fused = fuse_source(source, target, options, Prover(source, None) if check else None)
    return kv_static.make_static(fused.source or source, fused, target, layout, max_cache_len, check)
