"""Fused reparameterize + KL: one Triton kernel forward, one backward, eps never stored.

Forward, per row b of mu, logvar in R^{B x D}:

    eps[b, d] = Normal(Philox(seed, b, d))               (generated in registers, not stored)
    z[b, d]   = mu[b, d] + exp(0.5 * logvar[b, d]) * eps[b, d]
    kl[b]     = 0.5 * sum_d (mu^2 + exp(logvar) - 1 - logvar)      = KL(q(z|x) || N(0, I))

Backward, with gz = dL/dz and gkl = dL/dkl (per row):

    dmu     = gz + gkl * mu
    dlogvar = 0.5 * gz * eps * std + 0.5 * gkl * (exp(logvar) - 1),    std = exp(0.5 * logvar)

eps is regenerated in the backward from the saved seed, so autograd keeps only mu, logvar and a
one-element seed tensor. Noise is keyed by (seed, row, column) only, never by block size or grid:
eps[b, d] = randn4x(seed, b * ceil(D/4) + d // 4)[d % 4]; for D % 4 == 0 that is simply
randn4x(seed, i // 4)[i % 4] of the flat index i = b * D + d. One Philox call feeds 4 elements.

Math runs in fp32 registers; z and the gradients come back in the input dtype, kl in fp32.
The op is registered with ``torch.library.custom_op`` (forward and backward are both opaque
ops with fake kernels), so ``torch.compile(fullgraph=True)`` traces through it.

On CPU the kernel runs under Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the
environment *before triton is imported* (``@triton.jit`` reads it at decoration time, also for
triton's own ``tl.randn4x``). Where the kernel cannot run (other CPU cases, float64) the op computes
the reference math with eps from a ``torch.Generator`` seeded by ``seed``: still deterministic
per seed and still not storing eps, but a different stream than Philox.
"""

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from fastvae.distributions import kl_standard_normal

# Columns handled per step of a program; wider rows loop (the KL sum stays in registers).
MAX_BLOCK_D = 1024
# Elements per program step on a GPU (4 warps). Measured on an H200 (kernel time, B = 65536,
# benchmarks/results/nvidia-h200/tile_sweep.json): 1024-element tiles ran 1.15-1.7x faster than
# 4096 for D = 64 and 256. Wider rows keep 4096 (4 rows of 1024) until measured. The CPU
# interpreter pays ~10-25 ms per program instance, so there it takes large tiles, few programs.
TILE_GPU = 1024
TILE_GPU_WIDE = 4096  # BLOCK_D > 256
TILE_INTERPRET = 1 << 16
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _normal_tile(seed, rows, d0, D4, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """eps[row, col] for col in d0 + [0, BLOCK_D): randn4x(seed, row * D4 + col // 4)[col % 4].

    d0 and BLOCK_D are multiples of 4, so the tile holds whole groups of 4 columns.
    """
    groups = d0 // 4 + tl.arange(0, BLOCK_D // 4)
    offsets = rows[:, None] * D4 + groups[None, :]  # int64: B * D may pass 2**31
    n0, n1, n2, n3 = tl.randn4x(seed, offsets)
    # Interleave so that column 4g + k holds n_k[g]: join(join(n0,n2), join(n1,n3))[.., j, k]
    # is n_{2j+k}, and reshape (row-major) flattens (g, j, k) to column 4g + 2j + k.
    eps = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(eps, (BLOCK_B, BLOCK_D))


@triton.jit(do_not_specialize=["seed"])
def _reparam_kl_fwd_kernel(
    mu_ptr, lv_ptr, z_ptr, kl_ptr,
    B, D, D4,
    stride_mu_b, stride_mu_d, stride_lv_b, stride_lv_d,
    seed, seed_ptr,
    SEED_FROM_PTR: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = BLOCK_B rows; loops over D so the row's KL is reduced without atomics."""
    if SEED_FROM_PTR:  # a device seed: read at run time, so a CUDA graph replay sees new ones
        seed = tl.load(seed_ptr)
    pid = tl.program_id(0)
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_mask = rows < B
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        mu = tl.load(mu_ptr + rows[:, None] * stride_mu_b + cols[None, :] * stride_mu_d,
                     mask=mask, other=0.0).to(tl.float32)
        lv = tl.load(lv_ptr + rows[:, None] * stride_lv_b + cols[None, :] * stride_lv_d,
                     mask=mask, other=0.0).to(tl.float32)
        eps = _normal_tile(seed, rows, d0, D4, BLOCK_B, BLOCK_D)
        z = mu + tl.exp(0.5 * lv) * eps
        tl.store(z_ptr + rows[:, None] * D + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(mask, mu * mu + tl.exp(lv) - 1.0 - lv, 0.0)
    tl.store(kl_ptr + rows, 0.5 * tl.sum(acc, axis=1), mask=row_mask)


@triton.jit(do_not_specialize=["seed"])
def _reparam_kl_bwd_kernel(
    mu_ptr, lv_ptr, gz_ptr, gkl_ptr, dmu_ptr, dlv_ptr,
    B, D, D4,
    stride_mu_b, stride_mu_d, stride_lv_b, stride_lv_d, stride_gz_b, stride_gz_d, stride_gkl,
    seed, seed_ptr,
    HAS_GZ: tl.constexpr, HAS_GKL: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Elementwise over a 2-D grid of (BLOCK_B, BLOCK_D) tiles; eps regenerated from seed."""
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = (rows < B)[:, None] & (cols < D)[None, :]
    lv = tl.load(lv_ptr + rows[:, None] * stride_lv_b + cols[None, :] * stride_lv_d,
                 mask=mask, other=0.0).to(tl.float32)
    dmu = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    dlv = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    if HAS_GZ:
        gz = tl.load(gz_ptr + rows[:, None] * stride_gz_b + cols[None, :] * stride_gz_d,
                     mask=mask, other=0.0).to(tl.float32)
        eps = _normal_tile(seed, rows, d0, D4, BLOCK_B, BLOCK_D)
        dmu += gz
        dlv += 0.5 * gz * eps * tl.exp(0.5 * lv)
    if HAS_GKL:
        mu = tl.load(mu_ptr + rows[:, None] * stride_mu_b + cols[None, :] * stride_mu_d,
                     mask=mask, other=0.0).to(tl.float32)
        gkl = tl.load(gkl_ptr + rows * stride_gkl, mask=rows < B, other=0.0).to(tl.float32)
        dmu += gkl[:, None] * mu
        dlv += 0.5 * gkl[:, None] * (tl.exp(lv) - 1.0)
    out = rows[:, None] * D + cols[None, :]
    tl.store(dmu_ptr + out, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(dlv_ptr + out, dlv.to(dlv_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _interpret() -> bool:
    """TRITON_INTERPRET as set now (triton >= 3.3 reads it through ``triton.knobs``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels_interpreted() -> bool:
    # @triton.jit reads TRITON_INTERPRET when it runs, for triton's own helpers (tl.randn4x)
    # too, so interpreted kernels exist only if it was set before triton was imported.
    return type(_reparam_kl_fwd_kernel).__name__ == "InterpretedFunction"


def kernel_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the Triton kernel runs: CUDA, or CPU with TRITON_INTERPRET=1 set both now
    and when triton was imported (elsewhere the op takes its torch fallback)."""
    if dtype not in KERNEL_DTYPES:
        return False
    return device.type == "cuda" or (_interpret() and _kernels_interpreted())


def gpu_tile(block_d: int) -> int:
    """Elements per program on a GPU for rows handled ``block_d`` columns at a time."""
    return TILE_GPU if block_d <= 256 else TILE_GPU_WIDE


def _block_sizes(B: int, D: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_D): BLOCK_D a power of two >= 4 (whole Philox groups), tile ~ TILE."""
    block_d = min(max(triton.next_power_of_2(D), 4), MAX_BLOCK_D)
    tile = TILE_INTERPRET if _kernels_interpreted() else gpu_tile(block_d)
    block_b = min(max(tile // block_d, 1), triton.next_power_of_2(B))
    return block_b, block_d


def _device_guard(device: torch.device):
    # Triton launches on the *current* CUDA device; make it the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _seed_args(seed, dummy: torch.Tensor) -> dict:
    """Kernel arguments seed, seed_ptr, SEED_FROM_PTR for an int seed or a one-element int64
    tensor on the kernel's device (read by the kernel, never by the host: no sync, and CUDA
    graphs replay with the tensor's current value instead of the one seen at capture)."""
    if isinstance(seed, torch.Tensor):
        return dict(seed=0, seed_ptr=seed, SEED_FROM_PTR=True)
    return dict(seed=int(seed), seed_ptr=dummy, SEED_FROM_PTR=False)


def _forward_triton(mu, logvar, seed, block_b=None, block_d=None, num_warps=4):
    """Launch the forward kernel on 2-D (B, D) inputs (any strides); ``seed``: int or device
    tensor (see ``_seed_args``). Returns (z, kl)."""
    B, D = mu.shape
    z = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
    kl = torch.empty(B, dtype=torch.float32, device=mu.device)
    bb, bd = _block_sizes(B, D)
    bb, bd = block_b or bb, block_d or bd
    assert bd % 4 == 0, "BLOCK_D must hold whole groups of 4 Philox outputs"
    with _device_guard(mu.device):
        _reparam_kl_fwd_kernel[(triton.cdiv(B, bb),)](
            mu, logvar, z, kl, B, D, triton.cdiv(D, 4),
            mu.stride(0), mu.stride(1), logvar.stride(0), logvar.stride(1),
            **_seed_args(seed, mu), BLOCK_B=bb, BLOCK_D=bd, num_warps=num_warps,
        )
    return z, kl


def _backward_triton(mu, logvar, seed, gz, gkl, block_b=None, block_d=None, num_warps=4):
    """Launch the backward kernel; gz (B, D) and gkl (B,) may be None or have any strides."""
    B, D = mu.shape
    dmu = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
    dlv = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
    bb, bd = _block_sizes(B, D)
    bb, bd = block_b or bb, block_d or bd
    assert bd % 4 == 0, "BLOCK_D must hold whole groups of 4 Philox outputs"
    gz_arg = gz if gz is not None else mu  # dummy pointer, never read (HAS_GZ=False)
    gkl_arg = gkl if gkl is not None else mu
    with _device_guard(mu.device):
        _reparam_kl_bwd_kernel[(triton.cdiv(B, bb), triton.cdiv(D, bd))](
            mu, logvar, gz_arg, gkl_arg, dmu, dlv, B, D, triton.cdiv(D, 4),
            mu.stride(0), mu.stride(1), logvar.stride(0), logvar.stride(1),
            gz_arg.stride(0), gz_arg.stride(-1), gkl_arg.stride(0),
            **_seed_args(seed, mu), HAS_GZ=gz is not None, HAS_GKL=gkl is not None,
            BLOCK_B=bb, BLOCK_D=bd, num_warps=num_warps,
        )
    return dmu, dlv


# Torch fallback (CPU without the interpreter, float64): same contract, eps from torch.


def _torch_eps(seed: int, shape, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def _forward_torch(mu, logvar, seed: int):
    """The reference math (fastvae.reparam) in fp32, or fp64 for fp64 inputs."""
    compute = torch.promote_types(mu.dtype, torch.float32)
    mu_c, lv_c = mu.to(compute), logvar.to(compute)
    z = mu_c + torch.exp(0.5 * lv_c) * _torch_eps(seed, mu.shape, mu.device).to(compute)
    # Contiguous like the kernel's outputs (the fake kernel promises that layout).
    return z.to(mu.dtype).contiguous(), kl_standard_normal(mu_c, lv_c)


def _backward_torch(mu, logvar, seed: int, gz, gkl):
    compute = torch.promote_types(mu.dtype, torch.float32)
    mu_c, lv_c = mu.to(compute), logvar.to(compute)
    dmu = torch.zeros_like(mu_c)
    dlv = torch.zeros_like(lv_c)
    if gz is not None:
        gz_c = gz.to(compute)
        eps = _torch_eps(seed, mu.shape, mu.device).to(compute)
        dmu = dmu + gz_c
        dlv = dlv + 0.5 * gz_c * eps * torch.exp(0.5 * lv_c)
    if gkl is not None:
        gkl_c = gkl.to(compute)[:, None]
        dmu = dmu + gkl_c * mu_c
        dlv = dlv + 0.5 * gkl_c * (torch.exp(lv_c) - 1.0)
    return dmu.to(mu.dtype).contiguous(), dlv.to(mu.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# torch.library ops + autograd
# --------------------------------------------------------------------------------------------


def _kl_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastvae::reparameterize_kl", mutates_args=())
def _reparam_kl_op(
    mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) mu, logvar and a 0-d int64 seed tensor (on the CPU or mu's device) -> z (B, D)
    input dtype, kl (B,) fp32."""
    if mu.numel() == 0:
        kl = torch.zeros(mu.shape[0], dtype=_kl_dtype(mu.dtype), device=mu.device)
        return torch.empty_like(mu), kl
    if kernel_available(mu.device, mu.dtype):
        return _forward_triton(mu, logvar, _kernel_seed(seed, mu))
    return _forward_torch(mu, logvar, int(seed.item()))


def _kernel_seed(seed: torch.Tensor, mu: torch.Tensor):
    """A CPU seed becomes an int kernel argument (read now, no device sync); a seed on an
    accelerator stays a tensor that the kernel reads (no sync either; CUDA-graph safe)."""
    if seed.device.type == "cpu":
        return int(seed.item())
    return seed if seed.device == mu.device else seed.to(mu.device)


@_reparam_kl_op.register_fake
def _(mu, logvar, seed):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), mu.new_empty(
        mu.shape[:1], dtype=_kl_dtype(mu.dtype)
    )


@torch.library.custom_op("fastvae::reparameterize_kl_backward", mutates_args=())
def _reparam_kl_backward_op(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    seed: torch.Tensor,
    grad_z: Optional[torch.Tensor],
    grad_kl: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dmu, dlogvar) from mu, logvar, the seed and the upstream grads (either may be None)."""
    if mu.numel() == 0:
        return torch.zeros_like(mu), torch.zeros_like(logvar)
    if kernel_available(mu.device, mu.dtype):
        return _backward_triton(mu, logvar, _kernel_seed(seed, mu), grad_z, grad_kl)
    return _backward_torch(mu, logvar, int(seed.item()), grad_z, grad_kl)


@_reparam_kl_backward_op.register_fake
def _(mu, logvar, seed, grad_z, grad_kl):
    return (torch.empty_like(mu, memory_format=torch.contiguous_format),
            torch.empty_like(logvar, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    mu, logvar, seed = inputs
    ctx.save_for_backward(mu, logvar, seed)  # nothing else of size B x D: eps is regenerated


def _backward(ctx, grad_z, grad_kl):
    mu, logvar, seed = ctx.saved_tensors
    if grad_z is None and grad_kl is None:
        return None, None, None
    dmu, dlv = _reparam_kl_backward_op(mu, logvar, seed, grad_z, grad_kl)
    return dmu, dlv, None


_reparam_kl_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _seed_tensor(seed) -> torch.Tensor:
    if seed is None:
        # Drawn from torch's CPU generator: reproducible under torch.manual_seed, no device sync.
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex:
            raise ValueError("seed tensor must hold one integer")
        return seed.reshape(()).to(torch.int64)  # stays where it is: moving it would sync
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor(seed, dtype=torch.int64)


def reparameterize_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    seed: "int | torch.Tensor | None" = None,
    reduction: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused z = mu + exp(0.5 logvar) * eps and KL(N(mu, exp(logvar)) || N(0, I)).

    ``mu``, ``logvar``: same shape (..., D), float32/bfloat16/float16 (float64 uses the torch
    path). ``seed``: int, one-element integer tensor, or None to draw one from torch's CPU
    generator. A tensor seed on the CPU is read by the host (no device sync); one on mu's
    device is read by the kernel, which CUDA graphs need (a host-read seed would be frozen into
    the graph). Same seed value, same shape -> same eps, on any block size.
    Returns ``z`` (..., D) in the input dtype and ``kl`` in float32: shape (...) for
    ``reduction="none"``, a scalar sum or mean over rows for ``"sum"`` / ``"mean"``.
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if mu.shape != logvar.shape or mu.dtype != logvar.dtype or mu.device != logvar.device:
        raise ValueError("mu and logvar must have the same shape, dtype and device")
    if mu.dim() == 0:
        raise ValueError("mu must have at least one dimension (the latent dimension)")
    shape = mu.shape
    rows = math.prod(shape[:-1])
    z, kl = _reparam_kl_op(mu.reshape(rows, shape[-1]), logvar.reshape(rows, shape[-1]),
                           _seed_tensor(seed))
    z, kl = z.view(shape), kl.view(shape[:-1])
    # The row reduction is a tiny deterministic second stage (no atomics in the kernel).
    if reduction == "sum":
        kl = kl.sum()
    elif reduction == "mean":
        kl = kl.mean()
    return z, kl


def philox_eps(seed: int, rows: int, cols: int, device="cpu", **blocks) -> torch.Tensor:
    """The (rows, cols) fp32 eps the kernel uses for ``seed`` (z with mu = 0, logvar = 0)."""
    zeros = torch.zeros(rows, cols, device=device, dtype=torch.float32)
    if not kernel_available(zeros.device, zeros.dtype):
        raise RuntimeError("the Triton kernel needs CUDA, or TRITON_INTERPRET=1 before import")
    return _forward_triton(zeros, zeros, int(seed), **blocks)[0]
