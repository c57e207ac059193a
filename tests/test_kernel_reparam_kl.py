"""Tests for the fused reparameterize + KL op (fastvae.kernels.reparameterize_kl).

On CPU the Triton kernels run under Triton's interpreter, which only works when
TRITON_INTERPRET=1 is set before triton is imported (``@triton.jit`` reads it at decoration
time, for triton's own ``tl.randn4x`` too). Setting it for this whole pytest process would
route every other test through the slow interpreter, so the CPU kernel tests (param id
``cpu_interp``) run in one child pytest with TRITON_INTERPRET=1
(``test_cpu_kernels_in_subprocess``).
Run them directly with ``TRITON_INTERPRET=1 pytest tests/test_kernel_reparam_kl.py``.
Shapes stay small: every interpreted program instance costs ~10-25 ms.
CUDA variants of the same tests carry ``@pytest.mark.gpu``.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import fastvae.kernels as fk
from fastvae.distributions import kl_standard_normal
from fastvae.kernels import philox_eps, reparameterize_kl
from fastvae.kernels import reparam_kl as rk
from noise_stats import ks_normal, philox4x32, reference_eps

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = rk._kernels_interpreted()  # TRITON_INTERPRET=1 was set before triton's import
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="needs TRITON_INTERPRET=1 before import: test_cpu_kernels_in_subprocess"
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
DEVICES = [
    pytest.param("cpu", id="cpu_interp", marks=needs_interpreter),
    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One ulp (relative) of each dtype: interpreter bf16/fp16 stores may truncate, not round.
ULP = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.skipif(INTERPRETED, reason="already running under the interpreter")
def test_cpu_kernels_in_subprocess():
    """Run this file's CPU kernel tests (id ``cpu_interp``) in a child pytest, interpreted."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
           "-k", "cpu_interp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-2000:]


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's patch (run by test_cpu_kernels_in_subprocess)")
def test_loop_bounds_index_one_element_arrays_cpu_interp():
    """triton 3.6's interpreter indexed a runtime argument (a 1-element array) with int(array),
    which numpy >= 2.4 refuses: every interpreted forward failed (its range(0, D, BLOCK_D))."""
    import operator
    from types import SimpleNamespace

    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang_tensor, "fastvae_index", False)
    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(tl.tensor, scope)
    try:
        bound = tl.tensor.__new__(tl.tensor)
        for data, expected in ((np.array([7], np.int32), 7), (np.array(5, np.int64), 5)):
            bound.handle = SimpleNamespace(data=data)
            assert operator.index(bound) == expected
    finally:
        scope.restore()


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """'cpu' runs the Triton kernel in the interpreter; 'cuda' compiles it."""
    if request.param == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


@pytest.fixture
def no_interpret(monkeypatch):
    """CPU without the interpreter: the op takes its torch fallback."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def make_inputs(shape, device, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g)
    logvar = 0.5 * torch.randn(shape, generator=g) - 0.2
    return tuple(t.to(device, dtype).requires_grad_(requires_grad) for t in (mu, logvar))


def reference(mu, logvar, eps):
    """Reference math in fp32 with a given eps: z = mu + exp(logvar/2) eps, kl per row."""
    mu, logvar = mu.float(), logvar.float()
    return mu + torch.exp(0.5 * logvar) * eps, kl_standard_normal(mu, logvar)


def kernel_eps(seed, shape, device):
    """The eps the kernel drew for ``shape`` (..., D): flat rows, as the kernel sees them."""
    rows = math.prod(shape[:-1])
    return philox_eps(seed, rows, shape[-1], device=device).view(shape)


# ------------------------------------------------------------------------------------------
# Forward values
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (5, 64), (2, 3, 5)])
def test_forward_matches_reference(device, dtype, shape):
    mu, logvar = make_inputs(shape, device, dtype)
    z, kl = reparameterize_kl(mu, logvar, seed=123)
    assert z.shape == shape and z.dtype == dtype and z.device.type == device
    assert kl.shape == shape[:-1] and kl.dtype == torch.float32
    z_ref, kl_ref = reference(mu, logvar, kernel_eps(123, shape, device))
    torch.testing.assert_close(z.float(), z_ref, rtol=ULP[dtype], atol=1e-5)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-5 * shape[-1])


def test_wide_rows_loop_over_d(device):
    """D = 4096 > MAX_BLOCK_D: the forward loops over column blocks, the KL stays exact."""
    mu, logvar = make_inputs((2, 4096), device)
    z, kl = reparameterize_kl(mu, logvar, seed=5)
    z_ref, kl_ref = reference(mu, logvar, kernel_eps(5, (2, 4096), device))
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-3)


def test_kl_matches_closed_form_and_torch_distributions(device):
    mu, logvar = make_inputs((6, 19), device)
    _, kl = reparameterize_kl(mu, logvar, seed=1)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl_torch = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(kl, kl_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, kl_standard_normal(mu, logvar), rtol=1e-5, atol=1e-5)
    # KL = 0 at the prior.
    zero = torch.zeros(3, 8, device=device)
    assert reparameterize_kl(zero, zero, seed=1)[1].abs().max() < 1e-6


def test_kl_keeps_its_precision_near_the_prior(device):
    """mu = 0, |logvar| << 1: KL ~ logvar^2 / 2 per dim, which var - 1 - logvar in fp32 lost to
    cancellation (20% off at 1e-3, negative below); both sides of the series' 1/4 switch."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.2, 0.249, 0.251, 0.3, 1.0])
    logvar = (scales[:, None] * torch.randn(len(scales), 64, generator=gen)).to(device).requires_grad_()
    mu = torch.zeros_like(logvar)
    _, kl = reparameterize_kl(mu, logvar, seed=1)
    kl.sum().backward()
    lv = logvar.detach().double().requires_grad_()
    q = torch.distributions.Normal(torch.zeros_like(lv), torch.exp(0.5 * lv))
    p = torch.distributions.Normal(torch.zeros_like(lv), torch.ones_like(lv))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    expected.sum().backward()
    assert (kl >= 0).all(), kl
    torch.testing.assert_close(kl.detach().double(), expected.detach(), rtol=2e-5, atol=0)
    # the gradient 0.5 (std^2 - 1) keeps the exponential's absolute error (a series would cost
    # instructions per element: kernels/reparam_kl.py): within 3e-7
    torch.testing.assert_close(logvar.grad.double(), lv.grad, rtol=2e-6, atol=3e-7)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions(device, reduction):
    mu, logvar = make_inputs((7, 10), device, requires_grad=True)
    _, kl_rows = reparameterize_kl(mu, logvar, seed=2)
    z, kl = reparameterize_kl(mu, logvar, seed=2, reduction=reduction)
    expected = {"none": kl_rows, "sum": kl_rows.sum(), "mean": kl_rows.mean()}[reduction]
    torch.testing.assert_close(kl, expected)
    kl.sum().backward()
    # d kl / d logvar = 0.5 (exp(logvar) - 1), scaled 1/B for the mean.
    scale = 1.0 / 7 if reduction == "mean" else 1.0
    torch.testing.assert_close(mu.grad, scale * mu.detach())
    torch.testing.assert_close(logvar.grad, scale * 0.5 * (logvar.detach().exp() - 1))


# ------------------------------------------------------------------------------------------
# Noise: determinism, layout independence, statistics
# ------------------------------------------------------------------------------------------


def test_same_seed_same_noise_different_seed_different(device):
    mu, logvar = make_inputs((4, 33), device)
    z1, _ = reparameterize_kl(mu, logvar, seed=7)
    z2, _ = reparameterize_kl(mu, logvar, seed=7)
    z3, _ = reparameterize_kl(mu, logvar, seed=torch.tensor(7))
    z4, _ = reparameterize_kl(mu, logvar, seed=8)
    assert torch.equal(z1, z2) and torch.equal(z1, z3)
    assert (z1 == z4).float().mean() < 0.05
    # seed=None draws from torch's CPU generator: reproducible under torch.manual_seed.
    torch.manual_seed(0)
    a, _ = reparameterize_kl(mu, logvar)
    b, _ = reparameterize_kl(mu, logvar)
    torch.manual_seed(0)
    c, _ = reparameterize_kl(mu, logvar)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_noise_independent_of_block_size_and_grid(device):
    ref = philox_eps(11, 4, 24, device=device)
    for block_b, block_d in [(1, 8), (2, 16), (4, 4)]:
        eps = philox_eps(11, 4, 24, device=device, block_b=block_b, block_d=block_d)
        assert torch.equal(eps, ref), (block_b, block_d)
    # Keyed by (row, column) only: a prefix of rows draws the same noise as the full batch,
    assert torch.equal(philox_eps(11, 3, 24, device=device), ref[:3])
    # and for D % 4 == 0 it is a function of the flat index row * D + col.
    assert torch.equal(philox_eps(11, 1, 4 * 24, device=device).view(4, 24), ref)
    # The backward regenerates the same eps with its own tiling (2-D grid).
    mu, logvar = make_inputs((4, 24), device)
    grad_z = torch.ones(4, 24, device=device)
    _, dlv = rk._backward_triton(mu, logvar, 11, grad_z, None, block_b=2, block_d=16)
    torch.testing.assert_close(dlv, 0.5 * ref * torch.exp(0.5 * logvar), rtol=1e-6, atol=1e-6)


def test_a_seed_on_the_device_is_read_by_the_kernel_with_the_same_noise(device):
    """A tensor seed on the kernel's device takes the pointer path (the kernel loads it, as
    CUDA graphs need): the same eps, z, KL and gradients as the same value given as an int."""
    mu, logvar = make_inputs((4, 24), device)
    gz, gkl = torch.randn(4, 24).to(device), torch.randn(4).to(device)
    on_device = torch.tensor(11, device=device)
    for got, want in [(rk._forward_triton(mu, logvar, on_device), rk._forward_triton(mu, logvar, 11)),
                      (rk._backward_triton(mu, logvar, on_device, gz, gkl),
                       rk._backward_triton(mu, logvar, 11, gz, gkl))]:
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    z_other, _ = rk._forward_triton(mu, logvar, torch.tensor(12, device=device))
    assert (z_other == rk._forward_triton(mu, logvar, 11)[0]).float().mean() < 0.05
    # through the op and autograd, with the seed tensor on mu's device
    mu, logvar = make_inputs((4, 24), device, requires_grad=True)
    z1, kl1 = reparameterize_kl(mu, logvar, seed=on_device)
    g1 = torch.autograd.grad((z1 * gz).sum() + (kl1 * gkl).sum(), (mu, logvar))
    z2, kl2 = reparameterize_kl(mu, logvar, seed=11)
    g2 = torch.autograd.grad((z2 * gz).sum() + (kl2 * gkl).sum(), (mu, logvar))
    assert torch.equal(z1, z2) and torch.equal(kl1, kl2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@triton.jit
def _philox_probe(out_ptr, seed, base, N: tl.constexpr, FAST_MATH: tl.constexpr):
    """out[k, i] = word k of the kernel's Philox for counter base + i; out[4 + k, i]: the same
    from triton's own tl.randint4x."""
    offsets = base + tl.arange(0, N).to(tl.int64)
    x0, x1, x2, x3 = rk._philox(seed, offsets, FAST_MATH)
    y0, y1, y2, y3 = tl.randint4x(seed, offsets)
    i = tl.arange(0, N)
    tl.store(out_ptr + 0 * N + i, x0.to(tl.int64))
    tl.store(out_ptr + 1 * N + i, x1.to(tl.int64))
    tl.store(out_ptr + 2 * N + i, x2.to(tl.int64))
    tl.store(out_ptr + 3 * N + i, x3.to(tl.int64))
    tl.store(out_ptr + 4 * N + i, y0.to(tl.int64))
    tl.store(out_ptr + 5 * N + i, y1.to(tl.int64))
    tl.store(out_ptr + 6 * N + i, y2.to(tl.int64))
    tl.store(out_ptr + 7 * N + i, y3.to(tl.int64))


@pytest.mark.parametrize("seed,base", [(7, 0), (2**31 + 11, 2**32 - 8)])
def test_philox_matches_numpy_and_triton(device, seed, base):
    """The kernel's Philox4x32-10 (one wide multiply per product on NVIDIA GPUs) against a
    numpy implementation and tl.randint4x, with a 64-bit seed and counters crossing 2^32."""
    N = 16
    out = torch.empty(8, N, dtype=torch.int64, device=device)
    _philox_probe[(1,)](out, seed, base, N=N, FAST_MATH=rk.FAST_MATH)
    got = out.cpu().numpy()
    want = np.stack(philox4x32(seed, base + np.arange(N))).astype(np.int64)
    assert np.array_equal(got[:4], want)
    assert np.array_equal(got[4:], want)


def test_noise_matches_an_independent_philox_box_muller(device):
    """eps is the documented stream: numpy Philox + Box-Muller in float64 (noise_stats). The
    interpreter computes log/sin/cos precisely; on CUDA the hardware approximations err by
    ~2^-21 (sin, cos) and 2^-22 in log2 u, which moves r by up to ~5e-4 only where r ~ 0."""
    for seed, rows, cols in [(2024, 3, 37), (2**40 + 5, 2, 8)]:
        got = philox_eps(seed, rows, cols, device=device).double().cpu().numpy()
        want = reference_eps(seed, rows, cols)
        err = np.abs(got - want)
        if device == "cpu":
            assert np.allclose(got, want, rtol=1e-5, atol=2e-6), err.max()
        else:
            assert err.max() < 1e-3 and np.median(err) < 2e-6, (err.max(), np.median(err))


def test_eps_statistics(device):
    """eps ~ N(0, I): moments, coverage, no correlation across rows, columns or seeds.

    N = 65536 samples; every check allows 5 standard errors of its estimator.
    """
    B, D = 512, 128
    eps = philox_eps(2024, B, D, device=device).double().cpu()
    n = eps.numel()
    se = 1.0 / math.sqrt(n)
    assert abs(eps.mean()) < 5 * se
    assert abs(eps.var() - 1.0) < 5 * math.sqrt(2.0) * se  # Var(s^2) = 2 / N for a normal
    assert abs(eps.pow(4).mean() - 3.0) < 5 * math.sqrt(96.0) * se  # Var(x^4) = 105 - 9
    p1 = math.erf(1 / math.sqrt(2))  # P(|x| < 1) = 0.6827
    assert abs((eps.abs() < 1).double().mean() - p1) < 5 * math.sqrt(p1 * (1 - p1)) * se
    # Lag-k products have mean 0 and sd 1 for independent N(0,1): neighbours within a Philox
    # group (k = 1..3), across groups (k = 4, 5) and across rows.
    for k in (1, 2, 3, 4, 5):
        assert abs((eps[:, :-k] * eps[:, k:]).mean()) < 5 / math.sqrt(B * (D - k)), k
    assert abs((eps[:-1] * eps[1:]).mean()) < 5 / math.sqrt((B - 1) * D)
    # Box-Muller pairs share a radius: their squares must still be uncorrelated (sd 2 each).
    sq = eps.square() - 1
    assert abs((sq[:, :-1] * sq[:, 1:]).mean()) < 5 * 2 / math.sqrt(B * (D - 1))
    _, p = ks_normal(eps)
    assert p > 1e-3, p
    other = philox_eps(2025, B, D, device=device).double().cpu()
    assert abs((eps * other).mean()) < 5 * se
    # Per-column and per-row means: each ~ N(0, 1/count), so their spread is ~1/sqrt(count).
    assert abs(eps.mean(0).std() * math.sqrt(B) - 1) < 5 / math.sqrt(2 * D)
    assert abs(eps.mean(1).std() * math.sqrt(D) - 1) < 5 / math.sqrt(2 * B)


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (4, 37)])
def test_gradients_match_reference_autograd(device, dtype, shape):
    mu, logvar = make_inputs(shape, device, dtype, requires_grad=True)
    z, kl = reparameterize_kl(mu, logvar, seed=31)
    g = torch.Generator().manual_seed(1)
    # grad_z reaches the op in z's dtype: round w to it so both sides see the same grad.
    w = torch.randn(shape, generator=g).to(device=device, dtype=dtype).float()
    v = torch.randn(shape[:-1], generator=g).to(device)
    ((z.float() * w).sum() + (kl * v).sum()).backward()

    mu_r, lv_r = (t.detach().float().requires_grad_() for t in (mu, logvar))
    z_r, kl_r = reference(mu_r, lv_r, kernel_eps(31, shape, device))
    ((z_r * w).sum() + (kl_r * v).sum()).backward()
    assert mu.grad.dtype == dtype and logvar.grad.dtype == dtype
    torch.testing.assert_close(mu.grad.float(), mu_r.grad, rtol=ULP[dtype], atol=1e-5)
    torch.testing.assert_close(logvar.grad.float(), lv_r.grad, rtol=ULP[dtype], atol=1e-5)


def test_gradients_with_one_output_unused(device):
    """Only z or only kl feeds the loss: the other upstream grad is None (or zeros)."""
    mu, logvar = make_inputs((3, 12), device, requires_grad=True)
    eps = philox_eps(4, 3, 12, device=device)
    z, _ = reparameterize_kl(mu, logvar, seed=4)
    z.sum().backward()  # grad_z is an expanded (stride 0) tensor of ones
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar.grad, 0.5 * eps * torch.exp(0.5 * logvar.detach()))
    mu.grad = logvar.grad = None
    _, kl = reparameterize_kl(mu, logvar, seed=4)
    kl.sum().backward()
    torch.testing.assert_close(mu.grad, mu.detach())
    torch.testing.assert_close(logvar.grad, 0.5 * (logvar.detach().exp() - 1))


def test_backward_op_with_none_grads(device):
    mu, logvar = make_inputs((3, 12), device)
    seed = torch.tensor(9)
    eps = philox_eps(9, 3, 12, device=device)
    gz = torch.randn(3, 12, device=device)
    gkl = torch.randn(3, device=device)
    bwd = torch.ops.fastvae.reparameterize_kl_backward
    dmu, dlv = bwd(mu, logvar, seed, gz, None)
    torch.testing.assert_close(dmu, gz)
    torch.testing.assert_close(dlv, 0.5 * gz * eps * torch.exp(0.5 * logvar))
    dmu, dlv = bwd(mu, logvar, seed, None, gkl)
    torch.testing.assert_close(dmu, gkl[:, None] * mu)
    torch.testing.assert_close(dlv, 0.5 * gkl[:, None] * (logvar.exp() - 1))


def test_non_contiguous_inputs(device):
    base_mu, base_lv = make_inputs((40, 24), device)
    mu, logvar = base_mu.t()[:, ::2], base_lv[::2].t()  # (24, 20) views with odd strides
    assert not mu.is_contiguous() and not logvar.is_contiguous()
    mu_c, lv_c = mu.contiguous(), logvar.contiguous()
    for m, lv in ((mu, logvar), (mu_c, lv_c)):
        m.requires_grad_()
        lv.requires_grad_()
    z, kl = reparameterize_kl(mu, logvar, seed=3)
    z_c, kl_c = reparameterize_kl(mu_c, lv_c, seed=3)
    assert torch.equal(z, z_c)
    torch.testing.assert_close(kl, kl_c)  # on GPU the row sum's order may follow the layout
    w = torch.randn(24, 20, device=device).t().contiguous().t()  # non-contiguous grad_z
    ((z * w).sum() + kl.sum()).backward()
    ((z_c * w).sum() + kl_c.sum()).backward()
    assert torch.equal(mu.grad, mu_c.grad) and torch.equal(logvar.grad, lv_c.grad)


def test_eps_not_saved_for_backward(device):
    """Autograd keeps mu, logvar and the seed: nothing else of size B x D. An int seed rides on
    the autograd context (no tensor per call); a seed tensor on mu's device (the kind CUDA
    graphs use, read by the kernel) is saved as one more element."""
    B, D = 6, 20
    mu, logvar = make_inputs((B, D), device, requires_grad=True)

    def saved_by(fn):
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn()
        loss.backward()
        return saved

    def with_int_seed():
        z, kl = reparameterize_kl(mu, logvar, seed=1, reduction="mean")
        return z.square().sum() + kl

    saved = saved_by(with_int_seed)
    big = [s for s in saved if math.prod(s[0]) >= B * D]
    # z.square() saves z itself (that is the caller's op); the fused op saves mu and logvar.
    assert sorted(big) == sorted([((B, D), torch.float32)] * 3), saved
    assert sum(math.prod(s[0]) for s in saved) <= 3 * B * D + 1, saved
    assert mu.grad is not None and logvar.grad is not None
    grads = mu.grad.clone(), logvar.grad.clone()
    mu.grad = logvar.grad = None

    def with_tensor_seed():
        z, kl = rk.ReparamKLFunction.apply(mu, logvar, torch.tensor(1, device=device))
        return z.square().sum() + kl.mean()

    saved = saved_by(with_tensor_seed)
    assert sorted(saved) == sorted([((B, D), torch.float32)] * 3 + [((), torch.int64)]), saved
    assert torch.equal(mu.grad, grads[0]) and torch.equal(logvar.grad, grads[1])


# ------------------------------------------------------------------------------------------
# Fallback, validation, dispatch, torch.library / torch.compile
# ------------------------------------------------------------------------------------------


def _penalised_grads(op, mu, logvar):
    """d/d(mu, logvar) of kl.sum() + z.sum() + |d kl.sum() / d logvar|^2 + |d (z w).sum() / d mu|^2
    (a gradient penalty: needs the op's second derivatives)."""
    w = torch.linspace(-1.0, 1.0, mu.shape[-1], device=mu.device)
    z, kl = op(mu, logvar)
    (g_lv,) = torch.autograd.grad(kl.sum(), logvar, create_graph=True)
    (g_mu,) = torch.autograd.grad((z * w).sum(), mu, create_graph=True)
    loss = kl.sum() + z.sum() + (g_lv**2).sum() + (g_mu * mu).sum()
    return torch.autograd.grad(loss, (mu, logvar))


def _second_derivatives_match(mu, logvar, eps, seed):
    fused = _penalised_grads(lambda m, l: reparameterize_kl(m, l, seed=seed), mu, logvar)
    ref = _penalised_grads(lambda m, l: reference(m, l, eps), mu, logvar)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_second_derivatives_under_create_graph(device):
    """create_graph=True: the gradients are differentiable again (they dropped the
    second-order terms silently before)."""
    mu, logvar = make_inputs((3, 2, 8), device, requires_grad=True)
    _second_derivatives_match(mu, logvar, kernel_eps(5, (3, 2, 8), device), 5)


def test_second_derivatives_under_create_graph_fallback(no_interpret):
    mu, logvar = make_inputs((3, 2, 8), "cpu", requires_grad=True)
    _second_derivatives_match(mu, logvar, rk._fallback_eps(5, (6, 8), "cpu").view(3, 2, 8), 5)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 6), (4, 6)])
def test_outputs_take_in_place_ops_in_any_shape(shape, no_interpret):
    """z and kl are not views of a flattened result: in-place ops on them work under
    autograd (they raised for 1-D and N-D inputs)."""
    mu, logvar = make_inputs(shape, "cpu", requires_grad=True)
    z, kl = reparameterize_kl(mu, logvar, seed=1)
    assert z._base is None and kl._base is None
    z.clamp_(-3, 3)
    kl.mul_(0.5)
    (z.sum() + kl.sum()).backward()
    assert mu.grad.shape == shape


def test_transforms_without_a_derivative_rule_raise_instead_of_dropping_tangents(no_interpret):
    import torch.autograd.forward_ad as fwAD

    mu, logvar, tangent = (torch.randn(3, 8) for _ in range(3))
    with fwAD.dual_level():  # dual tensors do not require grad: the raw kernel dropped tangents
        with pytest.raises(RuntimeError, match="jvp"):
            reparameterize_kl(fwAD.make_dual(mu, tangent), logvar, seed=1)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.vmap(lambda m: reparameterize_kl(m, m, seed=1)[1], randomness="different")(mu)


def test_fallback_noise_uses_all_64_bits_of_the_seed(no_interpret):
    mu = torch.zeros(2, 8)
    first = reparameterize_kl(mu, mu, seed=3)[0]
    for seed in (3 + 2**32, 3 + 5 * 2**40):
        assert not torch.equal(first, reparameterize_kl(mu, mu, seed=seed)[0])
    assert torch.equal(first, reparameterize_kl(mu, mu, seed=np.int64(3))[0])


def test_torch_fallback_without_interpreter(no_interpret):
    assert not fk.kernel_available(torch.device("cpu"), torch.float32)
    mu, logvar = make_inputs((5, 9), "cpu", requires_grad=True)
    z, kl = reparameterize_kl(mu, logvar, seed=17)
    eps = rk._fallback_eps(17, (5, 9), "cpu")
    z_ref, kl_ref = reference(mu.detach(), logvar.detach(), eps)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(kl, kl_ref)
    assert torch.equal(reparameterize_kl(mu, logvar, seed=17)[0], z)
    (z.sum() + kl.sum()).backward()
    torch.testing.assert_close(mu.grad, 1 + mu.detach())
    lv = logvar.detach()
    torch.testing.assert_close(logvar.grad, 0.5 * eps * torch.exp(0.5 * lv) + 0.5 * (lv.exp() - 1))


def test_float64_uses_torch_path(device):
    g = torch.Generator().manual_seed(0)
    mu, logvar = (torch.randn(3, 5, generator=g, dtype=torch.float64).to(device) for _ in "ab")
    z, kl = reparameterize_kl(mu, logvar, seed=1)
    assert z.dtype == torch.float64 and kl.dtype == torch.float64
    torch.testing.assert_close(kl, kl_standard_normal(mu, logvar))


def test_empty_batch(device):
    mu = torch.zeros(0, 8, device=device, requires_grad=True)
    z, kl = reparameterize_kl(mu, mu, seed=0)
    assert z.shape == (0, 8) and kl.shape == (0,)


def test_input_validation():
    mu = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        reparameterize_kl(mu, torch.zeros(2, 4))
    with pytest.raises(ValueError):
        reparameterize_kl(mu, mu, reduction="batchmean")
    with pytest.raises(ValueError):
        reparameterize_kl(mu, mu, seed=-1)
    with pytest.raises(ValueError):
        reparameterize_kl(torch.zeros(()), torch.zeros(()))
    for seed in (3.9, "3", True, torch.tensor(True), torch.tensor([1, 2])):  # not truncated to 3 / 1
        with pytest.raises(ValueError, match="seed"):
            reparameterize_kl(mu, mu, seed=seed)
    for dtype in (torch.int64, torch.complex64):  # int z had its noise truncated away
        with pytest.raises(ValueError, match="floating point"):
            reparameterize_kl(mu.to(dtype), mu.to(dtype), seed=0)
    z, kl = reparameterize_kl(torch.zeros(2, 3, 0), torch.zeros(2, 3, 0), seed=0)  # D = 0
    assert z.shape == (2, 3, 0) and kl.shape == (2, 3) and not kl.any()


def test_dispatch_from_fastvae_reparam(device):
    from fastvae.reparam import reparameterize_kl as dispatch

    mu, logvar = make_inputs((4, 6), device)
    torch.manual_seed(3)
    z1, kl1 = dispatch(mu, logvar)
    torch.manual_seed(3)
    z2, kl2 = dispatch(mu, logvar)
    assert torch.equal(z1, z2) and kl1.shape == (4,)
    torch.testing.assert_close(kl1, kl_standard_normal(mu, logvar))


def test_opcheck_fallback(no_interpret):
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
    mu, logvar = make_inputs((4, 6), "cpu", requires_grad=True)
    seed = torch.tensor(5)
    torch.library.opcheck(torch.ops.fastvae.reparameterize_kl.default, (mu, logvar, seed))
    gz, gkl = torch.randn(4, 6), torch.randn(4)
    args = (mu.detach(), logvar.detach(), seed, gz, gkl)
    torch.library.opcheck(torch.ops.fastvae.reparameterize_kl_backward.default, args)


def test_torch_path_refuses_what_the_kernel_refuses(no_interpret):
    """fastvae.reparam's torch path takes the kernel's contract: no broadcast or promoted
    inputs that would train on a CPU and fail on a GPU."""
    from fastvae.reparam import reparameterize_kl as dispatched

    mu = torch.randn(3, 5)
    for logvar, match in ((torch.randn(1, 5), "same shape"), (torch.randn(3, 5).half(), "same shape"),
                          (torch.randn(3, 5, dtype=torch.float64), "same shape")):
        for backend in ("auto", "torch"):
            with pytest.raises(ValueError, match=match):
                dispatched(mu, logvar, backend=backend)
    with pytest.raises(ValueError, match="floating point"):
        dispatched(torch.ones(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one dimension"):
        dispatched(torch.tensor(0.0), torch.tensor(0.0))
    z, kl = dispatched(mu.double(), mu.double())  # fp64 goes through the torch path
    assert z.dtype == kl.dtype == torch.float64


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes", "Y", "0", "", "off", "2", " 1", "t"])
def test_interpreter_switch_reads_like_triton(monkeypatch, value):
    """The dispatcher reads TRITON_INTERPRET as triton does (it said no to 'true', which
    triton interprets: the kernel refused to run while triton would have run it)."""
    from triton._C.libtriton import getenv_bool

    from fastvae.reparam import interpret_requested

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpret_requested() is getenv_bool("TRITON_INTERPRET", False)


def test_op_takes_two_dimensional_inputs_only(no_interpret):
    """The registered op's fake kernel says kl is (B,): N-D inputs (kl (B, ...)) are refused
    rather than traced with a wrong shape (the entry point flattens them)."""
    mu = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        torch.ops.fastvae.reparameterize_kl(mu, mu, torch.tensor(1))


def test_compiled_code_checks_a_host_seed_like_eager_code(no_interpret):
    torch._dynamo.reset()
    mu = torch.zeros(1, 4)
    compiled = torch.compile(lambda m, s: reparameterize_kl(m, m, seed=s)[0], backend="aot_eager",
                             fullgraph=True)
    for bad in (-1, 2**63 - 1 + 1):
        seed = torch.tensor(bad if bad < 2**63 else -2**63, dtype=torch.int64)
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
            reparameterize_kl(mu, mu, seed=seed)
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
            compiled(mu, seed)


def test_compile_fullgraph_aot_eager(no_interpret):
    """Dynamo traces the op without graph breaks (fake kernels + registered autograd).

    The op is opaque to the compiler, so the torch path checks the same registration the
    kernel path uses (the kernel path under torch.compile runs on CUDA: the gpu variant below).
    """
    torch._dynamo.reset()

    def loss_fn(mu, logvar, seed):
        z, kl = reparameterize_kl(mu, logvar, seed=seed, reduction="mean")
        return (z * z).sum(-1).mean() + kl

    mu, logvar = make_inputs((4, 8), "cpu", requires_grad=True)
    seed = torch.tensor(13)
    expected = loss_fn(mu, logvar, seed)
    grads = torch.autograd.grad(expected, (mu, logvar))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(mu, logvar, seed)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, (mu, logvar)), grads):
        torch.testing.assert_close(a, b)
    # A new seed tensor is a new input value, not a new graph.
    counter = torch._dynamo.testing.CompileCounter()
    counted = torch.compile(loss_fn, fullgraph=True, backend=counter)
    for s in (1, 2, 3):
        counted(mu, logvar, torch.tensor(s))
    assert counter.frame_count == 1
    # seed=None draws inside the graph; still no graph break.
    unseeded = torch.compile(lambda m, lv: reparameterize_kl(m, lv)[0].sum(), fullgraph=True,
                             backend="aot_eager")
    unseeded(mu, logvar)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.slow),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
])
def test_compile_fullgraph_inductor(no_interpret, device):
    """Inductor around the op (C++ codegen on CPU: slow; the Triton kernel inside the graph on CUDA)."""
    torch._dynamo.reset()

    def loss_fn(mu, logvar, seed):
        z, kl = reparameterize_kl(mu, logvar, seed=seed)
        return torch.tanh(z).sum() + kl.sum()

    mu, logvar = make_inputs((4, 8) if device == "cpu" else (64, 48), device, requires_grad=True)
    seed = torch.tensor(13)
    expected = loss_fn(mu, logvar, seed)
    grads = torch.autograd.grad(expected, (mu, logvar))
    got = torch.compile(loss_fn, fullgraph=True)(mu, logvar, seed)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, (mu, logvar)), grads):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("entry", ["fastvae.reparam", "kernels"])
def test_cuda_graph_replays_draw_fresh_noise(perf_hints, entry):
    """Under torch.compile(mode="reduce-overhead") the step runs as a CUDA graph: the seed is
    drawn on the device inside the graph and read by the kernel, so each replay draws new
    noise (a seed read by the host at capture would freeze eps), and no part is skipped. Both
    through fastvae's dispatcher and by the op's own call (which drew its seed on the CPU)."""
    from torch._dynamo.utils import counters

    from testkit import cuda_graphs_recorded
    from fastvae import reparam

    dispatch = reparam.reparameterize_kl if entry == "fastvae.reparam" else reparameterize_kl

    torch._dynamo.reset()
    counters.clear()

    def step(mu, logvar):
        z, kl = dispatch(mu, logvar)
        return z.float().square().mean(), z, kl

    graphed = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    mu = torch.zeros(4096, 64, device="cuda", requires_grad=True)
    logvar = torch.zeros(4096, 64, device="cuda", requires_grad=True)
    draws = []
    for _ in range(6):  # the first calls warm up and record; the rest replay
        torch.compiler.cudagraph_mark_step_begin()
        loss, z, kl = graphed(mu, logvar)
        (dmu, dlogvar) = torch.autograd.grad(loss, (mu, logvar))
        draws.append(z.detach().clone())
        # d loss / d logvar = mean(z * eps) with std 1: z = eps here, so 2 eps^2 * 0.5 / n
        torch.testing.assert_close(dlogvar, z.detach() ** 2 / z.numel(), rtol=1e-4, atol=1e-9)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert cuda_graphs_recorded() > 0
    for i in range(len(draws)):
        eps = draws[i]
        assert abs(eps.mean().item()) < 0.01 and abs(eps.std().item() - 1) < 0.01
        for j in range(i):
            assert (draws[j] == eps).float().mean() < 1e-3, (i, j)
    assert torch.equal(kl, torch.zeros_like(kl))


def test_rows_beyond_the_backward_grids_second_dimension_are_refused_in_words():
    """CUDA caps a grid's second dimension at 65535 tiles of at most 1024 columns: a longer row
    failed at launch with "invalid argument"; the forward (one program per row block) has no cap."""
    rows_of = 2**26 + 2**16  # > 65535 * 1024
    with pytest.raises(ValueError, match=r"beyond the backward kernel's grid .* backend='torch'"):
        rk._plan(4, rows_of, None, None, 4, {}, two_d=True)
    with pytest.raises(ValueError, match=r"rows: the kernels number rows in int32, .* at most .* split the batch"):
        rk._plan(2**31 + 1, 4, None, None, 4, {}, two_d=False)  # rows numbered in int32
    assert rk._plan(2**31 - 4, 4, None, None, 4, {}, two_d=False)[0][0] * rk._block_sizes(2**31 - 4, 4)[0] <= 2**31
    assert len(rk._plan(4, rows_of, None, None, 4, {}, two_d=False)[0]) == 1
    assert rk._plan(4, 2**20, None, None, 4, {}, two_d=True)[0][1] <= 65535
