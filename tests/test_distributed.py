"""Multi-process semantics on CPU (gloo, spawned processes): 2 ranks x B/2 == 1 rank x B.

The deterministic MSE autoencoder makes the comparison exact: with a VAE the per-rank noise
streams differ by design. Evaluation sharding and precision are checked separately.
"""

import math
import os

import signal

import pytest
import torch

from fastvae import run_folder
from fastvae.checkpoint import read_checkpoint
from fastvae.config import TrainConfig
from fastvae.errors import FastVAEError
from fastvae.data import EpochBatches, Splits, load_dataset
from fastvae.evaluation import elbo_sums
from fastvae.models import build_model
from fastvae.trainer import train


@pytest.fixture(scope="module")
def small_digits():
    splits = load_dataset("digits")
    return Splits("digits", splits.train[:256], splits.test[:60])


def config(out, **overrides):
    base = dict(kind="ae", hidden_dim=64, epochs=1, accelerator="cpu", progress=False,
                pictures=False, out=str(out))
    return TrainConfig(**{**base, **overrides})


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_epoch_batches_shard_a_global_batch_exactly():
    data = torch.arange(100)
    single = list(EpochBatches(data, 20, seed=3, epoch=2))
    shards = [list(EpochBatches(data, 10, seed=3, epoch=2, rank=r, world_size=2)) for r in range(2)]
    for i, batch in enumerate(single):
        assert sorted(batch.tolist()) == sorted(shards[0][i].tolist() + shards[1][i].tolist())
    # a new epoch reshuffles; padding gives every rank the same number of rows
    assert not torch.equal(torch.cat(single), torch.cat(list(EpochBatches(data, 20, seed=3, epoch=3))))
    odd = [EpochBatches(torch.arange(7), 2, seed=0, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert {len(o.indices) for o in odd} == {3}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_match_one_and_resume_in_one(tmp_path, small_digits):
    one = train(config(tmp_path / "one", batch_size=32, epochs=2), splits=small_digits)
    environment = dict(os.environ)
    two = train(config(tmp_path / "two", batch_size=16, devices=2, strategy="ddp_spawn"), splits=small_digits)
    # the launcher's MASTER_PORT was left set: a program's next ddp_spawn run reused the port
    assert dict(os.environ) == environment
    one_after_1 = read_checkpoint(tmp_path / "one")  # after 2 epochs; rebuild epoch 1 below
    first = train(config(tmp_path / "one_e1", batch_size=32), splits=small_digits)
    w1, w2 = read_checkpoint(tmp_path / "one_e1")["model"], read_checkpoint(tmp_path / "two")["model"]
    assert max_diff(w1, w2) < 1e-6  # same parameters after 8 steps
    assert two.metrics[0]["train_loss"] == pytest.approx(first.metrics[0]["train_loss"], rel=1e-6)
    # evaluation over the test set happened once in total: same test MSE as one rank
    assert two.metrics[0]["test_recon"] == pytest.approx(first.metrics[0]["test_recon"], rel=1e-6)
    assert read_checkpoint(tmp_path / "two")["world_size"] == 2
    # resume the 2-process checkpoint in 1 process with the global batch: epoch 2 == straight run
    resumed = train(config(tmp_path / "two", batch_size=32, epochs=2), resume=True, splits=small_digits)
    assert resumed.epochs == 2 and len(resumed.metrics) == 2
    assert max_diff(read_checkpoint(tmp_path / "two")["model"], one_after_1["model"]) < 1e-5
    assert resumed.metrics[1]["train_loss"] == pytest.approx(one.metrics[1]["train_loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)  # the old code hung here: one rank waited in the checkpoint's barrier
def test_a_stop_seen_by_one_rank_stops_every_rank_and_resumes_exactly(tmp_path, small_digits):
    """SIGTERM to rank 0 only, mid-epoch: both ranks stop after the same step, the checkpoint
    holds each rank's own noise stream and the epoch's sums over both ranks, and the resumed
    2-rank VAE run ends with the uninterrupted run's weights and metrics. On the way, rank 0's
    --checkpoint-minutes clock (due at every step) makes both ranks write mid-epoch checkpoints
    together (one rank alone would wait in the save's collectives), and they change nothing."""
    from pause_points import SignalAtStep
    from testkit import CheckpointSteps

    # the largest seed: rank 1's own seed wraps around into the 32-bit range (was a traceback)
    vae = dict(kind="vae", hidden_dim=32, latent_dim=4, batch_size=16, devices=2, strategy="ddp_spawn",
               seed=2**32 - 1)
    straight = train(config(tmp_path / "straight", **vae), splits=small_digits)
    seen = CheckpointSteps(log=tmp_path / "seen.txt")
    stopped = train(config(tmp_path / "stopped", **vae, checkpoint_minutes=1e-9), splits=small_digits,
                    callbacks=[seen, SignalAtStep(0, 3)])
    assert stopped.interrupted and stopped.steps == 3
    assert seen.saves() == [1, 2]  # then step 3's stop checkpoint
    state = read_checkpoint(tmp_path / "stopped")
    assert state["batch_in_epoch"] == 3 and state["partial_of_all_ranks"]
    assert state["partial"][2] == 3 * 16 * 2  # examples of both ranks' three steps
    rank0, rank1 = state["rank_rng"]
    assert torch.equal(rank0["torch"], state["rng"]["torch"]) and not torch.equal(rank0["torch"], rank1["torch"])
    resumed = train(config(tmp_path / "stopped", **vae), resume=True, splits=small_digits)
    assert max_diff(read_checkpoint(tmp_path / "stopped")["model"], read_checkpoint(tmp_path / "straight")["model"]) == 0
    for key in ("train_loss", "train_recon", "train_kl", "test_neg_elbo"):
        assert resumed.metrics[0][key] == pytest.approx(straight.metrics[0][key], rel=1e-12), key


def test_process_layouts_that_cannot_start_are_refused(monkeypatch):
    """Several nodes without a launcher would wait 30 minutes for nodes that never come; more
    CPU processes than cores would crawl."""
    from fastvae.errors import FastVAEError
    from fastvae.process_layout import check_processes

    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS",
                 "LSB_JOBID", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(FastVAEError, match="multi-node launcher"):
        check_processes(config("run", num_nodes=2))
    for name, value in (("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500"), ("NODE_RANK", "1")):
        monkeypatch.setenv(name, value)
    check_processes(config("run", num_nodes=2))
    from fastvae.config import usable_cpus

    cores = usable_cpus()  # the affinity mask's, not the machine's (taskset, a cpuset)
    check_processes(config("run", devices=cores))
    with pytest.raises(FastVAEError, match=f"may use {cores} cores"):
        check_processes(config("run", devices=cores + 1))


_TORCHRUN = {"TORCHELASTIC_RUN_ID": "none", "RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
_SRUN = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train",
         "SLURM_JOB_ID": "7", "SLURM_NODELIST": "node1", "SLURM_STEP_ID": "0"}


@pytest.mark.parametrize("launcher, env, layout", [
    ("torchrun", {**_TORCHRUN, "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, (8, 2)),
    ("srun", {**_SRUN, "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2"}, (8, 2)),
    ("srun", {**_SRUN, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1"}, (1, 1)),
])
def test_a_launchers_layout_must_be_the_runs(monkeypatch, launcher, env, layout):
    """Under torchrun or srun each process is one rank: --devices/--num-nodes that differ made
    Fabric train every process alone into one run folder (--devices 1 under 2 processes), or
    silently train on fewer devices than asked (--devices 2 in a 1-task SLURM job)."""
    from fastvae.errors import FastVAEError
    from fastvae.process_layout import check_processes

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_NNODES",
                 "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NAME", "SLURM_STEPID", *_TORCHRUN, *_SRUN):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("fastvae.process_layout.usable_cpus", lambda: 64)
    per_node, nodes = layout
    check_processes(config("run", devices=per_node, num_nodes=nodes, accelerator="cpu"))
    for devices, num_nodes in ((per_node + 1, nodes), (1, nodes + 1), (max(1, per_node * nodes // 2), 1)):
        if (devices, num_nodes) == layout:
            continue
        with pytest.raises(FastVAEError, match=rf"^{launcher} started {per_node} process(es)? per node on "
                                               rf"{nodes} nodes?, and each is one rank: give --devices {per_node} "
                                               rf"--num-nodes {nodes} \(not --devices {devices} --num-nodes {num_nodes}\)"):
            check_processes(config("run", devices=devices, num_nodes=num_nodes, accelerator="cpu"))
    if launcher == "srun":
        # no job step (an sbatch script or salloc shell running fastvae without srun): one
        # process, which may train alone as before
        monkeypatch.delenv("SLURM_STEP_ID")
        check_processes(config("run", devices=1, num_nodes=1, accelerator="cpu"))
        # a job named interactive: Fabric starts the processes, as without SLURM
        monkeypatch.setenv("SLURM_STEP_ID", "0")
        monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
        check_processes(config("run", devices=per_node + 1, num_nodes=1, accelerator="cpu"))


@pytest.mark.parametrize("block_rows", [None, 4], ids=["one-noise-block", "noise-blocks-of-4-rows"])
def test_sharded_evaluation_equals_single_process(monkeypatch, block_rows):
    """Also with the test rows' noise drawn a block at a time (it was drawn for all rows at
    once: memory that grew with the split), blocks crossing batches and ranks' rows."""
    import fastvae.evaluation
    from fastvae.evaluation import RowNoise

    torch.manual_seed(0)
    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 32})
    latent = math.prod(model.latent_shape)
    if block_rows:
        monkeypatch.setattr(fastvae.evaluation, "EPS_BLOCK_VALUES", block_rows * latent)
    data = torch.rand(37, 1, 8, 8)
    whole = elbo_sums(model, data, seed=4, batch_size=8)
    shards = sum(elbo_sums(model, data, seed=4, batch_size=5, rank=r, world_size=3) for r in range(3))
    torch.testing.assert_close(shards, whole, rtol=1e-6, atol=0)  # fp32 sums in another order
    assert whole[3] == 37
    noise = RowNoise(37, model.latent_shape, 4, "cpu")
    rows = torch.cat([noise[torch.arange(i, min(i + 3, 37))] for i in range(0, 37, 3)])
    assert torch.equal(rows, noise[torch.arange(37)])  # a row's noise, however it is asked for
    one_draw = torch.randn(37, *model.latent_shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(rows, one_draw) == (block_rows is None)  # within a block: the old single draw
    if block_rows:  # blocks of their own noise (seeds k * 2**32 apart drew the same on a CPU)
        assert not any(torch.equal(rows[:4], rows[k * 4:k * 4 + 4]) for k in range(1, 9))
    assert abs(float(rows.mean())) < 0.2 and abs(float(rows.var()) - 1) < 0.2


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_mixed_precision_on_cpu_trains_with_finite_loss(tmp_path, small_digits, precision):
    result = train(config(tmp_path / "bf16", kind="vae", epochs=2, precision=precision), splits=small_digits)
    losses = [row["train_loss"] for row in result.metrics]
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0]
    fp32 = train(config(tmp_path / "fp32", kind="vae", epochs=2), splits=small_digits)
    # bf16 autocast changes the numbers a little, not the course of training (1e-5 apart on the
    # dev CPU; a run that does not train ends ~8% higher)
    assert losses[1] == pytest.approx(fp32.metrics[1]["train_loss"], rel=5e-3)


def fp16_fabric_on_cpu(config, callbacks=None, trackers=True):
    """Fabric turns 16-mixed into bf16 on a CPU; build the fp16 plugin with a CPU GradScaler
    directly, with a scale so large that the first steps overflow and are skipped."""
    from lightning_fabric import Fabric

    from fastvae.fabric_setup import fp16_plugin

    return Fabric(accelerator="cpu", devices=1, callbacks=callbacks,
                  plugins=[fp16_plugin("cpu", init_scale=2.0**30)])


def test_fp16_loss_scale_is_logged_checkpointed_and_resumed(tmp_path, small_digits, monkeypatch):
    monkeypatch.setattr("fastvae.trainer.make_fabric", fp16_fabric_on_cpu)
    straight = train(config(tmp_path / "straight", kind="vae", epochs=2), splits=small_digits)
    scales = [row["loss_scale"] for row in straight.metrics]
    assert scales[0] < 2.0**30  # overflowing steps were skipped and the scale backed off
    assert read_checkpoint(tmp_path / "straight")["precision"]["scale"] == scales[1]
    assert all(math.isfinite(row["train_loss"]) for row in straight.metrics)

    train(config(tmp_path / "resumed", kind="vae", epochs=1), splits=small_digits)
    resumed = train(config(tmp_path / "resumed", kind="vae", epochs=2), resume=True, splits=small_digits)
    # the resumed run continues with the saved scale: no second round of skipped steps
    assert resumed.metrics[1]["loss_scale"] == scales[1]
    assert max_diff(read_checkpoint(tmp_path / "resumed")["model"],
                    read_checkpoint(tmp_path / "straight")["model"]) == 0


def _free_port() -> int:
    """A free port below the kernel's ephemeral range: the launchers take seconds to bind it,
    and meanwhile an ephemeral one may go to another test's socket or port-0 search."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            first_ephemeral = int(ranges.read().split()[0])
    except OSError:
        first_ephemeral = 32768  # Linux's default
    for port in random.Random().sample(range(20000, max(first_ephemeral, 20100)), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port from 20000 up")


TWO_NODE_RUN = ["train", "--kind", "ae", "--hidden-dim", "32", "--epochs", "1", "--accelerator", "cpu",
                "--no-pictures", "--quiet"]


def _two_nodes(tmp_path, *node_args) -> tuple[list[int], list[str]]:
    """``torchrun --nnodes 2`` with one process per "node" on this machine, node r running
    ``fastvae train`` with TWO_NODE_RUN and ``node_args[r]``: (exit statuses, logs)."""
    import subprocess
    import sys

    from testkit import REPO, SUBPROCESS_ENV

    port = _free_port()
    logs = [open(tmp_path / f"node{rank}.log", "w") for rank in (0, 1)]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "fastvae", *TWO_NODE_RUN, "--devices", "1", "--num-nodes", "2", "--strategy", "ddp",
         *map(str, node_args[rank])],
        # torchrun leaves its log folders (torchelastic_*) in the temporary folder: this test's;
        # output into files: a node blocked on a full pipe would hold the other in a collective
        cwd=REPO, env={**SUBPROCESS_ENV, "TMPDIR": str(tmp_path)}, stdout=log, stderr=subprocess.STDOUT)
        for rank, log in zip((0, 1), logs)]
    try:
        for node in nodes:
            node.wait(timeout=240)
    finally:
        for node, log in zip(nodes, logs):
            node.kill()
            log.close()
    return [node.returncode for node in nodes], [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_under_torchrun_match_one_process(tmp_path):
    """The README's multi-node recipe on one machine: ``torchrun --nnodes 2`` with one process
    per "node". Node ranks become global ranks, only rank 0 writes, and the run equals one
    process with the global batch."""
    from testkit import run_cli, state_dict_of

    node = ["--batch-size", 32, "--out", tmp_path / "two_nodes"]
    statuses, logs = _two_nodes(tmp_path, node, node)
    assert statuses == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert not any("global batch" in log for log in logs), logs[0][-2000:]  # --quiet: no such line
    rc, _, err = run_cli(*TWO_NODE_RUN, "--batch-size", "64", "--out", tmp_path / "one")
    assert rc == 0, err
    two = read_checkpoint(tmp_path / "two_nodes")
    assert two["world_size"] == 2
    assert max_diff(two["model"], state_dict_of(tmp_path / "one")) < 1e-6
    assert sorted(p.name for p in (tmp_path / "two_nodes").iterdir()) == [
        "checkpoints", "config.json", "metrics.csv"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("node1, said", [
    (["--seed", 1, "--batch-size", 16], "--batch-size 32 on rank 0, 16 on rank 1, --seed 0 on rank 0, 1 on rank 1"),
    (["--data", "COPY"], "--data reads other data (digits: 1500 + 297 images of 1x8x8 on rank 0, "),
], ids=["seed-and-batch-size", "data"])
def test_nodes_started_with_other_settings_or_data_stop_with_one_line(tmp_path, node1, said):
    """Another --seed on node 1 trained silently on overlapping shares of each epoch; another
    --batch-size or data ended in gloo's collective mismatch, reported by the other node as a
    killed rank. Every rank now says which setting differs, before training, and nothing is
    written."""
    import numpy as np

    from fastvae.data import load_dataset

    copy = tmp_path / "copy.npy"  # digits-like data of the same shape, not the same images
    np.save(copy, (load_dataset("digits").train[:1000].numpy() * 16).round().astype(np.uint8) * 15)
    out = ["--batch-size", 32, "--out", tmp_path / "run"]
    statuses, logs = _two_nodes(tmp_path, out, [*out, *[copy if arg == "COPY" else arg for arg in node1]])
    for log in logs:  # each node: the one line from its rank, then torchrun's report of the exit
        assert ("fastvae train: error: rank 1 was started with other settings than rank 0: " + said) in log, log
        assert "FastVAEError" not in log, log
    assert statuses == [1, 1], (statuses, logs)  # torchrun's status for a failed rank
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_node_waiting_for_one_that_never_comes_says_so_and_stops_on_sigterm(tmp_path):
    """Node 0 of two, node 1 never started: torch's join held the main thread (no Python signal
    handler runs there) for 30 minutes, silent, and a SIGTERM did nothing."""
    import select
    import subprocess
    import sys
    import time

    from testkit import REPO, SUBPROCESS_ENV

    env = {**SUBPROCESS_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "NODE_RANK": "0",
           "FASTVAE_JOIN_NOTE_S": "0.5", "TMPDIR": str(tmp_path)}
    node = subprocess.Popen([sys.executable, "-m", "fastvae", *TWO_NODE_RUN, "--devices", "1", "--num-nodes", "2",
                             "--strategy", "ddp", "--out", str(tmp_path / "run")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        said, deadline = "", time.monotonic() + 120
        while "waiting for the other ranks" not in said and node.poll() is None and time.monotonic() < deadline:
            if select.select([node.stderr], [], [], 1)[0]:  # the note is an event; this bounds the wait for it
                said += node.stderr.readline()
        assert "fastvae train: waiting for the other ranks to join (2 in all, rendezvous at 127.0.0.1:" in said, said
        node.send_signal(signal.SIGTERM)
        rc = node.wait(timeout=60)
        said += node.stderr.read()
    finally:
        node.kill()
        node.stderr.close()
    assert rc == 130 and said.rstrip().endswith("fastvae train: interrupted"), (rc, said)
    assert "Traceback" not in said, said


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_a_ddp_spawn_launcher_stops_its_ranks_cleanly(tmp_path):
    """The launcher of spawned ranks only waits for them: a SIGTERM to it alone (``kill PID``)
    is passed on, the ranks stop together and write the checkpoint, one line, exit 130 (the
    launcher used to exit at once, leaving its ranks training on)."""
    from testkit import SUBPROCESS_ENV, REPO, run_cli

    env = {**SUBPROCESS_ENV, "PYTHONPATH": str(REPO / "tests"), "SIGNAL_AT_STEP": "3"}
    rc, out, err = run_cli("train", "--data", "digits", "--hidden-dim", "16", "--epochs", "2", "--devices", "2",
                           "--strategy", "ddp_spawn", "--accelerator", "cpu", "--no-pictures", "--out", tmp_path / "run",
                           "--callback", "pause_points:SignalLauncherAtStep", env=env)
    assert rc == 130, err[-2000:]
    state = read_checkpoint(tmp_path / "run")  # the ranks stop at the step the forwarded signal meets
    assert 3 <= state["step"] < 2 * 12, state["step"]  # 12 steps an epoch
    assert f"interrupted: checkpoint written at step {state['step']} " in out, out
    assert "Traceback" not in err, err[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy, line", [
    # Fabric relaunches the command for rank 1: rank 0's death reaches it as a failed collective
    ("ddp", "fastvae train: error: rank 1 lost contact with the other ranks ("),
    # torch.multiprocessing's launcher sees rank 0 end and stops rank 1
    ("ddp_spawn", "fastvae train: error: rank 0 was killed by SIGKILL ("),
])
def test_a_rank_killed_mid_run_is_one_line_from_the_others(tmp_path, strategy, line):
    """SIGKILL to rank 0 at step 3 (the OOM killer): what the run prints is one line saying
    so and how to go on, not a rank's 75-line traceback or the launcher's."""
    from testkit import SUBPROCESS_ENV, REPO, run_cli

    env = {**SUBPROCESS_ENV, "PYTHONPATH": str(REPO / "tests"), "SIGNAL_RANK": "0", "SIGNAL_AT_STEP": "3",
           "SIGNAL_NUM": str(int(signal.SIGKILL))}
    rc, _, err = run_cli("train", "--data", "digits", "--hidden-dim", "16", "--epochs", "2", "--devices", "2",
                         "--strategy", strategy, "--accelerator", "cpu", "--no-pictures", "--quiet",
                         "--out", tmp_path / "run", "--callback", "pause_points:SignalAtStep", env=env)
    assert rc == (-signal.SIGKILL if strategy == "ddp" else 2), err[-2000:]  # ddp: rank 0 is this process
    assert "Traceback" not in err, err[-3000:]
    errors = [e for e in err.splitlines() if e.startswith("fastvae train: error:")]
    assert len(errors) == 1 and errors[0].startswith(line), err[-2000:]
    # killed before the first checkpoint: the launcher, which sees rank 0's folder, does not
    # advise a --resume; a rank that only lost contact and sees none says both (its folder may
    # be a node-local copy)
    advice = ("no checkpoint was written yet: run the same command again" if strategy == "ddp_spawn"
              else "continue the run with --resume from its last checkpoint where rank 0 wrote one "
                   "(else run the same command again)")
    assert errors[0].endswith(advice), errors


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_a_non_finite_stop_on_two_ranks_is_one_line_and_leaves_no_files(tmp_path, strategy):
    """Both ranks diverge at the same step, and each printed the same error line (under ddp two
    lines): rank 0 says it, once. Under ddp_spawn torch left the failed rank's traceback in the
    temp folder (pytorch-errorfile-*.pickle)."""
    from testkit import SUBPROCESS_ENV, run_cli

    temp = tmp_path / "tmp"
    temp.mkdir()
    rc, _, err = run_cli("train", "--data", "digits", "--hidden-dim", "64", "--batch-size", "128", "--epochs", "1",
                         "--likelihood", "gaussian", "--sigma", "0.01", "--lr", "1e3", "--devices", "2",
                         "--strategy", strategy, "--accelerator", "cpu", "--no-pictures", "--quiet",
                         "--out", tmp_path / "run", env={**SUBPROCESS_ENV, "TMPDIR": str(temp)})
    errors = [line for line in err.splitlines() if line.startswith("fastvae train: error:")]
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and "training stopped" in errors[0], err[-3000:]
    assert not list(temp.glob("pytorch-errorfile-*")), sorted(p.name for p in temp.iterdir())


def test_the_advice_after_a_lost_rank_follows_the_checkpoints_the_rank_can_see(tmp_path):
    """Rank 0 writes the checkpoints: where none is in its folder there is nothing to resume;
    another rank's folder may be a node-local copy without them, so it says both."""
    from fastvae.rank_errors import RESUME, lost_peer_error
    from fastvae.run_folder import LAST

    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    run = tmp_path / "run"
    assert str(lost_peer_error(0, lost, run)).endswith("no checkpoint was written yet: run the same command again")
    assert str(lost_peer_error(1, lost, run)).endswith(f"{RESUME} where rank 0 wrote one (else run the same command again)")
    (run / LAST).parent.mkdir(parents=True)
    (run / LAST).write_bytes(b"a checkpoint")
    for rank in (0, 1):
        message = str(lost_peer_error(rank, lost, run))
        assert message.startswith(f"rank {rank} lost contact with the other ranks (Connection closed by peer)")
        assert message.endswith(RESUME), message


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_lost_node_resumes_on_fewer_or_more_processes_from_the_kept_epoch_end(tmp_path, small_digits, capsys):
    """A run lost mid-epoch 2 (its last checkpoint mid-epoch, step 20) resumed on another number
    of processes (the nodes left, or new ones) starts from the epoch's end its mid-epoch
    checkpoint kept (step 16), says so, and ends as a run resumed from that epoch's end."""
    from testkit import CheckpointSteps, Crash, metrics_without_time

    reference, run = tmp_path / "reference", tmp_path / "run"
    train(config(reference, batch_size=16), splits=small_digits)  # 16 steps an epoch
    train(config(reference, batch_size=16, epochs=2, devices=2, strategy="ddp_spawn"), resume=True,
          splits=small_digits)
    with pytest.raises(Crash):
        train(config(run, batch_size=16, epochs=2, checkpoint_every=2), splits=small_digits,
              callbacks=[CheckpointSteps(crash_at=21)])
    assert read_checkpoint(run)["step"] == 20
    capsys.readouterr()
    train(config(run, batch_size=16, epochs=2, checkpoint_every=2, devices=2, strategy="ddp_spawn"), resume=True,
          splits=small_digits)
    note = capsys.readouterr().err
    assert "is mid-epoch (step 20) and resumes only on the 1 process(es) it was made with" in note, note
    assert "resuming from the end of epoch 1" in note and "step 16" in note
    assert max_diff(read_checkpoint(run)["model"], read_checkpoint(reference)["model"]) == 0
    assert metrics_without_time(run) == metrics_without_time(reference)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_ranks_own_error_is_reported_not_the_others_lost_contact(tmp_path, small_digits):
    """Rank 1 fails with its own one-line error: that is what the run reports, not rank 0's
    lost contact with it (the lowest rank's record won, and hid the cause)."""
    from testkit import FailAtStep

    with pytest.raises(FastVAEError, match="rank 1's own failure at step 3"):
        train(config(tmp_path / "run", batch_size=16, devices=2, strategy="ddp_spawn"), splits=small_digits,
              callbacks=[FailAtStep(1, 3)])
    # a bug's exception is not a one-line error: its traceback is what the run shows, whichever
    # rank's failure the launcher saw first (rank 0's lost contact may come first)
    from fastvae.rank_errors import RankBug

    with pytest.raises(RankBug, match="(?s)rank 1 failed:.*Traceback.*ValueError: rank 1's own failure at step 3"):
        train(config(tmp_path / "bug", batch_size=16, devices=2, strategy="ddp_spawn"), splits=small_digits,
              callbacks=[FailAtStep(1, 3, bug=True)])


@pytest.mark.slow
@pytest.mark.timeout(300)  # rank 1 used to wait at the next collective for a rank 0 that had left
@pytest.mark.parametrize("strategy,limit,fails", [
    ("ddp_spawn", 4096, "checkpoints/last.ckpt"), ("fsdp", 4096, "checkpoints/last.ckpt"),
    ("ddp", 64, "metrics.csv")])
def test_a_file_rank_0_cannot_write_stops_every_rank_with_its_error(tmp_path, strategy, limit, fails):
    """Rank 0's epoch-2 checkpoint (or, at a lower limit, the metrics.csv written before it)
    outgrows the file-size limit, as on a full disk: every rank stops (none waits at a
    collective), rank 0's error is the one line on stderr (spawned ranks: the launcher prints
    it, not torch's traceback of the rank), exit 2, epoch 1's checkpoint intact and no
    checkpoint without its metrics row."""
    from testkit import REPO, SUBPROCESS_ENV, run_cli

    env = {**SUBPROCESS_ENV, "PYTHONPATH": str(REPO / "tests"), "LIMIT_AT_STEP": "14",
           "LIMIT_BYTES": str(limit)}  # 12 steps an epoch; metrics.csv ~230 bytes
    run = tmp_path / "run"
    rc, _, err = run_cli("train", "--data", "digits", "--hidden-dim", "16", "--epochs", "2", "--devices", "2",
                         "--strategy", strategy, "--accelerator", "cpu", "--no-pictures", "--quiet", "--out", run,
                         "--callback", "pause_points:LimitFileSizeAtStep", env=env, timeout=240)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert errors and len(set(errors)) == 1, err[-3000:]
    assert errors[0].startswith(f"fastvae train: error: cannot write {run / fails}: ")
    # rank 0's error, once (spawned ranks: the launcher prints it); the other rank ends quietly
    assert len(errors) == 1, err[-3000:]
    assert read_checkpoint(run)["epoch"] == 1
    # a row is written before its checkpoint (a resume drops rows past the checkpoint's epoch)
    rows = [1] if fails == "metrics.csv" else [1, 2]
    assert [row["epoch"] for row in run_folder.read_metrics(run / run_folder.METRICS_CSV)] == rows
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "metrics.csv"]


def test_rank_0_failures_stop_the_other_ranks_quietly():
    """``Trainer._on_rank0``: the work runs on rank 0 only; its error is raised there as itself
    and on the other ranks as ``_RankZeroFailed`` (which ``_fit`` turns into a quiet return), by
    one broadcast from rank 0 (ranks played one after the other over a shared channel)."""
    import types

    from fastvae import trainer as T

    channel: list = []

    class Fabric:
        def broadcast(self, obj, src=0):
            assert src == 0
            if obj is not None:
                channel.append(obj)
            return channel[-1] if channel else None

    def rank(r, world):
        t = types.SimpleNamespace(rank=r, world=world, fabric=Fabric())
        t._share_rank0_failure = types.MethodType(T.Trainer._share_rank0_failure, t)
        return t

    ran = []
    T.Trainer._on_rank0(rank(0, 2), lambda: ran.append(0))
    T.Trainer._on_rank0(rank(1, 2), lambda: ran.append(1))
    assert ran == [0] and channel == []

    full = OSError(28, "No space left on device", "run/metrics.csv")

    def fail():
        raise full

    with pytest.raises(OSError) as raised:
        T.Trainer._on_rank0(rank(0, 2), fail)
    assert raised.value is full
    with pytest.raises(T._RankZeroFailed, match="OSError: .*No space left on device"):
        T.Trainer._on_rank0(rank(1, 2), fail)
    channel.clear()
    with pytest.raises(OSError):  # one process: no broadcast
        T.Trainer._on_rank0(rank(0, 1), fail)
    assert channel == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_program_without_a_main_guard_does_not_train_again_in_its_spawned_ranks(tmp_path):
    """ddp_spawn starts each rank by importing the program: without `if __name__ ==
    "__main__":` the ranks ran the program's train() calls again, into the same folder."""
    import subprocess
    import sys

    from testkit import SUBPROCESS_ENV

    program = tmp_path / "unguarded.py"
    program.write_text(
        "import fastvae\nfrom fastvae.config import TrainConfig\n"
        f"fastvae.train(TrainConfig(out={str(tmp_path / 'run')!r}, epochs=1, hidden_dim=16, latent_dim=4, "
        "reparam='torch', pictures=False, progress=False, devices=2, strategy='ddp_spawn', accelerator='cpu'))\n")
    done = subprocess.run([sys.executable, program], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=240)
    assert done.returncode != 0
    assert "put the program's calls under `if __name__ == \"__main__\":`" in done.stderr, done.stderr[-3000:]
    assert "no checkpoint was written yet: run the same command again" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
