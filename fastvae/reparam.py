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

Backend = Literal["auto", "torch", "triton"]


def reparameterize_kl_reference(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference: returns (z, kl) with kl per row, in float32 for low-precision inputs.

    ``eps`` may be given (tests, IWAE); otherwise it is drawn from ``generator``.
    """
    if eps is None and generator is None:
        eps = torch.randn_like(mu)  # traceable by torch.compile (an explicit generator is not)
    elif eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = kl_standard_normal(mu.float(), logvar.float())
    return z, kl


def triton_available(device: torch.device) -> bool:
    """True where the fused kernel can run: CUDA with triton, or CPU under TRITON_INTERPRET=1."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def reparameterize_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (z, kl_per_row) using the fused kernel where available, else the torch reference.

    With the kernel, the Philox seed is drawn from ``generator`` (or torch's default CPU
    generator), so runs stay reproducible under ``torch.manual_seed``.
    """
    use_kernel = backend == "triton" or (backend == "auto" and triton_available(mu.device))
    if not use_kernel:
        return reparameterize_kl_reference(mu, logvar, generator)
    from fastvae.kernels import reparameterize_kl as fused

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=_cpu_generator(generator)).item())
    return fused(mu, logvar, seed=seed, reduction="none")


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    # A seed drawn on the CPU costs no device sync; a CUDA generator cannot draw CPU numbers.
    if generator is not None and generator.device.type == "cpu":
        return generator
    return None
