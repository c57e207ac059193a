"""The training loop on Lightning Fabric: Fabric owns devices, precision, strategy and launch.

``train(config)`` checks everything a user can get wrong before launching, then builds a
``Trainer`` in every process. Semantics across processes:
- ``batch_size`` is per device; the global batch is batch_size x world size (logged);
- in-memory data: every rank draws the same per-epoch permutation and takes every W-th row
  of it; a prepared (streamed) dataset: every rank computes the same per-epoch plan and
  reads its own contiguous part of it, split over its DataLoader workers
  (``fastvae.loaders``); either way one loop, ``train_pass``, runs the steps;
- metrics are summed across ranks; the test set is evaluated once in total (sharded);
- global rank 0 alone writes files (``fastvae.run_folder``): config.json, metrics.csv,
  checkpoints (atomically, after every epoch, on Ctrl-C, and mid-epoch every
  ``checkpoint_minutes`` / ``checkpoint_every`` steps) and pictures; checkpoints hold full
  state, whatever the strategy (``fastvae.sharding`` for FSDP), so a run resumes on another
  device count or strategy;
- a step with a non-finite loss or gradients is never applied, and is caught without a host
  sync per step (``fastvae.guard``).

Callbacks (``train(config, callbacks=[...])``, ``fastvae train --callback MODULE:NAME``) are
Fabric callbacks: any object with some of these methods, called on every rank:
``on_train_start(trainer)``; ``on_train_batch_end(trainer, batch)`` after each optimizer step
(``trainer.step`` counts steps, ``batch`` is the batch's index in its epoch);
``on_train_epoch_end(trainer, metrics)`` once the epoch's metrics row and checkpoint are
written; ``on_train_end(trainer, interrupted)``. A callback may call ``trainer.request_stop()``
(early stopping, a sweep's budget, a program's own signal): the run stops as on Ctrl-C, after
the step every rank agrees on, with a checkpoint, and ``train`` returns ``interrupted=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastvae import rendezvous_watch, run_folder
from fastvae.checkpoint import FORMAT, load_model_state, read_checkpoint, rng_state, set_rng_state
from fastvae.config import (MAX_SEED, TrainConfig, keyword_spelling, saved_settings, unused_settings,
                            unused_split_flags)
from fastvae.data import Splits, content_id, load_dataset, program_splits
from fastvae.errors import FastVAEError, one_line
from fastvae.fabric_setup import fp16_runs_as_bf16, make_fabric, make_optimizer
from fastvae.float32_default import float32_by_default
from fastvae.guard import check_interval, flag_nonfinite_grads, skip_mode
from fastvae.interrupts import removed_on_exit
from fastvae.loaders import batches_per_epoch, in_memory_sample, is_streamed, make_source
from fastvae.losses import kl_weight
from fastvae.models import check_model
from fastvae.process_layout import check_processes
from fastvae.rank_agreement import check_ranks_agree, what_this_rank_trains
from fastvae.reparam import resolve_backend
from fastvae.resume_checks import check_resume
from fastvae.run_folder import EPOCH_END, LAST, METRICS_CSV
from fastvae.shards import changed_data, dataset_id, prepared_split
from fastvae.sharding import (keep_implementation, load_sharded_optimizer_state,
                              optimizer_state_by_index)
from fastvae.stop_signals import RANK_OF_ENV, SignalsToRanks, StopRequest, deliver_deferred


@dataclass
class TrainResult:
    """What ``train`` returns on global rank 0 (other ranks get ``None``)."""

    run_dir: Path
    epochs: int
    steps: int
    metrics: list[dict] = field(default_factory=list)
    interrupted: bool = False


_clock = time.monotonic  # --checkpoint-minutes' clock (a test sets its own)


@dataclass
class EpochSums:
    """One rank's running sums over the examples of an epoch (kept across a mid-epoch resume)."""

    recon: float = 0.0  # sum over examples of -log p(x|z)
    kl: float = 0.0  # sum over examples of KL(q(z|x) || p(z))
    count: float = 0.0  # examples of finite steps
    seconds: float = 0.0  # wall time of the epoch's steps

    def to_list(self) -> list[float]:  # checkpoints hold plain data
        return [self.recon, self.kl, self.count, self.seconds]


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          splits: Splits | None = None, callbacks: list | None = None) -> TrainResult | None:
    """Train as ``config`` says, into ``config.out``; return the run's result (on rank 0).

    ``resume`` continues from ``out/checkpoints/last.ckpt`` exactly (mid-epoch too);
    ``overwrite`` replaces a run already in ``out``. Without either, an ``out`` that already
    holds a run is refused, so no earlier work is lost by a typo. ``callbacks``: Fabric
    callbacks (see the module docstring). The caller's random streams (torch, numpy, random)
    are as they were afterwards: training seeds them all from ``config.seed``. It trains with
    gradients and in float32 whatever the caller set (a notebook's ``torch.no_grad()`` or
    ``inference_mode()``, ``torch.set_default_dtype(torch.float64)``). A SIGTERM (or Ctrl-C)
    stops it after the current step with a checkpoint (``result.interrupted``); where the
    program had left SIGTERM to Python's default, the signal then ends the program, as it would
    have without fastvae. Error messages name these keywords and TrainConfig's fields
    (``resume=True``, ``latent_dim``), not the command line's flags.
    """
    try:
        return command_line_train(config, resume=resume, overwrite=overwrite, splits=splits, callbacks=callbacks)
    except FastVAEError as exc:  # "pass --resume to continue it" reads "pass resume=True" here
        exc.args = (keyword_spelling(str(exc)), *exc.args[1:])
        raise


@float32_by_default
def command_line_train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                       splits: Splits | None = None, callbacks: list | None = None) -> TrainResult | None:
    """``train``, its messages naming the command line's flags (``fastvae train`` calls it)."""
    # gradients on: a notebook cell's leftover no_grad/inference_mode failed the first backward
    with _callers_random_state(), torch.inference_mode(False), torch.enable_grad():
        return _train(config, resume=resume, overwrite=overwrite, splits=splits, callbacks=callbacks)


@contextlib.contextmanager
def _callers_random_state():
    """torch's (CPU, and CUDA where the caller had started it), numpy's and Python's random
    states and Lightning's seed variables, restored on the way out (Fabric's seed_everything
    sets them all)."""
    import random

    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with (_environment_kept("PL_GLOBAL_SEED", "PL_SEED_WORKERS"),
          torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else [])):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


@contextlib.contextmanager
def _environment_kept(*names: str):
    """The environment variables ``names`` as they were (set or not), on the way out; yields
    their values at the start."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield saved
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _train(config: TrainConfig, *, resume: bool, overwrite: bool, splits: Splits | None,
           callbacks: list | None) -> TrainResult | None:
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # a spawned process (a ddp_spawn rank) imports the program's main module first: a
        # program without a main guard trained again there, into the same folder
        raise FastVAEError("train() was called while a spawned process (a ddp_spawn rank) imported the program: "
                           "put the program's calls under `if __name__ == \"__main__\":`")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a fastvae.config.TrainConfig (TrainConfig(**settings) or "
                        f"TrainConfig.from_dict(settings)), got {type(config).__name__}")
    for name, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):  # overwrite="no" would read as True and replace the run
            raise FastVAEError(f"train(): {name} must be True or False, got {value!r}")
    _check_callbacks(callbacks, config.strategy)
    config.validate()  # the command line's were validated already: what fails here is a program's
    check_processes(config)
    run_dir = Path(config.out)
    replace = run_folder.check_out_folder(run_dir, resume=resume, overwrite=overwrite)
    saved, resume_from, resume_note = check_resume(run_dir, config) if resume else ({}, None, None)
    loaded = splits is None
    if loaded:
        if resume and _local_path_gone(config.data):
            raise FastVAEError(f"data {config.data} does not exist (the run's data: moved? resume with "
                               "--data NEWPATH, the same data where it is now)")
        splits = load_config_data(config)
    else:
        splits = program_splits(splits)
    check_model(config.model_spec(splits.data_shape))  # e.g. convkl: H, W divisible by f
    steps = batches_per_epoch(len(splits.train), config.devices * config.num_nodes, config.batch_size)
    if saved.get("batch_in_epoch", 0) >= steps:  # the loop would run no step, then call it divergence
        raise FastVAEError(f"cannot resume {run_dir}: its checkpoint stopped at batch {saved['batch_in_epoch']} "
                           f"of an epoch of {steps} batches (an edited or foreign checkpoint); resume from an "
                           "intact checkpoint or train into a new --out")
    saved_id = saved.get("data_id")
    data_id = dataset_id(splits)
    if data_id is None and str(saved_id).startswith("content:") and isinstance(splits, Splits):
        data_id = content_id(splits)  # a program's own splits, checked against what the run read
    if isinstance(splits, Splits) and data_id is not None and splits.content_id != data_id:
        # digested once (the ranks record it), on a copy: the caller's object stays as it was
        splits = dataclasses.replace(splits, content_id=data_id)
    if saved_id is not None and saved_id != data_id:
        reason = changed_data(saved_id, config.data, same_path=config.data == saved["config"].get("data"))
        raise FastVAEError(f"cannot resume {run_dir}: {reason}; resume on that data or a copy of it, or train "
                           "into a new --out")
    finished = bool(saved) and int(saved.get("epoch", 0)) >= config.epochs and not saved.get("batch_in_epoch")
    if _first_process():  # notes once, not from every rank's process
        if resume_note:
            print(resume_note, file=sys.stderr)
        if loaded:
            _note_unused_split_settings(config, splits)
        if saved and not finished:  # a finished run's new settings would train nothing
            _note_changed_settings(saved, config)
        if finished:
            print(f"note: {run_dir} has trained its {config.epochs} epoch(s) already: nothing to train "
                  f"(give --epochs more than {config.epochs} to train on)", file=sys.stderr)
        elif fp16_runs_as_bf16(config):
            print("note: --precision 16-mixed runs as bf16-mixed on a CPU (fp16 autocast needs CUDA)",
                  file=sys.stderr)
    if finished:  # no process started, config.json left as the run trained (not the new settings)
        return TrainResult(run_dir, int(saved["epoch"]), int(saved.get("step", 0)),
                           run_folder.read_metrics(run_dir / METRICS_CSV, int(saved["epoch"]))) if _first_process() else None
    if resume_from is not None:  # a damaged metrics.csv: one line here, not in every rank after the launch
        run_folder.read_metrics(run_dir / METRICS_CSV)
    try:
        with _quiet_lightning(not config.progress):
            return _launch(config, callbacks, splits, resume_from, replace)
    finally:
        # a program's unhandled SIGTERM ends it, once the checkpoint is written (or the ranks
        # have stopped): as its default would have, had training not held it
        deliver_deferred()


# set while a --quiet run launches: ranks started by ddp_spawn (new interpreters, which import
# this module before Lightning sets up their process group) are quiet too
QUIET_ENV = "FASTVAE_QUIET_LIGHTNING"


def _quiet_lightning_logger() -> None:
    import logging

    import lightning_fabric  # it sets its logger's level as it is imported: first

    logging.getLogger(lightning_fabric.__name__).setLevel(logging.WARNING)


if os.environ.get(QUIET_ENV) == "1":
    _quiet_lightning_logger()


@contextlib.contextmanager
def _quiet_lightning(quiet: bool):
    """--quiet: Lightning's info lines (its precision, the distributed banner) are not shown,
    warnings still are; the logger's level (a program's own) and the environment are put back
    afterwards."""
    import logging

    log = logging.getLogger("lightning_fabric")
    level, before = log.level, os.environ.get(QUIET_ENV)
    if quiet:
        _quiet_lightning_logger()
        os.environ[QUIET_ENV] = "1"
    try:
        yield
    finally:
        log.setLevel(level)
        if before is None:
            os.environ.pop(QUIET_ENV, None)
        else:
            os.environ[QUIET_ENV] = before


def _launch(config: TrainConfig, callbacks, splits, resume_from, replace: bool) -> TrainResult | None:
    """Build the Fabric and start ``_fit`` in every process."""
    run_dir = Path(config.out)
    # after every refusal: the trackers write into the run folder as they start (wandb, mlflow),
    # so the hardware is checked first (a Fabric without them), the folder cleared, then they start
    # the hardware check's Fabric says nothing where the trackers' one follows (its lines twice)
    with _quiet_lightning(bool(config.logger_names())):
        fabric = make_fabric(config, callbacks, trackers=False)
    resolve_backend(config.reparam, fabric.device)  # --reparam triton where it cannot run: say so now
    if replace:  # only now that data and hardware are known to be good
        run_folder.clear_run(run_dir)
    if config.logger_names():  # a refused run leaves no tracker files (mlflow.db, wandb/) behind
        fabric = make_fabric(config, callbacks)
    if config.strategy == "ddp_spawn":  # this process only waits for the spawned ranks
        from fastvae import rank_errors

        # Lightning's launcher also sets MASTER_ADDR/MASTER_PORT here: left set, a program's next
        # ddp_spawn run took the same port instead of a free one
        with _environment_kept(RANK_OF_ENV, "PYTHONWARNINGS", "MASTER_ADDR", "MASTER_PORT") as saved:
            os.environ[RANK_OF_ENV] = str(os.getpid())  # the ranks' own signal handling
            # a rank that a stop ends at once (os._exit) leaves its semaphores to multiprocessing's
            # resource tracker, started with the ranks, which removes them and warns about each
            # ("leaked semaphore objects"): below the launcher's 'interrupted', nothing to act on
            os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [saved["PYTHONWARNINGS"],
                                                                  "ignore:resource_tracker:UserWarning"]))
            with SignalsToRanks(), rank_errors.collected(config.out) as errors:
                return fabric.launch(rank_errors.reporting, _fit, errors, config, splits, resume_from)
    # joining the other ranks: a note when long, and Ctrl-C/SIGTERM end it
    with rendezvous_watch.watched_join(config.devices * config.num_nodes):
        return fabric.launch(_fit, config, splits, resume_from)


def _end_process_group() -> None:
    """Destroy the process group Fabric started in this process and free its backends now
    (called as each rank's part ends: torchrun, srun, ddp, fsdp, spawned ranks): left to the
    interpreter's exit, gloo's threads can still run while it tears down, and the rank aborts
    ("terminate called without an active exception", SIGABRT) after a finished or stopped run."""
    import gc

    import torch.distributed as dist

    from fastvae.sharding import release_process_groups

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    release_process_groups()
    gc.collect()  # FSDP's hooks hold the groups in reference cycles: free them while Python runs


def _local_path_gone(source: str) -> bool:
    """Whether ``source`` names a local path (not bundled data, not a URL) that is not there."""
    from fastvae.data import is_bundled
    from fastvae.shards import is_remote

    return not is_bundled(source) and not is_remote(str(source)) and not Path(source).exists()


def load_config_data(config: TrainConfig, source: str | None = None):
    """The data a run's settings name (or ``source`` split the same way): ``Splits`` in
    memory, or a prepared dataset to stream."""
    return load_dataset(source or config.data, test_fraction=config.test_fraction,
                        split_seed=config.split_seed, split_rule=config.split_rule, grayscale=config.grayscale)


CALLBACK_HOOKS = ("on_train_start", "on_train_batch_end", "on_train_epoch_end", "on_train_end")


def _check_callbacks(callbacks, strategy: str) -> None:
    """FastVAEError unless ``callbacks`` is a list of objects with at least one of the hooks
    (``callbacks=object()`` or ``[1]`` were taken and never called), picklable under ddp_spawn
    (a lambda failed in Lightning's launcher, after --overwrite had cleared the old run)."""
    if callbacks is None:
        return
    if not isinstance(callbacks, (list, tuple)):
        raise FastVAEError(f"callbacks must be a list of callback objects, got {type(callbacks).__name__}")
    for callback in callbacks:
        if not any(callable(getattr(callback, hook, None)) for hook in CALLBACK_HOOKS):
            raise FastVAEError(f"the callback {callback!r:.60} has none of the hooks {', '.join(CALLBACK_HOOKS)}")
    if strategy == "ddp_spawn":
        import pickle

        try:
            pickle.dumps(list(callbacks))
        except Exception as exc:  # noqa: BLE001 - pickle raises several types for the same cause
            raise FastVAEError(f"with strategy ddp_spawn the callbacks go to new processes and must be "
                               f"picklable (module-level classes, not lambdas or local classes): {one_line(exc)}") from None


def _first_process() -> bool:
    """Whether this is the launch's first process (a launcher's other ranks, or the processes
    Fabric starts for them, have a rank in their environment)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _note_unused_split_settings(config: TrainConfig, splits) -> None:
    """One note when --test-fraction / --split-seed are set but the data has a test split of
    its own (digits, photos, a prepared dataset, train/ + test/, ...): they change nothing."""
    ignored = unused_split_flags(config.test_fraction, config.split_seed)
    if ignored and not getattr(splits, "held_out", False):
        print(f"note: {config.data} has a test split of its own: {ignored} "
              "(a prepared dataset's split is made by 'fastvae prepare --test-fraction')", file=sys.stderr)


# settings a resume changes without a note: how the run is watched, not what it trains
UNNOTED_ON_RESUME = ("epochs", "out", "progress", "pictures", "threads", "loggers", "tensorboard", "workers")


def _note_changed_settings(saved: dict, config: TrainConfig) -> None:
    """One note naming the settings a resume changes (old -> new): config.json keeps the latest."""
    before = {**TrainConfig().to_dict(), **saved_settings(saved["config"])}
    quiet = {*UNNOTED_ON_RESUME, *unused_settings(config.model)}  # unused: they change nothing
    changed = [f"{key} {before[key]} -> {value}" for key, value in config.to_dict().items()
               if key not in quiet and key in before and before[key] != value]
    if changed:
        print(f"note: resuming with changed settings: {', '.join(changed)}", file=sys.stderr)


def _set_fixed_sigma(model, sigma: float) -> None:
    """A fixed (not learned) Gaussian/Laplace sigma is the setting's value, also on --resume
    (a learned one continues from where it is: its setting was a starting value)."""
    likelihood = getattr(model, "likelihood", None)
    scale = getattr(likelihood, "log_scale", None)
    if scale is not None and likelihood.kind != "bernoulli" and not isinstance(scale, torch.nn.Parameter):
        with torch.no_grad():
            scale.fill_(math.log(sigma))


class Trainer:
    """One process's share of a run: model and optimizer set up by Fabric, epoch by epoch."""

    def __init__(self, fabric, config: TrainConfig, splits: Splits, resume: bool | Path = False):
        from fastvae.models import build_model

        self.fabric, self.config, self.splits = fabric, config, splits
        self.run_dir = Path(config.out)
        self.rank, self.world = fabric.global_rank, fabric.world_size
        # the same initial weights on every rank (FSDP shards each rank's own copy; DDP would
        # broadcast rank 0's), then a noise stream per rank; rank 0's is the single-process one
        fabric.seed_everything(config.seed, verbose=False)
        model = build_model(config.model_spec(splits.data_shape))
        if self.rank:  # wrapped into the 32-bit range seeds live in
            fabric.seed_everything((config.seed + self.rank) % (MAX_SEED + 1), verbose=False)
        if model.kind == "vae":  # decided once here, not in every (compiled) step
            model.reparam_backend = resolve_backend(config.reparam, fabric.device)
        if fabric.device.type == "cuda" and len(model.latent_shape) == 3:
            model.to(memory_format=torch.channels_last)  # spatial conv models: cuDNN's fast layout
        self.epoch = self.step = self.skip_batches = 0
        self._asked_to_stop = False  # request_stop(): a callback's stop request
        self.partial: EpochSums | None = None  # sums of an interrupted epoch
        # resume: True for last.ckpt, or the checkpoint file check_resume chose
        source = resume if isinstance(resume, Path) else self.run_dir / LAST
        saved = read_checkpoint(source) if resume else None
        # whether last.ckpt holds an epoch's end, which a mid-epoch save keeps as EPOCH_END
        self._last_is_epoch_end = (saved is not None and source.name == LAST.name
                                   and not saved.get("batch_in_epoch"))
        self._fresh = saved is None
        self.data_id = dataset_id(splits)  # train() refused a resume on another dataset
        self.data_split = prepared_split(splits)
        # before training's first collective: nodes started by commands of their own may differ
        check_ranks_agree(fabric, what_this_rank_trains(config, splits, self.data_id))
        if saved is not None:  # full weights go into the plain model, before any sharding,
            # in the precision's dtype (float64 weights loaded into a float32 model lose bits)
            model = fabric.strategy.precision.convert_module(model)
            load_model_state(model, saved["model"], source)
            _set_fixed_sigma(model, config.sigma)  # a resume may change it: the buffer held the old
        self.module = model  # the plain module: state dicts, evaluation, pictures
        if config.compiled:  # in place: state-dict keys stay plain, Fabric wraps the compiled call
            model.compile(mode=None if config.compile_mode == "default" else config.compile_mode)
        # CUDA graphs: each step's records must be copied before the next replay overwrites them
        # (torch.stack below does), and a varying KL weight must be a device tensor, not a
        # Python float (which torch.compile would turn into a CPU input once it changes)
        self.graphed = (config.compiled and fabric.device.type == "cuda"
                        and config.compile_mode in ("reduce-overhead", "max-autotune"))
        if config.strategy == "fsdp":  # FSDP2 swaps in sharded parameters: optimizer after that
            self.model = fabric.setup_module(model)
            self.optimizer = fabric.setup_optimizers(make_optimizer(model, config))
            if saved is not None:
                load_sharded_optimizer_state(model, self.optimizer.optimizer, saved["optimizer"])
        else:
            optimizer = make_optimizer(model, config)
            self.model, self.optimizer = fabric.setup(model, optimizer)
            if saved is not None:  # after set-up: the moments take the parameters' device and
                # dtype (float64 under 64-true: loaded before, they stayed float32)
                state = optimizer_state_by_index(saved["optimizer"], model)
                optimizer.load_state_dict(keep_implementation(state, optimizer))
        if saved is not None:
            self._restore_progress(saved)  # train() refused fewer --epochs than trained
            for group in self.optimizer.optimizer.param_groups:  # the checkpoint held the old lr
                group["lr"] = config.lr
        self.skip_mode = skip_mode(self.optimizer.optimizer, fabric.strategy.precision)
        self.check_every = check_interval(fabric.device)  # host mode reads every step anyway
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # (step, rows, record) not yet read
        self._last_save = _clock()  # --checkpoint-minutes counts from here (rank 0's clock)
        self.source = make_source(splits.train, fabric, config.workers, config.epochs)
        self.test_data = splits.test if is_streamed(splits.test) else fabric.to_device(splits.test)
        metrics_csv = self.run_dir / METRICS_CSV
        self.rows = run_folder.read_metrics(metrics_csv, self.epoch) if resume else []

    def _restore_progress(self, state: dict) -> None:
        """Counters, loss scale, an interrupted epoch's sums and (same world size only) every
        rank's own random streams of a checkpoint."""
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.skip_batches = int(state.get("batch_in_epoch", 0))
        partial = state.get("partial")
        if partial and state.get("partial_of_all_ranks") and self.rank:  # rank 0 holds the totals
            self.partial = EpochSums(seconds=partial[3])
        else:
            self.partial = EpochSums(*partial) if partial else None
        if state.get("precision"):  # fp16's loss scale: resuming keeps it instead of relearning
            self.fabric.strategy.precision.load_state_dict(state["precision"])
        if int(state.get("world_size", 1)) == self.world:  # other sizes: fresh per-rank streams
            ranks = state.get("rank_rng")  # older checkpoints: rank 0's streams only
            set_rng_state(ranks[self.rank] if ranks else state["rng"])

    def fit(self) -> TrainResult | None:
        config, fabric = self.config, self.fabric
        self._on_rank0(self._write_start)
        fabric.call("on_train_start", self)
        if self.world > 1 and config.progress:  # --quiet: no such lines
            fabric.print(f"global batch {config.batch_size * self.world} = per-device batch "
                         f"{config.batch_size} x {self.world} processes")
        interrupted = False
        with StopRequest() as stop:
            try:
                while self.epoch < config.epochs and not interrupted:
                    row = self.run_epoch(stop)
                    if row is not None:
                        self._on_rank0(lambda: self._log(row))  # trackers write files too
                    # asked after the last epoch too: a stop during its last step, evaluation or
                    # checkpoint was ignored, and pictures were drawn with exit status 0
                    interrupted = row is None or self._agreed_stop(stop)
            finally:
                self.source.close()  # a streamed split's loader workers
            if interrupted and self.epoch >= config.epochs and row is not None:
                pictures = (f" but its pictures were not drawn: 'fastvae evaluate {self.run_dir} --pictures' "
                            "draws them") if config.pictures else ""  # --no-pictures asked for none
                fabric.print(f"interrupted after the last epoch: the run is complete (checkpoint at step "
                             f"{self.step}){pictures}")
            elif interrupted:
                fabric.print(f"interrupted: checkpoint written at step {self.step} (epoch "
                             f"{self.epoch + (row is None)}); continue with --resume")
        fabric.call("on_train_end", self, interrupted)
        for logger in fabric.loggers:  # flush files, close tracker runs
            logger.finalize("interrupted" if interrupted else "success")
        if self.rank != 0:
            return None
        if config.pictures and not interrupted:
            _write_pictures(self.run_dir, self.splits, config)
        _note_stale_outputs(self.run_dir)
        return TrainResult(self.run_dir, self.epoch, self.step, self.rows, interrupted)

    def request_stop(self) -> None:
        """Stop the run as Ctrl-C does (a checkpoint at the step the ranks agree on), from a
        callback; works outside the main thread, where no signal reaches training. A flag of
        its own: a Ctrl-C or SIGTERM after it is still a first stop request, not the second
        that ends the process at once."""
        self._asked_to_stop = True

    def run_epoch(self, stop: StopRequest | None = None) -> dict | None:
        """Train one epoch (or its rest, after a mid-epoch resume), evaluate, checkpoint.

        Returns the metrics row, or ``None`` when a stop request ended the epoch early (a
        mid-epoch checkpoint is written then).
        """
        sums, index = self.train_pass(stop)
        totals = self._all_ranks(sums)
        if index is not None:
            self.save(batch_in_epoch=index, partial=totals)
            return None
        self.skip_batches, self.partial = 0, None
        recon, kl, count = totals.recon, totals.kl, totals.count
        if count == 0:  # the totals of every rank: all ranks stop here, rank 0 says why
            message = (f"every step of epoch {self.epoch + 1} had a non-finite loss: the model has "
                       f"diverged. {self._checkpoint_note()}Train again with a lower --lr")
            raise FastVAEError(message) if self.rank == 0 else _RankZeroFailed(message)
        self.epoch += 1
        row = {"epoch": self.epoch, "step": self.step, "train_loss": (recon + kl) / count,
               "train_recon": recon / count, "train_kl": kl / count, "epoch_time_s": sums.seconds}
        row.update(self.test_metrics())
        scaler = getattr(self.fabric.strategy.precision, "scaler", None)
        if scaler is not None:  # fp16: a falling scale means steps skipped for inf/NaN gradients
            row["loss_scale"] = float(scaler.get_scale())
        self.rows.append(row)
        self.save(metrics=True)
        self.fabric.call("on_train_epoch_end", self, row)
        return row

    def _all_ranks(self, sums: EpochSums) -> EpochSums:
        """The epoch's sums over every rank (this rank's seconds)."""
        if self.world == 1:
            return sums
        reduced = torch.tensor(sums.to_list()[:3], dtype=torch.float64, device=self.fabric.device)
        recon, kl, count = self.fabric.all_reduce(reduced, reduce_op="sum").cpu().tolist()
        return EpochSums(recon, kl, count, sums.seconds)

    def _agreed_stop(self, stop: StopRequest | None) -> bool:
        """Whether a stop was requested on any rank: every rank gets the same answer. A signal
        may reach one rank only (a launcher's SIGTERM) or the ranks at different steps, and a
        rank stopping alone would wait in the checkpoint's collectives forever."""
        return self._agreed(stop, save_due=False)[0]

    def _agreed(self, stop: StopRequest | None, save_due: bool) -> tuple[bool, bool]:
        """(stop requested on any rank, ``save_due`` on any rank): one all-reduce, the same
        answers on every rank (a checkpoint's collectives need them all)."""
        requested = self._asked_to_stop or (stop is not None and stop.requested)
        if self.world == 1:
            return requested, save_due
        flags = torch.tensor([float(requested), float(save_due)], device=self.fabric.device)
        stop_sum, save_sum = self.fabric.all_reduce(flags, reduce_op="sum").tolist()
        return stop_sum > 0, save_sum > 0

    def _save_due(self) -> bool:
        """Whether ``--checkpoint-minutes`` have passed since the last checkpoint (rank 0 decides)."""
        minutes = self.config.checkpoint_minutes
        return minutes > 0 and self.rank == 0 and _clock() - self._last_save >= 60 * minutes

    def _save_mid_epoch(self, batch_in_epoch: int, sums: EpochSums, started: float) -> float:
        """A checkpoint of the epoch so far, as a stop request writes it; training goes on from
        this rank's own ``sums``. Returns the seconds it took (not the epoch's time)."""
        self._read_records(sums)
        begun = time.perf_counter()
        so_far = EpochSums(sums.recon, sums.kl, sums.count, sums.seconds + begun - started)
        self.save(batch_in_epoch=batch_in_epoch, partial=self._all_ranks(so_far))
        return time.perf_counter() - begun

    def train_pass(self, stop: StopRequest | None = None) -> tuple[EpochSums, int | None]:
        """The optimization steps of one epoch: what ``epoch_time_s`` measures.

        Returns this rank's sums, plus the number of batches done when a stop request cut the
        epoch short (else ``None``).
        """
        from fastvae.progress_bars import progress_bar

        config = self.config
        self.model.train()
        batches = self.source.epoch_batches(epoch=self.epoch, seed=config.seed, rank=self.rank,
                                            world=self.world, batch_size=config.batch_size,
                                            start=self.skip_batches)
        sums = self.partial if self.partial is not None else EpochSums()
        started = time.perf_counter()
        bar = progress_bar(total=len(batches), initial=self.skip_batches, leave=False, mininterval=0.5,
                           desc=f"epoch {self.epoch + 1}/{config.epochs}",
                           disable=None if config.progress and self.rank == 0 else True)  # None: only on a terminal
        stopped_at = None
        every = config.checkpoint_every
        for index, x in enumerate(batches, start=self.skip_batches):
            self._train_step(x, sums)
            bar.update(1)
            self.fabric.call("on_train_batch_end", self, index)
            if index + 1 == len(batches):  # the epoch's end: checkpointed after evaluation
                continue
            # every rank asks at the same steps (on an accelerator with the records' host read)
            stop_now, save_due = False, False
            if self.world == 1 or self.step % self.check_every == 0:
                stop_now, save_due = self._agreed(stop, self._save_due())
            if stop_now:
                stopped_at = index + 1
                break
            if save_due or (every and self.step % every == 0):
                started += self._save_mid_epoch(index + 1, sums, started)
        self._read_records(sums)
        bar.close()
        sums.seconds += time.perf_counter() - started
        return sums, stopped_at

    def _train_step(self, x: torch.Tensor, sums: EpochSums) -> None:
        """One step; its (loss, recon, KL, flag) record stays on the device until read."""
        config = self.config
        beta = kl_weight(self.step, config.beta, config.kl_warmup_steps)
        # before the forward: with CUDA graphs the last step's gradients live in the graphs'
        # memory, which the next replay reuses
        self.optimizer.zero_grad(set_to_none=True)
        if self.graphed:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier outputs are done
            if config.kl_warmup_steps > 0:
                beta = torch.full((), beta, device=x.device)
        terms = self.model(x, beta=beta, free_bits=config.free_bits)
        self.step += 1
        record = [terms.loss.detach(), terms.recon, terms.kl]
        if self.skip_mode == "host":  # the optimizer cannot skip on the device: check now
            bad = torch.isfinite(record[0]).logical_not().float()
            if self.world > 1:  # all ranks skip together (backward has collectives)
                bad = self.fabric.all_reduce(bad, reduce_op="sum")
            self._pending.append((self.step, len(x), torch.stack([t.float() for t in record + [bad]])))
            if self._read_records(sums):
                self.fabric.backward(terms.loss)
                self.optimizer.step()
            return
        self.fabric.backward(terms.loss)
        if self.skip_mode == "device":
            record.append(flag_nonfinite_grads(self.optimizer.optimizer))
        self.optimizer.step()
        self._pending.append((self.step, len(x), torch.stack([t.float() for t in record])))
        if len(self._pending) >= self.check_every:
            self._read_records(sums)

    def _read_records(self, sums: EpochSums) -> bool:
        """Read the pending step records in one host sync; add the finite steps to ``sums``;
        stop or report each non-finite one. Returns whether the last was finite."""
        if not self._pending:
            return True
        pending, self._pending = self._pending, []
        records = torch.stack([record for _, _, record in pending])
        agreed = self.skip_mode == "host" or (self.world > 1 and self.config.on_nonfinite == "stop")
        if agreed and self.skip_mode != "host":
            # a loss non-finite on one rank alone (its gradients may be finite, a GradScaler's
            # records have no flag) stopped that rank alone, and the others waited in their next
            # collective (NCCL: until its timeout): the ranks' counts of non-finite losses, per
            # step, in one all-reduce per read (host mode reduces them at every step already)
            others = self.fabric.all_reduce(torch.isfinite(records[:, 0]).logical_not().float(), reduce_op="sum")
            records = torch.cat([records, others[:, None].to(records.dtype)], dim=1)
        finite = True
        for (step, n, _), (loss, recon, kl, *flags) in zip(pending, records.tolist()):
            # host: [losses' all-reduced flag]; device: [gradients' flag (averaged: every rank's)]
            # and, agreed, [ranks with a non-finite loss]; scaler: [] or that count
            finite = math.isfinite(loss) and not any(f > 0 for f in flags)
            if finite:
                sums.recon += recon * n
                sums.kl += kl * n
                sums.count += n
                continue
            if not math.isfinite(loss):
                became, now = f"loss became {loss}", f"loss is {loss}"
            elif agreed and flags[-1] > 0:  # the count of ranks whose loss is not finite
                became, now = "the loss of another rank became non-finite", "another rank's loss is not finite"
            else:
                became, now = "gradients became inf/NaN", "gradients are inf/NaN"
            if self.config.on_nonfinite == "stop":
                # the first step runs the initial weights: no learning rate has acted yet
                remedy = ("at the first step no update has been made yet: check --beta, --sigma, "
                          "--free-bits and the data for extreme or non-finite values"
                          if step == 1 and not math.isfinite(loss) else self._nonfinite_remedy())
                message = (f"{became} at epoch {self.epoch + 1}, step {step}; training stopped. "
                           f"{self._checkpoint_note()}{remedy[0].upper()}{remedy[1:]}")
                # the decision is every rank's (host: the losses' all-reduced flag; otherwise, with
                # several ranks, the reduced count above): all stop at this step, rank 0 says why
                if self.rank != 0:
                    raise _RankZeroFailed(message)
                raise FastVAEError(message)
            self.fabric.print(f"skipping step {step} (epoch {self.epoch + 1}): {now}")
        return finite

    def _nonfinite_remedy(self) -> str:
        """What to try after non-finite steps: the settings not tried yet (a 32-true run was
        told to try --precision 32-true)."""
        tries = ["a lower --lr"]
        if self.config.precision not in ("32-true", "32", "64-true"):
            tries.append("--precision 32-true")
        if self.config.on_nonfinite != "skip":
            tries.append("--on-nonfinite skip")
        return "Try " + (", ".join(tries[:-1]) + ", or " + tries[-1] if len(tries) > 1 else tries[0])

    def _checkpoint_note(self) -> str:
        last = self.run_dir / LAST
        if not last.exists():
            return "No checkpoint was written yet. "
        row = self.rows[-1] if self.rows else {}
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:  # --on-nonfinite skip went on past a diverged epoch: its checkpoint is no good start
            return (f"The last checkpoint {last} holds epoch {row['epoch']}, whose {bad[0]} was {row[bad[0]]}: "
                    "a --resume would start from diverged weights, so start again. ")
        return f"The last good checkpoint {last} is intact (--resume continues from it). "

    def test_metrics(self) -> dict:
        """Single-sample -ELBO (MSE for the autoencoder) on the test split, each example once."""
        from fastvae.evaluation import elbo_sums

        sums = elbo_sums(self.module, self.test_data, batch_size=max(self.config.batch_size, 256),
                         seed=self.config.seed, rank=self.rank, world_size=self.world,
                         device=self.fabric.device)
        sums = self.fabric.all_reduce(sums.to(self.fabric.device), reduce_op="sum").cpu()
        n = float(sums[3])
        if self.module.kind == "ae":  # the MSE autoencoder: no ELBO
            return {"test_recon": float(sums[1]) / n}
        return {"test_neg_elbo": float(sums[0]) / n, "test_recon": float(sums[1]) / n,
                "test_kl": float(sums[2]) / n}

    def save(self, batch_in_epoch: int = 0, partial: EpochSums | None = None, metrics: bool = False) -> None:
        """Checkpoint through Fabric (rank 0 writes a temp file, then renames it over last.ckpt);
        ``metrics``: rank 0 writes metrics.csv first (a resume drops rows past its checkpoint's
        epoch). A failed write stops every rank (``_share_rank0_failure``)."""
        state = {
            "format": FORMAT, "config": self.config.to_dict(), "spec": self.module.spec,
            "model": self.model, "optimizer": self.optimizer, "epoch": self.epoch,
            "step": self.step, "rng": rng_state(), "batch_in_epoch": batch_in_epoch,
            "world_size": self.world,
        }
        if self.world > 1:  # each rank's own noise stream continues on resume
            state["rank_rng"] = self._rank_rng_states()
        if self.data_id is not None:
            state["data_id"] = self.data_id
        if self.data_split is not None:  # how prepare split it: for evaluate/report --data SRC
            state["data_split"] = self.data_split
        precision_state = self.fabric.strategy.precision.state_dict()
        if precision_state:  # fp16: GradScaler's scale and growth tracker
            state["precision"] = precision_state
        if partial is not None:  # summed over the ranks: rank 0 resumes with them, the others from 0
            state["partial"], state["partial_of_all_ranks"] = partial.to_list(), True
        self._last_save = _clock()
        final = self.run_dir / LAST
        # one name for every save, so the next one replaces a file a SIGKILL left mid-write
        tmp = run_folder.temporary_name(final, tag="save")
        failure, saved = None, False
        if self.rank == 0:
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                if metrics:  # no checkpoint without its row; the other ranks still take part
                    run_folder.write_metrics(self.run_dir / METRICS_CSV, self.rows)
            except OSError as exc:
                if self.world == 1:  # no other rank needs this save's collectives: stop now
                    raise
                failure = exc
        try:
            with removed_on_exit(tmp):  # Fabric writes tmp on rank 0 (every rank takes part)
                self.fabric.save(tmp, state)
                saved = True
                if self.rank == 0 and failure is None:
                    self._replace_checkpoint(tmp, final, mid_epoch=bool(batch_in_epoch))
        except Exception as exc:  # also a MemoryError serializing, a bug: the other ranks must not wait
            failure = failure or _save_failure(exc, final)
        finally:
            if self.rank == 0:  # a failed write (a full disk) leaves no half a checkpoint
                tmp.unlink(missing_ok=True)
        if failure is not None and self.rank != 0:  # not rank 0's write: its own error
            raise failure
        if self.world > 1 and failure is not None and not saved:
            # rank 0's write failed inside fabric.save, before the barrier that ends it, where
            # the other ranks wait: take that barrier, then tell them
            self.fabric.barrier()
        self._share_rank0_failure(failure)

    def _replace_checkpoint(self, tmp: Path, final: Path, mid_epoch: bool) -> None:
        """Move the new checkpoint into place (rank 0). A mid-epoch one first keeps the epoch's
        end it replaces as EPOCH_END (a hard link: no copy; a copy where links are refused), so
        a resume on another number of processes can start there; an epoch's end drops it."""
        kept = self.run_dir / EPOCH_END
        if mid_epoch and self._last_is_epoch_end and final.is_file():
            self._keep_epoch_end(final, kept)
        run_folder.move_into_place(tmp, final)
        self._last_is_epoch_end = not mid_epoch
        if not mid_epoch:
            kept.unlink(missing_ok=True)

    @staticmethod
    def _keep_epoch_end(final: Path, kept: Path) -> None:
        """``final`` (an epoch's end) also as ``kept``: a hard link (the bytes are written
        already), a copy where links are refused (another user's file, some file systems).
        Optional: a failure is a note, and no older kept file stays."""
        link = run_folder.temporary_name(kept, tag="keep")
        try:
            link.unlink(missing_ok=True)  # left by a killed save
            try:
                os.link(final, link)
            except OSError:
                shutil.copyfile(final, link)
                run_folder.fsync_file(link)
            os.replace(link, kept)
            run_folder.fsync_folder(kept.parent)
        except OSError as exc:
            kept.unlink(missing_ok=True)
            print(f"note: could not keep the epoch's end as {kept} ({one_line(exc)}): this epoch's mid-epoch "
                  "checkpoints resume only on the same number of processes", file=sys.stderr)
        finally:
            link.unlink(missing_ok=True)

    def _write_start(self) -> None:
        if self._fresh:  # an epoch's end kept by a run this folder held before is not this run's
            (self.run_dir / EPOCH_END).unlink(missing_ok=True)
        run_folder.write_config(self.run_dir, self.config.to_dict())
        run_folder.write_metrics(self.run_dir / METRICS_CSV, self.rows)

    def _on_rank0(self, work) -> None:
        """``work()`` on rank 0 only (its writes), its error raised on every rank
        (``_share_rank0_failure``: a collective where there are several)."""
        failure = None
        if self.rank == 0:
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - raised again below, on every rank
                failure = exc
        self._share_rank0_failure(failure)

    def _share_rank0_failure(self, failure: BaseException | None) -> None:
        """Raise rank 0's ``failure`` (None: go on) there, and ``_RankZeroFailed`` on the other
        ranks (a collective, after rank 0's writes), so that a full disk stops every rank instead
        of leaving the others at the next collective (under srun: until it times out). The
        others stop quietly (exit 0, see ``_fit``); rank 0's error says what happened."""
        if self.world > 1:
            message = None if failure is None else f"{type(failure).__name__}: {one_line(failure)}"
            message = self.fabric.broadcast(message if self.rank == 0 else None, src=0)
            if message is not None and self.rank != 0:
                raise _RankZeroFailed(message)
        if failure is not None:
            raise failure

    def _rank_rng_states(self) -> list[dict]:
        """``rng_state()`` of every rank, in rank order (a collective: every rank calls it)."""
        states: list[dict] = [{} for _ in range(self.world)]
        for key, tensor in rng_state().items():
            gathered = self.fabric.all_gather(tensor.to(self.fabric.device)).cpu()
            for rank in range(self.world):
                states[rank][key] = gathered[rank].clone()
        return states

    def _log(self, row: dict) -> None:
        """The epoch's row to the trackers and the terminal (rank 0: see ``fit``)."""
        if self.fabric.loggers:
            self.fabric.log_dict({k: v for k, v in row.items() if k != "step"},  # epoch: a column too
                                 step=row["step"])
        if self.config.progress:
            test = f"  test -elbo {row['test_neg_elbo']:.3f}" if "test_neg_elbo" in row else ""
            self.fabric.print(
                f"epoch {row['epoch']}/{self.config.epochs}  loss {row['train_loss']:.3f}  "
                f"recon {row['train_recon']:.3f}  kl {row['train_kl']:.3f}{test}  "
                f"({row['epoch_time_s']:.2f}s)"
            )


def _save_failure(exc: Exception, final: Path) -> Exception:
    """What a failed checkpoint write reports: an OSError naming ``final``, torch.save's
    writer failure said in one line, anything else as it is."""
    if isinstance(exc, OSError):
        return run_folder.named(exc, final)
    if isinstance(exc, RuntimeError) and _is_write_failure(exc):
        return FastVAEError(f"cannot write {final}: torch.save's writer failed ({one_line(exc)}): a full disk or "
                            "a file-size limit (ulimit -f); free space or raise the limit, then --resume")
    return exc


def _is_write_failure(exc: RuntimeError) -> bool:
    """Whether torch.save's file writer failed (FSDP's rank 0 writes with it: a full disk says
    "unexpected pos N vs M", without an errno)."""
    text = str(exc)
    return "inline_container" in text or "PytorchStreamWriter" in text


class _RankZeroFailed(Exception):
    """On ranks other than 0: rank 0 failed at its part of the run (a write); its error reports it."""


def _fit(fabric, config: TrainConfig, splits: Splits, resume: Path | None) -> TrainResult | None:
    rendezvous_watch.joined()  # this process has joined the others
    if multiprocessing.parent_process() is not None and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a spawned rank's own, as fastvae.cli.run's
    threads = torch.get_num_threads()
    if config.threads:  # in each rank's process; the caller's setting comes back after
        torch.set_num_threads(config.threads)
    try:
        with warnings.catch_warnings():  # Lightning's own call, deprecated by torch: nothing to do here
            warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
            return Trainer(fabric, config, splits, resume).fit()
    except _RankZeroFailed:
        # end quietly, exit status 0: rank 0 prints the error and exits 2. A failing rank would
        # also make Fabric's launcher SIGKILL rank 0 (its observer polls every 5 s), maybe
        # before rank 0 has said why
        return None
    except RuntimeError as exc:
        from fastvae import rank_errors

        if fabric.world_size == 1 or not rank_errors.lost_peer(exc):
            raise
        raise rank_errors.lost_peer_error(fabric.global_rank, exc, config.out) from None
    finally:
        torch.set_num_threads(threads)
        _end_process_group()  # in each rank's own process (spawned ranks end right after)


def _note_stale_outputs(run_dir: Path) -> None:
    """One note naming the report and exported models in the run folder that are older than
    its checkpoint (made before this training: they show the earlier model)."""
    checkpoint = run_dir / LAST
    if not checkpoint.is_file():
        return
    saved = checkpoint.stat().st_mtime
    # the report pages and exported models among what run_folder lists as a run's outputs
    names = [name for name in run_folder.RUN_OUTPUTS if name.startswith("report.")]
    names += [p.name for pattern in run_folder.RUN_OUTPUT_PATTERNS for p in sorted(run_dir.glob(pattern))
              if p.suffix == ".onnx"]
    stale = [name for name in names if (run_dir / name).is_file() and (run_dir / name).stat().st_mtime < saved]
    commands = [f"'fastvae {command}'" for command, kind in (("export", ".onnx"), ("report", "report."))
                if any(kind in name for name in stale)]
    if stale:
        print(f"note: {', '.join(stale)} in {run_dir} {'shows' if len(stale) == 1 else 'show'} the model before this training: run "
              f"{' and '.join(commands)} again", file=sys.stderr)


def _write_pictures(run_dir: Path, splits: Splits, config: TrainConfig) -> None:
    from fastvae import viz
    from fastvae.checkpoint import load

    stamp = viz.pictures_stamp(run_dir, run_dir / LAST, config.seed, config.data)
    viz.write_run_pictures(run_dir, load(run_dir), in_memory_sample(splits), seed=config.seed, stamp=stamp)
