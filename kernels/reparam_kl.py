"""Fused reparameterize + KL: one Triton kernel forward, one backward, eps never stored.

Forward, per row b of mu, logvar in R^{B x D}, with std = exp2(logvar * log2(e) / 2) (the one
exponential per element) and var = std * std:

    eps[b, d] = Normal(Philox(seed, b, d))               (generated in registers, not stored)
    z[b, d]   = mu[b, d] + std[b, d] * eps[b, d]
    kl[b]     = 0.5 * sum_d (mu^2 + var - 1 - logvar)       = KL(q(z|x) || N(0, I))

Backward, with gz = dL/dz and gkl = dL/dkl (per row):

    dmu     = gz + gkl * mu
    dlogvar = 0.5 * gz * eps * std + 0.5 * gkl * (var - 1)

eps is regenerated in the backward from the seed, so autograd keeps only mu, logvar and the seed.
Noise is keyed by (seed, row, column) only, never by block size or grid. For the Philox group
g = row * ceil(D/4) + col // 4, ``tl.randint4x(seed, g)`` (Philox4x32-10, counter (g mod 2^32,
g >> 32, 0, 0), key (seed mod 2^32, seed >> 32)) gives four uint32 words x0..x3, and Box-Muller
turns each pair (a, b) = (x0, x1), (x2, x3) into two normals:

    u = (a + 1/2) / 2^32                in (0, 1]
    theta = (int32(b) >> 8) * pi / 2^23   in [-pi, pi)
    r = sqrt(-2 ln u),   (n0, n1) = (r cos theta, r sin theta)

and column 4 (g mod ceil(D/4)) + k takes n_k (n2, n3 from the second pair). On CUDA the log, sin
and cos are the hardware approximations (``lg2.approx``, ``sin.approx``, ``cos.approx``: about
2^-21 absolute error, which is why theta stays in [-pi, pi)); the interpreter and other backends
compute the same formula with precise math (``FAST_MATH=False``). |eps| is at most
sqrt(2 * 33 ln 2) = 6.77.

Math runs in fp32 registers; z and the gradients come back in the input dtype, kl in fp32.

Host path (the Liger-Kernel pattern: kernels, launchers and autograd in this one file): in eager
mode ``reparameterize_kl`` calls ``ReparamKLFunction`` (a ``torch.autograd.Function``: reshape
inside, an int seed passed straight to the kernel, no tensors allocated but the outputs), and the
launches after the first of each shape skip Triton's generic JIT path (``_launch.LaunchCache``).
Under ``torch.compile`` it calls the ``torch.library`` custom ops instead (fake kernels and
registered autograd, so ``fullgraph=True`` traces through them), with a tensor seed: on CUDA
drawn on the device, so CUDA-graph replays read a fresh one.

On CPU the kernel runs under Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the
environment *before triton is imported* (``@triton.jit`` reads it at decoration time, also for
triton's own ``tl.randint4x``). Where the kernel cannot run (other CPU cases, float64) the op
computes the reference math with eps from numpy's Philox keyed by all 64 bits of ``seed``:
still deterministic per seed and still not storing eps, but another stream than the kernel's.
"""

import contextlib
import math
import numbers
import threading
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # macOS, Windows: the kernels cannot run; every call takes the torch reference
    from fastvae.kernels import _no_triton as triton

    tl = triton.language
    HAVE_TRITON = False

from fastvae.distributions import kl_standard_normal
from fastvae.kernels._launch import LaunchCache
from fastvae.reparam import check_mu_logvar, interpret_requested

# Columns handled per step of a program; wider rows loop (the KL sum stays in registers).
MAX_BLOCK_D = 1024
# Elements per program on a GPU (4 warps: 8 per thread), forward and backward. Measured on an
# H200 (benchmarks/results/nvidia-h200/tile_sweep.json, the kernels before the 2026-11-30 rewrite): 1024-element
# tiles ran 1.15-1.7x faster than 4096 at D = 64 and 256. Rows of >= 1024 columns take two rows
# of 1024: compiled for sm_90 that tile needs <= 80 registers (the ceiling is 96,
# tests/test_kernel_aot.py) and ~13% fewer instructions per element than one row, the per-program
# set-up being shared; benchmarks/gpu/tile_sweep.py measures both. The CPU interpreter pays
# ~10-25 ms per program instance, so there it takes large tiles, few programs.
TILE_GPU = 1024
TILE_GPU_WIDE = 2048  # BLOCK_D == MAX_BLOCK_D: two rows of 1024
TILE_INTERPRET = 1 << 16
NUM_WARPS = 4
# the dtypes the kernel takes; none without triton (every call then takes the torch reference)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if HAVE_TRITON else ()
_HALF_LOG2E = tl.constexpr(0.5 * math.log2(math.e))  # std = exp2(_HALF_LOG2E * logvar)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _lg2_approx(x):
    return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _sin_approx(x):
    return tl.inline_asm_elementwise("sin.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _cos_approx(x):
    return tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=1)


# Philox4x32-10 constants (Salmon et al. 2011; the same as triton.language.random).
_PHILOX_A = tl.constexpr(0xD2511F53)
_PHILOX_B = tl.constexpr(0xCD9E8D57)
_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)


@triton.jit
def _mul_wide(x, M: tl.constexpr, FAST_MATH: tl.constexpr):
    """(hi, lo) 32-bit halves of the 64-bit product x * M (x uint32): one IMAD.WIDE.U32 on
    NVIDIA GPUs, where umulhi and mul compile to two instructions."""
    if FAST_MATH:
        wide = tl.inline_asm_elementwise(
            "mul.wide.u32 $0, $1, $2;", "=l,r,r", [x, tl.full(x.shape, M, tl.uint32)],
            dtype=tl.uint64, is_pure=True, pack=1)
        hi = (wide >> 32).to(tl.uint32)
        lo = wide.to(tl.uint32)
    else:
        hi = tl.umulhi(x, M)
        lo = tl.mul(x, M, sanitize_overflow=False)
    return hi, lo


@triton.jit
def _philox(seed, offsets, FAST_MATH: tl.constexpr):
    """Philox4x32-10 of counter (offsets mod 2^32, offsets >> 32, 0, 0) and key (seed mod 2^32,
    seed >> 32): the same four uint32 words as ``tl.randint4x(seed, offsets)``."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = offsets.to(tl.uint32)
    c1 = (offsets >> 32).to(tl.uint32)
    # Round 1 with c2 = c3 = 0 written out (inline asm does not constant-fold a product by 0).
    hi_a, lo_a = _mul_wide(c0, _PHILOX_A, FAST_MATH)
    c0, c1, c2, c3 = c1 ^ k0, c0 * 0, hi_a ^ k1, lo_a
    for _ in tl.static_range(9):
        k0 = tl.add(k0, _PHILOX_KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_KEY_B, sanitize_overflow=False)
        hi_b, lo_b = _mul_wide(c2, _PHILOX_B, FAST_MATH)
        hi_a, lo_a = _mul_wide(c0, _PHILOX_A, FAST_MATH)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
    return c0, c1, c2, c3


@triton.jit
def _box_muller(a, b, FAST_MATH: tl.constexpr):
    """Two N(0, 1) from two uint32: u = (a + 1/2) 2^-32 in (0, 1], theta = (int32(b) >> 8)
    pi 2^-23 in [-pi, pi) (exact in fp32), r = sqrt(-2 ln u); (r cos theta, r sin theta)."""
    u = a.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    theta = (b.to(tl.int32, bitcast=True) >> 8).to(tl.float32) * 3.7450702e-07
    if FAST_MATH:  # -2 ln u = -2 ln(2) log2(u); MUFU.LG2/SIN/COS, no range reduction needed
        r = tl.sqrt(_lg2_approx(u) * -1.3862943611198906)
        cos, sin = _cos_approx(theta), _sin_approx(theta)
    else:
        r = tl.sqrt(-2.0 * tl.log(u))
        cos, sin = tl.cos(theta), tl.sin(theta)
    return r * cos, r * sin


@triton.jit
def _normal_tile(seed, rows, d0, D4, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                 FAST_MATH: tl.constexpr):
    """eps[row, col] for col in d0 + [0, BLOCK_D): column 4g + k of a row takes output k of
    Philox group row * D4 + g (d0 and BLOCK_D are multiples of 4: whole groups)."""
    groups = d0 // 4 + tl.arange(0, BLOCK_D // 4)
    offsets = rows[:, None] * D4 + groups[None, :]  # int64: B * D may pass 2**31
    x0, x1, x2, x3 = _philox(seed, offsets, FAST_MATH)
    n0, n1 = _box_muller(x0, x1, FAST_MATH)
    n2, n3 = _box_muller(x2, x3, FAST_MATH)
    # Interleave so that column 4g + k holds n_k[g]: join(join(n0,n2), join(n1,n3))[.., j, k]
    # is n_{2j+k}, and reshape (row-major) flattens (g, j, k) to column 4g + 2j + k.
    eps = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(eps, (BLOCK_B, BLOCK_D))


@triton.jit
def _var_minus_1_minus_lv(lv, std):
    """exp(lv) - 1 - lv (>= 0), the KL's variance term. ``std * std - 1 - lv`` cancels near
    lv = 0, where the term is ~lv^2 / 2: 20% off at |lv| = 1e-3, negative below. There its
    Taylor series to lv^6 instead (relative error < 1e-6 for |lv| < 1/4 in fp32; the difference
    keeps < 1e-5 beyond), like ``expm1(lv) - lv`` in the reference."""
    series = lv * lv * (0.5 + lv * (1.0 / 6 + lv * (1.0 / 24 + lv * (1.0 / 120 + lv * (1.0 / 720)))))
    return tl.where(tl.abs(lv) < 0.25, series, (std * std - 1.0) - lv)


@triton.jit(do_not_specialize=["seed"])
def _reparam_kl_fwd_kernel(
    mu_ptr, lv_ptr, z_ptr, kl_ptr,
    B, D, stride_mu, stride_lv,
    seed, seed_ptr,
    SEED_FROM_PTR: tl.constexpr, FAST_MATH: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = BLOCK_B rows (unit column stride); loops over D so the row's KL is
    reduced in registers, without atomics."""
    if SEED_FROM_PTR:  # a device seed: read at run time, so a CUDA graph replay sees new ones
        seed = tl.load(seed_ptr)
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_mask = rows < B
    D4 = (D + 3) // 4
    mu_rows = mu_ptr + rows[:, None] * stride_mu
    lv_rows = lv_ptr + rows[:, None] * stride_lv
    z_rows = z_ptr + rows[:, None] * D
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = tl.max_contiguous(d0 + tl.arange(0, BLOCK_D), 4)  # see _normal_tile
        mask = row_mask[:, None] & (cols < D)[None, :]
        mu = tl.load(mu_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        lv = tl.load(lv_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        eps = _normal_tile(seed, rows, d0, D4, BLOCK_B, BLOCK_D, FAST_MATH)
        std = tl.exp2(lv * _HALF_LOG2E)  # the one exponential: exp(lv / 2)
        tl.store(z_rows + cols[None, :], (mu + std * eps).to(z_ptr.dtype.element_ty), mask=mask)
        acc += mu * mu + _var_minus_1_minus_lv(lv, std)  # 0 where masked (mu = lv = 0)
    tl.store(kl_ptr + rows, 0.5 * tl.sum(acc, axis=1), mask=row_mask)


@triton.jit(do_not_specialize=["seed"])
def _reparam_kl_bwd_kernel(
    mu_ptr, lv_ptr, gz_ptr, gkl_ptr, dmu_ptr, dlv_ptr,
    B, D, stride_mu, stride_lv, stride_gz, stride_gkl,
    seed, seed_ptr,
    HAS_GZ: tl.constexpr, HAS_GKL: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
    FAST_MATH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Elementwise over a 2-D grid of (BLOCK_B, BLOCK_D) tiles; eps regenerated from seed."""
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    cols = tl.max_contiguous(d0 + tl.arange(0, BLOCK_D), 4)  # see _normal_tile
    mask = (rows < B)[:, None] & (cols < D)[None, :]
    lv = tl.load(lv_ptr + rows[:, None] * stride_lv + cols[None, :], mask=mask, other=0.0)
    std = tl.exp2(lv.to(tl.float32) * _HALF_LOG2E)
    dmu = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    dlv = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    if HAS_GZ:
        gz = tl.load(gz_ptr + rows[:, None] * stride_gz + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        eps = _normal_tile(seed, rows, d0, (D + 3) // 4, BLOCK_B, BLOCK_D, FAST_MATH)
        dmu += gz
        dlv += 0.5 * gz * eps * std
    if HAS_GKL:
        mu = tl.load(mu_ptr + rows[:, None] * stride_mu + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        half_gkl = 0.5 * tl.load(gkl_ptr + rows * stride_gkl, mask=rows < B, other=0.0).to(tl.float32)
        dmu += (2.0 * half_gkl)[:, None] * mu
        # exp(lv) - 1 as std^2 - 1: absolute error ~2e-7 (relatively large only where the
        # gradient itself is < 1e-5, near lv = 0); a series there, as the forward's, cost ~7
        # more instructions per element (tests/test_kernel_aot.py) for a negligible difference
        dlv += half_gkl[:, None] * (std * std - 1.0)
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
    return interpret_requested()


def _kernels_interpreted() -> bool:
    # @triton.jit reads TRITON_INTERPRET when it runs, for triton's own helpers (tl.randint4x)
    # too, so interpreted kernels exist only if it was set before triton was imported.
    return type(_reparam_kl_fwd_kernel).__name__ == "InterpretedFunction"


# Inline PTX approximations on NVIDIA GPUs; precise math in the interpreter and on ROCm.
FAST_MATH = not _kernels_interpreted() and torch.version.hip is None


def _index_through_the_element() -> None:
    """The interpreter of triton < 3.9 (3.6 checked) makes a loop bound of a runtime argument,
    held as a 1-element array, with ``int(array)``, which numpy >= 2.4 refuses ("only
    0-dimensional arrays can be converted"): the forward's ``range(0, D, BLOCK_D)`` failed.
    Index through the element, as triton 3.9 does (there this changes nothing)."""
    try:
        from triton.runtime import interpreter
        patch_tensor = interpreter._patch_lang_tensor
    except (ImportError, AttributeError):  # another interpreter: left as it is
        return

    def index(self):
        data = self.handle.data
        return int(data.reshape(-1)[0]) if getattr(data, "size", 0) == 1 else int(data)

    def patched(tensor, *rest):  # (tensor, scope) in 3.5+, (tensor) or (tensor, builder) before
        patch_tensor(tensor, *rest)
        scope = rest[0] if rest and hasattr(rest[0], "set_attr") else None
        if scope is not None:
            scope.set_attr(tensor, "__index__", index)  # restored after the launch
        else:
            tensor.__index__ = index  # as those versions set theirs

    if not getattr(patch_tensor, "fastvae_index", False):
        patched.fastvae_index = True
        interpreter._patch_lang_tensor = patched


if _kernels_interpreted():
    _index_through_the_element()


def kernel_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the Triton kernel runs: CUDA, or CPU with TRITON_INTERPRET=1 set both now
    and when triton was imported (elsewhere the op takes its torch fallback)."""
    if dtype not in KERNEL_DTYPES:
        return False
    return device.type == "cuda" or (_interpret() and _kernels_interpreted())


def _use_kernel(t: torch.Tensor) -> bool:
    """kernel_available for a tensor, cheap on CUDA (checked on every call)."""
    if t.is_cuda:
        return t.dtype in KERNEL_DTYPES
    return t.dtype in KERNEL_DTYPES and _interpret() and _kernels_interpreted()


def gpu_tile(block_d: int) -> int:
    """Elements per program on a GPU for rows handled ``block_d`` columns at a time."""
    return TILE_GPU_WIDE if block_d >= MAX_BLOCK_D else TILE_GPU


def _block_sizes(B: int, D: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_D): BLOCK_D a power of two >= 4 (whole Philox groups), tile ~ TILE."""
    block_d = min(max(triton.next_power_of_2(D), 4), MAX_BLOCK_D)
    tile = TILE_INTERPRET if _kernels_interpreted() else gpu_tile(block_d)
    block_b = min(max(tile // block_d, 1), triton.next_power_of_2(B))
    return block_b, block_d


_LAUNCHES = LaunchCache()
_FWD, _BWD = "fwd", "bwd"
_CONTIGUOUS = torch.contiguous_format


def _seed_args(seed, like: torch.Tensor):
    """(seed, seed_ptr, key part): an int seed is a kernel argument (32 or 64 bits by value, as
    Triton types it; ``like`` stands in as the unread pointer); a tensor seed is read by the
    kernel, from ``like``'s device."""
    if not isinstance(seed, torch.Tensor):
        seed = int(seed)
        return seed, like, seed >= 2**31
    if seed.device != like.device:
        seed = seed.to(like.device)
    return 0, seed, (True, seed.data_ptr() % 16 == 0)


def _unit_column_stride(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t, its row stride) with unit column stride (the kernels take a row stride only)."""
    stride = t.stride()
    if stride[-1] != 1:
        t = t.contiguous()
        stride = t.stride()
    return t, stride[0]


_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension


def _plan(B, D, block_b, block_d, num_warps, meta, two_d: bool):
    """(grid, constexprs, num_warps) of a launch: block sizes by ``_block_sizes`` unless given."""
    bb, bd = _block_sizes(B, D)
    bb, bd = block_b or bb, block_d or bd
    assert bd % 4 == 0, "BLOCK_D must hold whole groups of 4 Philox outputs"
    grid = (triton.cdiv(B, bb), triton.cdiv(D, bd)) if two_d else (triton.cdiv(B, bb),)
    if grid[0] * bb > 2**31:  # the kernels number rows in int32 (then widen them for pointers)
        raise ValueError(f"{B} rows: the kernels number rows in int32, {2**31 // bb * bb} at most with blocks of "
                         f"{bb} rows: split the batch")
    if two_d and grid[1] > _MAX_GRID_Y:  # CUDA's launch would fail with "invalid argument"
        raise ValueError(f"rows of {D} elements are beyond the backward kernel's grid (at most {_MAX_GRID_Y * bd}): "
                         "use the torch path (fastvae.reparam backend='torch')")
    return grid, dict(meta, FAST_MATH=FAST_MATH, BLOCK_B=bb, BLOCK_D=bd), num_warps


def _forward_triton(mu, logvar, seed, block_b=None, block_d=None, num_warps=NUM_WARPS, shape=None):
    """Launch the forward kernel on 2-D (B, D) inputs; ``seed``: an int, or a one-element int64
    tensor that the kernel reads (no sync; CUDA graphs replay with its current value).
    Returns (z, kl), allocated contiguous in ``shape`` (..., D) when given (the caller's
    shape: outputs that are not views, which in-place ops on them need). The key holds
    everything Triton specializes the launch on (values of the int arguments, dtypes and
    16-byte alignment of the pointers) and the block overrides."""
    s_mu, c_mu = mu.stride()
    s_lv, c_lv = logvar.stride()
    if c_mu != 1 or c_lv != 1:  # the kernels take a row stride only
        mu, s_mu = _unit_column_stride(mu)
        logvar, s_lv = _unit_column_stride(logvar)
    B, D = mu.shape
    if shape is None:
        z = torch.empty_like(mu, memory_format=_CONTIGUOUS)
        kl = mu.new_empty(B, dtype=torch.float32)
    else:
        z = mu.new_empty(shape)
        kl = mu.new_empty(shape[:-1], dtype=torch.float32)
    if seed.__class__ is int:
        seed_ptr, seed_key = mu, seed >= 2**31
    else:
        seed, seed_ptr, seed_key = _seed_args(seed, mu)
    dev = mu.get_device()
    key = (_FWD, dev, mu.dtype, B, D, s_mu, s_lv, seed_key, mu.data_ptr() % 16,
           logvar.data_ptr() % 16, block_b, block_d, num_warps)
    _LAUNCHES.launch(
        _reparam_kl_fwd_kernel, key, (mu, logvar, z, kl, B, D, s_mu, s_lv, seed, seed_ptr),
        lambda: _plan(B, D, block_b, block_d, num_warps,
                      dict(SEED_FROM_PTR=seed_ptr is not mu), two_d=False), dev)
    return z, kl


def _backward_triton(mu, logvar, seed, gz, gkl, block_b=None, block_d=None, num_warps=NUM_WARPS):
    """Launch the backward kernel; gz (B, D) and gkl (B,) may be None or have any strides."""
    s_mu, c_mu = mu.stride()
    s_lv, c_lv = logvar.stride()
    if c_mu != 1 or c_lv != 1:
        mu, s_mu = _unit_column_stride(mu)
        logvar, s_lv = _unit_column_stride(logvar)
    B, D = mu.shape
    dmu = torch.empty_like(mu, memory_format=_CONTIGUOUS)
    dlv = torch.empty_like(mu, memory_format=_CONTIGUOUS)
    if seed.__class__ is int:
        seed_ptr, seed_key = mu, seed >= 2**31
    else:
        seed, seed_ptr, seed_key = _seed_args(seed, mu)
    has_gz, has_gkl = gz is not None, gkl is not None
    # mu stands in for a missing grad: a pointer never read (HAS_GZ / HAS_GKL False)
    gz, s_gz = _unit_column_stride(gz) if has_gz else (mu, 0)
    gkl, s_gkl = (gkl, gkl.stride(0)) if has_gkl else (mu, 0)
    dev = mu.get_device()
    key = (_BWD, dev, mu.dtype, B, D, s_mu, s_lv, gz.dtype, s_gz, gkl.dtype, s_gkl, has_gz,
           has_gkl, seed_key, mu.data_ptr() % 16, logvar.data_ptr() % 16, gz.data_ptr() % 16,
           gkl.data_ptr() % 16, block_b, block_d, num_warps)
    _LAUNCHES.launch(
        _reparam_kl_bwd_kernel, key,
        (mu, logvar, gz, gkl, dmu, dlv, B, D, s_mu, s_lv, s_gz, s_gkl, seed, seed_ptr),
        lambda: _plan(B, D, block_b, block_d, num_warps,
                      dict(HAS_GZ=has_gz, HAS_GKL=has_gkl, SEED_FROM_PTR=seed_ptr is not mu),
                      two_d=True), dev)
    return dmu, dlv


# Torch fallback (CPU without the interpreter, float64): same contract, eps from torch.


def _fallback_eps(seed: int, shape, device) -> torch.Tensor:
    """The fallback's eps: numpy's Philox keyed by all 64 bits of ``seed`` (torch's CPU
    generator keeps 32: seeds 2**32 apart gave the same noise)."""
    import numpy as np

    rng = np.random.Generator(np.random.Philox(key=int(seed)))
    return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(device)


def _int_seed(seed) -> int:
    return int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)


def _forward_torch(mu, logvar, seed):
    """The reference math (fastvae.reparam) in fp32, or fp64 for fp64 inputs; (..., D) inputs
    draw the eps of their (rows, D) view."""
    compute = torch.promote_types(mu.dtype, torch.float32)
    mu_c, lv_c = mu.to(compute), logvar.to(compute)
    rows = math.prod(mu.shape[:-1])
    eps = _fallback_eps(_int_seed(seed), (rows, mu.shape[-1]), mu.device).view(mu.shape).to(compute)
    z = mu_c + torch.exp(0.5 * lv_c) * eps
    # Contiguous like the kernel's outputs (the fake kernel promises that layout).
    return z.to(mu.dtype).contiguous(), kl_standard_normal(mu_c, lv_c)


def _reference_backward(mu, logvar, eps_fn, gz, gkl):
    """(dmu, dlogvar) for (..., D) inputs in torch ops (differentiable), fp32 or fp64 for fp64:

        dmu = gz + gkl mu,    dlogvar = 0.5 gz eps exp(logvar / 2) + 0.5 gkl expm1(logvar)

    ``eps_fn()`` gives eps (called only when gz is given); gz or gkl may be None."""
    compute = torch.promote_types(mu.dtype, torch.float32)
    mu_c, lv_c = mu.to(compute), logvar.to(compute)
    dmu = torch.zeros_like(mu_c)
    dlv = torch.zeros_like(lv_c)
    if gz is not None:
        gz_c = gz.to(compute)
        dmu = dmu + gz_c
        dlv = dlv + 0.5 * gz_c * eps_fn().to(compute) * torch.exp(0.5 * lv_c)
    if gkl is not None:
        gkl_c = gkl.to(compute).unsqueeze(-1)
        dmu = dmu + gkl_c * mu_c
        dlv = dlv + 0.5 * gkl_c * torch.expm1(lv_c)
    return dmu.to(mu.dtype), dlv.to(logvar.dtype)


def _backward_torch(mu, logvar, seed, gz, gkl):
    dmu, dlv = _reference_backward(mu, logvar, lambda: _fallback_eps(_int_seed(seed), mu.shape, mu.device),
                                   gz, gkl)
    return dmu.contiguous(), dlv.contiguous()


def _kl_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(mu, logvar, seed):
    """(z, kl) for (..., D) mu, logvar: the kernel where it runs (on a 2-D view of the rows;
    z and kl are allocated in the inputs' shape, never views of a 2-D result, as autograd
    refuses in-place ops on a Function's outputs that are views), else the torch fallback."""
    if mu.numel() == 0:
        kl = torch.zeros(mu.shape[:-1], dtype=_kl_dtype(mu.dtype), device=mu.device)
        return torch.empty_like(mu, memory_format=torch.contiguous_format), kl
    if not _use_kernel(mu):
        return _forward_torch(mu, logvar, seed)
    if mu.dim() == 2:
        return _forward_triton(mu, logvar, seed)
    shape = mu.shape
    rows = math.prod(shape[:-1])
    return _forward_triton(mu.reshape(rows, shape[-1]), logvar.reshape(rows, shape[-1]), seed, shape=shape)


def _eps(mu, seed) -> torch.Tensor:
    """The fp32 eps the forward drew for 2-D ``mu`` and ``seed`` (the kernel's z for mu = 0,
    logvar = 0; the fallback's stream where the kernel does not run)."""
    if mu.numel() and _use_kernel(mu):
        zeros = torch.zeros(mu.shape, dtype=torch.float32, device=mu.device)
        return _forward_triton(zeros, zeros, seed)[0]
    return _fallback_eps(_int_seed(seed), mu.shape, mu.device)


def _backward(mu, logvar, seed, gz, gkl):
    """(dmu, dlogvar) for 2-D mu, logvar; gz (B, D) and gkl (B,) may be None."""
    if mu.numel() == 0:
        return torch.zeros_like(mu), torch.zeros_like(logvar)
    if _use_kernel(mu):
        return _backward_triton(mu, logvar, seed, gz, gkl)
    return _backward_torch(mu, logvar, seed, gz, gkl)


# --------------------------------------------------------------------------------------------
# Eager autograd: torch.autograd.Function
# --------------------------------------------------------------------------------------------


class ReparamKLFunction(torch.autograd.Function):
    """(mu, logvar, seed) -> (z, kl) for mu, logvar of shape (..., D): z (..., D) in the input
    dtype, kl (...) in fp32 (fp64 for fp64). ``seed``: an int (a kernel argument) or a
    one-element int64 tensor on mu's device (read by the kernel). Saves mu, logvar (and a seed
    tensor): eps is regenerated in the backward."""

    @staticmethod
    def forward(ctx, mu, logvar, seed):
        ctx.set_materialize_grads(False)  # an unused output's grad stays None: less work
        z, kl = _forward(mu, logvar, seed)
        if isinstance(seed, torch.Tensor):
            ctx.save_for_backward(mu, logvar, seed)
        else:
            ctx.save_for_backward(mu, logvar)
            ctx.seed = seed
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        if torch.is_grad_enabled():  # create_graph=True: differentiable torch ops
            return _backward_differentiable(ctx, grad_z, grad_kl)
        return _function_backward(ctx, grad_z, grad_kl)


def _saved(ctx):
    """(mu, logvar, seed) that ReparamKLFunction.forward kept."""
    saved = ctx.saved_tensors
    return saved[0], saved[1], saved[2] if len(saved) == 3 else ctx.seed


def _function_backward(ctx, grad_z, grad_kl):
    """ReparamKLFunction's backward: (dmu, dlogvar, None) from the saved inputs and seed."""
    if grad_z is None and grad_kl is None:
        return None, None, None
    mu, logvar, seed = _saved(ctx)
    if mu.dim() != 2:
        shape, width = mu.shape, mu.shape[-1]
        rows = math.prod(shape[:-1])
        mu, logvar = mu.reshape(rows, width), logvar.reshape(rows, width)
        grad_z = None if grad_z is None else grad_z.reshape(rows, width)
        grad_kl = None if grad_kl is None else grad_kl.reshape(rows)
        dmu, dlv = _backward(mu, logvar, seed, grad_z, grad_kl)
        return dmu.view(shape), dlv.view(shape), None
    dmu, dlv = _backward(mu, logvar, seed, grad_z, grad_kl)
    return dmu, dlv, None


def _backward_differentiable(ctx, grad_z, grad_kl):
    """The backward under ``create_graph=True``: the same gradients in torch ops with eps
    regenerated (one B x D tensor, this case only; ``_reference_backward``), so that second
    derivatives through mu, logvar and the upstream grads are right (gradient penalties,
    meta-learning)."""
    if grad_z is None and grad_kl is None:
        return None, None, None
    mu, logvar, seed = _saved(ctx)
    shape = mu.shape
    rows = math.prod(shape[:-1])

    def eps():
        return _eps(mu.detach().reshape(rows, shape[-1]), seed).view(shape)

    return (*_reference_backward(mu, logvar, eps, grad_z, grad_kl), None)


def _plain_apply():
    """``ReparamKLFunction.apply`` without its Python wrapper where torch allows: what
    ``Function.apply`` does when no functorch transform is active and ``setup_context`` is not
    defined (dead functorch wrappers unwrapped, then ``_C._FunctionBase.apply``), ~5 us less per
    call. None where this torch lacks those internals (then ``ReparamKLFunction.apply``)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    unwrap = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)
    base_apply = getattr(torch._C._FunctionBase, "apply", None)
    if active is None or unwrap is None or base_apply is None:
        return None
    c_apply = super(torch.autograd.Function, ReparamKLFunction).apply

    def apply(mu, logvar, seed):
        if active():  # vmap, grad, ...: torch's own path (and its error for this Function)
            return ReparamKLFunction.apply(mu, logvar, seed)
        return c_apply(unwrap(mu), unwrap(logvar), seed)

    return apply


_apply = _plain_apply() or ReparamKLFunction.apply


# --------------------------------------------------------------------------------------------
# torch.library ops + autograd: what torch.compile traces
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvae::reparameterize_kl", mutates_args=())
def _reparam_kl_op(
    mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) mu, logvar and a 0-d int64 seed tensor (on the CPU or mu's device) -> z (B, D)
    input dtype, kl (B,) fp32."""
    if mu.dim() != 2:  # what the fake kernel promises (the entry point flattens (..., D))
        raise ValueError(f"fastvae::reparameterize_kl takes (B, D) mu and logvar, got {tuple(mu.shape)}")
    return _forward(mu, logvar, _kernel_seed(seed, mu))


def _kernel_seed(seed: torch.Tensor, mu: torch.Tensor):
    """A CPU seed becomes an int kernel argument (read now, no device sync); a seed on an
    accelerator stays a tensor that the kernel reads (no sync either; CUDA-graph safe)."""
    if seed.device.type == "cpu":
        return _check_seed_int(int(seed.item()))  # as in eager code (a device seed is not read)
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
    return _backward(mu, logvar, _kernel_seed(seed, mu), grad_z, grad_kl)


@_reparam_kl_backward_op.register_fake
def _(mu, logvar, seed, grad_z, grad_kl):
    return (torch.empty_like(mu, memory_format=torch.contiguous_format),
            torch.empty_like(logvar, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    mu, logvar, seed = inputs
    ctx.save_for_backward(mu, logvar, seed)  # nothing else of size B x D: eps is regenerated


def _op_backward(ctx, grad_z, grad_kl):
    mu, logvar, seed = ctx.saved_tensors
    if grad_z is None and grad_kl is None:
        return None, None, None
    dmu, dlv = _reparam_kl_backward_op(mu, logvar, seed, grad_z, grad_kl)
    return dmu, dlv, None


_reparam_kl_op.register_autograd(_op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Seeds and the public entry point
# --------------------------------------------------------------------------------------------

_seed_buffers = threading.local()


def draw_host_seed(generator: "torch.Generator | None" = None) -> int:
    """A Philox seed in [0, 2**31 - 1) from torch's CPU generator (or a CPU ``generator``):
    reproducible under ``torch.manual_seed``, no device sync, no tensor allocated per call."""
    bufs = getattr(_seed_buffers, "bufs", None)
    if bufs is None:
        # a normal CPU tensor whatever mode the first call runs in (made under inference_mode it
        # would refuse the in-place draws of every later call outside it); the value is read
        # through a numpy view of it: no second torch op (``item``) per call
        with torch.inference_mode(False):
            buf = torch.empty((), dtype=torch.int64, device="cpu")
        bufs = _seed_buffers.bufs = (buf, buf.numpy())
    buf, value = bufs
    if generator is None:  # random_(to) draws what random_(0, to) does, ~1 us cheaper
        buf.random_(2**31 - 1)
    else:
        buf.random_(2**31 - 1, generator=generator)
    return int(value)


def _check_seed_tensor(seed: torch.Tensor) -> torch.Tensor:
    if (seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex
            or seed.dtype == torch.bool):
        raise ValueError(f"seed tensor must hold one integer, got {seed.numel()} of {seed.dtype}")
    return seed


def _check_seed_int(seed) -> int:
    """An int (Python or numpy) in [0, 2**63); floats, strings and bools are refused, not
    truncated (3.9 was taken as 3)."""
    # a plain int first: the ABC check costs ~0.5 us on the per-call host path (bool is not int)
    if seed.__class__ is not int and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def _eager_seed(seed, mu: torch.Tensor):
    """The seed as the Function takes it: an int (host values), or an int64 tensor on mu's
    device (read by the kernel: device seeds, and fresh draws inside a CUDA-graph capture)."""
    if seed is None:
        if mu.is_cuda and torch.cuda.is_current_stream_capturing():
            # a host int would be frozen into the graph: draw on the device at every replay
            return torch.randint(0, 2**31 - 1, (), device=mu.device)
        return draw_host_seed()
    if not isinstance(seed, torch.Tensor):
        return _check_seed_int(seed)
    _check_seed_tensor(seed)
    if seed.device.type == "cpu":
        return _check_seed_int(seed.item())  # read by the host: no device sync
    seed = seed.reshape(()).to(torch.int64)
    return seed if seed.device == mu.device else seed.to(mu.device)


def _seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The seed as the custom op takes it (under torch.compile): a 0-d int64 tensor."""
    if seed is None:
        # drawn on mu's device (reproducible under torch.manual_seed): on CUDA the kernel reads
        # it, so a CUDA graph's replays get fresh ones (a CPU draw was read by the host)
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        return _check_seed_tensor(seed).reshape(()).to(torch.int64)  # stays where it is
    return torch.tensor(_check_seed_int(seed), dtype=torch.int64)


_REDUCTIONS = ("none", "sum", "mean")


def _transformed() -> bool:
    """Forward-mode AD (dual tensors carry no requires_grad) or a torch.func transform is
    active: the call goes through the autograd.Function, whose error says what is missing
    (the raw kernel would drop the tangents, or fail on a wrapper tensor's data pointer)."""
    return _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def reparameterize_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    seed: "int | torch.Tensor | None" = None,
    reduction: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused z = mu + exp(0.5 logvar) * eps and KL(N(mu, exp(logvar)) || N(0, I)).

    ``mu``, ``logvar``: same shape (..., D), float32/bfloat16/float16 (float64 uses the torch
    path; other dtypes are refused). ``seed``: int, one-element integer tensor, or None to draw one from torch's CPU
    generator (on mu's device instead under torch.compile and while a CUDA graph is captured). A tensor seed on the
    CPU is read by the host (no device sync); one on mu's device is read by the kernel, which
    CUDA graphs need (a host-read seed would be frozen into the graph). Same seed value, same
    shape -> same eps, on any block size.
    Returns ``z`` (..., D) in the input dtype and ``kl`` in float32 (float64 for float64
    inputs): shape (...) for ``reduction="none"``, a scalar sum or mean over rows for
    ``"sum"`` / ``"mean"``. Differentiable once with the fused kernels, twice under
    ``create_graph=True`` (torch ops there); forward-mode AD and torch.func transforms raise.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    check_mu_logvar(mu, logvar)
    if torch.compiler.is_compiling():  # the custom op: fake kernels for tracing
        shape = mu.shape
        rows = math.prod(shape[:-1])
        z, kl = _reparam_kl_op(mu.reshape(rows, shape[-1]), logvar.reshape(rows, shape[-1]),
                               _seed_tensor(seed, mu.device))
        z, kl = z.view(shape), kl.view(shape[:-1])
    elif (torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad)) or _transformed():
        z, kl = _apply(mu, logvar, _eager_seed(seed, mu))
    else:  # nothing to differentiate: no autograd node, just the kernel
        z, kl = _forward(mu, logvar, _eager_seed(seed, mu))
    # The row reduction is a tiny deterministic second stage (no atomics in the kernel).
    if reduction == "sum":
        kl = kl.sum()
    elif reduction == "mean":
        kl = kl.mean()
    return z, kl


@contextlib.contextmanager
def stubbed_launches():
    """Within: the op takes its kernel path for CPU tensors too and does all of its host work
    (seed, outputs, launch-plan lookup, argument tuple, stream query) except the launch itself,
    which does nothing (outputs hold garbage). For measuring and checking the host path on a
    machine without a GPU (benchmarks/reparam_kl_device.py, tests); not thread-safe."""
    from fastvae.kernels import _launch

    class _NoLaunch(LaunchCache):
        def _generic(self, kernel, key, entry, args, plan):
            if entry is None:
                grid, constexprs, num_warps = plan()
                noop = (lambda *launch_args: None, 1, 1, 1, 0, 0, tuple(constexprs.values()))
                self.entries[key] = _launch._Entry(grid, constexprs, num_warps, noop)

    global _LAUNCHES, _use_kernel
    saved = _LAUNCHES, _use_kernel, _launch._current_device
    _LAUNCHES, _use_kernel = _NoLaunch(), lambda t: t.dtype in KERNEL_DTYPES
    _LAUNCHES.stream_of = lambda device_index: 0
    _launch._current_device = lambda: -1  # the CPU tensors' "device"
    try:
        yield
    finally:
        _LAUNCHES, _use_kernel, _launch._current_device = saved


def philox_eps(seed: int, rows: int, cols: int, device="cpu", **blocks) -> torch.Tensor:
    """The (rows, cols) fp32 eps the kernel uses for ``seed`` (z with mu = 0, logvar = 0)."""
    seed = _check_seed_int(seed)
    zeros = torch.zeros(rows, cols, device=device, dtype=torch.float32)
    if not kernel_available(zeros.device, zeros.dtype):
        raise RuntimeError("the Triton kernel needs CUDA, or TRITON_INTERPRET=1 before import")
    if zeros.numel() == 0:
        return zeros
    return _forward_triton(zeros, zeros, seed, **blocks)[0]
