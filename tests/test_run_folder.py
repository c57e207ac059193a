"""The run folder's one home: atomic writes (and their permissions), config.json, metrics.csv,
the clobber/resume rules; and the settings defined once."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import pytest

from fastvae import run_folder
from fastvae.errors import FastVAEError


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask-022", "umask-077", "umask-002"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_open_mode(folder: Path) -> int:
    """The permissions a plain ``open()`` gives a new file under the current umask."""
    with open(folder / "plain", "w") as f:
        f.write("x")
    return mode(folder / "plain")


def test_atomic_write_keeps_the_permissions_of_a_plain_open(tmp_path, umask):
    expected = plain_open_mode(tmp_path)
    assert expected == 0o666 & ~umask
    written = run_folder.write_text(tmp_path / "config.json", "{}\n")
    assert mode(written) == expected
    with run_folder.atomic_write(tmp_path / "again.json") as tmp:  # replacing keeps them too
        tmp.write_text("1")
    with run_folder.atomic_write(tmp_path / "again.json") as tmp:
        tmp.write_text("2")
    assert mode(tmp_path / "again.json") == expected and (tmp_path / "again.json").read_text() == "2"


WRITE_EVERYTHING = """
import os, sys
os.umask(int(sys.argv[2], 8))  # before anything is imported: libraries may cache the umask
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from testkit import tiny_config
from fastvae.cli import main
from fastvae.export import export_decoder
from fastvae.report_page import write_report
from fastvae.trainer import train

run = Path(sys.argv[1])
train(tiny_config(run, epochs=1, pictures=True))
write_report(run, iwae_k=0)
export_decoder(run, run / "decoder.onnx", check_batches=(3,), int8=True)
for out in ("samples_onnx.png", "samples.npy"):
    assert main(["sample", str(run / "decoder.onnx"), "-n", "4", "--out", str(run / out)]) == 0
"""


def test_every_writer_keeps_the_permissions_of_a_plain_open(tmp_path, mask=0o022):
    """Checkpoints, config and metrics, pictures, the report, ONNX exports and sampled images
    alike (each written in a process that runs under that umask from its start)."""
    import subprocess
    import sys

    from testkit import REPO, SUBPROCESS_ENV

    run = tmp_path / "run"
    subprocess.run([sys.executable, "-c", WRITE_EVERYTHING, str(run), oct(mask), str(REPO / "tests")],
                   check=True, timeout=240, env=SUBPROCESS_ENV, capture_output=True)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"config.json", "metrics.csv", "last.ckpt", "samples.png", "loss_curves.png", "report.md",
            "decoder.onnx", "decoder.int8.onnx", "samples_onnx.png", "samples.npy"} <= {p.name for p in files}
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(0o666 & ~mask) for p in files}


def test_atomic_write_keeps_the_suffix_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "grid.png"
    with pytest.raises(RuntimeError):
        with run_folder.atomic_write(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".")
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


def test_temporary_folder_is_removed(tmp_path):
    with run_folder.temporary_folder(tmp_path / "decoder.onnx") as staging:
        (staging / "decoder.onnx").write_bytes(b"new")
        run_folder.move_into_place(staging / "decoder.onnx", tmp_path / "decoder.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx"]


def test_temporary_folder_removes_the_folders_it_made_when_nothing_was_moved_in(tmp_path):
    """A failed export into new folders left them behind, empty."""
    (tmp_path / "old").mkdir()
    with pytest.raises(RuntimeError):
        with run_folder.temporary_folder(tmp_path / "old" / "new1" / "new2" / "d.onnx") as staging:
            (staging / "d.onnx").write_bytes(b"half")
            raise RuntimeError("validation failed")
    assert list(tmp_path.iterdir()) == [tmp_path / "old"] and not any((tmp_path / "old").iterdir())
    with run_folder.temporary_folder(tmp_path / "new" / "d.onnx") as staging:  # moved in: kept
        (staging / "d.onnx").write_bytes(b"new")
        run_folder.move_into_place(staging / "d.onnx", tmp_path / "new" / "d.onnx")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["d.onnx"]


def test_metrics_round_trip_and_columns(tmp_path):
    path = tmp_path / run_folder.METRICS_CSV
    assert run_folder.read_metrics(path) == []
    rows = [{"epoch": 1, "step": 24, "train_loss": 30.5, "train_recon": 25.0, "train_kl": 5.5,
             "epoch_time_s": 0.5, "test_neg_elbo": 29.0},
            {"epoch": 2, "step": 48, "train_loss": 28.5, "train_recon": 24.0, "train_kl": 4.5,
             "epoch_time_s": 0.25}]
    run_folder.write_metrics(path, rows)
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["epoch", "step", "train_loss", "train_recon", "train_kl", "epoch_time_s",
                      "test_neg_elbo"]  # METRIC_FIELDS order, only the columns that have values
    back = run_folder.read_metrics(path)
    assert back == rows and isinstance(back[0]["epoch"], int) and isinstance(back[0]["step"], int)
    assert run_folder.read_metrics(path, upto_epoch=1) == rows[:1]
    columns = run_folder.metric_columns(back)
    assert columns["epoch"] == [1.0, 2.0] and columns["test_neg_elbo"][0] == 29.0
    assert math.isnan(columns["test_neg_elbo"][1])
    run_folder.write_metrics(path, [])
    assert path.read_text().strip() == ",".join(run_folder.ALWAYS_WRITTEN)


def test_unreadable_metric_cells_are_skipped(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train_loss\n1,10,oops\nbad,20,3.0\n2,30,2.5\n")
    assert run_folder.read_metrics(path) == [{"epoch": 1, "step": 10},
                                             {"epoch": 2, "step": 30, "train_loss": 2.5}]


def test_config_round_trip_and_errors(tmp_path):
    assert run_folder.read_config(tmp_path) is None
    run_folder.write_config(tmp_path, {"seed": 3, "data": "digits"})
    assert run_folder.read_config(tmp_path) == {"seed": 3, "data": "digits"}
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(FastVAEError, match="config.json could not be read"):
        run_folder.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(FastVAEError, match="one object of settings"):
        run_folder.read_config(tmp_path)


def test_clobber_rules(tmp_path):
    run = tmp_path / "run"
    assert run_folder.check_out_folder(run, resume=False, overwrite=False) is False  # new folder
    (run / "checkpoints").mkdir(parents=True)
    run_folder.write_config(run, {})
    assert run_folder.check_out_folder(run, resume=False, overwrite=False) is False  # nothing trained
    (run / run_folder.LAST).write_bytes(b"a checkpoint")
    with pytest.raises(FastVAEError, match="already holds a run"):
        run_folder.check_out_folder(run, resume=False, overwrite=False)
    assert run_folder.check_out_folder(run, resume=False, overwrite=True) is True
    assert run_folder.check_out_folder(run, resume=True, overwrite=False) is False
    with pytest.raises(FastVAEError, match="contradict"):
        run_folder.check_out_folder(run, resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FastVAEError, match="is a file"):
        run_folder.check_out_folder(tmp_path / "file", resume=False, overwrite=False)
    # what the old run wrote goes (a report of the new run would show its pictures and decoder);
    # the user's own files stay
    old_outputs = ["samples.png", "loss_curves.png", "report.md", "decoder.onnx", "decoder.int8.onnx",
                   "encoder.onnx", "mlflow.db"]
    for name in old_outputs + ["notes.txt", "my_decoder.onnx"]:
        (run / name).write_bytes(b"old")
    for folder in ("wandb", "csv", "mlruns"):
        (run / folder / "inner").mkdir(parents=True)
    run_folder.clear_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["my_decoder.onnx", "notes.txt"]


def test_resume_rules():
    identity = ("model", "data")
    saved = {"model": "mlp", "data": "digits", "batch_size": 64, "seed": 0}
    run_folder.check_resume("run", saved, {**saved, "epochs": 9}, identity, mid_epoch=True,
                            saved_world_size=1, world_size=1)
    with pytest.raises(FastVAEError, match="model"):
        run_folder.check_resume("run", saved, {**saved, "model": "conv"}, identity, mid_epoch=False,
                                saved_world_size=1, world_size=1)
    # between epochs the batch size, seed and world size may change; mid-epoch they may not
    run_folder.check_resume("run", saved, {**saved, "batch_size": 32}, identity, mid_epoch=False,
                            saved_world_size=1, world_size=2)
    with pytest.raises(FastVAEError, match=r"batch_size \(64, now 32\), devices \(1 process\(es\), now 2\) differ .* mid-epoch"):
        run_folder.check_resume("run", saved, {**saved, "batch_size": 32}, identity, mid_epoch=True,
                                saved_world_size=1, world_size=2)


def test_run_folder_and_sampler_cli_are_torch_free():
    import subprocess
    import sys

    code = ("import sys; import fastvae.run_folder, fastvae.interrupts, fastvae.cli, "
            "fastvae.commands.sample_command; assert 'torch' not in sys.modules and "
            "'numpy' not in sys.modules, sorted(m for m in sys.modules if m in ('torch', 'numpy'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


WITHOUT_PACKAGES = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # import fails as where the package is not installed
from fastvae.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("blocked,command,needles", [
    ("torch", ["train", "--epochs", "1", "--quiet"], ["needs the package 'torch'", "pip install torch"]),
    ("torch", ["export", "RUN"], ["needs the package 'torch'", "sample, decode, encode, bench-sampler and serve only"]),
    ("torch", ["evaluate", "RUN"], ["needs the package 'torch'"]),
    ("torch", ["report", "RUN"], ["needs the package 'torch'"]),
    ("fastapi,uvicorn", ["serve", "DECODER"], ["needs fastapi and uvicorn", "pip install 'fastapi>=0.110'"]),
])
def test_a_command_whose_package_is_missing_says_what_to_install(tmp_path, blocked, command, needles):
    """A torch-free install (sampling and serving) asked to train, export or report, or one
    without fastapi asked to serve, printed a 25-line ModuleNotFoundError traceback."""
    import subprocess
    import sys

    from testkit import SUBPROCESS_ENV, assert_one_line_error

    (tmp_path / "RUN").mkdir()
    (tmp_path / "DECODER").write_bytes(b"")
    done = subprocess.run([sys.executable, "-c", WITHOUT_PACKAGES, blocked, *command, *(
        ["--out", str(tmp_path / "out")] if command[0] == "train" else [])], cwd=tmp_path,
        capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert_one_line_error(done.returncode, done.stderr, *needles)


def test_settings_are_defined_once():
    """The CLI's choices, validation and the model registry all come from fastvae.config."""
    from fastvae.cli import build_parser
    from fastvae.config import CHOICES, MODEL_SETTINGS, TrainConfig
    from fastvae.models import ARCHITECTURES, DEFAULT_SPEC, build_model

    assert tuple(ARCHITECTURES) == CHOICES["model"]
    assert DEFAULT_SPEC == {k: getattr(TrainConfig(), k) for k in MODEL_SETTINGS}
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    from fastvae.config import REFUSED

    for action in train_parser._actions:
        if action.dest in CHOICES:  # plus Fabric's names refused with a reason (validate)
            assert tuple(action.choices) == tuple(CHOICES[action.dest]) + REFUSED.get(action.dest, ()), action.dest
    for kind in CHOICES["kind"]:
        assert build_model({"data_shape": [1, 8, 8], "kind": kind, "hidden_dim": 8}).kind == kind
