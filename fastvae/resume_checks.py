"""Which checkpoint ``--resume`` starts from, and what a resume may not change (the model, the
data, a mid-epoch checkpoint's batching): refused in one line before any process starts."""

from __future__ import annotations

from pathlib import Path

from fastvae import run_folder
from fastvae.checkpoint import check_resumable, checkpoint_path, read_checkpoint
from fastvae.config import SPLIT_RULE, TrainConfig, resume_identity, saved_settings
from fastvae.errors import FastVAEError
from fastvae.run_folder import EPOCH_END


def check_resume(run_dir: Path, config: TrainConfig) -> tuple[dict, Path, str | None]:
    """Refuse to resume the run in ``run_dir`` as another model, data or (mid-epoch) batching,
    or with fewer epochs than it has trained; return the checkpoint to resume from, its path
    and a note to print (or None): ``last.ckpt``, or, where only the number of processes
    changed from a mid-epoch one's (a lost node), the epoch's end kept beside it (``EPOCH_END``)."""
    # clear error when missing or corrupt; mapped: the ranks' Trainer reads the weights later
    path = checkpoint_path(run_dir)
    state = read_checkpoint(path, mmap=True)
    check_resumable(state, path)
    made_with = saved_settings(state["config"]).get("split_rule", SPLIT_RULE)
    if config.split_rule == SPLIT_RULE != made_with:  # today's default: the run keeps its own rule
        config.split_rule = made_with  # (the command line reads it from config.json; a program may not)
    note = None
    try:
        _check_settings(run_dir, state, config)
    except FastVAEError:
        earlier = _epoch_end_for(run_dir, state, config)
        if earlier is None:
            raise
        note = (f"note: {path} is mid-epoch (step {state['step']}) and resumes only on the "
                f"{state.get('world_size', 1)} process(es) it was made with; resuming from the end of epoch "
                f"{earlier['epoch']} ({run_dir / EPOCH_END}, step {earlier['step']}) instead: the steps since are "
                f"trained again, and the next checkpoint replaces the mid-epoch one (Ctrl-C now and resume on "
                f"{state.get('world_size', 1)} process(es) to keep them)")
        state, path = earlier, run_dir / EPOCH_END
    trained = int(state.get("epoch", 0))
    if config.epochs < trained:  # config.json would say fewer epochs than the run holds
        raise FastVAEError(f"--epochs {config.epochs}: {run_dir} has trained {trained} "
                           f"epoch(s) already; give --epochs {trained} or more to continue it")
    return state, path, note


def _epoch_end_for(run_dir: Path, state: dict, config: TrainConfig) -> dict | None:
    """The epoch's end kept beside the mid-epoch checkpoint ``state`` when it is that epoch's
    (same epoch, not later), this resume changes only the number of processes (another batch
    size or seed stays refused: a typo must not throw steps away) and leaves an epoch to train;
    else None."""
    kept = run_dir / EPOCH_END
    if not state.get("batch_in_epoch") or not kept.is_file():
        return None
    if (any(state["config"].get(k) != getattr(config, k) for k in ("batch_size", "seed"))
            or int(state.get("world_size", 1)) == config.devices * config.num_nodes):
        return None
    earlier = read_checkpoint(kept, mmap=True)
    check_resumable(earlier, kept)
    if (int(earlier.get("epoch", -1)) != int(state.get("epoch", 0)) or earlier.get("batch_in_epoch")
            or int(earlier.get("step", 0)) > int(state.get("step", 0)) or config.epochs <= int(earlier["epoch"])):
        return None  # another run's file, left behind (or nothing left to train from it)
    _check_settings(run_dir, earlier, config)  # model and data still refuse
    return earlier


def _check_settings(run_dir: Path, state: dict, config: TrainConfig) -> None:
    """``run_folder.check_resume`` for checkpoint ``state``: what may not change."""
    # settings added since take what the run was made with, else today's defaults
    saved = {**TrainConfig().to_dict(), **saved_settings(state["config"])}
    # a prepared dataset is known by its dataset_id (train() compares it), not by its path:
    # a copy elsewhere (another disk, a bucket) resumes the run
    identity = [k for k in resume_identity(saved) if not (k == "data" and state.get("data_id"))]
    if _has_own_split(saved, state, config):  # the split settings change nothing there (a note says so)
        identity = [k for k in identity if k not in ("test_fraction", "split_seed")]
    run_folder.check_resume(
        run_dir, saved, config.to_dict(), identity,
        mid_epoch=bool(state.get("batch_in_epoch")),
        saved_world_size=int(state.get("world_size", 1)),
        world_size=config.devices * config.num_nodes,
    )


def _has_own_split(saved: dict, state: dict, config: TrainConfig) -> bool:
    """Whether the run's data holds out a split of its own, whatever --test-fraction and
    --split-seed say: bundled data (the same name) or a prepared dataset (its id recorded)."""
    from fastvae.data import is_bundled

    data_id = state.get("data_id")
    prepared = isinstance(data_id, str) and not data_id.startswith("content:")
    return prepared or (is_bundled(saved.get("data")) and config.data == saved.get("data"))
