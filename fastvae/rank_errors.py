"""Errors of spawned ranks (``--strategy ddp_spawn``) reach the launcher as themselves.

torch.multiprocessing re-raises a rank's exception in the launcher as ``ProcessRaisedException``,
whose only content is the rank's traceback as text: a full disk or a bad dataset met by a rank
printed that traceback where one process prints one line. So each rank pickles the errors that
fastvae reports in one line (``FastVAEError``, ``OSError``) into a folder the launcher made, and
the launcher raises the lowest rank's instead. Other exceptions (bugs) are recorded as their
traceback's text (``RankBug``). A rank whose collective lost another rank records ``LostPeer``,
shown only where no rank recorded a cause (it is a consequence, and may reach the launcher first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Iterator

from fastvae.errors import FastVAEError

REPORTED = (FastVAEError, OSError)


class LostPeer(FastVAEError):
    """A rank's collective failed because another rank's process is gone: a consequence, so
    the gone rank's own error (if it recorded one) is the one reported."""


class RankBug(RuntimeError):
    """Another exception of a spawned rank (a bug), carried to the launcher with the rank's
    traceback as text: what the run shows then, rather than another rank's lost contact."""


def record(folder: str, rank: int, exc: BaseException) -> None:
    """Keep ``exc`` as rank ``rank``'s error (written whole, then renamed into place)."""
    path = Path(folder) / f"rank{rank:05d}.pickle"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(pickle.dumps(exc))
        os.replace(tmp, path)
    except (OSError, pickle.PicklingError):  # a full /tmp: the traceback is all that is left
        tmp.unlink(missing_ok=True)


def first(folder: str) -> BaseException | None:
    """The error of the lowest rank that recorded one, or None; a ``LostPeer`` only where no
    rank recorded a cause (the rank that failed first made the others lose it)."""
    lost = None
    for path in sorted(Path(folder).glob("rank*.pickle")):
        try:
            error = pickle.loads(path.read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError):
            continue
        if not isinstance(error, LostPeer):
            return error
        lost = lost or error
    return lost


@contextlib.contextmanager
def collected(run_dir=None) -> Iterator[str]:
    """A folder for the ranks' errors; a ``ProcessRaisedException`` leaving the block becomes
    the lowest rank's recorded error where one was recorded. ``run_dir``: the run's folder, for
    the advice after a rank that ended (``resume_advice``)."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    # torch logs "Terminating process N via signal SIGTERM" for the other ranks when one fails:
    # nothing for a user to act on, above the one line the error gets
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="fastvae-rank-errors-") as folder:
        # torch's spawn has a failed rank write its traceback to a pytorch-errorfile-*.pickle in
        # the temp folder and never removes it: made in this folder (torch's module alone is
        # pointed there; other code's temporary files stay where they go), it goes with the folder
        import importlib

        torch_spawn = importlib.import_module("torch.multiprocessing.spawn")  # the module (the package's
        real = getattr(torch_spawn, "tempfile", None)  # attribute of that name is its function)
        if real is tempfile:
            torch_spawn.tempfile = _TempfileIn(folder)
        try:
            yield folder
        except ProcessRaisedException:
            error = first(folder)  # a rank's bug (RankBug: its traceback) wins over lost contact
            if error is None:
                raise
            raise error from None
        except ProcessExitedException as exc:  # a rank killed (SIGKILL: the OOM killer?) or gone
            if interrupted(exc.exit_code, exc.signal_name):
                raise KeyboardInterrupt from None  # said as a Ctrl-C is: 'interrupted', status 130
            raise FastVAEError(ended_rank(exc.error_index, exc.signal_name, exc.exit_code, run_dir)) from None
        finally:
            if real is tempfile:
                torch_spawn.tempfile = real
            spawn_log.setLevel(level)


class _TempfileIn:
    """The ``tempfile`` module for torch's spawn: its NamedTemporaryFile made in ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder

    def NamedTemporaryFile(self, *args, **kwargs):  # noqa: N802 - tempfile's name
        kwargs.setdefault("dir", self.folder)
        return tempfile.NamedTemporaryFile(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(tempfile, name)


def interrupted(exit_code: int | None, signal_name: str | None) -> bool:
    """Whether a rank ended as a stop makes it: status 130 (``hold_rank_signals``), or killed
    by Ctrl-C or the forwarded stop before it could hold them (its interpreter starting)."""
    from fastvae.interrupts import EXIT_STATUS
    from fastvae.stop_signals import FORWARDED_STOP

    return exit_code == EXIT_STATUS or signal_name in ("SIGINT", FORWARDED_STOP.name)


KILLERS = "the out-of-memory killer, a scheduler, kill -9, or a failed node"
RESUME = "continue the run with --resume from its last checkpoint"


def resume_advice(run_dir=None, writes_checkpoints: bool = True) -> str:
    """RESUME where the run folder holds a checkpoint (or is not known here), else what to do
    instead: a run that failed before its first checkpoint has nothing to resume. A rank that
    does not write the checkpoints (``writes_checkpoints=False``: not rank 0) may see a
    node-local folder without them: it says both."""
    from pathlib import Path

    from fastvae.run_folder import LAST

    if run_dir is None or (Path(run_dir) / LAST).is_file():
        return RESUME
    if not writes_checkpoints:
        return f"{RESUME} where rank 0 wrote one (else run the same command again)"
    return "no checkpoint was written yet: run the same command again"


def ended_rank(rank: int, signal_name: str | None, exit_code: int | None, run_dir=None) -> str:
    """A spawned rank that ended without raising, as the launcher says it."""
    if signal_name == "SIGKILL":
        how = f"was killed by SIGKILL ({KILLERS}?)"
    elif signal_name:
        how = f"was ended by {signal_name}"
    else:
        how = f"ended with exit status {exit_code} (its own output above may say why)"
    return f"rank {rank} {how} and the other ranks were stopped: {resume_advice(run_dir)}"


def lost_peer_error(rank: int, exc: BaseException, run_dir=None) -> LostPeer:
    """What a rank whose collective found another rank gone says (``run_dir``: the run folder
    as this rank sees it; rank 0 writes the checkpoints there)."""
    found = next((p for p in LOST_PEER if p in str(exc)), type(exc).__name__)
    return LostPeer(f"rank {rank} lost contact with the other ranks ({found}): another rank ended; if it "
                    f"printed no error of its own, it was killed ({KILLERS}?); "
                    f"{resume_advice(run_dir, writes_checkpoints=rank == 0)}")


# what a gloo collective says when another rank's process is gone (NCCL's DistBackendError
# texts are not matched: on a GPU a lost rank still shows NCCL's error or its timeout)
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank is gone."""
    import torch.distributed as dist

    network = getattr(dist, "DistNetworkError", ())
    return isinstance(exc, network) or (isinstance(exc, RuntimeError) and any(p in str(exc) for p in LOST_PEER))


def reporting(fabric, function, folder: str, *args):
    """``function(fabric, *args)`` in a spawned rank (``fabric.launch(reporting, function,
    folder, *args)``), recording a reported error before it
    propagates (module level: spawned processes unpickle it)."""
    try:
        return function(fabric, *args)
    except REPORTED as exc:
        record(folder, fabric.global_rank, exc)
        raise
    except Exception:  # noqa: BLE001 - recorded as its traceback, then raised as it is
        import traceback

        record(folder, fabric.global_rank, RankBug(f"rank {fabric.global_rank} failed:\n{traceback.format_exc()}"))
        raise
