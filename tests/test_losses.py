"""Likelihoods against torch.distributions; the reparameterization reference's statistics."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, ContinuousBernoulli, Independent, Normal

from fastvae.losses import (Likelihood, bernoulli_log_likelihood, elbo_terms, free_bits_kl,
                            gaussian_log_likelihood, iwae_bound, kl_weight)
from fastvae.reparam import reparameterize_kl, reparameterize_kl_reference


def test_bernoulli_log_likelihood_matches_torch_on_binary_and_continuous_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    binary = (torch.rand(4, 1, 8, 8, generator=g) > 0.5).double()
    ref = Independent(Bernoulli(logits=logits), 3).log_prob(binary)
    torch.testing.assert_close(bernoulli_log_likelihood(logits, binary).double(), ref, rtol=1e-5, atol=1e-5)
    # continuous targets: -BCE(p, x) = x log p + (1 - x) log(1 - p), not binarized
    x = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64)
    p = torch.sigmoid(logits)
    expected = (x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(-1)
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x).double(), expected, rtol=1e-5, atol=1e-5)
    # and it is not the continuous Bernoulli (which adds a normalizer)
    cb = Independent(ContinuousBernoulli(logits=logits), 3).log_prob(x)
    assert not torch.allclose(bernoulli_log_likelihood(logits, x).double(), cb)


@pytest.mark.parametrize("learn", [False, True])
def test_gaussian_likelihood_matches_torch(learn):
    g = torch.Generator().manual_seed(1)
    mean, x = torch.randn(3, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g)
    lik = Likelihood("gaussian", sigma=0.3, learn_sigma=learn)
    ref = Independent(Normal(mean, 0.3), 3).log_prob(x)
    torch.testing.assert_close(lik.log_prob(mean, x), ref, rtol=1e-5, atol=1e-4)
    assert isinstance(lik.log_scale, torch.nn.Parameter) == learn
    torch.testing.assert_close(lik.mean(mean), mean)
    torch.testing.assert_close(gaussian_log_likelihood(mean, x, torch.tensor(math.log(0.3))), ref, rtol=1e-5, atol=1e-4)


def test_kl_weight_and_free_bits():
    assert kl_weight(0, beta=2.0, warmup_steps=0) == 2.0
    assert kl_weight(5, beta=2.0, warmup_steps=10) == pytest.approx(1.0)
    assert kl_weight(50, beta=2.0, warmup_steps=10) == 2.0
    kl_per_dim = torch.tensor([[0.1, 2.0], [0.3, 4.0]])  # batch means 0.2 and 3.0
    assert free_bits_kl(kl_per_dim, 0.5).item() == pytest.approx(0.5 + 3.0)
    terms = elbo_terms(torch.tensor([10.0, 20.0]), torch.tensor([1.0, 3.0]), beta=0.5)
    assert terms.recon.item() == 15.0 and terms.kl.item() == 2.0
    assert terms.loss.item() == 16.0 and terms.neg_elbo.item() == 17.0
    # a tensor KL weight (what CUDA-graphed training passes during a warm-up) weighs the same
    for beta in (0.5, 1.0):
        as_tensor = elbo_terms(torch.tensor([10.0, 20.0]), torch.tensor([1.0, 3.0]), beta=torch.tensor(beta))
        assert as_tensor.loss.item() == 15.0 + 2.0 * beta


def test_iwae_bound_is_logmeanexp():
    w = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 1.0]])
    expected = torch.log(torch.exp(w).mean(0))
    torch.testing.assert_close(iwae_bound(w), expected)


def test_reference_reparameterization_given_eps_and_statistics():
    g = torch.Generator().manual_seed(2)
    mu, logvar, eps = (torch.randn(5, 3, generator=g) for _ in range(3))
    z, kl = reparameterize_kl_reference(mu, logvar, eps=eps)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps)
    # z ~ N(mu, exp(logvar)): check the moments of many draws
    mu = torch.tensor([[1.0, -2.0]]).expand(200_000, 2)
    logvar = torch.tensor([[0.0, math.log(4.0)]]).expand(200_000, 2)
    z, _ = reparameterize_kl(mu, logvar, torch.Generator().manual_seed(3), backend="torch")
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 2.0]), atol=0.02, rtol=0)


def test_reparam_backend_resolves_to_torch_on_a_plain_cpu(monkeypatch):
    from fastvae.errors import FastVAEError
    from fastvae.reparam import resolve_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch" and resolve_backend("torch", cpu) == "torch"
    with pytest.raises(FastVAEError, match="--reparam triton"):
        resolve_backend("triton", cpu)
    # an unknown backend was taken as torch, silently
    from fastvae.reparam import reparameterize_kl as dispatch

    for call in (lambda: resolve_backend("bogus", cpu), lambda: dispatch(torch.zeros(2, 3), torch.zeros(2, 3),
                                                                         backend="bogus")):
        with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'triton', got 'bogus'"):
            call()


@pytest.mark.parametrize("learn", [False, True])
def test_likelihood_loads_state_saved_with_a_scalar_log_scale(learn):
    """Checkpoints written before log_scale became shape (1,) (for FSDP) still load."""
    lik = Likelihood("gaussian", sigma=0.3, learn_sigma=learn)
    lik.load_state_dict({"log_scale": torch.tensor(math.log(0.7))})
    assert lik.log_scale.shape == (1,)
    torch.testing.assert_close(lik.log_scale.exp(), torch.tensor([0.7]))


def test_float64_inputs_keep_float64_likelihoods():
    """A 64-true run's likelihoods were computed in float32 (an error of ~1e-3 nats on a
    3072-pixel Gaussian term); half precision still becomes float32."""
    from fastvae.losses import laplace_log_likelihood

    g = torch.Generator().manual_seed(1)
    mean, x = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64), torch.rand(3, 3, 32, 32, generator=g,
                                                                                     dtype=torch.float64)
    log_scale = torch.tensor(math.log(0.01), dtype=torch.float64)
    got = gaussian_log_likelihood(mean, x, log_scale)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, Independent(Normal(mean, 0.01), 3).log_prob(x), rtol=1e-12, atol=1e-9)
    from torch.distributions import Laplace

    torch.testing.assert_close(laplace_log_likelihood(mean, x, log_scale),
                               Independent(Laplace(mean, 0.01), 3).log_prob(x), rtol=1e-12, atol=1e-9)
    logits = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x),
                               (x * torch.sigmoid(logits).log() + (1 - x) * torch.sigmoid(-logits).log()).flatten(1).sum(-1),
                               rtol=1e-12, atol=1e-9)
    assert gaussian_log_likelihood(mean.bfloat16(), x.bfloat16(), log_scale.bfloat16()).dtype == torch.float32


def test_iwae_log_q_from_the_noise_is_exact_at_tiny_variances():
    """log q(z|x) from z - mu lost its digits where exp(logvar / 2) is far below mu's float32
    spacing (mu = 3, logvar = -30: ~1 nat over 64 dims); from eps it is exact."""
    from fastvae.losses import iwae_log_weights

    g = torch.Generator().manual_seed(2)
    mu = torch.full((5, 64), 3.0)
    eps = torch.randn(4, 5, 64, generator=g)
    recon_ll = torch.zeros(4, 5)
    for level in (-10.0, -20.0, -30.0):
        logvar = torch.full((5, 64), level)
        z = mu + torch.exp(0.5 * logvar) * eps
        exact = (Independent(Normal(torch.zeros(64, dtype=torch.float64), 1.0), 1).log_prob(z.double())
                 - (-0.5 * (math.log(2 * math.pi) + level + eps.double().pow(2))).sum(-1))
        got = iwae_log_weights(recon_ll, z, mu, logvar, eps=eps)
        torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-3)
    assert (iwae_log_weights(recon_ll, z, mu, logvar).double() - exact).abs().max() > 0.1  # without eps
