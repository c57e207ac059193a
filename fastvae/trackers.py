"""Experiment trackers (``fastvae train --logger NAME``, repeatable) as Lightning Fabric loggers.

- ``csv``: Fabric's ``CSVLogger`` -> ``RUN/csv/metrics.csv`` (every logged metric, by step);
- ``tensorboard``: Fabric's ``TensorBoardLogger`` -> ``RUN/tensorboard`` (needs tensorboard or
  tensorboardX; ``--tensorboard`` is the same as ``--logger tensorboard``);
- ``wandb``: Weights & Biases, offline by default (``RUN/wandb``; sync later with
  ``wandb sync``); ``WANDB_MODE=online`` logs live;
- ``mlflow``: MLflow, into a store inside the run folder unless ``MLFLOW_TRACKING_URI`` says
  otherwise: ``sqlite:///RUN/mlflow.db`` where SQLAlchemy and Alembic are installed (full ``mlflow``; the
  kind of store MLflow 3 defaults to), else the file store ``RUN/mlruns`` (``mlflow-skinny``;
  MLflow 3 refuses that store unless ``MLFLOW_ALLOW_FILE_STORE=true``, which is then set for the
  training process).
wandb and mlflow are optional: a missing package is one clear error before training starts.
Their run ids are kept in ``RUN/trackers.json``: a ``--resume``d run logs on into the same
wandb run (``resume="allow"``) and the same MLflow run, not a new one per restart.
The trainer logs each epoch's metrics row on global rank 0 (``fabric.log_dict``) and finalizes
the loggers at the end. ``metrics.csv`` in the run folder is written by the trainer itself,
whatever the trackers; the trackers' files are their own (appended logs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import uuid
from pathlib import Path

from fastvae.config import TRACKERS
from fastvae.errors import FastVAEError, one_line
from fastvae.run_folder import TRACKERS_JSON, write_text

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def make_loggers(run_dir: str | Path, names: list[str], hyperparams: dict | None = None) -> list:
    """Fabric loggers for ``names`` (any of ``TRACKERS``), writing under ``run_dir``. Every
    tracker's package is checked (and imported) before any starts: a missing one after another
    left that one's run and files behind (mlflow.db, trackers.json)."""
    for name in names:
        _check_installed(name)
    loggers = []
    for name in names:
        # --quiet (settings with progress off): wandb's own ~25 lines of run summary too, and
        # MLflow's INFO lines
        quiet = {"quiet": not hyperparams.get("progress", True)} if name in ("wandb", "mlflow") and hyperparams else {}
        logger = globals()[f"_{name}"](Path(run_dir), **quiet)
        if hyperparams and name in ("wandb", "mlflow"):
            logger.log_hyperparams(hyperparams)
        loggers.append(logger)
    return loggers


def _check_installed(name: str) -> None:
    """One line unless tracker ``name`` is known, installed and imports."""
    if name not in TRACKERS:
        raise FastVAEError(f"--logger {name!r} is not supported: use one or more of {', '.join(TRACKERS)}")
    if name == "tensorboard":
        from lightning_fabric.loggers import tensorboard as tb

        if not tb._TENSORBOARD_AVAILABLE and not tb._TENSORBOARDX_AVAILABLE:
            raise FastVAEError(
                "TensorBoard logging needs the tensorboard package, which is not installed: run "
                "'pip install tensorboard' (or 'pip install tensorboardX'), or train without "
                "--tensorboard / --logger tensorboard"
            )
    package = PACKAGES.get(name)
    if not package:
        return
    if importlib.util.find_spec(package) is None:
        raise FastVAEError(f"--logger {name} needs the {package} package, which is not installed: "
                           f"run 'pip install {package}', or train without --logger {name}")
    try:
        importlib.import_module(package)
    except ImportError as exc:  # installed but broken (a missing or mismatched dependency)
        raise FastVAEError(f"--logger {name}: the installed {package} package cannot be imported: "
                           f"{one_line(exc)}; reinstall it, or train without --logger {name}") from None


def _csv(run_dir: Path):
    from fastvae.csv_tracker import csv_logger

    return csv_logger(run_dir)


def _tensorboard(run_dir: Path):
    from lightning_fabric.loggers import tensorboard as tb

    return tb.TensorBoardLogger(root_dir=str(run_dir), name="tensorboard", version="")


def _base():
    from lightning_fabric.loggers.logger import Logger

    return Logger


def _tracker_ids(run_dir: Path) -> dict:
    """The tracker run ids an earlier run in ``run_dir`` kept ({} for none or an unreadable file)."""
    try:
        ids = json.loads((run_dir / TRACKERS_JSON).read_text())
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def _keep_tracker_id(run_dir: Path, name: str, run_id: str) -> None:
    ids = _tracker_ids(run_dir)
    if ids.get(name) != run_id:  # write_text makes the folder
        write_text(run_dir / TRACKERS_JSON, json.dumps({**ids, name: run_id}, indent=2) + "\n")


def _wandb(run_dir: Path, quiet: bool = False):
    import wandb

    class WandbTracker(_base()):
        """A Weights & Biases run as a Fabric logger (offline unless WANDB_MODE says so)."""

        def __init__(self):
            super().__init__()
            run_id = _tracker_ids(run_dir).get("wandb") or uuid.uuid4().hex[:16]
            run_dir.mkdir(parents=True, exist_ok=True)  # wandb warns "git root ... does not exist"
            try:
                self.run = wandb.init(dir=str(run_dir), project=os.environ.get("WANDB_PROJECT", "fastvae"),
                                      name=run_dir.name, mode=os.environ.get("WANDB_MODE", "offline"),
                                      id=run_id, resume="allow", reinit=_wandb_reinit(wandb.__version__),
                                      **({"settings": wandb.Settings(silent=True)} if quiet else {}))
            except Exception as exc:  # noqa: BLE001 - wandb raises many kinds
                raise FastVAEError(f"--logger wandb could not start a run: {one_line(exc)}") from None
            _keep_tracker_id(run_dir, "wandb", run_id)

        name = property(lambda self: "wandb")
        version = property(lambda self: self.run.id)

        def log_metrics(self, metrics, step=None):
            self.run.log(dict(metrics), step=step)

        def log_hyperparams(self, params, *args, **kwargs):
            self.run.config.update(dict(params), allow_val_change=True)

        def finalize(self, status):
            self.run.finish(exit_code=0 if status == "success" else 1)

    return WandbTracker()


def _wandb_reinit(version: str):
    """Finish a run still open in this process before starting the next: ``"finish_previous"``
    from wandb 0.19.10 (which warns that ``True``, the older spelling, is deprecated)."""
    parts = [re.match(r"\d*", piece).group() for piece in version.split(".")[:3]]  # "10rc1" -> 10
    return "finish_previous" if tuple(int(p or 0) for p in parts) >= (0, 19, 10) else True


def _mlflow(run_dir: Path, quiet: bool = False):
    import logging

    import mlflow

    mlflow_log = logging.getLogger("mlflow")
    level = mlflow_log.level  # restored when the run ends (a program's later runs, its own MLflow use)
    if quiet:  # --quiet: not its INFO lines either ("Creating initial MLflow database tables...")
        mlflow_log.setLevel(logging.WARNING)

    class MlflowTracker(_base()):
        """An MLflow run as a Fabric logger (a store in the run folder by default)."""

        def __init__(self):
            super().__init__()
            uri = mlflow_tracking_uri(run_dir)
            store = run_dir / "mlflow.db"  # the default store, when this start creates it
            created = uri == f"sqlite:///{store.resolve()}" and not store.exists()
            try:
                self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fastvae")
                found = self.client.get_experiment_by_name(name)
                experiment = found.experiment_id if found else self.client.create_experiment(name)
                self.run_id = self._earlier_run() or self.client.create_run(
                    experiment, run_name=run_dir.name).info.run_id
            except Exception as exc:  # noqa: BLE001
                mlflow_log.setLevel(level)
                if created:  # half-migrated (a full disk): every later start would fail on it
                    for leftover in (store, store.with_name(store.name + "-journal")):
                        leftover.unlink(missing_ok=True)
                raise FastVAEError(f"--logger mlflow could not start a run at {uri}: {one_line(exc)}") from None
            _keep_tracker_id(run_dir, "mlflow", self.run_id)

        def _earlier_run(self):
            """The run an earlier (interrupted) training of this run folder logged to, if this
            store still holds it: reopened, so a --resume logs on into it."""
            run_id = _tracker_ids(run_dir).get("mlflow")
            if not run_id:
                return None
            try:
                self.client.get_run(run_id)
            except Exception:  # noqa: BLE001 - another store, or the run was deleted
                return None
            self.client.update_run(run_id, status="RUNNING")
            return run_id

        name = property(lambda self: "mlflow")
        version = property(lambda self: self.run_id)

        def log_metrics(self, metrics, step=None):
            for key, value in metrics.items():
                self.client.log_metric(self.run_id, key, float(value), step=step or 0)

        def log_hyperparams(self, params, *args, **kwargs):
            # MLflow params cannot change: a resumed run's new values (more epochs, another lr)
            # become tags "resumed.KEY"
            logged = self.client.get_run(self.run_id).data.params
            for key, value in params.items():
                if key not in logged:
                    self.client.log_param(self.run_id, key, value)
                elif logged[key] != str(value):
                    self.client.set_tag(self.run_id, f"resumed.{key}", str(value))

        def finalize(self, status):
            self.client.set_terminated(self.run_id, "FINISHED" if status == "success" else "KILLED")
            mlflow_log.setLevel(level)

    return MlflowTracker()


def mlflow_tracking_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, or a store inside ``run_dir`` (see the module docstring)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    folder = run_dir.resolve()
    # MLflow's SQL store needs SQLAlchemy and Alembic; SQLAlchemy reads "?", "#" and "%" in a
    # sqlite:/// path as URL syntax (a database outside the run folder), so those take the file
    # store, whose file:// URI quotes them
    sql = all(importlib.util.find_spec(m) is not None for m in ("sqlalchemy", "alembic"))
    if sql and not any(c in str(folder) for c in "?#%"):
        return f"sqlite:///{folder / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # read when the file store opens
    return (folder / "mlruns").as_uri()
