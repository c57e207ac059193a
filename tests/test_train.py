"""Training: the objective (beta, KL warm-up, free bits, IWAE) and the loop (learning, resume, seeds)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from testkit import CheckpointSteps, Crash, max_weight_diff, metrics_without_time, state_dict_of
from fastvae import run_folder
from fastvae.errors import FastVAEError
from fastvae.distributions import kl_standard_normal
from fastvae.losses import (bernoulli_log_likelihood, elbo_terms, free_bits_kl, iwae_bound,
                            iwae_log_weights, kl_weight)
from fastvae.checkpoint import load
from fastvae.data import load_dataset
from fastvae.trainer import train

# ----------------------------------------------------------------------------- objective, by hand


@pytest.mark.parametrize("step, beta, warmup, expected", [
    (0, 1.0, 100, 0.0),
    (25, 1.0, 100, 0.25),
    (50, 2.0, 100, 1.0),
    (100, 2.0, 100, 2.0),
    (10_000, 2.0, 100, 2.0),   # stays at beta after the warm-up
    (0, 0.5, 0, 0.5),          # no warm-up: plain beta from the first step
    (7, 3.0, 0, 3.0),
])
def test_kl_weight(step, beta, warmup, expected):
    assert kl_weight(step, beta, warmup) == pytest.approx(expected, abs=1e-12)


def test_free_bits_kl_by_hand():
    kl_per_dim = torch.tensor([[0.1, 2.0, 0.0], [0.3, 1.0, 0.4]])
    # batch means per dim: 0.2, 1.5, 0.2 -> clamped at 0.5: 0.5, 1.5, 0.5
    assert float(free_bits_kl(kl_per_dim, 0.5)) == pytest.approx(2.5)
    assert float(free_bits_kl(kl_per_dim, 0.0)) == pytest.approx(1.9)
    assert float(free_bits_kl(kl_per_dim, 2.0)) == pytest.approx(6.0)


def test_elbo_terms_beta_and_free_bits_by_hand():
    recon_nll = torch.tensor([10.0, 20.0])  # -log p(x|z) per example
    kl_per_dim = torch.tensor([[0.2, 0.8], [0.6, 2.4]], requires_grad=True)
    kl = kl_per_dim.sum(-1)  # 1.0, 3.0
    plain = elbo_terms(recon_nll, kl)
    assert float(plain.recon) == pytest.approx(15.0) and float(plain.kl) == pytest.approx(2.0)
    assert float(plain.loss.detach()) == pytest.approx(17.0)
    assert float(plain.neg_elbo.detach()) == pytest.approx(17.0)

    beta = elbo_terms(recon_nll, kl, beta=0.5)
    assert float(beta.loss.detach()) == pytest.approx(15.0 + 0.5 * 2.0)
    assert float(beta.neg_elbo.detach()) == pytest.approx(17.0)  # the reported bound ignores beta

    # free bits 1.5 nats/dim: per-dim means 0.4 -> 1.5, 1.6 stays: 3.1
    fb = elbo_terms(recon_nll, kl, beta=0.5, kl_per_dim=kl_per_dim, free_bits=1.5)
    assert float(fb.loss.detach()) == pytest.approx(15.0 + 0.5 * 3.1)
    assert float(fb.kl) == pytest.approx(2.0)  # reported KL is the true KL
    fb.loss.backward()
    # dimension 0 sits under its free bits: no gradient pushes its KL down
    assert torch.allclose(kl_per_dim.grad, torch.tensor([[0.0, 0.25], [0.0, 0.25]]))
    with pytest.raises(ValueError):
        elbo_terms(recon_nll, kl, free_bits=1.0)


def test_kl_standard_normal_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(kl_standard_normal(mu, logvar), kl_divergence(q, p).sum(-1))


def test_bernoulli_log_likelihood_continuous_targets():
    logits = torch.tensor([[0.3, -1.2, 2.0]])
    x = torch.tensor([[0.0, 0.25, 1.0]])
    p = torch.sigmoid(logits)
    expected = (x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum(-1)
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x), expected)


def test_vae_forward_beta_scales_only_the_kl(digits):
    from fastvae.models import build_model

    torch.manual_seed(0)
    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 16, "latent_dim": 3})
    x = digits.train[:32]
    terms = {b: model(x, torch.Generator().manual_seed(1), beta=b) for b in (0.0, 1.0, 4.0)}
    for b, t in terms.items():
        torch.testing.assert_close(t.recon, terms[0.0].recon)  # same eps: same recon
        torch.testing.assert_close(t.loss, t.recon + b * t.kl)
    assert float(terms[0.0].loss.detach()) == pytest.approx(float(terms[0.0].recon))


# ----------------------------------------------------------------------------- IWAE


def _toy_posterior(digits, n=64):
    from fastvae.models import build_model

    torch.manual_seed(0)
    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 16, "latent_dim": 3}).eval()
    x = digits.test[:n]
    with torch.no_grad():
        mu, logvar = model.encode(x)
    return model, x, mu, logvar


def _log_weights(model, x, mu, logvar, eps):
    """(K, B) log weights computed with torch.distributions, independently of fastvae.losses."""
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps
    with torch.no_grad():
        k, b = eps.shape[:2]
        logits = model.decode(z.flatten(0, 1))
        xk = x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1)
        recon_ll = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, xk, reduction="none").flatten(1).sum(-1).view(k, b)
    log_p = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_q = Normal(mu, std).log_prob(z).sum(-1)
    return recon_ll, z, recon_ll + log_p - log_q


def test_iwae_k1_equals_single_sample_elbo(digits):
    model, x, mu, logvar = _toy_posterior(digits)
    eps = torch.randn((1, *mu.shape), generator=torch.Generator().manual_seed(0))
    recon_ll, z, reference = _log_weights(model, x, mu, logvar, eps)
    log_w = iwae_log_weights(recon_ll, z, mu, logvar)
    torch.testing.assert_close(log_w, reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(iwae_bound(log_w), reference[0], rtol=1e-5, atol=1e-4)


def test_iwae_k1_is_unbiased_for_the_closed_form_elbo(digits):
    # with K = 1 the bound is the ELBO with a sampled KL; averaged over many eps it meets the
    # closed-form ELBO (log p(x|z) averaged the same way, minus the analytic KL)
    model, x, mu, logvar = _toy_posterior(digits, n=16)
    eps = torch.randn((4000, *mu.shape), generator=torch.Generator().manual_seed(1))
    recon_ll, z, _ = _log_weights(model, x, mu, logvar, eps)
    per_sample = torch.stack([iwae_bound(iwae_log_weights(recon_ll[i:i + 1], z[i:i + 1], mu, logvar))
                              for i in range(len(eps))])
    closed = recon_ll - kl_standard_normal(mu, logvar)
    diff = (per_sample - closed).mean(0)  # per example, over 4000 draws
    stderr = (per_sample - closed).std(0) / math.sqrt(len(eps))
    assert (diff.abs() < 5 * stderr + 1e-3).all(), (diff, stderr)


def test_iwae_bound_tightens_with_k(digits):
    model, x, mu, logvar = _toy_posterior(digits)
    logvar = logvar + 2.0  # a poor, too-wide q: the ELBO is loose and importance weighting helps
    g = torch.Generator().manual_seed(2)
    means = {}
    for k in (1, 10, 100):
        eps = torch.randn((k, *mu.shape), generator=g)
        recon_ll, z, _ = _log_weights(model, x, mu, logvar, eps)
        means[k] = float(iwae_bound(iwae_log_weights(recon_ll, z, mu, logvar)).mean())
    eps = torch.randn((1, *mu.shape), generator=g)
    recon_ll, _, _ = _log_weights(model, x, mu, logvar, eps)
    elbo = float((recon_ll[0] - kl_standard_normal(mu, logvar)).mean())
    # measured: ELBO -53.6, K=1 -52.3, K=10 -45.9, K=100 -45.4 (64 test digits, fixed seeds)
    assert abs(means[1] - elbo) < 3.0, (elbo, means)
    assert means[10] > elbo + 4.0 and means[100] > means[10] + 0.2, (elbo, means)
    # log-mean-exp of the weights lies between their mean (Jensen) and their max
    log_w = torch.randn(50, 7, generator=g) * 5
    assert (iwae_bound(log_w) <= log_w.max(0).values + 1e-6).all()
    assert (iwae_bound(log_w) >= log_w.mean(0) - 1e-6).all()
    torch.testing.assert_close(iwae_bound(torch.full((8, 3), -2.5)), torch.full((3,), -2.5))


# ----------------------------------------------------------------------------- the loop


def test_loss_decreases_on_digits(make_config):
    result = train(make_config(epochs=4))
    losses = [row["train_loss"] for row in result.metrics]
    tests = [row["test_neg_elbo"] for row in result.metrics]
    assert all(math.isfinite(v) for v in losses + tests)
    assert losses[-1] < losses[0] - 2.0, losses
    assert tests[-1] < tests[0] - 2.0, tests
    assert [row["epoch"] for row in result.metrics] == [1, 2, 3, 4]
    assert [row["step"] for row in result.metrics] == [24, 48, 72, 96]  # ceil(1500 / 64) per epoch
    assert result.epochs == 4 and result.steps == 96 and not result.interrupted


def test_threads_hold_while_training_and_the_callers_come_back(make_config):
    """--threads N: torch's CPU threads during the run (two threads on two cores made steps
    2-8x slower when another process kept one core busy); the caller's setting after it."""
    seen = []

    class Threads:
        def on_train_batch_end(self, trainer, index):
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    wanted = 3 if before != 3 else 2
    train(make_config(epochs=1, threads=wanted), callbacks=[Threads()])
    assert set(seen) == {wanted} and torch.get_num_threads() == before
    with pytest.raises(FastVAEError, match="--threads"):
        make_config(threads=-1).validate()


@pytest.mark.parametrize("settings,said", [
    ({"precision": "16-true"}, "--precision 16-true is not supported: it keeps Adam's moments in float16"),
    ({"strategy": "dp"}, "--strategy dp (DataParallel: one process drives every device) is not supported: use ddp"),
    ({"strategy": "fsdp", "precision": "64-true"}, "--strategy fsdp does not take --precision 64-true"),
])
def test_precisions_and_strategies_that_train_badly_or_not_at_all_are_refused(settings, said, capsys):
    """16-true trained to test -ELBO 262 (32-true: 37) with exit 0: Adam's second moment
    underflows in float16; dp became ddp on a CPU with Lightning's raw warning; fsdp with
    64-true failed with Lightning's words. --help offers none of them."""
    from fastvae.cli import build_parser, main
    from fastvae.config import TrainConfig

    with pytest.raises(FastVAEError) as refused:
        TrainConfig(**settings).validate()
    assert str(refused.value).startswith(said)
    flags = [part for name, value in settings.items() for part in (f"--{name}", value)]
    capsys.readouterr()  # the command line says the same, in one line (argparse takes the names)
    assert main(["train", *flags, "--epochs", "1", "--out", "never"]) == 2 and not Path("never").exists()
    assert capsys.readouterr().err.strip() == f"fastvae train: error: {refused.value}"
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert ",16-true" not in help_text and ",dp}" not in help_text


def test_settings_of_the_wrong_type_are_refused_not_read_by_truthiness(tmp_path, make_config):
    """overwrite="no" replaced a run (a non-empty string is true), pictures="no" drew them,
    kl_warmup_steps="5" was a TypeError in a comparison; numpy numbers and paths are fine."""
    import numpy as np

    train(make_config(epochs=1))
    for call, words in ((lambda: train(make_config(epochs=1), overwrite="no"), "overwrite must be True or False"),
                        (lambda: train(make_config(epochs=2), resume="no"), "resume must be True or False"),
                        (lambda: train(make_config(epochs=1, pictures="no")), "'pictures' must be True or False"),
                        (lambda: train(make_config(epochs=1, kl_warmup_steps="5")), "'kl_warmup_steps' must be an integer, got '5'"),
                        (lambda: train(make_config(epochs=1, lr=True)), "'lr' must be a number, got True"),
                        (lambda: train(make_config(epochs=1, loggers=["csv"])), "'loggers' must be a string")):
        with pytest.raises(FastVAEError, match=words):
            call()
    assert load(make_config().out) is not None  # the run is still there
    with pytest.raises(TypeError, match="TrainConfig"):
        train({"epochs": 1})
    config = make_config(out=tmp_path / "typed", epochs=np.int64(1), lr=np.float32(1e-3), iwae_k=np.int64(2)).validate()
    assert type(config.epochs) is int and type(config.lr) is float and config.out == str(tmp_path / "typed")


def test_train_and_load_leave_the_callers_random_streams_alone(make_config):
    """train() seeded torch, numpy and random from its config (Fabric's seed_everything) and
    left them so; load() drew the initial weights it then replaced from torch's generator."""
    import os
    import random

    import numpy as np

    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    env = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    train(make_config(epochs=1))
    load(make_config().out)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert {k: os.environ.get(k) for k in env} == env
    if not torch.cuda.is_available():
        with pytest.raises(FastVAEError, match="no CUDA device; load with map_location='cpu'"):
            load(make_config().out, map_location="cuda")


def test_model_sample_checks_n(digits):
    from fastvae.models import build_model

    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 16, "latent_dim": 4})
    assert model.sample(0).shape == (0, 1, 8, 8) and model.sample(np.int64(2)).shape == (2, 1, 8, 8)
    for n in (-1, 2.0, "2", True):
        with pytest.raises(ValueError, match="n must be a non-negative integer"):
            model.sample(n)


def test_resume_equals_straight_run(tmp_path, make_config):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_config(out=straight, epochs=4))
    train(make_config(out=split, epochs=2))
    first_half = state_dict_of(split)
    train(make_config(out=split, epochs=4), resume=True)
    assert max_weight_diff(state_dict_of(straight), state_dict_of(split)) <= 1e-6
    assert max_weight_diff(first_half, state_dict_of(split)) > 1e-4  # it did train on
    assert metrics_without_time(straight) == metrics_without_time(split)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (4, 96)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=1e-9)


def test_mid_epoch_checkpoints_change_nothing_and_a_crash_resumes_from_the_last(tmp_path, make_config):
    """--checkpoint-every: a checkpoint every N steps, mid-epoch, besides each epoch's end; a
    run lost between two of them resumes from the last one and ends as the straight run."""
    from fastvae.checkpoint import read_checkpoint

    straight, periodic = tmp_path / "straight", tmp_path / "periodic"
    train(make_config(out=straight))  # 2 epochs of 24 steps
    seen = CheckpointSteps(crash_at=33)
    with pytest.raises(Crash):
        train(make_config(out=periodic, checkpoint_every=5), callbacks=[seen])
    assert seen.saves() == [5, 10, 15, 20, 24, 25, 30]  # 24: epoch 1's end
    state = read_checkpoint(periodic)
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 6, 30)
    assert state["partial"][2] == 6 * 64  # the examples of epoch 2's six steps
    train(make_config(out=periodic), resume=True)
    assert max_weight_diff(state_dict_of(straight), state_dict_of(periodic)) == 0.0
    assert metrics_without_time(straight) == metrics_without_time(periodic)


def test_a_mid_epoch_checkpoint_keeps_its_epochs_end_and_another_batch_size_stays_refused(tmp_path, make_config):
    """A mid-epoch checkpoint keeps the epoch's end it replaced (checkpoints/epoch_end.ckpt,
    for a resume on another number of processes: tests/test_distributed.py); another batch
    size is still refused (a typo must not throw the steps since away); a resume with the same
    settings goes on, and the next epoch's end drops the kept file; a fresh run in the folder
    drops one left by an earlier run (it is not this run's epoch end)."""
    from fastvae.checkpoint import read_checkpoint

    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(make_config(out=run, checkpoint_every=5), callbacks=[CheckpointSteps(crash_at=33)])
    kept = run / "checkpoints" / "epoch_end.ckpt"
    assert read_checkpoint(run)["step"] == 30 and read_checkpoint(kept)["step"] == 24
    with pytest.raises(FastVAEError, match=r"batch_size \(64, now 32\) differ .* mid-epoch"):
        train(make_config(out=run, batch_size=32, checkpoint_every=5), resume=True)
    assert read_checkpoint(run)["step"] == 30 and read_checkpoint(kept)["step"] == 24
    train(make_config(out=run, checkpoint_every=5), resume=True)
    assert read_checkpoint(run)["step"] == 48 and not kept.exists()
    # an earlier run's kept file in a folder trained into afresh
    with pytest.raises(Crash):
        train(make_config(out=run, epochs=3, checkpoint_every=5), resume=True, callbacks=[CheckpointSteps(crash_at=52)])
    assert read_checkpoint(kept)["step"] == 48
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(Crash):
        train(make_config(out=run, checkpoint_every=2, seed=7), callbacks=[CheckpointSteps(crash_at=5)])
    assert read_checkpoint(run)["step"] == 4 and not kept.exists()


def test_checkpoint_minutes_count_from_the_last_checkpoint(tmp_path, make_config, monkeypatch):
    """--checkpoint-minutes 0.5 with 7 s steps: a checkpoint once 30 s have passed since the
    last one, the epoch's end included (steps 5, 10, ..., 24, then 29, 34, ...); saving
    changes nothing of the run; 0 turns it off."""
    straight = tmp_path / "straight"
    train(make_config(out=straight))
    timed = CheckpointSteps(seconds_per_step=7.0)
    monkeypatch.setattr("fastvae.trainer._clock", lambda: timed.now)
    train(make_config(out=tmp_path / "timed", checkpoint_minutes=0.5), callbacks=[timed])
    assert timed.saves() == [5, 10, 15, 20, 24, 29, 34, 39, 44]  # 48: the last step, after it
    assert max_weight_diff(state_dict_of(straight), state_dict_of(tmp_path / "timed")) == 0.0
    assert metrics_without_time(straight) == metrics_without_time(tmp_path / "timed")
    off = CheckpointSteps(seconds_per_step=1e6)
    monkeypatch.setattr("fastvae.trainer._clock", lambda: off.now)
    train(make_config(out=tmp_path / "off", checkpoint_minutes=0.0), callbacks=[off])
    assert off.saves() == [24]


@pytest.mark.parametrize("model", ["mlp", "convkl"])
def test_float64_runs_evaluate_and_resume_in_float64(tmp_path, make_config, model):
    """--precision 64-true: the test set is evaluated in the weights' dtype (float32 batches
    met float64 weights and crashed), and Adam's moments come back as float64 on --resume
    (loaded before Fabric's set-up converted the model, they stayed float32 and crashed)."""
    from fastvae.evaluation import evaluate

    extra = dict(model=model, downsample=2, width=4) if model == "convkl" else {}
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_config(out=straight, epochs=2, precision="64-true", **extra))
    train(make_config(out=split, epochs=1, precision="64-true", **extra))
    train(make_config(out=split, epochs=2, precision="64-true", **extra), resume=True)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(t.dtype == torch.float64 for t in a["model"].values() if t.is_floating_point())
    assert max_weight_diff(state_dict_of(straight), state_dict_of(split)) <= 1e-9
    assert metrics_without_time(straight) == metrics_without_time(split)
    model64 = load(straight)
    result = evaluate(model64, load_dataset("digits").test[:40], iwae_k=4)
    assert math.isfinite(result["neg_elbo"]) and math.isfinite(result["iwae_nll"])


def test_resume_takes_a_new_lr_and_fixed_sigma_and_refuses_fewer_epochs(tmp_path, make_config):
    """Settings a resume may change take effect (the checkpoint's optimizer state and buffers
    held the old lr and sigma while config.json recorded the new ones); fewer epochs than the
    run has trained is refused (config.json would have contradicted the run)."""
    from fastvae.errors import FastVAEError

    run = tmp_path / "run"
    train(make_config(out=run, epochs=1, likelihood="gaussian", sigma=0.1))
    train(make_config(out=run, epochs=2, likelihood="gaussian", sigma=0.5, lr=0.05), resume=True)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [0.05]
    assert float(ckpt["model"]["likelihood.log_scale"].exp()) == pytest.approx(0.5)
    assert load(run).likelihood.log_scale.exp().item() == pytest.approx(0.5)
    with pytest.raises(FastVAEError, match="has trained 2 epoch"):
        train(make_config(out=run, epochs=1, likelihood="gaussian", sigma=0.5, lr=0.05), resume=True)
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


def test_resume_of_a_finished_run_changes_nothing_and_says_so(make_config, capsys):
    """Not even config.json: it took the resume's new settings (an lr that never trained a step)."""
    config = make_config(epochs=1)
    train(config)
    before = state_dict_of(config.out)
    run = Path(config.out)
    saved = (run / "config.json").read_bytes()
    capsys.readouterr()
    result = train(make_config(epochs=1, lr=0.5), resume=True)
    assert result.epochs == 1 and max_weight_diff(before, state_dict_of(config.out)) == 0.0
    assert result.steps > 0 and result.metrics == run_folder.read_metrics(run / "metrics.csv")
    assert (run / "config.json").read_bytes() == saved
    assert len(metrics_without_time(config.out)) == 1
    assert "has trained its 1 epoch(s) already: nothing to train (give --epochs more than 1" in capsys.readouterr().err


def test_seed_decides_the_weights(tmp_path, make_config):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(make_config(out=tmp_path / name, epochs=1, seed=seed))
    assert max_weight_diff(state_dict_of(tmp_path / "a"), state_dict_of(tmp_path / "b")) == 0.0
    assert max_weight_diff(state_dict_of(tmp_path / "a"), state_dict_of(tmp_path / "c")) > 1e-3


def test_autoencoder_baseline_trains(make_config, digits):
    from fastvae import load
    from fastvae.models import StackedAutoencoder

    config = make_config(kind="ae", epochs=3, lr=1e-2)
    result = train(config)
    losses = [row["train_loss"] for row in result.metrics]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(row["train_kl"] == 0.0 for row in result.metrics)
    model = load(config.out)
    assert isinstance(model, StackedAutoencoder)
    x = digits.test[:50]
    with torch.no_grad():
        mse = float((model.reconstruct(x) - x).pow(2).flatten(1).sum(-1).mean())
        baseline = float((x - digits.train.mean(0)).pow(2).flatten(1).sum(-1).mean())
    assert mse < baseline, (mse, baseline)  # better than predicting the mean image


def test_beta_zero_lets_the_kl_grow(tmp_path, make_config):
    # beta = 0 removes the KL from the objective, so the posterior drifts far from the prior;
    # a long warm-up keeps the KL weight near 0 and behaves the same way early on
    runs = {}
    for name, extra in (("beta1", {}), ("beta0", {"beta": 0.0}),
                        ("warm", {"kl_warmup_steps": 100_000})):
        runs[name] = train(make_config(out=tmp_path / name, epochs=2, **extra)).metrics[-1]["train_kl"]
    assert runs["beta0"] > 3 * runs["beta1"], runs
    assert runs["warm"] > 3 * runs["beta1"], runs


def test_free_bits_keep_kl_up(tmp_path, make_config):
    plain = train(make_config(out=tmp_path / "plain", epochs=2)).metrics[-1]["train_kl"]
    fb = train(make_config(out=tmp_path / "fb", epochs=2, free_bits=2.0)).metrics[-1]["train_kl"]
    assert fb > plain + 1.0, (plain, fb)


def test_evaluate_checks_its_arguments(make_config, digits):
    """An empty test set was a ZeroDivisionError, numpy data an AttributeError, a run path
    "'str' object has no attribute 'training'", seed "0" a torch RuntimeError."""
    from fastvae.evaluation import evaluate

    config = make_config(epochs=1)
    train(config)
    model = load(config.out)
    expected = evaluate(model, digits.test[:40], iwae_k=0)
    assert evaluate(config.out, digits.test[:40].numpy(), iwae_k=np.int64(0),
                    seed=np.int64(0)) == expected  # a run path, numpy rows and numbers
    assert evaluate(model, digits, iwae_k=0)["n"] == len(digits.test)  # Splits: the test split
    pixels = (digits.test[:40] * 255).round().to(torch.uint8)  # uint8 rows read as the loaders read them
    assert evaluate(model, pixels, iwae_k=0)["neg_elbo"] == pytest.approx(
        evaluate(model, pixels.float() / 255, iwae_k=0)["neg_elbo"], rel=1e-6)
    # numpy rows take the files' rule: long double, big-endian, reversed, read-only all read
    rows = digits.test[:40].numpy()
    for odd in (rows.astype(np.longdouble), rows.astype(">f4"), rows[::-1],
                np.frombuffer(rows.tobytes(), np.float32).reshape(rows.shape)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert evaluate(model, odd, iwae_k=0)["n"] == 40
    for args, kwargs, words in (((model, digits.test[:0]), {}, "at least one"),
                                ((model, digits.test[:4].double() * 1e300), {}, r"values in \[0, 1e\+300\]"),
                                ((model, digits.test[:4] * 255), {}, r"values in \[0, 255\]"),  # was a number
                                ((model, digits.test[:4] - 0.5), {}, r"in \[0, 1\]"),
                                ((model, digits.test[:4] * float("nan")), {}, "NaN"),
                                ((model, digits.test[:4].long()), {}, "evaluate: data has dtype int64: use uint8"),
                                ((model, digits.test[:4].flatten(1)), {}, "the model takes rows"),
                                ((model, digits.test[:4]), {"seed": "0"}, "seed must be an integer"),
                                ((model, digits.test[:4]), {"seed": True}, "seed must be an integer"),
                                ((model, digits.test[:4]), {"seed": 2**32}, "got 4294967296"),
                                ((torch.nn.Linear(2, 2), digits.test[:4]), {}, "takes a fastvae VAE")):
        with pytest.raises(FastVAEError, match=words):
            evaluate(*args, **{"iwae_k": 0, **kwargs})
    for k in (-1, 2.0, 10**9):  # named as the program wrote it, not as the command line's --iwae-k
        with pytest.raises(FastVAEError, match=r"^evaluate: iwae_k must be an integer from 0"):
            evaluate(model, digits.test[:4], iwae_k=k)


def test_an_autoencoders_bf16_true_metrics_are_summed_in_float32(tmp_path):
    """test_recon of a bf16-true autoencoder was a bf16-rounded batch sum (3040/297 exactly),
    0.1% off; the VAE's terms were summed in fp32 already. Reference: the same bf16 forward,
    its squared errors summed in float64."""
    from fastvae.config import TrainConfig

    splits = load_dataset("digits")
    config = TrainConfig(kind="ae", hidden_dim=16, latent_dim=4, epochs=1, precision="bf16-true", reparam="torch",
                         pictures=False, progress=False, out=str(tmp_path / "ae"))
    result = train(config, splits=splits)
    model = load(tmp_path / "ae").to(torch.bfloat16)
    x = splits.test.to(torch.bfloat16)
    with torch.no_grad():
        errors = (model.reconstruct(x).double() - x.double()).pow(2).flatten(1).sum(-1)
    assert result.metrics[-1]["test_recon"] == pytest.approx(float(errors.mean()), rel=1e-6)


def test_fp16_on_a_cpu_is_one_note_and_runs_as_bf16(tmp_path, capsys):
    """--precision 16-mixed on a CPU: Fabric warned in several lines naming its source file
    ("connector.py:483: ... Using precision='bf16-mixed' instead"), twice with a tracker; now
    one note, and the run is bf16 (its loss as a bf16-mixed run's)."""
    from fastvae.cli import main

    common = ["train", "--epochs", "1", "--hidden-dim", "8", "--latent-dim", "2", "--quiet", "--no-pictures",
              "--reparam", "torch", "--threads", "1", "--accelerator", "cpu"]
    capsys.readouterr()
    assert main([*common, "--precision", "16-mixed", "--logger", "csv", "--out", str(tmp_path / "fp16")]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [
        "note: --precision 16-mixed runs as bf16-mixed on a CPU (fp16 autocast needs CUDA)"], err
    assert main([*common, "--precision", "bf16-mixed", "--out", str(tmp_path / "bf16")]) == 0
    losses = [run_folder.read_metrics(tmp_path / run / "metrics.csv")[-1]["train_loss"] for run in ("fp16", "bf16")]
    assert losses[0] == losses[1]


def test_resume_takes_split_settings_that_change_nothing(tmp_path, capsys):
    """--test-fraction / --split-seed on a resume of data with a split of its own (digits, a
    prepared dataset) change nothing: a note, as for a new run (it was refused as another run);
    on data that the run split itself they stay refused (another held-out set)."""
    import numpy as np

    from fastvae.cli import main

    common = ["--hidden-dim", "8", "--latent-dim", "2", "--quiet", "--no-pictures", "--reparam", "torch",
              "--threads", "1"]
    digits = tmp_path / "digits-run"
    assert main(["train", "--epochs", "1", *common, "--out", str(digits)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(digits), "--epochs", "2", "--test-fraction", "0.2"]) == 0
    assert "--test-fraction 0.2 changes nothing" in capsys.readouterr().err
    np.save(tmp_path / "rows.npy", np.random.default_rng(0).integers(0, 256, (60, 4, 4), dtype=np.uint8))
    own = tmp_path / "npy-run"
    assert main(["train", "--epochs", "1", *common, "--data", str(tmp_path / "rows.npy"), "--out", str(own)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(own), "--epochs", "2", "--split-seed", "3"]) == 2
    assert "setting(s) split_seed (0, now 3) differ" in capsys.readouterr().err


def test_a_long_iwae_bound_says_how_long_it_will_take(make_config, digits, capsys, monkeypatch):
    """The default K = 1000 took ~29 min on the photos recipe with nothing said where no bar
    shows (a batch job's log): the first batch is timed, and a bound estimated past
    LONG_IWAE_S gets one note with the estimate; --quiet (progress off) stays silent."""
    from fastvae import evaluation
    from fastvae.evaluation import evaluate

    config = make_config(epochs=1)
    train(config)
    model = load(config.out)
    capsys.readouterr()
    evaluate(model, digits.test[:200], iwae_k=20, progress=True)
    assert "IWAE" not in capsys.readouterr().err  # well under the threshold
    monkeypatch.setattr(evaluation, "LONG_IWAE_S", -1.0)  # every bound is "long"
    evaluate(model, digits.test[:200], iwae_k=20, progress=True)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "IWAE bound with 20 samples per example will take about" in notes[0], notes
    evaluate(model, digits.test[:200], iwae_k=20, progress=False)
    assert "note:" not in capsys.readouterr().err


def test_a_programs_bad_settings_are_named_as_it_wrote_them(tmp_path):
    """fastvae.train(TrainConfig(latent_dim=0)) said "--latent-dim must be ...": a program
    passed a keyword, not a flag (the command line validates first and keeps its flags)."""
    from fastvae.config import TrainConfig

    for settings, said in ((dict(latent_dim=0), "latent_dim must be a positive integer"),
                           (dict(loggers="csv,nope"), "loggers 'nope' is not supported"),
                           (dict(learn_sigma=True, likelihood="bernoulli"),
                            "learn_sigma needs a gaussian or laplace likelihood")):
        with pytest.raises(FastVAEError) as refused:
            train(TrainConfig(out=str(tmp_path / "run"), **settings))
        assert str(refused.value).startswith(said) and "--" not in str(refused.value), str(refused.value)
    assert not (tmp_path / "run").exists()


def test_a_program_under_float64_default_no_grad_or_inference_mode_trains_in_float32(tmp_path):
    """torch.set_default_dtype(torch.float64) made train, sample and export fail in F.linear
    ("mat1 and mat2 must have the same dtype"); a notebook's leftover no_grad/inference_mode
    failed the first backward. fastvae works in float32 with gradients and gives the program
    its settings back."""
    from fastvae.config import TrainConfig
    from fastvae.evaluation import evaluate
    from fastvae.export import export_decoder

    splits = load_dataset("digits")
    settings = dict(epochs=1, hidden_dim=16, latent_dim=4, reparam="torch", pictures=False, progress=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            first = train(TrainConfig(out=str(tmp_path / "no_grad"), **settings), splits=splits)
        with torch.inference_mode():
            second = train(TrainConfig(out=str(tmp_path / "inference"), **settings), splits=splits)
        assert torch.get_default_dtype() == torch.float64
        assert first.metrics[0]["train_loss"] == second.metrics[0]["train_loss"]  # the same run twice
        model = load(tmp_path / "no_grad")
        assert model.sample(3).dtype == torch.float32
        assert evaluate(model, splits.test[:20], iwae_k=0)["n"] == 20
        export_decoder(model, tmp_path / "decoder.onnx", check_batches=(3,))
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(previous)


START_METHOD_AFTER_TRAINING = """
import multiprocessing, sys
sys.path.insert(0, sys.argv[2])
from testkit import tiny_config
from fastvae.trainer import train
train(tiny_config(sys.argv[1], epochs=1, progress=True))  # bars drawn or not, tqdm's lock is made
assert multiprocessing.get_start_method(allow_none=True) is None
multiprocessing.set_start_method("spawn")
from tqdm.contrib.concurrent import process_map  # tqdm's own bars across processes still work
assert process_map(abs, [-1, -2], max_workers=1, disable=True) == [1, 2]
print("start method set")
"""


def test_training_leaves_the_programs_multiprocessing_start_method_unset(tmp_path):
    """tqdm's default lock is a multiprocessing RLock, which fixes the default context: a
    program's set_start_method("spawn") after train() raised "context has already been set".
    A thread lock in its place broke tqdm's process_map under spawn (it pickles the lock)."""
    import subprocess
    import sys

    from testkit import REPO, SUBPROCESS_ENV

    done = subprocess.run([sys.executable, "-c", START_METHOD_AFTER_TRAINING, str(tmp_path / "run"),
                           str(REPO / "tests")], capture_output=True, text=True, timeout=240, env=SUBPROCESS_ENV)
    assert done.returncode == 0 and "start method set" in done.stdout, done.stderr[-2000:]


def test_a_programs_own_splits_are_checked_and_read_as_files_are(tmp_path):
    """uint8 or float64 splits failed in F.linear, numpy ones in flatten, a test split of another
    image size after a whole epoch, an empty one as a ZeroDivisionError, an array as an
    AttributeError. Now uint8/numpy/float64 train like the same pixels as float32; the rest is
    one FastVAEError naming splits, before anything is written."""
    from fastvae.config import TrainConfig
    from fastvae.data import Splits

    digits = load_dataset("digits")
    pixels = (digits.train[:256] * 255).round().to(torch.uint8), (digits.test[:64] * 255).round().to(torch.uint8)
    settings = dict(epochs=1, hidden_dim=16, latent_dim=4, reparam="torch", pictures=False, progress=False)
    runs = {}
    for name, (train_part, test_part) in (("float32", [p.float() / 255 for p in pixels]), ("uint8", pixels),
                                          ("numpy", [p.numpy() for p in pixels]),
                                          ("float64", [p.double() / 255 for p in pixels])):
        runs[name] = train(TrainConfig(out=str(tmp_path / name), **settings),
                           splits=Splits("mine", train_part, test_part)).metrics[0]
    for name in ("uint8", "numpy", "float64"):
        assert runs[name]["train_loss"] == pytest.approx(runs["float32"]["train_loss"], rel=1e-6), name
    train_part, test_part = pixels
    for splits, said in ((train_part.numpy(), "splits must be fastvae.data.Splits"),
                         (Splits("mine", train_part, test_part[:, :, :7, :7]), "give both splits the same image size"),
                         (Splits("mine", train_part, test_part[:0]), r"splits.test has shape \(0, 1, 8, 8\)"),
                         (Splits("mine", train_part.flatten(1), test_part), r"splits.train has shape \(256, 64\)"),
                         (Splits("mine", train_part.long(), test_part), "splits.train has dtype int64"),
                         (Splits("mine", [1, 2], test_part), "splits.train must be a tensor or numpy array")):
        with pytest.raises(FastVAEError, match=said):
            train(TrainConfig(out=str(tmp_path / "bad"), **settings), splits=splits)
    assert not (tmp_path / "bad").exists()


def test_build_model_names_what_is_wrong_with_a_spec():
    """build_model({"latent_dim": 3}) was a bare KeyError; a typo (latnet_dim) was ignored and
    kind "bogus" built a VAE; a negative size was torch's RuntimeError."""
    from fastvae.models import build_model

    assert build_model({"data_shape": [1, 8, 8], "latent_dim": 3}).latent_shape == (3,)
    for spec, said in (({"latent_dim": 3}, "build_model takes a dict with data_shape"),
                       ({"data_shape": [1, 8, 8], "latnet_dim": 3}, r"unknown key\(s\) latnet_dim \(did you mean latent_dim\?\)"),
                       ({"data_shape": [1, 8, 8], "kind": "bogus"}, "kind must be one of vae, ae, got 'bogus'"),
                       ({"data_shape": [1, 8, 8], "latent_dim": -3}, "this spec builds no model"),
                       ({"data_shape": [1, 8, 8], "model": "resnet"}, "unknown model 'resnet'")):
        with pytest.raises(FastVAEError, match=said):
            build_model(spec)


def test_a_callback_can_stop_the_run_with_a_checkpoint_from_any_thread(tmp_path):
    """A program had no way to stop a run cleanly (early stopping, a budget), and one training
    outside the main thread could not be stopped at all (signals reach the main thread only)."""
    import threading

    from fastvae.checkpoint import read_checkpoint
    from fastvae.config import TrainConfig

    class StopAtFive:
        def on_train_batch_end(self, trainer, batch):
            if trainer.step == 5:
                trainer.request_stop()

    results = []
    config = TrainConfig(out=str(tmp_path / "run"), epochs=3, hidden_dim=16, latent_dim=4, reparam="torch",
                         pictures=False, progress=False)
    worker = threading.Thread(target=lambda: results.append(train(config, callbacks=[StopAtFive()])))
    worker.start()
    worker.join(240)
    assert results and results[0].interrupted and results[0].steps == 5
    state = read_checkpoint(tmp_path / "run")
    assert (state["step"], state["batch_in_epoch"]) == (5, 5)
    assert not train(config, resume=True).interrupted  # and it resumes to the end


def test_a_signal_after_request_stop_is_still_a_first_stop_request(tmp_path):
    """request_stop() set the signal handler's own flag, so a Ctrl-C/SIGTERM after it (a
    scheduler's, during the stop's checkpoint) counted as a second signal: the process ended at
    once (KeyboardInterrupt in a program, exit 130 on the command line) without the checkpoint."""
    import os
    import signal

    from fastvae.checkpoint import read_checkpoint
    from fastvae.config import TrainConfig

    class StopThenSignal:
        def on_train_batch_end(self, trainer, batch):
            if trainer.step == 5:
                trainer.request_stop()
                os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: a KeyboardInterrupt if escalated

    config = TrainConfig(out=str(tmp_path / "run"), epochs=3, hidden_dim=16, latent_dim=4, reparam="torch",
                         pictures=False, progress=False)
    result = train(config, callbacks=[StopThenSignal()])
    assert result.interrupted and result.steps == 5
    assert read_checkpoint(tmp_path / "run")["batch_in_epoch"] == 5


def test_callbacks_are_checked_before_anything_is_written(tmp_path):
    """callbacks=object() or [1] were taken and never called; a lambda's method under ddp_spawn
    failed in Lightning's launcher as a pickling AttributeError, after --overwrite had cleared
    the old run."""
    from fastvae.config import TrainConfig

    class Local:  # a local class: not picklable
        def on_train_start(self, trainer):
            pass

    settings = dict(out=str(tmp_path / "run"), epochs=1, hidden_dim=16, latent_dim=4, pictures=False, progress=False)
    for callbacks, strategy, said in ((object(), "auto", "callbacks must be a list of callback objects, got object"),
                                      ([1], "auto", "the callback 1 has none of the hooks on_train_start"),
                                      ([Local()], "ddp_spawn", "must be picklable")):
        config = TrainConfig(**settings, strategy=strategy, devices=2 if strategy == "ddp_spawn" else 1,
                             accelerator="cpu")
        with pytest.raises(FastVAEError, match=said):
            train(config, callbacks=callbacks)
    assert not (tmp_path / "run").exists()
