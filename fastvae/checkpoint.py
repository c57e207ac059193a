"""Checkpoints: plain dicts of tensors and numbers, written atomically, loaded safely.

A checkpoint holds ``format``, ``config`` (the run's TrainConfig dict), ``spec`` (the model spec),
``model`` and ``optimizer`` state dicts, ``epoch`` (epochs completed), ``step`` and ``rng``
(torch CPU/CUDA generator states), so that ``--resume`` continues exactly. Everything loads with
``torch.load(weights_only=True)``: no pickled classes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastvae.errors import FastVAEError, one_line
from fastvae.float32_default import float32_by_default
from fastvae.run_folder import LAST, atomic_write

FORMAT = "fastvae-checkpoint-v1"
REQUIRED_KEYS = ("config", "spec", "model")


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically ``torch.save`` a plain-dict checkpoint."""
    with atomic_write(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_path(run_or_ckpt: str | Path) -> Path:
    """The checkpoint file of a run folder (``checkpoints/last.ckpt``) or the file itself."""
    path = Path(run_or_ckpt)
    if path.is_dir():
        path = path / LAST
        if not path.is_file():
            raise FastVAEError(
                f"run folder {run_or_ckpt} has no {LAST}: train into it first with "
                f"'fastvae train --out {run_or_ckpt}'"
            )
    elif not path.exists():
        raise FastVAEError(f"{path} does not exist: give a run folder or a .ckpt file")
    return path


def read_checkpoint(run_or_ckpt: str | Path, map_location="cpu", *, mmap: bool = False) -> dict:
    """Load and check a checkpoint dict; one clear error for truncated or foreign files.
    ``mmap``: tensors mapped from the file, read only where touched (a check of the settings
    alone costs no read of the weights)."""
    path = checkpoint_path(run_or_ckpt)
    try:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except OSError:
            if not mmap:
                raise
            # a file system without mmap (some FUSE or network mounts): read it whole
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, foreign formats: one message
        try:  # unless the file itself cannot be read (permissions, a failing disk): say so
            with open(path, "rb") as file:
                file.read(1)
        except OSError as unreadable:
            raise FastVAEError(f"could not read {path} ({unreadable.strerror or one_line(unreadable)})") from None
        if "on a CUDA device but torch.cuda.is_available() is False" in str(exc):  # not the file's fault
            raise FastVAEError(f"map_location {map_location!r}: this machine has no CUDA device; "
                               "load with map_location='cpu'") from None
        import zipfile

        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; torch's reason is noise here
            raise FastVAEError(f"{path} is not a readable fastvae checkpoint (not a torch checkpoint file: "
                               "truncated, or another kind of file); give a run folder or an intact .ckpt file") from None
        if "Weights only load failed" in str(exc):  # torch's paragraph on weights_only: say what it means
            raise FastVAEError(f"{path} is not a readable fastvae checkpoint (it holds Python objects beyond "
                               "tensors and plain data, which fastvae checkpoints never do)") from None
        raise FastVAEError(
            f"{path} is not a readable fastvae checkpoint (truncated or another format: {one_line(exc)})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FastVAEError(f"{path} is not a fastvae checkpoint (no '{FORMAT}' marker)")
    missing = [k for k in REQUIRED_KEYS if not isinstance(state.get(k), dict)]
    if missing:
        raise FastVAEError(f"{path} is a damaged fastvae checkpoint: no {', '.join(missing)} entry; "
                           "use an intact checkpoint or train again")
    return state


def unfinished(run_or_ckpt: str | Path) -> str | None:
    """Where an unfinished run's checkpoint stands ("step 17, epoch 2 of 5, mid-epoch"), or
    None for a finished run (or no readable checkpoint: its readers say so themselves)."""
    try:
        state = read_checkpoint(run_or_ckpt, mmap=True)
        epoch, epochs = int(state.get("epoch", 0)), int(state["config"].get("epochs", 0))
        step, batch = int(state.get("step", 0)), int(state.get("batch_in_epoch", 0))
    except (FastVAEError, KeyError, TypeError, ValueError):
        return None
    if not batch and epoch >= epochs:
        return None
    if batch:
        return f"step {step}, epoch {epoch + 1} of {epochs}, mid-epoch"
    return f"step {step}, epoch {epoch} of {epochs}"


def trained_epochs(run_dir: str | Path) -> float:
    """The epochs the run's checkpoint holds (``math.inf`` without a readable one): metrics.csv
    rows past it describe no saved model (the row is written before the checkpoint, which a
    full disk or a kill can stop)."""
    try:
        return float(read_checkpoint(run_dir, mmap=True).get("epoch", math.inf))
    except FastVAEError:
        return math.inf


@float32_by_default
def load(run_or_ckpt: str | Path, map_location="cpu"):
    """Rebuild the trained model of a run folder or checkpoint file: fp32, eval mode.

    >>> model = fastvae.load("runs/digits")      # doctest: +SKIP
    >>> model.sample(16)                          # doctest: +SKIP
    """
    from fastvae.models import build_from_spec

    state = read_checkpoint(run_or_ckpt, map_location)
    path = checkpoint_path(run_or_ckpt)
    try:
        with torch.random.fork_rng(devices=[]):  # the initial weights, replaced below, draw from
            model = build_from_spec(state["spec"])  # torch's generator: the caller's stream stays
    except (ValueError, KeyError, TypeError, OverflowError) as exc:  # an edited or foreign spec
        raise FastVAEError(f"{path} is a damaged fastvae checkpoint: its model spec builds no model "
                           f"({type(exc).__name__}: {one_line(exc)}); use an intact checkpoint or train again") from None
    load_model_state(model, state["model"], path)
    bad = [name for name, value in model.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise FastVAEError(f"{path} holds non-finite weights (NaN/Inf in {bad[0]}"
                           f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): the model diverged or "
                           "the file was damaged; use an earlier checkpoint or train again (a lower --lr)")
    return model.float().eval()


def check_resumable(state: dict, path) -> None:
    """FastVAEError unless the entries ``--resume`` reads (optimizer, random state, counters)
    are there, with their types: an edited checkpoint failed mid set-up with a KeyError."""
    rng = state.get("rng")
    problems = [] if isinstance(state.get("optimizer"), dict) else ["optimizer"]
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)):
        problems.append("rng")
    for key in ("epoch", "step", "batch_in_epoch"):
        value = state.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(key)
    if problems:
        raise FastVAEError(f"{path} is a damaged fastvae checkpoint: its {', '.join(problems)} "
                           f"entr{'y is' if len(problems) == 1 else 'ies are'} missing or invalid, so it "
                           "cannot be resumed; resume from an intact checkpoint or train into a new --out")


def load_model_state(model: torch.nn.Module, weights: dict, source) -> None:
    """``load_state_dict`` with a clear error when the checkpoint is for another model shape."""
    weights = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = [line.strip() for line in str(exc).splitlines() if line.strip()][1:3]
        raise FastVAEError(
            f"checkpoint {source} does not fit this model ({'; '.join(first)[:300]}): "
            "use the same --model, --latent-dim, --hidden-dim and data as the run that wrote it"
        ) from None
