"""Which onnxruntime execution providers implement the ops target "ort" emits, and in which types.

CPU is read from the kernel registry of the onnxruntime installed here (the build the check runs
on). The other providers cannot be read from a CPU build: their entries are the facts recorded in
shared/reference/onnxruntime-contrib-ops.md (onnxruntime 1.32: OperatorKernels.md for CUDA and
DirectML, the WebGPU contrib kernel list, which registers the ops without type detail).
"""

from __future__ import annotations

from functools import lru_cache

import onnx

CONTRIB = "com.microsoft"

# provider -> op -> element types ("any": registered, types not documented)
_RECORDED = {
    "CUDA": {"GroupQueryAttention": ("float16", "bfloat16"),
             "MultiHeadAttention": ("float", "float16", "bfloat16"),
             "RotaryEmbedding": ("float", "float16", "bfloat16"),
             "Attention": ("float", "float16", "bfloat16")},
    "DirectML": {"GroupQueryAttention": ("float", "float16"),
                 "MultiHeadAttention": ("float", "float16"),
                 "RotaryEmbedding": ("float", "float16")},
    "WebGPU": {"GroupQueryAttention": ("any",), "MultiHeadAttention": ("any",),
               "RotaryEmbedding": ("any",), "Attention": ("any",)},
}
# Inputs an op's schema says only some providers honour (the others reject the node).
_ONLY_ON = {("GroupQueryAttention", 16): ("CPU", "CUDA")}  # query_seqlens


@lru_cache(maxsize=None)
def cpu_types(op: str, domain: str) -> tuple[str, ...]:
    """Element types of the CPU kernels registered for `op` (its first type constraint)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found: list[str] = []
    for kernel in state.get_all_opkernel_def():
        if kernel.op_name != op or (kernel.domain or "") != domain \
                or kernel.provider != "CPUExecutionProvider":
            continue
        constraints = dict(kernel.type_constraints)
        for name in ("T", "T1"):
            for type_str in constraints.get(name, []):
                element = type_str[len("tensor("):-1]
                if element not in found:
                    found.append(element)
    return tuple(found)


def runs_on_cpu(op: str, domain: str, dtype: int) -> bool:
    """Whether onnxruntime's CPU provider runs `op` in `dtype`: a kernel of that type, or a float32
    kernel for float16 (onnxruntime then casts around it)."""
    name = onnx.TensorProto.DataType.Name(dtype).lower()  # "float", "float16", "bfloat16"
    types = cpu_types(op, domain)
    return name in types or (name == "float16" and "float" in types)


def providers(op_type: str, domain: str, inputs: list[str]) -> dict[str, list[str]]:
    """Provider -> element types for a node of `op_type` with these input names (empty: left
    out), narrowed by inputs only some providers honour."""
    table = {"CPU": list(cpu_types(op_type, domain))}
    table.update({p: list(ops[op_type]) for p, ops in _RECORDED.items() if op_type in ops})
    for (op, index), allowed in _ONLY_ON.items():
        if op_type == op and len(inputs) > index and inputs[index]:
            table = {p: types for p, types in table.items() if p in allowed}
    return {p: types for p, types in table.items() if types}
