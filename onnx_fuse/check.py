"""Numerical equivalence check between a reference ONNX model and a rewritten candidate.

A rewrite (opset conversion, attention/RoPE/KV-cache fusion) is only worth keeping if the
rewritten model computes the same thing. We run both models with onnxruntime on the same
inputs and compare every output of the reference within a dtype-dependent tolerance.

The inputs are synthesized so that they exercise the model the way real use does: token ids
inside the vocabulary, a 0/1 attention mask with a left-padded row, position ids consistent
with that mask, a non-empty KV cache, and distinct sizes for distinct symbolic dimensions
(so that a rewrite which mixes up two axes cannot pass by accident). Relations between
dimensions that the model does not declare are read from the graph (dim_relations.py, sized by
input_plan.py), else found by trying candidates on the reference. A model whose boolean inputs
are If conditions is checked once per branch.
"""

from __future__ import annotations

import ctypes
import math
from collections import defaultdict
from collections.abc import Iterator
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from . import runtime
from .dim_relations import find_relations
from .errors import first_line
from .input_plan import branch_cases, plan_sizes
from .exact_quantize import exactly_quantized, has_quantize, nudged
from .widen import WidenError, has_bfloat16, widened, widened_inputs

if TYPE_CHECKING:
    import onnxruntime

    from .tolerances import Tolerances

_BF16 = np.dtype(ml_dtypes.bfloat16)

# (atol, rtol) per floating dtype; a pass is |a - b| <= atol + rtol * |b| elementwise.
_TOLERANCES: dict[np.dtype, tuple[float, float]] = {
    np.dtype(np.float64): (1e-4, 1e-3),
    np.dtype(np.float32): (1e-4, 1e-3),
    np.dtype(np.float16): (1e-2, 1e-2),
    _BF16: (5e-2, 5e-2),
}

# Ops through which an integer input still "is" the index of a Gather, and through which a
# Gather's data still "is" a constant table.
_INDEX_PASSTHROUGH = {"Cast", "Unsqueeze", "Reshape", "Flatten", "Squeeze", "Identity"}
_TABLE_PASSTHROUGH = {"Cast", "Identity", "DequantizeLinear"}


class CheckError(Exception):
    """The reference model cannot be run, so there is nothing to compare against."""


@dataclass
class OutputDiff:
    """How far one candidate output is from the reference (over entries finite in both)."""

    max_abs: float
    max_rel: float
    passed: bool
    # Agrees everywhere except at padded token positions (attention_mask 0), whose outputs
    # are undefined: a softmax over a fully masked row is computed differently by every kernel.
    only_padding_differs: bool = False
    # Error statistics as Polygraphy reports them: {"abs"|"rel": {"max", "mean", "median",
    # "p99"}} over the entries finite in both, and the tolerance applied ({"atol", "rtol"}).
    stats: dict | None = None
    tolerance: dict | None = None


@dataclass
class CheckResult:
    passed: bool
    outputs: dict[str, OutputDiff]  # every output of the reference model
    message: str  # one line, for humans
    checked_as: str | None = None  # "float32": bfloat16 models were run widened (widen.py)

    def to_json(self) -> dict:
        """Plain JSON-able dict; inf/NaN (a missing or unrunnable output) become None,
        because JSON has no representation for them."""
        extra = {"checked_as": self.checked_as} if self.checked_as else {}
        return extra | {
            "passed": self.passed,
            "outputs": {
                name: {
                    "max_abs": _json_float(diff.max_abs),
                    "max_rel": _json_float(diff.max_rel),
                    "passed": diff.passed,
                    "only_padding_differs": diff.only_padding_differs,
                    **({"stats": diff.stats} if diff.stats is not None else {}),
                    **({"tolerance": diff.tolerance} if diff.tolerance is not None else {}),
                }
                for name, diff in self.outputs.items()
            },
            "message": self.message,
        }


@dataclass
class ModelRef:
    """A model to run: an in-memory ModelProto whose external data (if any, and not loaded
    into memory) lives in files relative to `base_dir`."""

    model: onnx.ModelProto
    base_dir: str | None = None


# --------------------------------------------------------------------------- running


def run_model(model: ModelRef, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `model` on onnxruntime CPU and return all its outputs by name.

    Inputs the model does not declare are ignored, so one input set can feed a reference
    and a candidate that dropped an input it no longer uses.
    """
    return run_session(session_for(model), inputs)


def session_for(model: ModelRef) -> onnxruntime.InferenceSession:
    if has_quantize(model.model):  # Q/DQ as ONNX defines them (exact_quantize.py)
        return runtime.session(exactly_quantized(model.model).SerializeToString(), model.base_dir)
    return runtime.session(model.model.SerializeToString(), model.base_dir, optimize=True)


def run_session(
    session: onnxruntime.InferenceSession, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    # Going through OrtValue is what lets bfloat16 in and out: the numpy path of
    # onnxruntime rejects ml_dtypes.bfloat16 arrays and cannot return bfloat16 outputs.
    declared = [meta.name for meta in session.get_inputs()]
    feed = {name: _to_ort(inputs[name]) for name in declared if name in inputs}
    values = session.run_with_ort_values(None, feed)
    return {meta.name: _from_ort(value) for meta, value in zip(session.get_outputs(), values)}


def run_sharing_buffers(session: onnxruntime.InferenceSession, inputs: dict[str, np.ndarray],
                        shared: dict[str, str]) -> dict[str, np.ndarray]:
    """`run_session` with each output of `shared` ({output: input}) written into its input's
    buffer (IO binding), as a runtime that shares past and present buffers runs the model
    (onnxruntime-genai's past_present_share_buffer). Those inputs are fed copies: `inputs` stay
    as they were."""
    binding, buffers = session.io_binding(), {}
    for name in (meta.name for meta in session.get_inputs()):
        if name in inputs:
            value = np.array(inputs[name]) if name in shared.values() else inputs[name]
            buffers[name] = _to_ort(value)
            binding.bind_ortvalue_input(name, buffers[name])
    outputs = session.get_outputs()
    for meta in outputs:
        if meta.name in shared:
            binding.bind_ortvalue_output(meta.name, buffers[shared[meta.name]])
        else:
            binding.bind_output(meta.name)
    session.run_with_iobinding(binding)
    return {meta.name: np.array(_from_ort(value)) for meta, value in zip(outputs, binding.get_outputs())}


def _to_ort(array: np.ndarray) -> onnxruntime.OrtValue:
    from onnxruntime import OrtValue

    array = np.require(array, requirements="C")
    if array.dtype == _BF16:
        return OrtValue.ortvalue_from_numpy_with_onnx_type(
            array.view(np.uint16), TensorProto.BFLOAT16
        )
    return OrtValue.ortvalue_from_numpy(array)


def _from_ort(value: onnxruntime.OrtValue) -> np.ndarray:
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    size = value.tensor_size_in_bytes()
    data = ctypes.string_at(value.data_ptr(), size) if size else b""
    return np.frombuffer(data, dtype=_BF16).reshape(value.shape())


# --------------------------------------------------------------------------- inputs


def synthesize_inputs(model: ModelRef, *, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs that respect the model's structure (see module docstring); for a model with If
    conditions among its inputs, those of the first case (synthesize_cases has them all).

    Raises CheckError when none of the size assignments tried lets the model run.
    """
    return synthesize_cases(model, batch=batch, seed=seed)[0].inputs


@dataclass
class InputCase:
    """One input set the check runs, and the reference's outputs on it once they were needed
    to find it."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] | None = None
    label: str = ""  # which If conditions it sets ("use_cache_branch=True"); "" when none
    # A quantized reference: per float output, the largest jump rounding boundaries cause
    # (quantization_noise), computed once per input set.
    quantization_noise: dict[str, float] | None = None


def synthesize_cases(model: ModelRef, *, batch: int = 2, seed: int = 0) -> list[InputCase]:
    """One input set per combination of the boolean If conditions among the inputs (both
    branches of optimum's merged decoder), each sized for the branch it selects; one set for
    a model without such inputs."""
    cases = []
    for branches in branch_cases(model.model):
        inputs, outputs = _synthesize(model, batch, seed, branches)
        label = ", ".join(f"{name}={value}" for name, value in branches.items())
        cases.append(InputCase(inputs, outputs, label))
    return cases


@dataclass
class _Input:
    name: str
    dtype: np.dtype
    dims: list[int | str]  # ints are fixed sizes; strings are symbols or dim expressions
    kind: str  # "ids", "mask", "position", "float", "bool" or "int"
    table_rows: int | None  # rows of the constant table this input indexes via Gather


def _synthesize(
    model: ModelRef, batch: int, seed: int, branches: dict[str, bool] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Synthesize inputs, plus the model's outputs on them when finding them took running
    the model, so that a caller need not run it again."""
    specs = input_specs(model.model)
    plan = plan_sizes(specs, find_relations(model.model, branches), batch)
    branches = branches or {}
    if len(plan.assignments) == 1:
        return _fill(specs, plan.assignments[0], plan.past, seed, branches), None
    try:
        session = session_for(model)
    except Exception as e:
        raise CheckError(f"reference model failed to load: {first_line(e)}") from e
    errors = []
    for sizes in plan.assignments:
        try:
            inputs = _fill(specs, sizes, plan.past, seed, branches)
            return inputs, run_session(session, inputs)
        except Exception as e:  # any failure just means "not this assignment"
            errors.append(e)
    raise CheckError(
        f"reference model did not run with any of {len(plan.assignments)} input shape "
        f"assignments; first error: {first_line(errors[0])}"
    )


def input_specs(model: onnx.ModelProto) -> list[_Input]:
    graph = model.graph
    initialized = {t.name for t in graph.initializer}
    rows = _gather_table_rows(graph)
    specs = []
    for value in graph.input:
        if value.name in initialized:  # IR < 4 lists initializers as inputs
            continue
        if not value.type.HasField("tensor_type"):
            raise CheckError(f"cannot synthesize input '{value.name}': not a tensor")
        tensor_type = value.type.tensor_type
        # No shape at all reads as a scalar; unknown dims become symbols of their own.
        # A size written as a string ('2': transformers' exporter) is a size.
        dims = [
            dim.dim_value if dim.dim_value > 0
            else int(dim.dim_param) if dim.dim_param.strip().isdigit()
            else dim.dim_param or f"?{value.name}:{axis}"
            for axis, dim in enumerate(tensor_type.shape.dim)
        ]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        spec = _Input(value.name, dtype, dims, "", rows.get(value.name))
        spec.kind = _kind(spec)
        specs.append(spec)
    return specs


def _kind(spec: _Input) -> str:
    """Role of an input, from structure first and the name only as a tie-breaker."""
    name = spec.name.lower()
    integer = spec.dtype.kind in "iu"
    if integer and "position" in name and len(spec.dims) in (1, 2):
        return "position"
    if integer and spec.table_rows is not None:
        return "ids"
    mask_typed = spec.dtype.kind in "iub" or (_is_float(spec.dtype) and "mask" in name)
    if len(spec.dims) == 2 and mask_typed:
        return "mask"
    if spec.dtype.kind == "b":
        return "bool"
    return "float" if _is_float(spec.dtype) else "int"


def _gather_table_rows(graph: onnx.GraphProto) -> dict[str, int]:
    """For each graph input used (through shape-only ops) as Gather indices into a constant
    table, the number of rows of the smallest such table: the valid index range."""
    scopes = list(_scopes(graph))
    shapes = {t.name: list(t.dims) for scope in scopes for t in scope.initializer}
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in (node for scope in scopes for node in scope.node):
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
        for name in node.output:
            producer[name] = node
        for index, name in enumerate(node.input):
            consumers[name].append((node, index))

    def table_shape(name: str) -> list[int] | None:
        while name not in shapes and name in producer:
            if producer[name].op_type not in _TABLE_PASSTHROUGH:
                return None
            name = producer[name].input[0]
        return shapes.get(name)

    def rows(name: str) -> int | None:
        found, pending = [], [name]
        while pending:
            for node, index in consumers[pending.pop()]:
                if node.op_type in _INDEX_PASSTHROUGH and index == 0:
                    pending.append(node.output[0])
                elif node.op_type == "Gather" and index == 1:
                    if shape := table_shape(node.input[0]):
                        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                        found.append(shape[axis])
        return min(found, default=None)

    return {value.name: r for value in graph.input if (r := rows(value.name)) is not None}


def _scopes(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and its If/Loop/Scan bodies, which read outer tensors (the embedding of
    optimum's merged decoder sits in its branches)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _scopes(body)


def _fill(specs: list[_Input], sizes: dict[tuple[str, int], int], past: int, seed: int,
          branches: dict[str, bool]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    # Positions last: they are derived from the mask.
    for spec in sorted(specs, key=lambda s: s.kind == "position"):
        shape = tuple(d if isinstance(d, int) else sizes[spec.name, axis] for axis, d in enumerate(spec.dims))
        if spec.name in branches:
            array = np.full(shape, branches[spec.name])
        elif spec.kind == "ids":
            array = rng.integers(0, spec.table_rows, size=shape)
        elif spec.kind == "mask":
            array = _mask(shape, past)
        elif spec.kind == "position":
            mask = next((arrays[s.name] for s in specs if s.kind == "mask"), None)
            array = _positions(shape, mask, past)
            if spec.table_rows is not None:
                array = np.minimum(array, spec.table_rows - 1)
        elif spec.kind == "float":
            array = rng.standard_normal(shape)
        elif spec.kind == "bool":
            array = rng.random(shape) < 0.5
        else:  # an integer of unknown meaning: 0 is a valid index, count and offset
            array = np.zeros(shape)
        arrays[spec.name] = np.asarray(array).astype(spec.dtype)
    return arrays


def _mask(shape: tuple[int, ...], past: int) -> np.ndarray:
    """All ones, with every odd row left-padded (inside the past region when there is one)
    while keeping at least one valid position."""
    mask = np.ones(shape, dtype=np.int64)
    total = shape[-1]
    pad = min(max(1, past - 1) if past else max(1, total // 2), total - 1)
    mask[1::2, :pad] = 0
    return mask


def _positions(shape: tuple[int, ...], mask: np.ndarray | None, past: int) -> np.ndarray:
    """Position ids as a generation loop computes them from the mask: cumsum(mask) - 1."""
    length = shape[-1]
    usable = mask is not None and len(shape) == 2 and mask.shape[0] == shape[0]
    if usable and mask.shape[1] >= length:
        return np.maximum(np.cumsum(mask.astype(np.int64), axis=1) - 1, 0)[:, -length:]
    return np.broadcast_to(np.arange(past, past + length), shape)


# Symbolic dims: a name ("batch", "unk__3", "past_key_values.0.key_dim_2") or a simple
# arithmetic expression of names as the dynamo exporter writes them ("s0 + s1", "2*s1").
# --------------------------------------------------------------------------- comparing


def check_equivalent(
    reference: ModelRef,
    candidate: ModelRef,
    inputs: dict[str, np.ndarray] | None = None,
    *,
    seed: int = 0,
    reference_outputs: dict[str, np.ndarray] | None = None,
    tolerances: Tolerances | None = None,
    batch: int = 2,
) -> CheckResult:
    """Run both models on the same inputs and compare every reference output.

    `inputs` default to synthesized ones (every case of synthesize_cases, `batch` rows).
    `reference_outputs` must have been computed from `inputs` (so passing it requires passing
    `inputs`). `tolerances` overrides the dtype's tolerance globally or per output
    (tolerances.py). A candidate that fails to load or run is a failed check, not an exception;
    a reference that fails raises CheckError.
    """
    if inputs is None and reference_outputs is not None:
        raise ValueError("reference_outputs given without the inputs they were computed from")
    widen = has_bfloat16(reference.model) or has_bfloat16(candidate.model)
    if widen:  # onnxruntime's CPU provider cannot run bfloat16: both run as float32
        reference, candidate = runnable_as_float32(reference), runnable_as_float32(candidate)
        inputs = None if inputs is None else widened_inputs(inputs)
        reference_outputs = None if reference_outputs is None else widened_inputs(reference_outputs)
    if inputs is None:
        cases = synthesize_cases(reference, batch=batch, seed=seed)
    else:
        cases = [InputCase(inputs, reference_outputs)]
    outcome = merge_results([check_case(reference, candidate, case, tolerances) for case in cases],
                            [case.label for case in cases])
    outcome.checked_as = "float32" if widen else None
    return outcome


def runnable_as_float32(model: ModelRef) -> ModelRef:
    """A bfloat16 model widened to float32 (widen.py), as onnxruntime's CPU provider runs it."""
    if not has_bfloat16(model.model):
        return model
    try:
        return ModelRef(widened(model.model, model.base_dir), model.base_dir)
    except WidenError as exc:
        raise CheckError(f"cannot check the bfloat16 model as float32: {exc}") from None


def check_case(reference: ModelRef, candidate: ModelRef, case: InputCase,
               tolerances: Tolerances | None = None) -> CheckResult:
    """Both models on one input set (the reference's outputs are kept in the case)."""
    if case.outputs is None:
        try:
            case.outputs = run_model(reference, case.inputs)
        except Exception as e:
            raise CheckError(f"reference model failed to run: {first_line(e)}") from e
    try:
        candidate_outputs = run_model(candidate, case.inputs)
    except Exception as e:  # onnxruntime raises many unrelated exception types
        return CheckResult(
            passed=False,
            outputs={name: _incomparable() for name in case.outputs},
            message=f"candidate failed to run: {first_line(e)}",
        )
    if not has_quantize(reference.model):
        return compare_outputs(reference.model, case.inputs, case.outputs, candidate_outputs, tolerances)
    result = compare_outputs(reference.model, case.inputs, case.outputs, candidate_outputs,
                             quantization_tolerances(reference, case, tolerances))
    for name, noise in case.quantization_noise.items():  # the report says where atol came from
        if result.outputs[name].tolerance is not None:
            result.outputs[name].tolerance["quantization_noise"] = noise
    return result


def quantization_tolerances(reference: ModelRef, case: InputCase, tolerances: Tolerances | None) -> Tolerances:
    """A quantized model's outputs jump by whole quantization steps wherever a value a quantizer
    rounds moves across a rounding boundary, which any reordering of float arithmetic before it
    (a fused RoPE, a fused attention's softmax) can do. Each float output's atol becomes the
    largest such jump the reference itself shows (`quantization_noise`) where that exceeds the
    dtype's; the caller's tolerances win over both."""
    from .tolerances import EVERY_OUTPUT, Tolerances

    if case.quantization_noise is None:
        case.quantization_noise = quantization_noise(reference, case)
    given = tolerances or Tolerances()
    if EVERY_OUTPUT in given.atol:  # the caller's atol for every output wins over the widening
        return given
    widened = {name: max(noise, _TOLERANCES[case.outputs[name].dtype][0])
               for name, noise in case.quantization_noise.items()}
    return Tolerances({**widened, **given.atol}, dict(given.rtol))


def quantization_noise(reference: ModelRef, case: InputCase) -> dict[str, float]:
    """Per float output: how far the reference's output moves when every QuantizeLinear's input
    moves by one unit in its last place, up or down (exact_quantize.nudged)."""
    noise = {name: 0.0 for name, value in case.outputs.items() if _is_float(value.dtype)}
    for direction in (1, -1):
        moved = run_model(ModelRef(nudged(reference.model, direction), reference.base_dir), case.inputs)
        for name in noise:
            a, b = moved[name].astype(np.float64), case.outputs[name].astype(np.float64)
            finite = np.isfinite(a) & np.isfinite(b)
            noise[name] = max(noise[name], float(np.abs(a[finite] - b[finite]).max(initial=0.0)))
    return noise


def compare_outputs(model: onnx.ModelProto, inputs: dict[str, np.ndarray],
                    expected_outputs: dict[str, np.ndarray],
                    actual_outputs: dict[str, np.ndarray],
                    tolerances: Tolerances | None = None) -> CheckResult:
    """Every expected output against the actual one, within the dtype's tolerance or
    `tolerances`; outputs at padded tokens (by the mask among `inputs`, the inputs of `model`)
    may differ."""
    diffs: dict[str, OutputDiff] = {}
    problems: list[str] = []
    padding = _padding_mask(model, inputs)
    for name, expected in expected_outputs.items():
        if name not in actual_outputs:
            diffs[name] = _incomparable()
            problems.append(f"output '{name}' is missing from the candidate")
            continue
        tolerance = tolerances.resolve(name, _TOLERANCES.get(expected.dtype)) if tolerances else None
        diffs[name], problem = compare_output(actual_outputs[name], expected, tolerance)
        padded = _padded_positions(padding, _query_length(model, inputs),
                                   expected.shape) if problem else None
        if padded is not None:
            valid, _ = compare_output(np.where(padded, 0, actual_outputs[name]),
                                      np.where(padded, 0, expected), tolerance)
            if valid.passed:
                diffs[name] = dataclasses.replace(diffs[name], passed=True, only_padding_differs=True)
                continue
        if problem:
            problems.append(f"output '{name}' differs: {problem}")
    return CheckResult(passed=not problems, outputs=diffs, message=_verdict(diffs, problems))


def _verdict(diffs: dict[str, OutputDiff], problems: list[str]) -> str:
    """The check's one line for humans."""
    padding_only = [name for name, d in diffs.items() if d.only_padding_differs]
    if not problems and padding_only:
        return (f"{'all outputs agree' if len(diffs) > 1 else 'the output agrees'} at every "
                f"token that is not padding; {', '.join(padding_only)} differ only at padded "
                "positions (undefined there)")
    if not problems:
        return f"all {len(diffs)} outputs agree" if len(diffs) != 1 else "the 1 output agrees"
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def merge_results(results: list[CheckResult], labels: list[str]) -> CheckResult:
    """One verdict over several input sets: every output's worst difference, the first failure."""
    if len(results) == 1:
        return results[0]
    outputs: dict[str, OutputDiff] = {}
    for result in results:
        for name, diff in result.outputs.items():
            seen = outputs.get(name, diff)
            worst = diff if diff.max_abs >= seen.max_abs else seen  # its statistics stand
            outputs[name] = dataclasses.replace(
                worst, max_abs=max(seen.max_abs, diff.max_abs), max_rel=max(seen.max_rel, diff.max_rel),
                passed=seen.passed and diff.passed,
                only_padding_differs=seen.only_padding_differs or diff.only_padding_differs)
    failed = [(label, r) for label, r in zip(labels, results) if not r.passed]
    if failed:
        message = f"{failed[0][1].message} (inputs {failed[0][0]})"
    else:
        message = f"{results[0].message} with each input set ({'; '.join(labels)})"
    return CheckResult(passed=not failed, outputs=outputs, message=message)


def compare_output(actual: np.ndarray, expected: np.ndarray,
                   tolerance: tuple[float, float] | None = None) -> tuple[OutputDiff, str | None]:
    """Diff of one output and, if it fails, why (for the message). `tolerance` (atol, rtol)
    replaces the dtype's for floating outputs."""
    if actual.shape != expected.shape:
        return _incomparable(), f"shape {actual.shape} vs reference {expected.shape}"
    if actual.dtype != expected.dtype:
        return _incomparable(), f"dtype {actual.dtype} vs reference {expected.dtype}"

    a, b = actual.astype(np.float64), expected.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    abs_diff = np.abs(a[finite] - b[finite])
    magnitude = np.abs(b[finite])
    rel_diff = abs_diff / np.maximum(magnitude, np.finfo(np.float32).tiny)
    max_abs = float(abs_diff.max(initial=0.0))
    max_rel = float(rel_diff.max(initial=0.0))

    problem = None
    applied = None
    if _is_float(expected.dtype):
        atol, rtol = tolerance or _TOLERANCES[expected.dtype]
        applied = {"atol": atol, "rtol": rtol}
        # NaN equals NaN at the same place; infinities must match exactly.
        undefined = int((np.isnan(b) & ~np.isnan(a)).sum())
        if undefined:
            problem = (f"the original computes NaN at {undefined} of {b.size} values where the result "
                       "computes numbers: the original is not defined on these inputs (float16 overflow "
                       "at padded tokens, say); give inputs it is defined on (--inputs, or "
                       "--check-batch 1 for no padded row)")
        elif not np.all(((np.isnan(a) & np.isnan(b)) | (a == b))[~finite]):
            problem = "NaN/inf positions or signs differ"
        elif not np.all(abs_diff <= atol + rtol * magnitude):
            problem = f"max_abs {max_abs:.3g} (tolerance atol {atol:g}, rtol {rtol:g})"
    elif not np.array_equal(actual, expected):
        problem = f"max_abs {max_abs:.3g} (exact match required)"
    stats = {"abs": _error_stats(abs_diff), "rel": _error_stats(rel_diff)}
    return OutputDiff(max_abs, max_rel, problem is None, stats=stats, tolerance=applied), problem


def _error_stats(errors: np.ndarray) -> dict[str, float]:
    """max, mean, median and 99th percentile of elementwise errors (0 for an empty output)."""
    if errors.size == 0:
        return {"max": 0.0, "mean": 0.0, "median": 0.0, "p99": 0.0}
    median, p99 = np.percentile(errors, [50, 99])
    return {"max": float(errors.max()), "mean": float(errors.mean()),
            "median": float(median), "p99": float(p99)}


def _padding_mask(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """The 0/1 attention mask [B, T] among the inputs, if the model has one."""
    try:
        specs = input_specs(model)
    except CheckError:
        return None
    for spec in specs:
        value = inputs.get(spec.name)
        if spec.kind == "mask" and value is not None and value.ndim == 2 and \
                np.isin(value, (0, 1)).all():
            return value
    return None


def _query_length(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> int | None:
    """How many new tokens the inputs hold (dim 1 of the token ids)."""
    try:
        specs = input_specs(model)
    except CheckError:
        return None
    ids = [inputs[s.name] for s in specs if s.kind == "ids" and s.name in inputs]
    return ids[0].shape[1] if ids and ids[0].ndim == 2 else None


def _padded_positions(mask: np.ndarray | None, query: int | None, shape: tuple) -> np.ndarray | None:
    """Where an output of `shape` sits at a padded token. Only per-token outputs qualify: a
    token axis (as long as the mask, e.g. a present cache [B, N, T, H], or as the new tokens,
    e.g. logits [B, S, V]) at position 1 or 2 with features after it; a pooled or classification
    output such as [B, labels] never does, whatever its sizes."""
    if mask is None or len(shape) < 3 or shape[0] != mask.shape[0] or mask.all():
        return None
    total = mask.shape[1]
    axes = [a for length in (total, query) for a in (1, 2) if a < len(shape) - 1 and shape[a] == length]
    if not axes:
        return None
    axis = axes[0]
    padded = mask[:, total - shape[axis]:] == 0  # [B, length along axis]
    index = [slice(None)] + [None] * (axis - 1) + [slice(None)] + [None] * (len(shape) - axis - 1)
    return np.broadcast_to(padded[tuple(index)], shape)


# --------------------------------------------------------------------------- helpers


def load_inputs_npz(path: str) -> dict[str, np.ndarray]:
    """User-supplied inputs from an .npz archive (one array per input name).

    Raises ValueError with a one-line message on anything that is not such an archive.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # np.load raises OSError, ValueError, EOFError, zip errors...
        raise ValueError(f"cannot read inputs from {path}: {first_line(e)}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"cannot read inputs from {path}: expected an .npz archive of named arrays, not one array"
        )
    with archive:
        try:
            inputs = {name: archive[name] for name in archive.files}
        except Exception as e:
            raise ValueError(f"cannot read inputs from {path}: {first_line(e)}") from e
    if not inputs:
        raise ValueError(f"cannot read inputs from {path}: the archive holds no arrays")
    return inputs


def _incomparable() -> OutputDiff:
    """The diff of an output that cannot be compared at all (missing, wrong shape...)."""
    return OutputDiff(math.inf, math.inf, False)


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == _BF16




def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
