"""``--logger wandb`` and ``--logger mlflow`` with the real packages, offline.

Every test trains 2 epochs with the network closed (HTTP(S) proxies pointed at a port nothing
listens on, so any request fails) and reads what the tracker stored back with an independent
reader: the values of the run's metrics.csv in wandb's offline run file, and MLflow's own
client on the store inside the run folder (SQLite where SQLAlchemy is installed, the file store
where it is not, as with mlflow-skinny alone). Skipped where the package is not installed
(``pip install 'fastvae[trackers]'``; ``make test`` installs it with the dev extra).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from fastvae.cli import main
from testkit import read_metrics

HAVE_WANDB = importlib.util.find_spec("wandb") is not None
HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None
HAVE_SQLALCHEMY = importlib.util.find_spec("sqlalchemy") is not None and importlib.util.find_spec("alembic") is not None
METRICS = ("train_loss", "test_neg_elbo")


@pytest.fixture
def offline(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # discard port: nothing listens there
    for var in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    # whatever the run sets for itself is undone after the test
    for var in ("MLFLOW_ALLOW_FILE_STORE", "WANDB_SERVICE"):  # WANDB_SERVICE: its service's address
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)
    yield
    if "wandb" in sys.modules:  # its service process and threads end here, not with the worker
        sys.modules["wandb"].teardown()


def _train(capsys, run, *loggers) -> list[dict]:
    args = ["train", "--epochs", "2", "--hidden-dim", "16", "--latent-dim", "2", "--quiet", "--no-pictures",
            "--reparam", "torch", "--out", str(run)]
    for name in loggers:
        args += ["--logger", name]
    return _train_with(capsys, run, args)


def _resume(capsys, run, epochs: int) -> list[dict]:
    return _train_with(capsys, run, ["train", "--resume", "--out", str(run), "--epochs", str(epochs), "--quiet"])


def _train_with(capsys, run, args) -> list[dict]:
    """``fastvae ARGS`` in this process; the run's metrics rows."""
    try:
        rc = main(args)
    except SystemExit as exc:
        rc = exc.code
    _, err = capsys.readouterr()
    assert rc == 0, err
    return read_metrics(run)


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed")
def test_wandb_offline_run_holds_the_metrics(tmp_path, capsys, offline):
    run = tmp_path / "run"
    rows = _train(capsys, run, "wandb")
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((run / "wandb").rglob("*"))
    # wandb stores each logged value as its JSON text: every epoch's figures are in the file
    needles = [row[key].encode() for row in rows for key in METRICS] + [b"latent_dim"]  # + settings
    assert all(json.dumps(float(row[key])) == row[key] for row in rows for key in METRICS)
    stored = _written(files[0], needles)
    assert all(needle in stored for needle in needles), [n for n in needles if n not in stored]


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed")
def test_overwrite_keeps_the_new_runs_tracker_logs(tmp_path, capsys, offline):
    """--overwrite cleared the run folder after the trackers had started: the new run's wandb
    folder and tracker ids were deleted under it (its logs lost). Now the old run's are gone
    and the new run's are there."""
    run = tmp_path / "run"
    _train(capsys, run, "wandb")
    old = json.loads((run / "trackers.json").read_text())["wandb"]
    rows = _train_with(capsys, run, ["train", "--epochs", "1", "--hidden-dim", "16", "--latent-dim", "2", "--quiet",
                                     "--no-pictures", "--reparam", "torch", "--out", str(run), "--logger", "wandb",
                                     "--overwrite"])
    new = json.loads((run / "trackers.json").read_text())["wandb"]
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert new != old and [f.name for f in files] == [f"run-{new}.wandb"], files
    assert rows[-1]["train_loss"].encode() in _written(files[0], [rows[-1]["train_loss"].encode()])


@pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow is not installed")
def test_a_refused_run_starts_no_tracker(tmp_path, capsys, offline):
    """--reparam triton where it cannot run, and an accelerator this machine lacks, were refused
    after the trackers had started: the folder kept mlflow.db and trackers.json."""
    import sys

    import torch

    refused = [] if torch.cuda.is_available() else [["--reparam", "triton"], ["--accelerator", "cuda"]]
    refused += [] if sys.platform == "darwin" else [["--accelerator", "mps"]]  # Apple's GPUs only
    if not refused:
        pytest.skip("this machine has every accelerator the test could ask for")
    for flags in refused:
        run = tmp_path / flags[1]
        rc = main(["train", "--epochs", "1", "--hidden-dim", "8", "--latent-dim", "2", "--quiet", "--no-pictures",
                   "--logger", "mlflow", "--out", str(run), *flags])
        err = capsys.readouterr().err
        assert rc == 2 and "mlflow" not in err.lower(), err
        assert not run.exists() or not any(run.iterdir()), list(run.iterdir())


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed")
@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_also_quiets_wandb(tmp_path, offline, quiet):
    """--quiet: no wandb run summary either (it printed ~25 lines of it); without it, wandb's
    lines stay."""
    from testkit import run_cli

    flags = ["--quiet"] if quiet else []
    rc, out, err = run_cli("train", "--epochs", "1", "--hidden-dim", "16", "--latent-dim", "2", "--no-pictures",
                           "--reparam", "torch", "--out", tmp_path / "run", "--logger", "wandb", *flags,
                           env={**{k: v for k, v in os.environ.items() if k != "WANDB_SILENT"},  # wandb's default
                                "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert rc == 0, err
    assert ("Run summary" in out + err) is not quiet, out + err


@pytest.mark.skipif(not (HAVE_MLFLOW and HAVE_SQLALCHEMY), reason="mlflow with SQLAlchemy is not installed")
def test_quiet_also_quiets_mlflow(tmp_path, offline):
    """--quiet: not MLflow's INFO lines either ("Creating initial MLflow database tables...")."""
    from testkit import SUBPROCESS_ENV, run_cli

    rc, out, err = run_cli("train", "--epochs", "1", "--hidden-dim", "16", "--latent-dim", "2", "--no-pictures",
                           "--reparam", "torch", "--out", tmp_path / "run", "--logger", "mlflow", "--quiet",
                           env={**SUBPROCESS_ENV, **{k: v for k, v in os.environ.items() if "PROXY" in k.upper()}})
    assert rc == 0, err
    assert [line for line in err.splitlines() if line.strip()] == [], err


def _written(path, needles, deadline_s: float = 60.0) -> bytes:
    """``path``'s bytes once they hold every needle (or at the deadline): wandb's service
    process writes the offline run file behind ``run.finish()``, later on a loaded machine."""
    import time

    start = time.monotonic()
    while True:
        data = path.read_bytes()
        if all(needle in data for needle in needles) or time.monotonic() - start > deadline_s:
            return data
        time.sleep(0.05)  # not synchronisation: the poll interval while waiting for the file to hold them


def _mlflow_history(uri: str, run_name: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fastvae")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == [run_name] and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert client.get_run(run_id).data.params["latent_dim"] == "2"
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in METRICS}


def _assert_same_metrics(history, rows) -> None:
    for key in METRICS:
        assert history[key] == [(int(row["step"]), pytest.approx(float(row[key]))) for row in rows], key


@pytest.mark.skipif(not (HAVE_MLFLOW and HAVE_SQLALCHEMY), reason="mlflow with SQLAlchemy is not installed")
def test_mlflow_sqlite_store_in_the_run_folder(tmp_path, capsys, offline):
    run = tmp_path / "run"
    rows = _train(capsys, run, "mlflow", "csv")
    assert (run / "mlflow.db").is_file() and not (run / "mlruns").exists()
    _assert_same_metrics(_mlflow_history(f"sqlite:///{run.resolve() / 'mlflow.db'}", "run"), rows)


@pytest.mark.skipif(not (HAVE_MLFLOW and HAVE_SQLALCHEMY), reason="mlflow with SQLAlchemy is not installed")
def test_a_failed_first_mlflow_start_leaves_no_store(tmp_path, capsys, offline, monkeypatch):
    """A start that fails once it has created RUN/mlflow.db (a full disk during MLflow's
    migrations) removes it: a half-migrated store made every later start fail."""
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"

    def fails(self, *args, **kwargs):
        assert (run / "mlflow.db").is_file()  # created by the store's first use
        raise OSError(28, "database or disk is full")

    monkeypatch.setattr(MlflowClient, "create_experiment", fails)
    rc = main(["train", "--epochs", "1", "--hidden-dim", "16", "--quiet", "--no-pictures", "--logger", "mlflow",
               "--out", str(run)])
    _, err = capsys.readouterr()
    assert rc == 2 and "--logger mlflow could not start a run" in err and "disk is full" in err
    assert not (run / "mlflow.db").exists()  # (a retry in this process would meet MLflow's cached engine)


@pytest.mark.skipif(not (HAVE_MLFLOW and HAVE_SQLALCHEMY), reason="mlflow with SQLAlchemy is not installed")
def test_a_resumed_run_logs_on_into_the_same_mlflow_run(tmp_path, capsys, offline):
    run = tmp_path / "run"
    _train(capsys, run, "mlflow")
    rows = _resume(capsys, run, 3)  # one MLflow run with all three epochs, not one per restart
    assert len(rows) == 3
    uri = f"sqlite:///{run.resolve() / 'mlflow.db'}"
    _assert_same_metrics(_mlflow_history(uri, "run"), rows)
    from mlflow.tracking import MlflowClient

    (logged,) = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("fastvae").experiment_id])
    assert logged.data.params["epochs"] == "2" and logged.data.tags["resumed.epochs"] == "3"


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed")
def test_a_resumed_run_logs_on_into_the_same_wandb_run(tmp_path, capsys, offline):
    run = tmp_path / "run"
    _train(capsys, run, "wandb")
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    assert main(["train", "--resume", "--out", str(run), "--epochs", "1", "--quiet"]) == 2
    assert "trained 2 epoch(s) already" in capsys.readouterr().err
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # refused before wandb started
    rows = _resume(capsys, run, 3)
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # one wandb run, two sessions
    assert rows[2]["train_loss"].encode() in _written(files[1], [rows[2]["train_loss"].encode()])


@pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow is not installed")
def test_mlflow_file_store_without_sqlalchemy(tmp_path, capsys, offline, monkeypatch):
    """mlflow-skinny alone (no SQLAlchemy): the file store, which MLflow 3 opens only when
    allowed; the run allows it for itself."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "sqlalchemy" else real(n, *a))
    run = tmp_path / "run"
    rows = _train(capsys, run, "mlflow")
    assert (run / "mlruns").is_dir() and not (run / "mlflow.db").exists()
    _assert_same_metrics(_mlflow_history((run.resolve() / "mlruns").as_uri(), "run"), rows)


def test_mlflow_store_choice(tmp_path, monkeypatch, offline):
    """SQLite needs SQLAlchemy and Alembic and a path SQLAlchemy reads as a path; else the file
    store (file:// URIs quote '?', '#', '%'); MLFLOW_TRACKING_URI wins."""
    from fastvae.trackers import mlflow_tracking_uri

    real = importlib.util.find_spec
    have = {"sqlalchemy": True, "alembic": True}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: (object() if have[n] else None) if n in have else real(n, *a))
    plain = tmp_path / "run"
    assert mlflow_tracking_uri(plain) == f"sqlite:///{plain.resolve() / 'mlflow.db'}"
    for name in ("run?x=1", "run#2", "run%20y"):
        uri = mlflow_tracking_uri(tmp_path / name)
        assert uri == (tmp_path / name / "mlruns").resolve().as_uri() and "?" not in uri and "#" not in uri
    have["alembic"] = False
    assert mlflow_tracking_uri(plain) == (plain / "mlruns").resolve().as_uri()
    import os

    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert mlflow_tracking_uri(plain) == "http://127.0.0.1:5000"


@pytest.mark.parametrize("version,expected", [("0.19.10", "finish_previous"), ("0.31.0", "finish_previous"),
                                              ("1.0.0rc1", "finish_previous"), ("0.19.10rc1", "finish_previous"),
                                              ("0.19.9", True), ("0.19.1rc2", True), ("0.19.9rc10", True),
                                              ("0.17.0", True), ("0.19", True)])
def test_wandb_reinit_spelling_by_version(version, expected):
    from fastvae.trackers import _wandb_reinit

    assert _wandb_reinit(version) == expected
