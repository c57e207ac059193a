"""Ctrl-C and SIGTERM in every phase of the command line: exit status 130, one line, no
traceback, and no half-written or temporary file left behind.

Each test stops a real ``fastvae`` process at a known point (``pause_points.py``: the child says
PAUSED and waits), signals it there, then checks what it printed and what it left on disk.
Training itself (a checkpoint at the stopped step, exact resume) is tested in
``test_reliability.py``.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from testkit import REPO, SUBPROCESS_ENV, PausedChild, run_cli, tiny_config
from fastvae.trainer import train

pytestmark = pytest.mark.slow

TRAIN = ("train", "--epochs", "1", "--hidden-dim", "16", "--latent-dim", "4", "--reparam", "torch",
         "--quiet")


def assert_interrupted(child: PausedChild, command: str, signum=signal.SIGINT) -> None:
    """Signal the paused child: status 130 and the one line ``fastvae COMMAND: interrupted``."""
    child.send_signal(signum)
    rc, stdout, stderr = child.finish()
    assert rc == 130, (rc, stdout, stderr)
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert lines == [f"fastvae {command}: interrupted"], stdout + stderr


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders (hidden ``.NAME.tmp-*``) anywhere below ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*tmp*"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny run with its pictures, and its decoder exported."""
    from fastvae.export import export_decoder

    out = tmp_path_factory.mktemp("interrupts") / "run"
    train(tiny_config(out, epochs=1, pictures=True))
    export_decoder(out, out / "decoder.onnx", check_batches=(3,))
    return out


@pytest.mark.parametrize("where", ["import:numpy.linalg", "import:numpy._core.multiarray",
                                   "import:lightning_fabric.fabric", "call:fastvae.data:load_dataset"],
                         ids=["importing-numpy-linalg", "importing-numpy-core", "importing-lightning-fabric",
                              "loading-data"])
def test_start_up(tmp_path, where):
    """A KeyboardInterrupt inside numpy's import ended in a 58-line RecursionError traceback
    (numpy.linalg), or was swallowed and the run trained on (numpy._core.multiarray)."""
    out = tmp_path / "run"
    assert_interrupted(PausedChild(*TRAIN, "--out", out, where=where), "train")
    assert not out.exists() or not any(out.iterdir())  # nothing written yet


def test_training_before_the_first_checkpoint(tmp_path):
    """The first epoch is cut short: a mid-epoch checkpoint, status 130, one line."""
    out = tmp_path / "run"
    child = PausedChild(*TRAIN, "--out", out, "--callback", "pause_points:PauseAtStep",
                        env={"PAUSE_AT_STEP": "5"})
    child.send_signal(signal.SIGTERM)
    rc, stdout, stderr = child.finish()
    assert rc == 130 and "Traceback" not in stderr, stderr
    assert [line for line in (stdout + stderr).splitlines() if line.strip()] == [
        "interrupted: checkpoint written at step 5 (epoch 1); continue with --resume"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "metrics.csv"]
    assert leftovers(out) == []


@pytest.mark.parametrize("to", ["launcher", "group"])
def test_spawned_ranks_before_training(tmp_path, to):
    """--strategy ddp_spawn, stopped while the ranks set up: the launcher's forwarded stop
    (SIGUSR1) ended them by its default action: 'rank 1 was ended by SIGUSR1 ... continue the
    run with --resume', of a run that had no checkpoint; a Ctrl-C to the whole group (the
    terminal's) also printed the ranks' KeyboardInterrupt tracebacks."""
    out = tmp_path / "run"
    child = PausedChild(*TRAIN, "--strategy", "ddp_spawn", "--devices", "2", "--accelerator", "cpu",
                        "--out", out, "--callback", "pause_points:PauseRankAtStart", session=True)
    (child.send_signal if to == "launcher" else child.signal_group)(signal.SIGINT)
    rc, stdout, stderr = child.finish()
    assert rc == 130, (rc, stdout, stderr)
    assert "Traceback" not in stderr and "SIGUSR1" not in stderr and "--resume" not in stdout + stderr, (stdout, stderr)
    assert stderr.strip().splitlines()[-1] == "fastvae train: interrupted", stderr
    assert not (out / "checkpoints").exists() and leftovers(out) == []


def test_a_stop_during_the_last_epochs_end_is_not_ignored(tmp_path):
    """A Ctrl-C during the last step, evaluation or checkpoint was ignored: pictures were drawn
    and the run exited 0."""
    out = tmp_path / "run"
    rc, stdout, stderr = run_cli(*TRAIN, "--out", out, "--callback", "pause_points:SignalAtStep",
                                 env={**SUBPROCESS_ENV, "PYTHONPATH": str(REPO / "tests"), "SIGNAL_RANK": "0",
                                      "SIGNAL_AT_STEP": "24", "SIGNAL_NUM": str(int(signal.SIGINT))})
    assert rc == 130 and "Traceback" not in stderr, (rc, stdout, stderr)
    assert "interrupted after the last epoch: the run is complete" in stdout and "--pictures" in stdout
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "samples.png").exists()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # header and the one epoch
    # --no-pictures asked for none: no advice to draw them
    rc, stdout, _ = run_cli(*TRAIN, "--out", tmp_path / "bare", "--no-pictures",
                            "--callback", "pause_points:SignalAtStep",
                            env={**SUBPROCESS_ENV, "PYTHONPATH": str(REPO / "tests"), "SIGNAL_RANK": "0",
                                 "SIGNAL_AT_STEP": "24", "SIGNAL_NUM": str(int(signal.SIGINT))})
    complete = "interrupted after the last epoch: the run is complete (checkpoint at step 24)\n"
    assert rc == 130 and complete in stdout, stdout


def test_picture_writing(tmp_path):
    out = tmp_path / "run"
    child = PausedChild(*TRAIN, "--out", out, where="rename:reconstructions.png")
    assert_interrupted(child, "train")
    assert (out / "samples.png").is_file() and not (out / "reconstructions.png").exists()
    assert leftovers(out) == []


def test_evaluation(run):
    before = sorted(p.name for p in run.iterdir())
    child = PausedChild("evaluate", run, "--iwae-k", "10", where="call:fastvae.evaluation:iwae_nll_sum")
    assert_interrupted(child, "evaluate", signal.SIGTERM)
    assert sorted(p.name for p in run.iterdir()) == before


def test_report_keeps_the_previous_page(run):
    (run / "report.md").write_text("the previous report\n")
    child = PausedChild("report", run, "--iwae-k", "0", where="rename:report.md")
    assert_interrupted(child, "report")
    assert (run / "report.md").read_text() == "the previous report\n"
    assert leftovers(run) == []


def test_export_keeps_the_previous_file(run, tmp_path):
    target = tmp_path / "decoder.onnx"
    target.write_bytes(b"the previous export")
    child = PausedChild("export", run, "--out", target, "--int8", where="rename:decoder.int8.onnx")
    assert_interrupted(child, "export")
    assert target.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx"]  # no staging folder


def test_sample(run, tmp_path):
    child = PausedChild("sample", run / "decoder.onnx", "-n", "16", "--out", tmp_path / "s.png",
                        where="rename:s.png")
    assert_interrupted(child, "sample")
    assert list(tmp_path.iterdir()) == []


def test_the_interpreters_teardown(run, tmp_path):
    """After the command's work, while exit hooks run: Python's own handler printed a
    KeyboardInterrupt traceback there ("Exception ignored in atexit callback"), exit status 0."""
    child = PausedChild("sample", run / "decoder.onnx", "-n", "4", "--out", tmp_path / "s.npy", where="exit:")
    assert_interrupted(child, "sample")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]  # written before the signal


def test_a_forked_worker_signalled_before_its_set_up_leaves_the_parents_files(tmp_path):
    """A pool's ``terminate()`` can reach a just-forked worker before ``in_worker_process``
    runs: the worker still holds the parent's handler, which must end the worker alone, not
    remove the parent's staging folder or print the parent's message."""
    import os

    from fastvae.interrupts import handled, removed_on_exit

    staged = tmp_path / ".out.tmp-1"
    staged.mkdir()
    read_end, write_end = os.pipe()
    with handled("fastvae prepare"), removed_on_exit(staged):
        pid = os.fork()
        if pid == 0:  # the worker, before any set-up of its own
            os.dup2(write_end, 2)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**7):  # the handler runs at the next bytecode boundary
                pass
            os._exit(99)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
    message = os.read(read_end, 1000)
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 130
    assert staged.is_dir() and message == b""


_PARENT_EXITS_AT_ONCE = """
import multiprocessing, os, sys, time
from pathlib import Path
from fastvae.interrupts import in_worker_process
context = multiprocessing.get_context("fork")
started = context.Event()
def long_task():  # a decode of a huge image, say
    started.set()
    time.sleep(3600)  # not synchronisation: the long task the worker is busy in when its parent ends
def identity():  # pid and start time (/proc/PID/stat field 22): a reused pid is another process
    return f"{os.getpid()} {Path(f'/proc/{os.getpid()}/stat').read_text().rsplit(')', 1)[1].split()[19]}"
pool = context.Pool(1, initializer=in_worker_process)
Path(sys.argv[1]).write_text(pool.apply(identity))
pool.apply_async(long_task)
assert started.wait(60)
os._exit(130)  # what exit_now does on Ctrl-C/SIGTERM: no pool shutdown
"""


def test_a_pool_worker_ends_with_its_parent(tmp_path):
    """prepare's decode workers outlived a prepare stopped by SIGTERM (exit_now leaves with
    os._exit) in the middle of their tasks: orphans of 175 MB each, still there 16 min later."""
    import os
    import select
    import subprocess
    import sys

    from testkit import SUBPROCESS_ENV

    # no pipes: a worker that outlives the parent would hold them open
    done = subprocess.run([sys.executable, "-c", _PARENT_EXITS_AT_ONCE, tmp_path / "pid"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SUBPROCESS_ENV, timeout=120)
    assert done.returncode == 130
    worker, started = (tmp_path / "pid").read_text().split()
    worker = int(worker)
    try:
        handle = os.pidfd_open(worker)
    except ProcessLookupError:  # gone already
        return
    try:
        try:  # read after pidfd_open: the handle holds the process the stat describes
            now = (Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[19])
        except FileNotFoundError:
            return
        if now != started:  # the worker is gone and its pid reused: nothing of ours to watch
            return
        ended = select.select([handle], [], [], 60)[0]  # readable once the process has ended
        if not ended:
            os.kill(worker, signal.SIGKILL)
        assert ended, "the pool worker outlived its parent"
    finally:
        os.close(handle)


def _echo_worker(connection) -> None:
    from fastvae.interrupts import in_worker_process

    in_worker_process(parent_stops=True)
    while True:
        connection.send(connection.recv())


def test_a_loader_worker_takes_sigterm_from_its_parent_only():
    """A scheduler's SIGTERM to the whole job (torchrun's killpg, SLURM) killed the DataLoader
    workers, which failed the trainer's step before its checkpoint: a worker now leaves that
    SIGTERM to its parent, and still ends on the parent's own terminate()."""
    import multiprocessing
    import subprocess

    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    worker = context.Process(target=_echo_worker, args=(theirs,), daemon=True)
    worker.start()
    try:
        ours.send("ready")
        assert ours.poll(60) and ours.recv() == "ready"
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True, timeout=60)  # another sender
        ours.send("alive")  # a default SIGTERM kills at once: no answer would come
        assert ours.poll(60) and ours.recv() == "alive"
        worker.terminate()  # the parent's SIGTERM
        worker.join(60)
        assert worker.exitcode == 128 + signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()


_AS_PID_1 = """
import multiprocessing, os
from fastvae.interrupts import in_worker_process
assert os.getpid() == 1, os.getpid()
pool = multiprocessing.get_context("fork").Pool(1, initializer=in_worker_process)
print(pool.apply_async(os.getppid).get(timeout=60))
pool.close()
pool.join()
"""


def test_workers_start_when_fastvae_is_pid_1():
    """In a container fastvae is often pid 1, the real parent of its workers: a check that took
    a parent pid of 1 for "orphaned" ended every worker at once (prepare hung, a streamed train
    failed). Run as pid 1 of a new pid namespace, where the machine allows one."""
    import shutil
    import subprocess
    import sys

    from testkit import SUBPROCESS_ENV

    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run([unshare, "-Urpf", "--mount-proc", "true"], capture_output=True, timeout=60)
    if not probe or probe.returncode != 0:
        pytest.skip("no user and pid namespaces here (unshare -Urpf)")
    done = subprocess.run([unshare, "-Urpf", "--mount-proc", sys.executable, "-c", _AS_PID_1],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["1"], done.stderr[-2000:]


_POOL_OF = """
import multiprocessing, os, sys
from fastvae.interrupts import in_worker_process
if __name__ == "__main__":
    pool = multiprocessing.get_context(sys.argv[1]).Pool(1, initializer=in_worker_process)
    print(pool.apply_async(os.getppid).get(timeout=60) > 0)
    pool.close()
    pool.join()
"""


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_workers_start_under_every_start_method(method, tmp_path):
    """A fork server's children are not its clients' children (Python 3.14's default start
    method): the parent check ended every such worker at once."""
    import subprocess
    import sys

    from testkit import SUBPROCESS_ENV

    script = tmp_path / "pool_of.py"  # a file: spawn and forkserver import the main module
    script.write_text(_POOL_OF)
    done = subprocess.run([sys.executable, script, method], capture_output=True, text=True,
                          env=SUBPROCESS_ENV, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["True"], done.stderr[-2000:]


@pytest.mark.parametrize("strategy", ["auto", "ddp_spawn"])
def test_a_killed_run_keeps_the_lines_it_printed_into_a_pipe(tmp_path, strategy):
    """stdout into a pipe or a batch job's log is block-buffered by Python: a run SIGKILLed in
    epoch 2 (preempted, the OOM killer) lost its epoch-1 line. The fastvae command and spawned
    ranks write each line at once (no PYTHONUNBUFFERED here, as in a user's shell)."""
    from testkit import REPO, SUBPROCESS_ENV, run_cli

    env = {**SUBPROCESS_ENV, "PYTHONPATH": str(REPO / "tests"), "SIGNAL_RANK": "0", "SIGNAL_AT_STEP": "26",
           "SIGNAL_NUM": str(int(signal.SIGKILL))}
    del env["PYTHONUNBUFFERED"]
    devices = ("--devices", "2", "--accelerator", "cpu", "--batch-size", "32") if strategy == "ddp_spawn" else ()
    rc, out, err = run_cli("train", "--epochs", "2", "--hidden-dim", "16", "--latent-dim", "4", "--reparam", "torch",
                           "--no-pictures", "--strategy", strategy, *devices, "--out", tmp_path / "run",
                           "--callback", "pause_points:SignalAtStep", env=env)
    assert rc == (-signal.SIGKILL if strategy == "auto" else 2), err[-2000:]  # 24 steps an epoch: killed in epoch 2
    assert "epoch 1/2  loss " in out, (out, err[-2000:])
