"""Reparameterize-plus-KL: z = mu + exp(0.5 logvar) * eps and KL(q(z|x) || N(0, I)) per row.

``reparameterize_kl`` is the one entry point models call. It dispatches to the fused Triton
kernel (``fastvae.kernels``) on CUDA tensors, and under ``TRITON_INTERPRET=1`` on CPU, and to
the pure-torch reference everywhere else or when ``backend="torch"`` is asked for.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from fastvae.distributions import kl_standard_normal
from fastvae.errors import FastVAEError

Backend = Literal["auto", "torch", "triton"]


def reparameterize_kl_reference(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference: returns (z, kl) with kl per row (float32 for 16-bit inputs).

    ``eps`` may be given (tests, IWAE); otherwise it is drawn from ``generator``.
    """
    if eps is None and generator is None:
        eps = torch.randn_like(mu)  # traceable by torch.compile (an explicit generator is not)
    elif eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl_dtype = torch.float64 if mu.dtype == torch.float64 else torch.float32
    kl = kl_standard_normal(mu.to(kl_dtype), logvar.to(kl_dtype))
    return z, kl


def check_mu_logvar(mu: torch.Tensor, logvar: torch.Tensor) -> None:
    """``ValueError`` unless mu and logvar are floating point of one shape (..., D), dtype and
    device: no broadcasting or promotion, which the fused kernel cannot do (code that ran on a
    CPU would fail on a GPU)."""
    if mu.shape != logvar.shape or mu.dtype != logvar.dtype or mu.device != logvar.device:
        raise ValueError("mu and logvar must have the same shape, dtype and device, got "
                         f"{tuple(mu.shape)} {mu.dtype} on {mu.device} and "
                         f"{tuple(logvar.shape)} {logvar.dtype} on {logvar.device}")
    if mu.dim() == 0:
        raise ValueError("mu must have at least one dimension (the latent dimension)")
    if not mu.is_floating_point():
        raise ValueError(f"mu and logvar must be floating point, got {mu.dtype}")


def interpret_requested() -> bool:
    """TRITON_INTERPRET set to a value triton takes as true (1, true, on, yes, y; any case),
    read without importing triton."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


def triton_available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """True where the fused kernel runs: CUDA with triton, or CPU under TRITON_INTERPRET=1."""
    if device.type != "cuda" and not interpret_requested():
        return False  # the common CPU case: do not even import triton
    try:
        from fastvae.kernels import kernel_available
    except ImportError:  # no triton on this platform
        return False
    return kernel_available(device, dtype)


def resolve_backend(backend: Backend, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> Backend:
    """``auto`` -> ``triton`` where the fused kernel runs on ``device``, else ``torch``.

    Resolve once, outside ``torch.compile``d code (the trainer does so at set-up): the check reads
    the environment and imports triton, which compiled code should not do every step.
    """
    if backend == "torch":
        return backend
    _check_backend(backend)
    available = triton_available(device, dtype)
    if backend == "triton" and not available:
        raise FastVAEError(
            f"--reparam triton needs the Triton kernel, which cannot run on {device.type} here "
            "(it needs CUDA and triton, or TRITON_INTERPRET=1 on a CPU): use --reparam auto or torch"
        )
    return "triton" if available else "torch"


def _check_backend(backend) -> None:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


def reparameterize_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (z, kl_per_row) using the fused kernel where available, else the torch reference.

    With the kernel, the Philox seed is drawn where no sync is needed. In eager code it is a
    Python int from torch's CPU generator (or ``generator``, if it is a CPU one) that goes
    straight to the kernel: no tensor, no device work. Under ``torch.compile`` (and with a CUDA
    ``generator``) it is a 0-d tensor: on a CUDA device drawn there, so the kernel reads it and
    CUDA graphs (``--compile-mode reduce-overhead``) draw a fresh one at every replay. Either way
    reproducible under ``torch.manual_seed``, with no recompilation or graph break.
    ``backend="triton"`` is the fused op's entry, which takes its own torch fallback where the
    kernel cannot run (``resolve_backend("triton", device)`` raises there: ask it once first).
    """
    if backend == "auto":
        backend = resolve_backend(backend, mu.device, mu.dtype)
    if backend == "torch":
        check_mu_logvar(mu, logvar)  # the kernel's entry checks its own: one contract for both
        return reparameterize_kl_reference(mu, logvar, generator)
    if backend != "triton":
        _check_backend(backend)
    global _fused
    if _fused is None:  # imported by resolve_backend already; bound once, not per step
        from fastvae.kernels import reparameterize_kl as _fused
    if torch.compiler.is_compiling() or (generator is not None and generator.device.type != "cpu"):
        seed = draw_seed(mu.device, generator)
    elif generator is not None:
        from fastvae.kernels.reparam_kl import draw_host_seed

        seed = draw_host_seed(generator)
    else:
        seed = None  # the kernel's entry draws an int from torch's CPU generator
    return _fused(mu, logvar, seed=seed, reduction="none")


_fused = None


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A 0-d int64 Philox seed tensor on ``device`` if it is a CUDA device (and ``generator``
    is not a CPU one), else on the CPU: what compiled code and CUDA graphs need."""
    if device.type == "cuda" and (generator is None or generator.device.type == "cuda"):
        return torch.randint(0, 2**31 - 1, (), device=device, generator=generator)
    return torch.randint(0, 2**31 - 1, (), generator=_cpu_generator(generator))


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    # A seed drawn on the CPU costs no device sync; a CUDA generator cannot draw CPU numbers.
    if generator is not None and generator.device.type == "cpu":
        return generator
    return None
