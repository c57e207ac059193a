"""Reliability: NaN losses, SIGKILL, Ctrl-C/SIGTERM, crashes between writes, mismatched resumes.

The subprocess tests train the same small run three ways (straight through; killed and resumed;
interrupted and resumed) and ask for the same final weights: on a CPU with one thread the loop is
deterministic, so "the same" means equal to within 1e-6 (in practice bit for bit).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from testkit import (PausedChild, assert_one_line_error, max_weight_diff, metrics_without_time,
                      run_cli, state_dict_of)
from fastvae.checkpoint import read_checkpoint
from fastvae.errors import FastVAEError
from fastvae.trainer import train

STEPS_PER_EPOCH = 24  # ceil(1500 / 64), the tiny config's batch size


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def patch_forward(monkeypatch):
    """``patch_forward(action)``: every model the trainer builds calls ``action(call, terms)``
    after each training forward pass (call counts from 0 in this process)."""
    import fastvae.models as models

    original = models.build_model

    def install(action):
        def build(spec):
            model = original(spec)
            real_forward = model.forward
            calls = itertools.count()

            def forward(*args, **kwargs):
                terms = real_forward(*args, **kwargs)
                return action(next(calls), terms) or terms

            model.forward = forward
            return model

        monkeypatch.setattr(models, "build_model", build)
        import fastvae.trainer

        if hasattr(fastvae.trainer, "build_model"):  # in case train.py imports it at module level
            monkeypatch.setattr(fastvae.trainer, "build_model", build)

    return install


def nan_at(steps):
    """An action that turns the loss of the given (0-based) training steps into NaN."""

    def action(call, terms):
        if call in steps:
            return terms._replace(loss=terms.loss * float("nan"))
        return terms

    return action


def nan_gradients_at(steps):
    """An action that keeps the loss of the given steps but makes its gradients NaN
    (d/dl sqrt(0 * l) = inf * 0)."""

    def action(call, terms):
        if call in steps:
            return terms._replace(loss=terms.loss + torch.sqrt(terms.loss * 0))
        return terms

    return action


@pytest.fixture(params=[1, 4], ids=["read-each-step", "read-every-4-steps"])
def check_lag(request, monkeypatch):
    """Step records read on the host after every step (a CPU's way) or every 4 steps (an
    accelerator's): the outcome must not depend on it."""
    monkeypatch.setattr("fastvae.trainer.check_interval", lambda device: request.param)
    return request.param


@pytest.fixture(params=["device-each-step", "device-every-4-steps", "host-before-backward"])
def any_check(request, monkeypatch):
    """``check_lag``'s two ways, plus the host check before backward that optimizers which
    cannot skip an update on the device (FSDP's) get."""
    if request.param.startswith("host"):
        monkeypatch.setattr("fastvae.trainer.skip_mode", lambda optimizer, precision: "host")
    lag = 4 if "every-4" in request.param else 1
    monkeypatch.setattr("fastvae.trainer.check_interval", lambda device: lag)
    return request.param


def signal_at(step, signum=signal.SIGINT):
    def action(call, terms):
        if call == step:
            os.kill(os.getpid(), signum)
        return terms

    return action


def listing(run) -> list[str]:
    return sorted(p.name for p in (Path(run) / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- non-finite losses


def test_nan_loss_stops_with_step_and_epoch_and_keeps_last_checkpoint(tmp_path, make_config, patch_forward,
                                                                      any_check):
    reference = make_config(out=tmp_path / "two_epochs", epochs=2)
    train(reference)
    patch_forward(nan_at({2 * STEPS_PER_EPOCH + 2}))  # third step of epoch 3
    config = make_config(out=tmp_path / "nan", epochs=4)
    with pytest.raises(FastVAEError) as info:
        train(config)
    message = str(info.value)
    assert "epoch 3" in message and f"step {2 * STEPS_PER_EPOCH + 3}" in message, message
    assert "nan" in message.lower()
    state = read_checkpoint(config.out)
    assert state["epoch"] == 2 and state["step"] == 2 * STEPS_PER_EPOCH
    assert max_weight_diff(state["model"], state_dict_of(reference.out)) == 0.0
    assert metrics_without_time(config.out) == metrics_without_time(reference.out)


def test_nan_loss_before_any_checkpoint_does_not_promise_one(make_config, patch_forward):
    patch_forward(nan_at({3}))
    config = make_config(epochs=2)
    with pytest.raises(FastVAEError) as info:
        train(config)
    assert not (Path(config.out) / "checkpoints" / "last.ckpt").exists()
    assert "intact" not in str(info.value), str(info.value)
    assert "lower lr" in str(info.value)


def test_after_a_diverged_epoch_the_advice_fits_the_run(make_config, capsys):
    """The stop's advice named --precision 32-true to a 32-true run; under --on-nonfinite skip
    an epoch whose test metrics were NaN was checkpointed, and the stop after it called that
    checkpoint 'the last good checkpoint' to --resume from, which diverged again."""
    settings = dict(likelihood="gaussian", sigma=0.01, lr=1e3, epochs=2, hidden_dim=64, batch_size=128)
    with pytest.raises(FastVAEError) as stopped:
        train(make_config(out=Path(make_config().out) / "stop", **settings))
    assert str(stopped.value).endswith("Try a lower lr, or on_nonfinite skip"), stopped.value
    with pytest.raises(FastVAEError) as skipped:
        train(make_config(out=Path(make_config().out) / "skip", on_nonfinite="skip", **settings))
    message = str(skipped.value)
    assert "holds epoch 1, whose test_neg_elbo was nan: a resume=True would start from diverged weights" in message
    assert "good checkpoint" not in message, message
    # that run's evaluation, as strict JSON: NaN and Infinity are no JSON (jq, JSON.parse refuse them)
    from fastvae.cli import main

    run = Path(make_config().out) / "skip"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iwae-k", "0", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1], parse_constant=lambda name: pytest.fail(name))
    assert result["neg_elbo"] is None and result["n"] > 0


def test_a_nonfinite_first_step_blames_the_settings_not_the_learning_rate(make_config):
    """--beta 1e308 or --sigma 1e-300 make the very first loss inf, before the learning rate
    has done anything: "try a lower --lr" sent the user the wrong way."""
    for settings in ({"beta": 1e308}, {"likelihood": "gaussian", "sigma": 1e-300}):
        with pytest.raises(FastVAEError) as info:
            train(make_config(epochs=1, **settings))
        message = str(info.value)
        assert "step 1;" in message and "check beta, sigma" in message and " lr" not in message, message


def test_nonfinite_skip_skips_and_continues(make_config, patch_forward, capsys, any_check):
    bad = {5, STEPS_PER_EPOCH + 10}
    patch_forward(nan_at(bad))
    result = train(make_config(epochs=2, on_nonfinite="skip"))
    assert result.epochs == 2 and result.steps == 2 * STEPS_PER_EPOCH
    out = capsys.readouterr().out
    assert "skipping step 6 (epoch 1)" in out and f"skipping step {STEPS_PER_EPOCH + 11} (epoch 2)" in out
    assert all(math.isfinite(row["train_loss"]) for row in result.metrics)
    state = read_checkpoint(result.run_dir)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_gradients_of_a_finite_loss_are_caught_at_their_step(make_config, patch_forward,
                                                                        capsys, check_lag, mode):
    patch_forward(nan_gradients_at({3}))
    config = make_config(epochs=1, on_nonfinite=mode)
    if mode == "stop":
        with pytest.raises(FastVAEError) as info:
            train(config)
        assert "gradients became inf/NaN at epoch 1, step 4;" in str(info.value), str(info.value)
        return
    result = train(config)
    assert "skipping step 4 (epoch 1): gradients are inf/NaN" in capsys.readouterr().out
    assert all(torch.isfinite(t).all() for t in read_checkpoint(result.run_dir)["model"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_nonfinite_steps_on_cuda_without_per_step_syncs(make_config, patch_forward, capsys, precision):
    """On CUDA the records are read every 32 steps and fused Adam skips bad steps itself: a NaN
    loss and NaN gradients are still reported at their own steps, and the weights stay finite."""
    bad_loss, bad_grads = nan_at({5}), nan_gradients_at({STEPS_PER_EPOCH + 2})
    patch_forward(lambda call, terms: bad_grads(call, bad_loss(call, terms)))
    result = train(make_config(epochs=2, on_nonfinite="skip", accelerator="cuda", precision=precision))
    out = capsys.readouterr().out
    assert "skipping step 6 (epoch 1): loss is nan" in out, out
    assert f"skipping step {STEPS_PER_EPOCH + 3} (epoch 2): gradients are inf/NaN" in out, out
    assert all(torch.isfinite(t).all() for t in read_checkpoint(result.run_dir)["model"].values())
    assert all(math.isfinite(row["train_loss"]) for row in result.metrics)


def test_reading_step_records_later_changes_nothing(tmp_path, make_config, patch_forward, monkeypatch):
    patch_forward(nan_at({5, STEPS_PER_EPOCH + 10}))
    now = train(make_config(out=tmp_path / "now", epochs=2, on_nonfinite="skip"))
    monkeypatch.setattr("fastvae.trainer.check_interval", lambda device: 7)
    later = train(make_config(out=tmp_path / "later", epochs=2, on_nonfinite="skip"))
    assert max_weight_diff(state_dict_of(now.run_dir), state_dict_of(later.run_dir)) == 0
    assert metrics_without_time(now.run_dir) == metrics_without_time(later.run_dir)


def test_skip_cannot_hide_a_diverged_model(make_config):
    config = make_config(epochs=3, lr=1e30, on_nonfinite="skip")
    try:
        result = train(config)
    except FastVAEError as exc:  # stopping with a clear error is fine
        assert "epoch" in str(exc)
        return
    for row in result.metrics:  # otherwise no epoch may claim a finite loss it never computed
        assert row["train_loss"] != 0.0, row


def test_lr_blowup_is_caught(make_config):
    # a learning rate that sends the weights to inf: stopped with a clear error, not a crash
    config = make_config(epochs=3, lr=1e30)
    with pytest.raises(FastVAEError) as info:
        train(config)
    # a program's message names its settings (lr), not the command line's flags (--lr)
    assert "epoch" in str(info.value) and "step" in str(info.value) and "lower lr" in str(info.value)
    assert "--" not in str(info.value), info.value


def test_a_programs_messages_name_its_keywords_and_the_command_lines_its_flags(make_config, capsys):
    """train() said "pass --resume to continue it" to a program, which passes resume=True."""
    from fastvae.cli import main

    config = make_config(epochs=1)
    train(config)
    with pytest.raises(FastVAEError, match=r"already holds a run: pass resume=True to continue it, overwrite=True"):
        train(config)
    with pytest.raises(FastVAEError, match=r"^resume=True and overwrite=True contradict each other"):
        train(config, resume=True, overwrite=True)
    capsys.readouterr()
    assert main(["train", "--out", str(config.out), "--epochs", "1", "--quiet"]) == 2
    assert "already holds a run: pass --resume to continue it, --overwrite" in capsys.readouterr().err
    from fastvae.config import keyword_spelling  # a command to run keeps its flags, quoted or in backticks

    assert keyword_spelling("--data x: run 'fastvae prepare SRC --out SHARDS' or `fastvae train --resume`") == (
        "data x: run 'fastvae prepare SRC --out SHARDS' or `fastvae train --resume`")


# ----------------------------------------------------------------------------- crashes between writes


class Killed(BaseException):
    """Stands for the process dying at this exact point."""


def test_crash_between_checkpoint_and_metrics_keeps_every_row(tmp_path, make_config, monkeypatch):
    straight = make_config(out=tmp_path / "straight", epochs=3)
    train(straight)
    config = make_config(out=tmp_path / "crash", epochs=3)
    renames = itertools.count(1)
    real_replace, real_rename = os.replace, os.rename

    def dying(real):
        def move(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            if str(dst).endswith("last.ckpt") and next(renames) == 2:  # epoch 2's checkpoint
                raise Killed

        return move

    monkeypatch.setattr(os, "replace", dying(real_replace))
    monkeypatch.setattr(os, "rename", dying(real_rename))
    with pytest.raises(Killed):
        train(config)
    monkeypatch.undo()
    assert read_checkpoint(config.out)["epoch"] == 2
    train(config, resume=True)
    assert max_weight_diff(state_dict_of(straight.out), state_dict_of(config.out)) == 0.0
    assert [r["epoch"] for r in metrics_without_time(config.out)] == ["1", "2", "3"]
    assert metrics_without_time(config.out) == metrics_without_time(straight.out)


def test_run_that_died_before_its_first_checkpoint_can_be_restarted(make_config, patch_forward, capsys):
    from fastvae.cli import main

    patch_forward(nan_at({3}))  # dies in epoch 1: config.json and metrics.csv, no checkpoint
    config = make_config(epochs=1)
    with pytest.raises(FastVAEError):
        train(config)
    patch_forward(lambda call, terms: terms)
    args = ["train", "--epochs", "1", "--hidden-dim", "32", "--latent-dim", "4", "--quiet",
            "--no-pictures", "--reparam", "torch", "--out", str(config.out)]
    if main(args) == 0:  # the same command again simply starts the run
        return
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_overwrite_with_bad_data_or_model_keeps_the_old_run(tmp_path, make_config, monkeypatch):
    config = make_config(epochs=1)
    train(config)
    with pytest.raises(FastVAEError):
        train(make_config(epochs=1, data=str(tmp_path / "typo.npy")), overwrite=True)
    assert read_checkpoint(config.out)["epoch"] == 1
    # a model too large for the machine (--hidden-dim 100000000000 emptied the folder, then
    # failed allocating): refused before the old run is touched; here "the machine" has 1 MB
    import fastvae.config

    monkeypatch.setattr(fastvae.config, "host_memory", lambda: 1 << 20)
    with pytest.raises(FastVAEError, match=r"parameters \([0-9.e-]+ GiB in fp32\), more than the memory here \(0.000977 GiB: the machine's, or its container's limit\)"):
        train(make_config(epochs=1, hidden_dim=4096), overwrite=True)
    assert read_checkpoint(config.out)["epoch"] == 1


def test_resume_refuses_another_model_shape(tmp_path, make_config):
    small, big = make_config(out=tmp_path / "small", epochs=1), make_config(out=tmp_path / "big", epochs=1, hidden_dim=48)
    train(small)
    train(big)
    with pytest.raises(FastVAEError) as info:
        train(make_config(out=small.out, epochs=2, hidden_dim=48), resume=True)
    assert "hidden_dim" in str(info.value)
    # a checkpoint of the other shape copied into the run: refused, and the run is untouched
    ckpt = Path(small.out) / "checkpoints" / "last.ckpt"
    ckpt.write_bytes((Path(big.out) / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(FastVAEError) as info:
        train(make_config(out=small.out, epochs=2), resume=True)
    assert "hidden_dim" in str(info.value) or "does not fit" in str(info.value)


def test_resume_from_a_corrupt_checkpoint_is_a_clear_error(make_config):
    config = make_config(epochs=1)
    train(config)
    ckpt = Path(config.out) / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(FastVAEError) as info:
        train(make_config(epochs=2), resume=True)
    assert str(ckpt) in str(info.value)


def test_edited_checkpoints_are_one_line_not_a_traceback(make_config):
    """Checkpoints with fastvae's marker but damaged entries failed with KeyError/ValueError
    tracebacks (evaluate, export, --resume), a NaN model was evaluated to NaN without a word,
    and a resume position past the epoch's end was reported as a diverged model."""
    import fastvae

    config = make_config(epochs=1)
    train(config)
    ckpt = Path(config.out) / "checkpoints" / "last.ckpt"
    good = torch.load(ckpt, weights_only=True)

    def edited(**changes):
        state = {**good, **changes}
        for key in [k for k, v in changes.items() if v is None]:
            del state[key]
        torch.save(state, ckpt)

    nan_weights = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in good["model"].items()}
    for changes, words in (({"spec": {**good["spec"], "model": "zzz"}}, ("damaged", "unknown model 'zzz'")),
                           ({"spec": {**good["spec"], "data_shape": "abc"}}, ("damaged", "builds no model")),
                           ({"model": nan_weights}, ("non-finite weights", "diverged"))):
        edited(**changes)
        with pytest.raises(FastVAEError) as info:
            fastvae.load(config.out)
        assert str(ckpt) in str(info.value) and all(w in str(info.value) for w in words), info.value
    for changes, words in (({"optimizer": None}, ("damaged", "optimizer entry")),
                           ({"rng": None, "epoch": "one"}, ("rng, epoch entries",)),
                           ({"batch_in_epoch": 10**9}, ("batch 1000000000 of an epoch of",))):
        edited(**changes)
        with pytest.raises(FastVAEError) as info:
            train(make_config(epochs=2), resume=True)
        assert all(w in str(info.value) for w in words), info.value


# ----------------------------------------------------------------------------- Ctrl-C in process


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_epoch_then_resume_is_exact(tmp_path, make_config, patch_forward, capsys, signum):
    straight = make_config(out=tmp_path / "straight", epochs=3)
    train(straight)
    stop_step = STEPS_PER_EPOCH + 9  # the tenth step of epoch 2
    patch_forward(signal_at(stop_step, signum))
    config = make_config(out=tmp_path / "interrupted", epochs=3)
    # a program that handles SIGTERM itself gets train's result back (one that does not is
    # ended by it after the checkpoint: test_an_unhandled_sigterm_ends_the_program_after_the_checkpoint)
    own_sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        result = train(config)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    finally:
        signal.signal(signal.SIGTERM, own_sigterm)
    assert result.interrupted and result.steps == stop_step + 1
    assert "interrupted" in capsys.readouterr().out
    state = read_checkpoint(config.out)
    assert state["epoch"] == 1 and state["step"] == stop_step + 1
    assert state["batch_in_epoch"] == 10
    assert len(metrics_without_time(config.out)) == 1
    patch_forward(lambda call, terms: terms)
    result = train(config, resume=True)
    assert not result.interrupted and result.epochs == 3
    assert max_weight_diff(state_dict_of(straight.out), state_dict_of(config.out)) <= 1e-6
    assert metrics_without_time(straight.out) == metrics_without_time(config.out)


_UNHANDLED_SIGTERM = """
import os, signal, sys
import fastvae
from fastvae.config import TrainConfig

class Preempt:  # a scheduler's SIGTERM at step 5, once
    def on_train_batch_end(self, trainer, batch):
        if trainer.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

fastvae.train(TrainConfig(out=sys.argv[1], epochs=2, hidden_dim=16, latent_dim=4, reparam="torch", pictures=False,
                          progress=False), callbacks=[Preempt()])
print("the program went on")
"""


def test_an_unhandled_sigterm_ends_the_program_after_the_checkpoint(tmp_path):
    """A program that never handles SIGTERM was ended by it before; train() turned it into a
    stop request and returned, so a preempted sweep ran on until killed. Now the checkpoint is
    written, then the signal ends the program as it would have."""
    import subprocess
    import sys

    from testkit import SUBPROCESS_ENV

    done = subprocess.run([sys.executable, "-c", _UNHANDLED_SIGTERM, tmp_path / "run"], capture_output=True,
                          text=True, env=SUBPROCESS_ENV, timeout=240)
    assert done.returncode == -signal.SIGTERM, (done.returncode, done.stdout, done.stderr)
    assert "the program went on" not in done.stdout and "Traceback" not in done.stderr, done.stderr
    state = read_checkpoint(tmp_path / "run")
    assert state["step"] == 5 and state["batch_in_epoch"] == 5


def test_interrupt_on_the_last_step_of_an_epoch_says_so(make_config, patch_forward, capsys):
    patch_forward(signal_at(STEPS_PER_EPOCH - 1))
    result = train(make_config(epochs=3))
    assert result.interrupted and result.epochs == 1
    assert read_checkpoint(result.run_dir)["epoch"] == 1
    assert "interrupted" in capsys.readouterr().out


# ----------------------------------------------------------------------------- real signals

SIGNAL_RUN = ("train", "--epochs", "3", "--batch-size", "16", "--hidden-dim", "32",
              "--latent-dim", "4", "--seed", "3", "--reparam", "torch", "--quiet", "--no-pictures")
SIGNAL_STEPS_PER_EPOCH = 94  # ceil(1500 / 16)
STOP_BATCH = 30  # the child stops after the 30th batch of epoch 2: one checkpoint behind it
PAUSE_AT = {"PAUSE_AT_STEP": str(SIGNAL_STEPS_PER_EPOCH + STOP_BATCH)}
CALLBACK = ("--callback", "pause_points:PauseAtStep")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("signals") / "straight"
    rc, stdout, stderr = run_cli(*SIGNAL_RUN, "--out", out)
    assert rc == 0, stderr
    assert listing(out) == ["last.ckpt"]  # a clean run leaves no temporary files
    return out


@pytest.mark.slow
def test_sigkill_then_resume_matches_straight_run(tmp_path, straight_run):
    out = tmp_path / "killed"
    child = PausedChild(*SIGNAL_RUN, *CALLBACK, "--out", out, env=PAUSE_AT)
    assert child.where.startswith(f"PAUSED step {SIGNAL_STEPS_PER_EPOCH + STOP_BATCH} (epoch 2")
    child.kill()  # SIGKILL: no handler, no cleanup
    rc, _, _ = child.finish()
    assert rc == -signal.SIGKILL
    state = read_checkpoint(out)  # never half-written
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 0
    rc, stdout, stderr = run_cli("train", "--resume", "--out", out, "--quiet")
    assert rc == 0, stderr
    assert read_checkpoint(out)["epoch"] == 3
    assert max_weight_diff(state_dict_of(straight_run), state_dict_of(out)) <= 1e-6
    assert metrics_without_time(straight_run) == metrics_without_time(out)
    # whatever the kill left behind did not stop the resume; the run still has its checkpoint
    assert "last.ckpt" in listing(out)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_then_resume_matches_straight_run(tmp_path, straight_run, signum):
    out = tmp_path / "interrupted"
    child = PausedChild(*SIGNAL_RUN, *CALLBACK, "--out", out, env=PAUSE_AT)
    child.send_signal(signum)  # handled while paused: the step ends, then the loop stops
    rc, stdout, stderr = child.finish()
    assert rc == 130, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0], lines
    state = read_checkpoint(out)  # a mid-epoch checkpoint at exactly the stopped step
    assert (state["epoch"], state["batch_in_epoch"]) == (1, STOP_BATCH)
    assert state["step"] == SIGNAL_STEPS_PER_EPOCH + STOP_BATCH
    rc, _, stderr = run_cli("train", "--resume", "--out", out, "--quiet")
    assert rc == 0, stderr
    assert max_weight_diff(state_dict_of(straight_run), state_dict_of(out)) <= 1e-6
    assert metrics_without_time(straight_run) == metrics_without_time(out)
    assert listing(out) == ["last.ckpt"]


def test_resume_with_another_shape_on_the_command_line(tmp_path, make_config):
    config = make_config(epochs=1)
    train(config)
    rc, _, stderr = run_cli("train", "--resume", "--out", config.out, "--hidden-dim", "64", "--epochs", "2")
    assert_one_line_error(rc, stderr, "hidden_dim", "resume")


def test_host_memory_is_a_containers_cgroup_limit_where_lower(tmp_path):
    """In a container (Kubernetes, docker --memory) or a SLURM job's or systemd scope's cgroup
    the machine's memory is not what the process may use: beyond the lowest limit on its cgroup's
    path the OOM killer ends it with no message."""
    from fastvae.config import host_memory

    def memory(root, *lines):
        (tmp_path / "cgroup").write_text("".join(f"{line}\n" for line in lines))
        return host_memory(cgroup_root=str(tmp_path / root), cgroup_file=str(tmp_path / "cgroup"))

    def limit(path, value):
        path = tmp_path / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")

    physical = host_memory(cgroup_root=str(tmp_path / "none"), cgroup_file=str(tmp_path / "none"))
    assert physical > 0
    limit("v2/memory.max", "max")  # v2: the job's limit below an unlimited root
    limit("v2/slurm/job_7/memory.max", 1 << 30)
    limit("v2/slurm/job_7/step_0/memory.max", "max")
    assert memory("v2", "0::/slurm/job_7/step_0") == min(physical, 1 << 30)
    assert memory("v2", "0::/") == physical  # a container: its root, unlimited
    limit("v1/memory/memory.limit_in_bytes", 2**63 - 4096)  # v1's "unlimited"
    limit("v1/memory/process_api/abc/memory.limit_in_bytes", 1 << 29)
    assert memory("v1", "9:name=systemd:/", "4:memory:/process_api/abc", "0::/") == min(physical, 1 << 29)
    assert memory("v1", "4:cpu,memory:/elsewhere") == physical  # not there: the hierarchy's top, unlimited
    (tmp_path / "cgroup").unlink()
    limit("v2/memory.max", 1 << 28)  # no /proc/self/cgroup: the root's own file
    assert host_memory(cgroup_root=str(tmp_path / "v2"), cgroup_file=str(tmp_path / "cgroup")) == min(physical, 1 << 28)
    # what can be allocated now: the cgroup's limit less its usage, where the host has more free
    from fastvae.config import available_memory

    limit("v2/memory.current", 3 << 26)  # 192 of its 256 MiB used
    (tmp_path / "meminfo").write_text(f"MemTotal: {physical // 1024} kB\nMemAvailable: {1 << 30} kB\n")
    assert available_memory(str(tmp_path / "meminfo"), str(tmp_path / "v2"), str(tmp_path / "cgroup")) == 1 << 26
    limit("v2/memory.current", 1 << 28)  # at its limit: no room (0 would read as "unknown")
    assert available_memory(str(tmp_path / "meminfo"), str(tmp_path / "v2"), str(tmp_path / "cgroup")) == 1
    (tmp_path / "v2" / "memory.max").write_text("max\n")  # no limit: the host's MemAvailable
    assert available_memory(str(tmp_path / "meminfo"), str(tmp_path / "v2"), str(tmp_path / "cgroup")) == 1 << 40


def test_usable_cpus_follow_the_affinity_mask_and_a_cgroup_cpu_quota(tmp_path):
    """Under taskset, a SLURM or Kubernetes cpuset or docker --cpus the sampler took the
    machine's CPU count (os.cpu_count) for its threads."""
    import os
    import subprocess
    import sys

    from fastvae.config import usable_cpus

    def cpus(*lines):
        (tmp_path / "cgroup").write_text("".join(f"{line}\n" for line in lines))
        return usable_cpus(cgroup_root=str(tmp_path / "v2"), cgroup_file=str(tmp_path / "cgroup"))

    mask = len(os.sched_getaffinity(0))
    (tmp_path / "v2" / "pod").mkdir(parents=True)
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert cpus("0::/pod") == mask  # no quota
    (tmp_path / "v2" / "pod" / "cpu.max").write_text("50000 100000\n")  # half a CPU: one
    assert cpus("0::/pod") == 1
    (tmp_path / "v2" / "pod" / "cpu.max").write_text(f"{150000 * mask} 100000\n")  # 1.5 per CPU: the mask
    assert cpus("0::/pod") == mask
    pinned = subprocess.run([sys.executable, "-c", "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
                             "from fastvae.config import usable_cpus; print(usable_cpus())"],
                            capture_output=True, text=True, check=True, timeout=60)
    assert pinned.stdout.strip() == "1"


def test_a_data_folder_changed_since_the_run_is_refused_on_resume_and_evaluate(tmp_path, make_config, capsys):
    """A run on an image folder resumed after images were added (a new seeded split: some of the
    test images trained on) went on silently; prepared datasets had their dataset_id, data read
    into memory now has a digest of what was read. A copy of the same folder elsewhere resumes."""
    import shutil

    import numpy as np
    from PIL import Image

    from fastvae.cli import main

    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(folder / label / f"{i}.png")
    config = make_config(data=str(folder), epochs=1, test_fraction=0.2)
    train(config)
    assert read_checkpoint(config.out)["data_id"].startswith("content:")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    train(make_config(data=str(copy), epochs=2, test_fraction=0.2), resume=True)  # the same images elsewhere
    from fastvae.data import load_dataset

    same = load_dataset(copy, test_fraction=0.2)
    same.from_path = False  # as a program's own splits: digested against the run's
    train(make_config(data=str(copy), epochs=3, test_fraction=0.2), resume=True, splits=same)
    assert same.content_id is None  # the caller's object is left as it was
    from fastvae.data import content_id

    half = dataclasses.replace(same, train=same.train.bfloat16().requires_grad_())  # any tensor digests
    assert content_id(half).startswith("content:") and content_id(half) != content_id(same)
    Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(copy / "a" / "new.png")
    with pytest.raises(FastVAEError, match=r"is not the data the run trained on \(images or rows added, removed "
                                           r"or changed since, .*\); resume on that data or a copy of it"):
        train(make_config(data=str(copy), epochs=4, test_fraction=0.2), resume=True)
    capsys.readouterr()
    assert main(["evaluate", str(config.out), "--iwae-k", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is not the data {config.out} trained on" in err[0] and "pass --data" in err[0], err
    assert main(["evaluate", str(config.out), "--iwae-k", "0", "--data", str(copy)]) == 0  # named: taken
    train(make_config(data="digits", epochs=1, out=tmp_path / "bundled"))  # bundled data: no digest
    assert "data_id" not in read_checkpoint(tmp_path / "bundled")


def test_a_run_made_under_an_earlier_split_rule_keeps_it(tmp_path, make_config, capsys):
    """A program resuming a split_rule 2 run with today's default rule (3) was refused, for any
    data; it keeps the run's rule now. On an image folder (whose reading rule 3 changed:
    train/ + val/ is a split, .tif is read) evaluate uses the run's rule too."""
    import json

    import numpy as np
    from PIL import Image

    from fastvae.cli import main
    from fastvae.data import load_dataset

    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(folder / split / label / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(folder / "train" / "a" / "x.tif")
    train(make_config(data=str(folder), epochs=1, split_rule=2, test_fraction=0.25))
    train(make_config(data=str(folder), epochs=2, test_fraction=0.25), resume=True)  # default rule: the run's
    assert json.loads((tmp_path / "run" / "config.json").read_text())["split_rule"] == 2
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--iwae-k", "0", "--json"]) == 0
    n = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"]
    assert n == len(load_dataset(folder, split_rule=2, test_fraction=0.25).test) == 6  # 24 images x 0.25
    assert len(load_dataset(folder, test_fraction=0.25).test) == 8  # today's: val/ is the test split
