"""``python tests/train_worker.py CONFIG_JSON [--resume]``: train on a slice of the digits.

For multi-process tests whose strategy (FSDP) launches ranks by re-running the command line,
which cannot be pytest itself. CONFIG_JSON holds TrainConfig fields plus ``train_rows`` and
``test_rows``, the sizes of the slices of the bundled digits to use, and optionally
``nan_loss_at``: ``[rank, step]``, a (0-based) training step whose loss that rank turns to NaN,
``fp16_on_cpu``: true for real fp16 autocast with a CPU GradScaler whose first scale
(2**30) overflows (Fabric itself runs 16-mixed as bf16 on a CPU), and ``keep_models``: true
to keep the models alive after train() returns, ``checkpoint_log``: a file where rank 0 notes
the checkpoint on disk at each step (``testkit.CheckpointSteps``).

After training, the process group's threads must be gone (exit 1 naming them and what still
holds the groups otherwise): left running into the interpreter's exit, they made about one
FSDP run in a hundred abort.
"""

import gc
import itertools
import json
import os
import sys
import warnings

import torch

import fastvae.fabric_setup
import fastvae.models
import fastvae.trainer
from fastvae.config import TrainConfig
from fastvae.data import Splits, load_dataset
from fastvae.trainer import train


def nan_loss_at(rank: int, step: int) -> None:
    """Make every model built from now on return a NaN loss at ``step`` on ``rank``."""
    build = fastvae.models.build_model

    def build_with_nan(spec):
        model = build(spec)
        forward, calls = model.forward, itertools.count()

        def patched(*args, **kwargs):
            terms = forward(*args, **kwargs)
            if next(calls) == step and torch.distributed.get_rank() == rank:
                return terms._replace(loss=terms.loss * float("nan"))
            return terms

        model.forward = patched
        return model

    fastvae.models.build_model = build_with_nan


KEPT = []


def keep_models() -> None:
    """Keep every model built from now on alive past train(), as something kept CI's compiled
    FSDP model (what is unknown; the groups were held by FSDP's mesh infos, which the model
    keeps)."""
    build = fastvae.models.build_model

    def build_and_keep(spec):
        KEPT.append(build(spec))
        return KEPT[-1]

    fastvae.models.build_model = build_and_keep


def communication_threads() -> list[str]:
    """This process's gloo and TCPStore threads, by name (Linux)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # a thread that ended while listed
            continue
    return sorted(name for name in names if "gloo" in name or "tcpstore" in name)


def remember_process_groups() -> set[int]:
    """The ids of the process groups alive as the trainer ends them (ids, not the groups: a
    reference here would keep them and their threads alive)."""
    ids, end = set(), fastvae.trainer._end_process_group

    def recording_end():
        from torch.distributed.distributed_c10d import _world

        ids.update(id(group) for group in _world.pg_map)
        end()

    fastvae.trainer._end_process_group = recording_end
    return ids


def holders(ids: set[int]) -> list[str]:
    """What still refers to the objects with these ids, by type (a dict: with its keys).

    Looks one step into untracked containers too: a dict of process groups (pybind objects,
    not tracked by gc) is itself untracked, so only its owner is in ``gc.get_objects()``."""
    found = []

    def describe(container, path: str) -> None:
        what = path + type(container).__qualname__
        if isinstance(container, dict):
            keys = [key for key, value in container.items() if id(value) in ids]
            what += f" keys={keys}"
        found.append(what)

    with warnings.catch_warnings():  # isinstance reads __class__: torch.distributed.reduce_op warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            for ref in gc.get_referents(obj):
                if id(ref) in ids:
                    describe(obj, "")
                elif isinstance(ref, (dict, list, tuple, set)) and not gc.is_tracked(ref):
                    if any(id(inner) in ids for inner in gc.get_referents(ref)):
                        describe(ref, f"{type(obj).__qualname__} -> ")
    return found


def fp16_on_cpu() -> None:
    """Every Fabric built from now on gets fp16 autocast and a CPU GradScaler, FSDP's too."""
    fastvae.fabric_setup.precision_kwargs = lambda config: {
        "plugins": [fastvae.fabric_setup.fp16_plugin("cpu", init_scale=2.0**30)]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    values = json.loads(sys.argv[1])
    train_rows, test_rows = values.pop("train_rows"), values.pop("test_rows")
    if "nan_loss_at" in values:
        nan_loss_at(*values.pop("nan_loss_at"))
    if values.pop("fp16_on_cpu", False):
        fp16_on_cpu()
    if values.pop("keep_models", False):
        keep_models()
    digits = load_dataset("digits")
    splits = Splits("digits", digits.train[:train_rows], digits.test[:test_rows])
    groups = remember_process_groups()
    callbacks = []
    log = values.pop("checkpoint_log", None)
    if log:  # the step of the checkpoint on disk at each step (testkit.CheckpointSteps)
        from pathlib import Path

        from testkit import CheckpointSteps

        callbacks.append(CheckpointSteps(log=Path(log)))
    train(TrainConfig(**values), resume="--resume" in sys.argv[2:], splits=splits, callbacks=callbacks)
    if left := communication_threads():
        sys.exit(f"train() returned with the process group's threads still running: {left};"
                 f" the groups are held by {holders(groups)}")
