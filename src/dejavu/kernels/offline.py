"""Compile a kernel of this package for a GPU without one (Triton's compiler and its bundled ptxas / cuobjdump).

Used by the sm_90 compile test (the interpreter never runs Triton's compiler) and by ``bench/kernel_resources.py``
(registers, shared memory and programs per SM of the decode step's kernels). Arguments are given by name: a torch
dtype for a pointer, a float for an fp32 scalar, an int for an i32 scalar, anything for a constexpr.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64", torch.uint8: "*u8", torch.int8: "*i8"}  # fmt: skip

# per SM of an H100 / H200 (compute capability 9.0)
SM90_REGS, SM90_WARPS, SM90_SMEM, SM90_BLOCKS = 65536, 64, 233472, 32


def compile_for(kernel, args: dict, num_warps: int, num_stages: int, arch: int = 90, **options):
    """``triton.compile`` of ``kernel`` for ``sm_<arch>`` with ``args`` by name (pointers 16-byte aligned, ints that
    are multiples of 16 marked so, as at a real launch); ``options`` go to the compiler (``launch_pdl``,
    ``maxnreg``...). Returns Triton's compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        v = args[name]
        if kernel.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.dtype):
            sig[name], attrs[(i,)] = _PTR[v], [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=num_warps, num_stages=num_stages, **options)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def resources(compiled) -> dict:
    """Registers per thread, stack bytes and shared memory of a compiled kernel (``cuobjdump -res-usage`` of its
    cubin; the shared memory Triton allocates dynamically comes from its metadata)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", out, re.S)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {out[:300]!r}")
    return {"regs": int(m.group(1)), "stack": int(m.group(2)),
            "smem": max(int(m.group(3)), int(compiled.metadata.shared))}  # fmt: skip


def programs_per_sm(regs: int, warps: int, smem: int) -> dict:
    """How many programs of a kernel fit on one sm_90 SM by registers, warps and shared memory (registers are
    counted per thread, ignoring the allocation granularity), and the least of them."""
    fit = {"by_regs": SM90_REGS // (max(regs, 1) * 32 * warps), "by_warps": SM90_WARPS // warps,
           "by_smem": SM90_SMEM // smem if smem else SM90_BLOCKS}  # fmt: skip
    fit["programs"] = min(SM90_BLOCKS, *fit.values())
    return fit
