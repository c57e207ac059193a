"""The run folder (``fastvae train --out RUN``): file names, atomic writes, ``config.json``,
``metrics.csv`` and the rules that keep a run from being clobbered by accident.

    RUN/config.json             every setting of the run: it repeats from this file alone
    RUN/metrics.csv             one row per epoch (METRIC_FIELDS; columns never filled are left out)
    RUN/checkpoints/last.ckpt   model, optimizer, progress and RNG states (fastvae.checkpoint)
    RUN/*.png, RUN/report.md    pictures (fastvae.viz) and the report page (fastvae.report_page)

Every file fastvae writes - here, and ONNX exports and sampled images elsewhere - goes through
``atomic_write`` (or ``temporary_folder`` + ``move_into_place`` for several files at once): the
data goes to a temporary file beside the target, is fsynced and renamed over it, so a crash or a
SIGKILL at any moment leaves the old file or the new one, never half of one; on Ctrl-C the
temporary file is removed (``fastvae.interrupts``). Temporary files are created by the writer's
own ``open()``, so the result has the permissions a plain ``open()`` gives under the umask.

Torch-free and numpy-free: the torch-free sampler CLI writes through it too.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fastvae.errors import FastVAEError
from fastvae.interrupts import removed_on_exit

CONFIG_JSON = "config.json"
METRICS_CSV = "metrics.csv"
CHECKPOINTS = "checkpoints"
LAST = Path(CHECKPOINTS) / "last.ckpt"
# the last epoch's end, kept while last.ckpt is mid-epoch: a resume on another number of
# processes, batch size or seed (which a mid-epoch checkpoint refuses) starts from it
EPOCH_END = Path(CHECKPOINTS) / "epoch_end.ckpt"
METRIC_FIELDS = ("epoch", "step", "train_loss", "train_recon", "train_kl", "epoch_time_s",
                 "test_neg_elbo", "test_recon", "test_kl", "loss_scale")
ALWAYS_WRITTEN = METRIC_FIELDS[:6]  # the header of a metrics.csv without rows yet


# ------------------------------------------------------------------------------ atomic writes


_OLD_MARK = ".old-"  # ".NAME.old-PID": a folder's previous version, renamed aside while the new one goes in
_TMP_MARK = ".tmp-"  # hidden ".NAME.tmp-PID" files and folders, moved into place when complete


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one of the temporary files or folders written here before moving."""
    name = Path(path).name
    return name.startswith(".") and _TMP_MARK in name


def staged_leftovers(beside: str | os.PathLike) -> list[Path]:
    """Staging files and folders ``.NAME.tmp-PID`` beside ``beside`` from other processes:
    left by one that was killed (or still running: the PID may live on another machine, so
    they are reported, never removed)."""
    beside = Path(beside)
    mine = f".{beside.name}{_TMP_MARK}{os.getpid()}"
    return sorted(p for p in beside.parent.glob(f".{beside.name}{_TMP_MARK}*") if p.name != mine)


def note_staged_leftovers(beside: str | os.PathLike, command: str) -> None:
    """A note on stderr for each of ``staged_leftovers(beside)``: what a killed ``fastvae
    COMMAND`` left (reported, never removed)."""
    import sys

    for left in staged_leftovers(beside):
        print(f"note: {left} was left by a 'fastvae {command}' that did not finish (killed?): remove "
              "it to free its space if none is running", file=sys.stderr)


def replaced_leftovers(beside: str | os.PathLike) -> list[Path]:
    """Folders ``.NAME.old-PID`` beside ``beside``: the previous version, renamed aside by a
    ``move_folder_into_place`` that was killed before it removed it (or before the new one
    went in). Reported, never removed: they may be all that is left of the old data."""
    beside = Path(beside)
    return sorted(beside.parent.glob(f".{beside.name}{_OLD_MARK}*"))


def temporary_name(path: str | os.PathLike, tag: str | None = None) -> Path:
    """``.STEM.tmp-TAG.SUFFIX`` beside ``path`` (TAG: this process's id unless given): the
    temporary file written before it is renamed over ``path``."""
    path = Path(path)
    return path.with_name(f".{path.stem}{_TMP_MARK}{os.getpid() if tag is None else tag}{path.suffix}")


def named(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` naming ``path`` where it names no file: a plain OSError from a failed write() or
    close() (a full disk) says only why, not where; any other is returned as it is."""
    if exc.filename is not None or type(exc) is not OSError:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without an error,
    fsync it and rename it over ``path``.

    The temporary name keeps the suffix (``.samples.tmp-PID.png``), so writers that choose a
    format by suffix (Pillow, ``numpy.save``) still do. On an error, or Ctrl-C on the command
    line, it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    with removed_on_exit(tmp):
        try:
            yield tmp
            move_into_place(tmp, path)
        except OSError as exc:
            raise named(exc, path) from exc.__cause__
        finally:
            tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically replace ``path`` with ``text``."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_npy(path: str | os.PathLike, array) -> Path:
    """Atomically replace ``path`` with ``numpy.save(array)``, whatever its suffix's case
    (given a name, numpy appends ``.npy`` unless it ends in exactly that: given a file, never)."""
    return write_npys({path: array})[0]


def read_npy(path: str | os.PathLike, what: str):
    """The array in the .npy file ``path`` (or the one array of an .npz), or one FastVAEError
    naming ``what`` it should hold ("latents (n, c, h, w)")."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "does not exist"
        raise FastVAEError(f"{path} {why}: give a .npy file of {what}")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy's format errors: one message
        raise FastVAEError(f"{path} is not a readable .npy array ({type(exc).__name__}): save {what.split(' (')[0]} "
                           "with numpy.save") from None
    if not isinstance(array, np.ndarray):  # an .npz archive: its one array, if it has one
        with array:
            if len(array.files) != 1:
                raise FastVAEError(f"{path} is an .npz archive of {len(array.files)} arrays "
                                   f"({', '.join(array.files[:5]) or 'none'}): save the {what.split(' (')[0]} alone "
                                   "with numpy.save")
            return array[array.files[0]]
    return array


def write_npys(arrays: dict) -> list[Path]:
    """``write_npy`` for arrays that belong together ({path: array}): every file is written
    before any is renamed into place, so a failed write (a full disk, Ctrl-C) replaces none."""
    import numpy as np

    with contextlib.ExitStack() as stack:
        for path, array in arrays.items():
            with open(stack.enter_context(atomic_write(path)), "wb") as f:
                np.save(_PythonWrites(f), array)
    return [Path(path) for path in arrays]


class _PythonWrites:
    """A file numpy writes through ``.write()``: given a real file it writes with C's fwrite,
    whose short write on a full disk is "N requested and M written", without the errno."""

    def __init__(self, f):
        self.write = f.write


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk (where a full disk can still fail a write)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def move_into_place(tmp: Path, final: Path) -> None:
    """fsync the complete file ``tmp``, rename it over ``final`` and fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_folder(final.parent)


def move_all_into_place(moves: list[tuple[Path, Path]]) -> None:
    """Files that belong together, staged as (temporary, final) pairs: every one is fsynced
    (where a full disk can still fail) before the first is renamed over its final name, in the
    order given (renames need no space, so none fails half-way for lack of it)."""
    for staged, _ in moves:
        fsync_file(staged)
    for staged, final in moves:
        os.replace(staged, final)
    for folder in dict.fromkeys(final.parent for _, final in moves):
        fsync_folder(folder)


def move_folder_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` (files fsynced by their writers) to ``final``,
    replacing a folder there: the old one is renamed aside first and removed after, so
    ``final`` is at every moment the old folder, absent for an instant, or the new one."""
    final = Path(os.path.abspath(final))  # '.' has no name to set aside
    for path in tmp.rglob("*"):  # writers that do not go through atomic_write (litdata's)
        if path.is_file():
            fsync_file(path)
    old = final.with_name(f".{final.name}{_OLD_MARK}{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    # not registered for removal on Ctrl-C: stopped between the two renames, the old folder
    # must survive (as .NAME.old-PID) rather than vanish with nothing new in its place
    os.replace(tmp, final)
    fsync_folder(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_failure_in(folder: str | os.PathLike) -> OSError | None:
    """Why nothing can be created in ``folder`` (or the nearest folder above it that exists,
    where it would be made), or None: tried with a file made and removed, as permission bits
    alone pass for root on a file system that refuses writes (/proc, a read-only mount)."""
    import tempfile

    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        handle, name = tempfile.mkstemp(prefix=".fastvae-probe-", dir=existing)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        return exc
    return None


@contextmanager
def temporary_folder(beside: str | os.PathLike) -> Iterator[Path]:
    """A new hidden folder beside the file ``beside``, removed when the block ends (or on
    Ctrl-C): for writers that stage several files, then ``move_into_place`` each one. What
    cannot be replaced (``check_replaceable``) is refused before any work."""
    beside = Path(os.path.abspath(beside))  # '.' has no name to stage beside
    check_replaceable(beside)
    created = [p for p in [beside.parent, *beside.parent.parents] if not p.exists()]  # deepest first
    beside.parent.mkdir(parents=True, exist_ok=True)
    folder = beside.with_name(f".{beside.name}{_TMP_MARK}{os.getpid()}")
    shutil.rmtree(folder, ignore_errors=True)  # left by a killed process with the same pid
    folder.mkdir()
    with removed_on_exit(folder):
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            for parent in created:  # the folders made for it, where nothing was moved in (a failure)
                try:
                    parent.rmdir()
                except OSError:  # not empty: the block's files are there
                    break


def check_replaceable(path: Path) -> None:
    """A FastVAEError if ``temporary_folder``'s output cannot replace ``path``: a mount point
    (the stage would lie on the disk above it, which fills up, and cannot be renamed over it),
    or the current folder or one holding it (this process, and the shell it was started from,
    would be left in a deleted folder)."""
    path = Path(os.path.abspath(path))
    if os.path.ismount(path):
        raise FastVAEError(f"{path} is a mount point: outputs are staged beside it and renamed into "
                           f"place, which a mount point cannot be; give a folder inside it "
                           f"(e.g. {path / 'out'})")
    try:
        here = Path.cwd()
    except OSError:  # the current folder is gone already
        return
    if here == path or path in here.parents:
        raise FastVAEError(f"{path} is the current folder{'' if here == path else ' or holds it'}: it is "
                           f"replaced when complete, which would leave this shell in a deleted folder; "
                           f"run from {path.parent} and give {path.name}")


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ config.json


def write_config(run_dir: str | os.PathLike, settings: dict) -> Path:
    """``RUN/config.json``: the run's settings as indented JSON."""
    return write_text(Path(run_dir) / CONFIG_JSON, json.dumps(settings, indent=2) + "\n")


def read_config(run_dir: str | os.PathLike) -> dict | None:
    """``RUN/config.json`` as a dict; ``None`` when the run has none; one clear error when it
    cannot be read."""
    path = Path(run_dir) / CONFIG_JSON
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FastVAEError(f"{path} could not be read ({exc}): repair it, or delete it (--resume, "
                           "evaluate, export and report then take the settings stored in the "
                           "checkpoint)") from None
    if not isinstance(values, dict):
        raise FastVAEError(f"{path} must hold one object of settings, not {type(values).__name__}")
    return values


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """The run's ``config.json``, or where there is none the settings stored in its checkpoint
    (``fastvae.checkpoint.read_checkpoint``'s clear error when that is missing too)."""
    values = read_config(run_dir)
    if values is not None:
        return values
    from fastvae.checkpoint import read_checkpoint  # it imports this module

    return dict(read_checkpoint(run_dir).get("config") or {})


# ------------------------------------------------------------------------------ metrics.csv


def csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    """(column names, rows) of a CSV file the run wrote (``metrics.csv``, the csv tracker's);
    one clear error when it is damaged (not text, a runaway quoted field)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or ()), rows
    except (UnicodeDecodeError, csv.Error) as exc:
        from fastvae.errors import one_line

        raise FastVAEError(f"{path} is damaged ({one_line(exc)}): repair it, or delete it (its history of "
                           "metrics is lost; checkpoints are kept)") from None


def read_metrics(path: str | os.PathLike, upto_epoch: float = math.inf) -> list[dict]:
    """The rows of a ``metrics.csv`` up to ``upto_epoch``: numbers by column name (``epoch``
    and ``step`` as ints); empty or unreadable cells are left out. ``[]`` when the file is
    missing."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for raw in csv_rows(path)[1]:
        row = {}
        for name, value in raw.items():
            try:
                row[name] = float(value)
            except (TypeError, ValueError):
                continue
        if not math.isfinite(row.get("epoch", math.nan)) or row["epoch"] > upto_epoch:
            continue
        row["epoch"] = int(row["epoch"])
        if "step" in row and math.isfinite(row["step"]):
            row["step"] = int(row["step"])
        rows.append(row)
    return rows


def write_metrics(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Atomically write ``rows`` as a ``metrics.csv`` with the METRIC_FIELDS that any row has."""
    fields = [f for f in METRIC_FIELDS if any(f in row for row in rows)] or list(ALWAYS_WRITTEN)
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)


def metric_columns(rows: list[dict]) -> dict[str, list[float]]:
    """Rows of ``read_metrics`` as columns, NaN where a row has no value."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [float(row.get(name, math.nan)) for row in rows] for name in names}


# ------------------------------------------------------------------------------ clobber rules


def holds_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a trained run (a checkpoint)."""
    return (Path(run_dir) / LAST).exists()


def check_out_folder(run_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> bool:
    """Refuse ``--out`` folders that would lose work; return True when ``run_dir`` holds a run
    that ``--overwrite`` is to replace (``clear_run``, once the new run is known to start).

    A folder without a checkpoint holds nothing trained, so it is reused without asking.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise FastVAEError("--resume and --overwrite contradict each other: choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise FastVAEError(f"--out {run_dir} is a file: give a folder for the run")
    if resume:
        return False
    if holds_run(run_dir) and not overwrite:
        raise FastVAEError(
            f"--out {run_dir} already holds a run: pass --resume to continue it, --overwrite to "
            "replace it (resume=True / overwrite=True to fastvae.train), or choose another folder"
        )
    return holds_run(run_dir)


def check_resume(run_dir, saved: dict, settings: dict, identity: tuple[str, ...], *,
                 mid_epoch: bool, saved_world_size: int, world_size: int) -> None:
    """Refuse to resume a run with settings that would make it another run: any of
    ``identity`` (model and data), and mid-epoch also the batch size, seed and world size
    (the rest of the epoch must be the same batches)."""
    changed = [f"{k} ({saved.get(k)!r}, now {settings.get(k)!r})" for k in identity if saved.get(k) != settings.get(k)]
    batching = []
    if mid_epoch:
        batching = [f"{k} ({saved.get(k)!r}, now {settings.get(k)!r})" for k in ("batch_size", "seed")
                    if saved.get(k) != settings.get(k)]
        if saved_world_size != world_size:
            batching.append(f"devices ({saved_world_size} process(es), now {world_size})")
    if changed or batching:
        why = (" (its checkpoint is mid-epoch: the rest of that epoch needs the same batches)"
               if batching else "")
        raise FastVAEError(
            f"cannot resume {run_dir}: setting(s) {', '.join(changed + batching)} differ from the run "
            f"that wrote it{why}; resume with the same settings, or train into a new --out"
        )


# What fastvae writes into a run folder besides config, metrics and checkpoints: the report,
# exported models (default names, their fp16/int8 variants and external data) and trackers' logs
TRACKERS_JSON = "trackers.json"  # the tracker run ids a --resume logs on into (fastvae.trackers)
RUN_OUTPUTS = ("report.md", "report.html", "pictures.json", "csv", "tensorboard", "wandb", "mlflow.db",
               "mlruns", TRACKERS_JSON)
RUN_OUTPUT_PATTERNS = ("decoder*.onnx*", "encoder*.onnx*")


def clear_run(run_dir: str | os.PathLike) -> None:
    """Remove everything a previous run wrote into ``run_dir`` (the ``--overwrite`` case): its
    config, metrics, checkpoints, pictures, report, exported decoder/encoder and tracker logs, so
    nothing of the old model outlives it (a report would show its pictures). Other files stay."""
    from fastvae.viz import PICTURES

    run_dir = Path(run_dir)
    targets = [run_dir / name for name in (CONFIG_JSON, METRICS_CSV, CHECKPOINTS, *PICTURES, *RUN_OUTPUTS)]
    targets += [path for pattern in RUN_OUTPUT_PATTERNS for path in sorted(run_dir.glob(pattern))]
    for target in targets:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
