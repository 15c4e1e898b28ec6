"""Ahead-of-time compilation of the kernels to PTX, and their launch parameters from shapes.

Nothing here imports tensorrt: it runs (and is tested) on a machine without a GPU. Types are
Triton's names ("fp16", "bf16", "fp32", "i1", "i32", "i64"); defs.py maps TensorRT's to them.

TensorRT launches an AOT kernel with its tensor inputs, then the int32 extra arguments, then
its outputs; the kernels in onnx_fuse.kernels take their parameters in that order and every
attribute as a constexpr. Triton appends hidden scratch pointers to every kernel; TensorRT
does not pass them, so a kernel is only usable when it needs no global scratch (no device-side
tensor descriptors): compile() refuses one that does.
"""
from dataclasses import dataclass

from ..kernels import launch

ARCHS = (80, 90)
# PTX ISA 8.4 (CUDA 12.4): the driver JIT-compiles the PTX, and a driver rejects an ISA newer
# than its own; Triton would otherwise write its bundled ptxas's (9.4 for Triton 3.9).
PTX_VERSION = 84


@dataclass(frozen=True)
class Compiled:
    name: str
    ptx: str
    num_warps: int
    shared: int


@dataclass(frozen=True)
class LaunchParams:
    grid: tuple
    block: tuple
    shared: int


def compile_kernel(fn, signature, constexprs, num_warps, num_stages, arch):
    """One Triton kernel to PTX for sm_<arch>; the device need not exist."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    full = dict(signature, **{name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=full, constexprs=constexprs)
    kernel = triton_compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages,
                                     "ptx_version": PTX_VERSION})
    if getattr(kernel.metadata, "global_scratch_size", 0):
        raise ValueError(f"{kernel.metadata.name} needs global scratch, which TensorRT does not "
                         "pass")
    return Compiled(kernel.metadata.name, kernel.asm["ptx"], kernel.metadata.num_warps,
                    kernel.metadata.shared)


def attention_kernel(dtype, mask_dtype, sinks_dtype, head, head_v, attrs, arch, tile=None):
    """attrs: the op's attributes (scale, causal, window, softcap, masked_row, use_key_mask)."""
    from ..kernels.attention_kernels import attn_fwd_kernel

    tile = tile or launch.prefill_tile(head, head_v)
    signature = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Mask": f"*{mask_dtype}",
                 "Sinks": f"*{sinks_dtype}", "KvLen": "*i32", "Nq": "i32", "Nkv": "i32",
                 "Sq": "i32", "Skv": "i32", "Out": f"*{dtype}"}
    constexprs = launch.attention_constexprs(
        head, head_v, **{k: attrs[k] for k in ("scale", "causal", "window", "softcap",
                                               "use_key_mask")})
    constexprs.update(MASKED_ROW=int(attrs["masked_row"]), BLOCK_M=tile.block_m,
                      BLOCK_N=tile.block_n)
    return compile_kernel(attn_fwd_kernel, signature, constexprs, tile.num_warps,
                          tile.num_stages, arch), tile


def attention_tactics(head, head_v):
    """Tactic number -> tile, TensorRT times each at build time: the default, then one more."""
    width = max(launch.next_pow2(head), launch.next_pow2(head_v))
    other = launch.Tile(128, 128, 8, 3) if width <= 128 else launch.Tile(64, 32, 4, 2)
    return {1: launch.prefill_tile(head, head_v), 2: other}


def attention_launch(compiled, tile, batch, nq, sq):
    """Q [batch, nq, sq, H]: one program per query block and head."""
    return LaunchParams(launch.prefill_grid(batch, nq, sq, tile), (compiled.num_warps * 32, 1, 1),
                        compiled.shared)


def attention_extra_args(nq, nkv, sq, skv):
    return (nq, nkv, sq, skv)


def rope_kernel(dtype, head, half, interleaved, arch, in_place=False, tile=None):
    from ..kernels.rope_kernels import rope_kernel as fn

    tile = tile or launch.ROPE_TILE
    signature = {"X": f"*{dtype}", "Cos": f"*{dtype}", "Sin": f"*{dtype}", "Pos": "*i64",
                 "Rows": "i32", "NS": "i32", "S": "i32", "Out": f"*{dtype}"}
    constexprs = launch.rope_constexprs(head, half, interleaved, in_place, tile)
    return compile_kernel(fn, signature, constexprs, tile.num_warps, 1, arch), constexprs


def rows_launch(compiled, constexprs, rows):
    return LaunchParams(launch.rows_grid(rows, constexprs["BLOCK_R"]),
                        (compiled.num_warps * 32, 1, 1), compiled.shared)


def rope_extra_args(batch, n, s):
    return (batch * n * s, n * s, s)


def kv_write_kernel(dtype, index_dtype, head, arch, tile=None):
    from ..kernels.kv_write_kernels import kv_write_kernel as fn

    tile = tile or launch.KV_WRITE_TILE
    signature = {"Cache": f"*{dtype}", "Update": f"*{dtype}", "WriteIdx": f"*{index_dtype}",
                 "Rows": "i32", "N": "i32", "S": "i32", "L": "i32", "Out": f"*{dtype}"}
    constexprs = launch.kv_write_constexprs(head, tile)
    return compile_kernel(fn, signature, constexprs, tile.num_warps, 1, arch), constexprs


def kv_write_extra_args(batch, n, length, s):
    return (batch * n * s, n, s, length)
