"""Independent references for the fused kernel's noise (used by the kernel tests).

* ``philox4x32`` / ``reference_eps``: Philox4x32-10 (Salmon et al., SC'11) and the kernel's
  documented Box-Muller mapping, written in numpy with 64-bit integer products and float64
  transcendental functions: no Triton code involved.
* ``ks_normal``: the Kolmogorov-Smirnov distance of samples from N(0, 1) and its asymptotic
  p-value, in torch (scipy may be absent on the GPU image). Samples stored in a 16-bit dtype are
  N(0, 1) rounded to that dtype's grid, so the null CDF is that of the rounded variable
  (Phi at the rounding boundaries), not Phi itself.
* ``tail_probability``: P(|round(X)| > t) for X ~ N(0, 1) rounded to a dtype's grid.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PHILOX_A, PHILOX_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def philox4x32(seed: int, counters: np.ndarray, rounds: int = 10):
    """Four uint32 arrays: Philox4x32 of counter (c mod 2^32, c >> 32, 0, 0) and key
    (seed mod 2^32, seed >> 32), for each c in ``counters`` (non-negative ints)."""
    c = np.asarray(counters, dtype=np.uint64)
    c0, c1 = c & np.uint64(MASK32), c >> np.uint64(32)
    c2 = c3 = np.zeros_like(c)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    a, b, m, s = np.uint64(PHILOX_A), np.uint64(PHILOX_B), np.uint64(MASK32), np.uint64(32)
    for _ in range(rounds):
        pa, pb = a * c0, b * c2  # exact: both factors < 2^32
        c0, c1, c2, c3 = ((pb >> s) ^ c1 ^ np.uint64(k0), pb & m,
                          (pa >> s) ^ c3 ^ np.uint64(k1), pa & m)
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return tuple(x.astype(np.uint32) for x in (c0, c1, c2, c3))


def box_muller(a: np.ndarray, b: np.ndarray):
    """The kernel's mapping of two uint32 words to two normals, in float64 after the same fp32
    rounding of u the kernel does: u = fl32(fl32(a) 2^-32 + 2^-33), theta = (int32(b) >> 8) pi 2^-23."""
    u = (a.astype(np.float32).astype(np.float64) * 2.0**-32 + 2.0**-33).astype(np.float32)
    theta = (b.view(np.int32) >> 8).astype(np.float64) * math.pi * 2.0**-23
    r = np.sqrt(-2.0 * np.log(u.astype(np.float64)))
    return r * np.cos(theta), r * np.sin(theta)


def reference_eps(seed: int, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) float64 eps as the kernel defines it: column 4g + k of a row takes normal k
    of Philox group row * ceil(cols / 4) + g."""
    groups = -(-cols // 4)
    counters = (np.arange(rows, dtype=np.uint64)[:, None] * np.uint64(groups)
                + np.arange(groups, dtype=np.uint64)[None, :])
    x0, x1, x2, x3 = philox4x32(seed, counters)
    n0, n1 = box_muller(x0, x1)
    n2, n3 = box_muller(x2, x3)
    eps = np.stack([n0, n1, n2, n3], axis=-1).reshape(rows, groups * 4)
    return eps[:, :cols]


def _rounding_bounds(values: torch.Tensor, dtype: torch.dtype):
    """(lower, upper) float64 boundaries of the values that round to each of ``values`` (exact
    in ``dtype``): midpoints to the neighbouring representable numbers."""
    v = values.to(dtype)
    up = torch.nextafter(v, torch.full_like(v, math.inf)).double()
    down = torch.nextafter(v, torch.full_like(v, -math.inf)).double()
    v = v.double()
    return (v + down) / 2, (v + up) / 2


def _ndtr(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def kolmogorov_sf(lam: float, terms: int = 100) -> float:
    """P(K > lam) for the Kolmogorov distribution: 2 sum_k (-1)^(k-1) exp(-2 k^2 lam^2)."""
    if lam < 0.2:
        return 1.0
    return max(0.0, min(1.0, 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam)
                                       for k in range(1, terms + 1))))


def ks_normal(samples: torch.Tensor) -> tuple[float, float]:
    """(D, p): KS distance of ``samples`` (any shape, any float dtype, any device) from
    N(0, 1) rounded to the samples' dtype, and its asymptotic p-value (Stephens' small-sample
    correction; conservative for a discrete null). Sorting happens on the samples' device."""
    dtype = samples.dtype
    x = samples.reshape(-1)
    n = x.numel()
    values, counts = torch.unique_consecutive(torch.sort(x).values, return_counts=True)
    cdf_right = torch.cumsum(counts, 0).double() / n  # F_n at each value
    cdf_left = cdf_right - counts.double() / n  # F_n just below it
    lower, upper = _rounding_bounds(values, dtype)
    # Between two observed values F_n is flat and the null CDF rises from Phi(upper_k) to
    # Phi(lower_{k+1}): comparing F_n at both ends of every step covers the supremum.
    d = torch.maximum((cdf_right - _ndtr(upper)).abs().max(), (cdf_left - _ndtr(lower)).abs().max())
    d = float(d)
    root = math.sqrt(n)
    return d, kolmogorov_sf((root + 0.12 + 0.11 / root) * d)


def tail_probability(threshold: float, dtype: torch.dtype) -> float:
    """P(|round(X)| > threshold) for X ~ N(0, 1) rounded to ``dtype`` (threshold exact there)."""
    _, upper = _rounding_bounds(torch.tensor([threshold]), dtype)
    return float(2 * (1 - _ndtr(upper)))
