"""Closed-form KLs against torch.distributions.kl_divergence, over shapes, dims and dtypes."""

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from fastvae.distributions import (diag_normal_log_prob, kl_diag_normals, kl_mvn,
                                   kl_standard_normal, standard_normal_log_prob)

SHAPES = [(), (5,), (3, 4)]
DIMS = [1, 3, 16]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def diag(mu, logvar):
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


def random_spd(batch, d, dtype, g):
    a = torch.randn(*batch, d, d, dtype=dtype, generator=g)
    return a @ a.transpose(-1, -2) + d * torch.eye(d, dtype=dtype) * 0.5


def test_kl_standard_normal_keeps_its_relative_accuracy_near_the_prior():
    """logvar ~ 1e-3, mu = 0 (a collapsed latent): KL ~ logvar^2 / 4 per dim, lost to
    cancellation in s2 - 1 - log s2 (1% relative error in float32) unless s2 - 1 is expm1."""
    g = torch.Generator().manual_seed(0)
    logvar = 1e-3 * torch.randn(64, 32, generator=g)
    mu = torch.zeros_like(logvar)
    ref = kl_divergence(diag(mu.double(), logvar.double()), diag(mu.double(), mu.double()))
    relative = (kl_standard_normal(mu, logvar).double() - ref).abs() / ref
    assert float(relative.max()) < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_standard_normal_matches_torch(shape, d, dtype):
    g = torch.Generator().manual_seed(d + len(shape))
    mu = torch.randn(*shape, d, dtype=dtype, generator=g) * 2
    logvar = torch.randn(*shape, d, dtype=dtype, generator=g)
    ours = kl_standard_normal(mu, logvar)
    ref = kl_divergence(diag(mu, logvar), diag(torch.zeros_like(mu), torch.zeros_like(logvar)))
    assert ours.shape == shape and ours.dtype == dtype
    torch.testing.assert_close(ours, ref, **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_diag_normals_matches_torch(shape, d, dtype):
    g = torch.Generator().manual_seed(100 + d)
    mq, lq, mp, lp = (torch.randn(*shape, d, dtype=dtype, generator=g) for _ in range(4))
    ours = kl_diag_normals(mq, lq, mp, lp)
    ref = kl_divergence(diag(mq, lq), diag(mp, lp))
    assert ours.shape == shape
    torch.testing.assert_close(ours, ref, **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_mvn_matches_torch(shape, d, dtype):
    g = torch.Generator().manual_seed(200 + d)
    mq, mp = (torch.randn(*shape, d, dtype=dtype, generator=g) for _ in range(2))
    sq, sp = random_spd(shape, d, dtype, g), random_spd(shape, d, dtype, g)
    ours = kl_mvn(mq, sq, mp, sp)
    ref = kl_divergence(MultivariateNormal(mq, sq), MultivariateNormal(mp, sp))
    assert ours.shape == shape and ours.dtype == dtype
    torch.testing.assert_close(ours, ref, **TOL[dtype])


def test_kl_mvn_broadcasts_a_shared_prior():
    g = torch.Generator().manual_seed(7)
    mq = torch.randn(6, 4, dtype=torch.float64, generator=g)
    sq = random_spd((6,), 4, torch.float64, g)
    mp, sp = torch.zeros(4, dtype=torch.float64), random_spd((), 4, torch.float64, g)
    ref = kl_divergence(MultivariateNormal(mq, sq), MultivariateNormal(mp.expand(6, 4), sp.expand(6, 4, 4)))
    torch.testing.assert_close(kl_mvn(mq, sq, mp, sp), ref)


def test_kl_mvn_with_diagonal_covariances_equals_diag_formula():
    g = torch.Generator().manual_seed(3)
    mq, lq, mp, lp = (torch.randn(5, 6, dtype=torch.float64, generator=g) for _ in range(4))
    full = kl_mvn(mq, torch.diag_embed(lq.exp()), mp, torch.diag_embed(lp.exp()))
    torch.testing.assert_close(full, kl_diag_normals(mq, lq, mp, lp))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_properties_nonnegative_zero_iff_equal_asymmetric(dtype):
    g = torch.Generator().manual_seed(11)
    mq, lq, mp, lp = (torch.randn(200, 5, dtype=dtype, generator=g) for _ in range(4))
    assert (kl_diag_normals(mq, lq, mp, lp) >= 0).all()
    assert (kl_standard_normal(mq, lq) >= 0).all()
    torch.testing.assert_close(kl_diag_normals(mq, lq, mq, lq), torch.zeros(200, dtype=dtype))
    torch.testing.assert_close(kl_standard_normal(torch.zeros(3, 5, dtype=dtype), torch.zeros(3, 5, dtype=dtype)),
                               torch.zeros(3, dtype=dtype))
    sq, sp = random_spd((200,), 5, dtype, g), random_spd((200,), 5, dtype, g)
    assert (kl_mvn(mq, sq, mp, sp) >= -1e-5).all()
    torch.testing.assert_close(kl_mvn(mq, sq, mq, sq), torch.zeros(200, dtype=dtype), atol=1e-5, rtol=0)
    forward, backward = kl_diag_normals(mq, lq, mp, lp), kl_diag_normals(mp, lp, mq, lq)
    assert not torch.allclose(forward, backward)
    assert not torch.allclose(kl_mvn(mq, sq, mp, sp), kl_mvn(mp, sp, mq, sq))


def test_kl_mvn_gradients_match_torch():
    g = torch.Generator().manual_seed(5)
    mq = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(3, 4, 4, dtype=torch.float64, generator=g)
    sq = (a @ a.mT + torch.eye(4, dtype=torch.float64)).requires_grad_()
    sp = random_spd((3,), 4, torch.float64, g)
    mp = torch.zeros(3, 4, dtype=torch.float64)
    ours = torch.autograd.grad(kl_mvn(mq, sq, mp, sp).sum(), (mq, sq))
    ref = torch.autograd.grad(kl_divergence(MultivariateNormal(mq, sq), MultivariateNormal(mp, sp)).sum(), (mq, sq))
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)


def test_log_probs_match_torch():
    g = torch.Generator().manual_seed(9)
    x, mu, logvar = (torch.randn(7, 3, dtype=torch.float64, generator=g) for _ in range(3))
    torch.testing.assert_close(diag_normal_log_prob(x, mu, logvar), diag(mu, logvar).log_prob(x))
    torch.testing.assert_close(standard_normal_log_prob(x), diag(torch.zeros_like(mu), torch.zeros_like(mu)).log_prob(x))


def test_kl_mvn_refuses_what_is_no_covariance():
    """cholesky reads only the lower triangle: an asymmetric "covariance" gave the KL of another
    matrix, without a word; not positive-definite was torch's LinAlgError."""
    d = 3
    a = torch.randn(d, d, dtype=torch.float64)
    cov = a @ a.T + torch.eye(d, dtype=torch.float64)
    mu = torch.zeros(d, dtype=torch.float64)
    for bad, words in ((torch.triu(cov), "not symmetric"), (-cov, "not positive-definite"),
                       (cov.new_full((d, d), float("nan")), "NaN or Inf")):
        with pytest.raises(ValueError, match=words):
            kl_mvn(mu, bad, mu, cov)
    with pytest.raises(ValueError, match="one d"):
        kl_mvn(mu, cov, torch.zeros(d + 1, dtype=torch.float64), cov)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        kl_mvn(mu.numpy(), cov, mu, cov)
