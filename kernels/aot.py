"""Compile the fused reparameterize+KL kernels ahead of time for an NVIDIA GPU this machine need
not have, and read what the compiled kernel uses: registers, local memory (spills), stack,
shared memory, SASS instructions.

    python -m fastvae.kernels.aot            # table for sm_90 and sm_80, every tile the launcher uses

Triton ships ptxas and cuobjdump, so this runs on a CPU: tests/test_kernel_aot.py asserts the
register ceiling and that no kernel touches local memory, so a regression shows without a GPU.
The signature is specialized as a real launch is: 16-byte aligned pointers, unit column stride,
row strides and D multiples of 16, an int seed (32 bits) or a seed pointer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from fastvae.kernels import reparam_kl as rk

# (kernel, BLOCK_B, BLOCK_D): the tiles the launcher picks on a GPU for D = 64, 256, >= 1024
# (1024 elements), and the 2048-element alternative for wide rows (two rows of 1024).
GPU_TILES = [("fwd", 16, 64), ("fwd", 4, 256), ("fwd", 1, 1024), ("fwd", 2, 1024),
             ("bwd", 16, 64), ("bwd", 4, 256), ("bwd", 1, 1024), ("bwd", 2, 1024)]
DTYPES = ("fp32", "bf16", "fp16")
ARCHS = (90, 80)


@dataclass
class Resources:
    """What one compiled kernel uses per thread (registers, local memory, stack in bytes) and
    per block (shared memory, bytes), and its static SASS instruction count (no NOPs)."""

    kernel: str
    dtype: str
    arch: int
    block_b: int
    block_d: int
    num_warps: int
    regs: int
    local_bytes: int
    stack_bytes: int
    shared_bytes: int
    instructions: int


def unavailable() -> str | None:
    """Why kernels cannot be compiled ahead of time here (None where they can)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"this triton has no AOT compile API: {exc}"
    if rk._kernels_interpreted():
        return "the kernels are interpreted (TRITON_INTERPRET=1 before import)"
    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    for tool in ("ptxas", "cuobjdump"):
        path = getattr(getattr(nvidia, tool, None), "path", None)
        if not path or not os.path.exists(path):
            return f"triton ships no {tool}"
    return None


def compile_kernel(kernel: str, dtype: str, block_b: int, block_d: int, *, arch: int = 90,
                   num_warps: int = rk.NUM_WARPS, seed_from_ptr: bool = False,
                   has_gz: bool = True, has_gkl: bool = True, fast_math: bool = True):
    """triton.compile of the forward (``"fwd"``) or backward (``"bwd"``) kernel for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = {"fwd": rk._reparam_kl_fwd_kernel, "bwd": rk._reparam_kl_bwd_kernel}[kernel]
    constexprs = dict(SEED_FROM_PTR=seed_from_ptr, FAST_MATH=fast_math, BLOCK_B=block_b,
                      BLOCK_D=block_d)
    if kernel == "bwd":
        constexprs.update(HAS_GZ=has_gz, HAS_GKL=has_gkl)
    names = fn.arg_names
    types = {"kl_ptr": "*fp32", "gkl_ptr": "*fp32", "seed": "i32", "seed_ptr": "*i64"}
    signature = {n: "constexpr" if n in constexprs else
                 types.get(n, f"*{dtype}" if n.endswith("_ptr") else "i32") for n in names}
    aligned = [i for i, n in enumerate(names)
               if n.endswith("_ptr") or n == "D" or (n.startswith("stride_") and n != "stride_gkl")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def resources(compiled, **labels) -> Resources:
    """Registers, local memory, stack, shared memory and SASS instructions of a compiled kernel
    (cuobjdump on its cubin: nothing here needs a GPU)."""
    import triton

    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{usage}")
    regs, stack, shared, local = (int(x) for x in found.groups())
    # "/*0a30*/  FMUL R58, R12, 0.72 ;": one instruction per address; NOPs pad the cubin
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    instructions = sum(1 for op in opcodes if op != "NOP")
    return Resources(regs=regs, local_bytes=local, stack_bytes=stack,
                     shared_bytes=max(shared, compiled.metadata.shared), instructions=instructions,
                     **labels)


def measure(kernel: str, dtype: str, block_b: int, block_d: int, arch: int = 90, **options) -> Resources:
    """compile_kernel + resources."""
    compiled = compile_kernel(kernel, dtype, block_b, block_d, arch=arch, **options)
    num_warps = options.get("num_warps", rk.NUM_WARPS)
    return resources(compiled, kernel=kernel, dtype=dtype, arch=arch, block_b=block_b,
                     block_d=block_d, num_warps=num_warps)


def main(argv=None) -> int:
    reason = unavailable()
    if reason:
        print(f"cannot compile ahead of time here: {reason}")
        return 2
    import triton

    print(f"triton {triton.__version__}; per thread: registers, local/stack bytes; "
          "SASS instructions per element = static count / (BLOCK_B * BLOCK_D / 128 threads)")
    print(f"{'arch':>5} {'kernel':6} {'dtype':5} {'tile':>9} {'regs':>5} {'local':>6} {'stack':>6} "
          f"{'shared':>7} {'instr':>6} {'instr/elem':>10}")
    for arch in ARCHS:
        for dtype in DTYPES[:2]:
            for kernel, block_b, block_d in GPU_TILES:
                r = measure(kernel, dtype, block_b, block_d, arch=arch)
                per_elem = r.instructions / (block_b * block_d / (32 * r.num_warps))
                print(f"sm_{arch} {kernel:6} {dtype:5} {block_b:>4}x{block_d:<4} {r.regs:>5} "
                      f"{r.local_bytes:>6} {r.stack_bytes:>6} {r.shared_bytes:>7} "
                      f"{r.instructions:>6} {per_elem:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


