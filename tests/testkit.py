"""Helpers the tests import (``from testkit import ...``): tiny training configs, the CLI in a
subprocess, a child paused at a known point, model comparisons.

Not in ``conftest.py``: a module imported by the name ``conftest`` resolves to whichever
``conftest.py`` comes first on ``sys.path`` (benchmarks/ has one too), for instance in a process
that DDP spawns and that unpickles a callback defined in a test module.

Everything here is sized for a 2-core CPU shared with other work: hidden layers of 16-32 units,
one or two epochs on the bundled 8x8 digits, no pictures, no progress bars.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# One thread per subprocess: the results do not depend on how busy the machine is, and runs that
# are compared with each other (resume vs straight) use the same kernels.
SUBPROCESS_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
SUBPROCESS_ENV.pop("TRITON_INTERPRET", None)


def tiny_config(out, **overrides):
    """A ``TrainConfig`` for a run that takes about a second: digits, small MLP, quiet."""
    from fastvae.config import TrainConfig

    values = dict(out=str(out), epochs=2, hidden_dim=32, latent_dim=4, batch_size=64,
                  progress=False, pictures=False, reparam="torch")
    values.update(overrides)
    return TrainConfig(**values)


def run_cli(*args, timeout: float = 240, cwd=None, env=None) -> tuple[int, str, str]:
    """Run ``python -m fastvae ARGS`` and return (exit status, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastvae", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
        env=env or SUBPROCESS_ENV,
    )
    return proc.returncode, proc.stdout, proc.stderr


class PausedChild:
    """``fastvae ARGS`` in a child process, returned once it has paused (``pause_points.py``):
    at ``where`` (``import:...``, ``call:...``, ``rename:...``), or where its own
    ``--callback pause_points:PauseAtStep`` stops it (``env`` sets ``PAUSE_AT_STEP``).

    Use ``send_signal``/``kill``, then ``finish()`` (releases the pause if the child still runs)
    -> (exit status, stdout after the PAUSED line, stderr). stderr goes to a file, so a chatty
    child never blocks on a full pipe.
    """

    def __init__(self, *args, where: str | None = None, env: dict | None = None, cwd=None,
                 session: bool = False):
        import tempfile

        from pause_points import PAUSED

        entry = [str(REPO / "tests" / "pause_points.py"), where, "--"] if where else ["-m", "fastvae"]
        self._stderr = tempfile.TemporaryFile(mode="w+")
        environment = {**SUBPROCESS_ENV, "PYTHONPATH": str(REPO / "tests"), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, *entry, *map(str, args)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=cwd or REPO, env=environment,
            start_new_session=session,  # a process group of its own: signal_group is a Ctrl-C
        )
        for line in self.proc.stdout:  # blocks until the child pauses (or ends)
            if line.startswith(PAUSED):
                self.where = line.strip()
                return
        rc, out, err = self.finish()
        raise AssertionError(f"the child ended (status {rc}) without pausing:\n{out}\n{err}")

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """``signum`` to the child's whole process group, as a terminal sends Ctrl-C
        (``session=True``)."""
        import os

        os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        self.proc.kill()

    def finish(self, timeout: float = 240) -> tuple[int, str, str]:
        try:
            self.proc.stdin.write("go on\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):  # the child is gone already
            pass
        out = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        self._stderr.seek(0)
        err = self._stderr.read()
        self._stderr.close()
        return self.proc.returncode, out, err


def assert_one_line_error(rc: int, stderr: str, *needles: str) -> None:
    """exit status 2, exactly one non-empty line on stderr, no traceback, naming ``needles``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, f"exit status {rc}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"


def state_dict_of(run_or_ckpt) -> dict[str, torch.Tensor]:
    """The model weights stored in a run's checkpoint, read without fastvae's loader."""
    path = Path(run_or_ckpt)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def read_metrics(run) -> list[dict]:
    import csv

    with open(Path(run) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def metrics_without_time(run) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in read_metrics(run)]


def cuda_graphs_recorded() -> int:
    """How many CUDA graph trees torch.compile's cudagraph manager holds on this device."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    return 0 if manager is None else sum(len(nodes) for nodes in manager.roots.values())


def exported_mlp_decoder(folder, **settings):
    """(model, decoder.onnx): a seeded MLP VAE for 1x8x8 images (``settings``: hidden_dim,
    latent_dim, likelihood, ...) and its decoder, exported with the fast TorchScript exporter
    (in the tests that use it the graph is not the subject) into ``folder/d.onnx``."""
    from fastvae.export import export_decoder
    from fastvae.models import build_model

    torch.manual_seed(0)
    model = build_model({"data_shape": [1, 8, 8], **settings}).eval()
    path = export_decoder(model, Path(folder) / "d.onnx", check_batches=(3,), exporter="torchscript").path
    return model, path


class Crash(Exception):
    """A process lost mid-epoch (as by SIGKILL): it writes no checkpoint of its own."""


class CheckpointSteps:
    """Fabric callback, rank 0: at each step, the step of the checkpoint on disk (the one
    written before that step's) goes into ``seen`` and, where the callback runs in a spawned
    rank, into the file ``log`` (lines "STEP SAVED_STEP"). ``now`` = ``seconds_per_step`` x
    step, for a test that makes it ``fastvae.trainer._clock`` (--checkpoint-minutes' clock).
    Raises ``Crash`` once step ``crash_at`` is done."""

    def __init__(self, seconds_per_step: float = 0.0, crash_at: int | None = None, log: Path | None = None):
        self.seconds_per_step, self.crash_at, self.log = seconds_per_step, crash_at, log
        self.seen: dict[int, int | None] = {}
        self.now = 0.0

    def on_train_batch_end(self, trainer, batch):
        from fastvae.checkpoint import read_checkpoint

        if trainer.rank != 0:
            return
        self.now = trainer.step * self.seconds_per_step
        on_disk = (trainer.run_dir / "checkpoints" / "last.ckpt").exists()
        self.seen[trainer.step] = read_checkpoint(trainer.run_dir)["step"] if on_disk else None
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(f"{trainer.step} {self.seen[trainer.step]}\n")
        if trainer.step == self.crash_at:
            raise Crash

    def saves(self) -> list[int]:
        """The steps whose checkpoints later steps saw (from ``log`` where there is one)."""
        seen = self.seen
        if self.log is not None:
            seen = dict(line.split() for line in self.log.read_text().splitlines())
        return sorted({int(step) for step in seen.values() if step not in (None, "None")})


def asgi_part(body: bytes, more: bool = True) -> dict:
    """One ASGI ``http.request`` message of a request body."""
    return {"type": "http.request", "body": body, "more_body": more}


def in_process_service(sampler, scenario, limits=None, batching=None):
    """Run the service's ASGI app in this process, lifespan included (batcher, body watch,
    encoding thread), and return ``await scenario(call, app)``: ``await call(method, path,
    messages)`` -> (status, headers dict, body bytes). ``messages``: the request's ASGI receive
    messages in order; an awaitable among them is awaited (one never done: a stalled client)."""
    import asyncio
    import inspect

    from fastvae.export.http_service import Batching, build_app
    from fastvae.export.service_io import Limits

    async def main():
        app = build_app(sampler, limits or Limits(), batching or Batching(16, 0.0))

        async def call(method, path, messages=(asgi_part(b"", more=False),)):
            script, sent = iter(messages), []

            async def receive():
                item = next(script, None)
                if item is None:  # the whole request is sent: a client that stays until answered
                    item = asyncio.get_running_loop().create_future()
                return await item if inspect.isawaitable(item) else item

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                     "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                     "root_path": "", "headers": [(b"content-type", b"application/json")],
                     "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "state": {}}
            await app(scope, receive, send)
            headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
            return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])

        async with app.router.lifespan_context(app):
            return await asyncio.wait_for(scenario(call, app), 60)

    return asyncio.run(main())


class FailAtStep:
    """Fabric callback: rank ``rank`` fails once step ``step`` is done, with a one-line error
    (a FastVAEError) or, ``bug=True``, a ValueError (what a bug raises)."""

    def __init__(self, rank: int, step: int, bug: bool = False):
        self.rank, self.step, self.bug = rank, step, bug

    def on_train_batch_end(self, trainer, batch):
        from fastvae.errors import FastVAEError

        if trainer.rank == self.rank and trainer.step == self.step:
            raise (ValueError if self.bug else FastVAEError)(f"rank {self.rank}'s own failure at step {self.step}")
