"""The command line: train -> evaluate round trip, help, config files, clear errors, run folders.

Subprocess runs check what a user sees (exit status, stdout, stderr); the many small cases that
need a trained model or a run folder call ``fastvae.cli.main`` in this process, which is the same
code without the interpreter start-up.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from testkit import SUBPROCESS_ENV, assert_one_line_error, max_weight_diff, run_cli, state_dict_of
from fastvae.cli import main
from fastvae.config import TrainConfig

TINY = ("--epochs", "1", "--hidden-dim", "32", "--latent-dim", "4", "--quiet", "--no-pictures")


def cli(capsys, *args) -> tuple[int, str, str]:
    """``fastvae ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse errors and --help
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """``fastvae train`` with a TOML config plus flags, then ``fastvae evaluate --json``."""
    root = tmp_path_factory.mktemp("cli")
    config_file = root / "settings.toml"
    config_file.write_text(
        'hidden_dim = 32\nlatent_dim = 4\nepochs = 5   # the flag below wins\n'
        'batch_size = 64\npictures = false\nprogress = false\nreparam = "torch"\n'
    )
    run = root / "run"
    train = run_cli("train", "--config", config_file, "--epochs", "2", "--seed", "1", "--out", run)
    evaluate = run_cli("evaluate", run, "--iwae-k", "20", "--json")
    return run, train, evaluate


def test_train_prints_a_json_summary(round_trip):
    run, (rc, out, err), _ = round_trip
    assert rc == 0, err
    assert "Traceback" not in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epochs"] == 2 and summary["steps"] == 48
    assert Path(summary["run"]) == run
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["test_neg_elbo"])


def test_evaluate_json_round_trip(round_trip):
    run, _, (rc, out, err) = round_trip
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("neg_elbo", "iwae_nll", "recon", "kl"):
        assert math.isfinite(result[key]), (key, result)
    assert result["n"] == 297 and result["iwae_k"] == 20
    assert result["neg_elbo"] == pytest.approx(result["recon"] + result["kl"], rel=1e-6)
    assert result["kl"] >= 0.0
    # IWAE with K = 20 is a tighter bound than the ELBO (up to Monte Carlo noise)
    assert result["iwae_nll"] <= result["neg_elbo"] + 0.05, result
    # the trainer logged the same single-sample -ELBO for the last epoch: evaluate draws its
    # noise from the run's own seed (1) by default
    with open(run / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert result["neg_elbo"] == pytest.approx(float(last["test_neg_elbo"]), rel=1e-6)
    assert result["kl"] == pytest.approx(float(last["test_kl"]), rel=1e-5)  # closed form: no noise


def test_evaluate_with_the_run_seed_reproduces_metrics_csv(round_trip, capsys):
    run = round_trip[0]
    rc, out, err = cli(capsys, "evaluate", run, "--seed", "1", "--iwae-k", "0", "--json")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    with open(run / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    for key in ("neg_elbo", "recon", "kl"):
        assert result[key] == pytest.approx(float(last[f"test_{key}"]), rel=1e-6), key


def test_evaluate_pictures_of_a_checkpoint_go_into_its_run_folder(round_trip, capsys, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(round_trip[0], run)
    assert not (run / "samples.png").exists()  # trained with pictures = false
    rc, _, err = cli(capsys, "evaluate", run / "checkpoints" / "last.ckpt", "--iwae-k", "0", "--pictures")
    assert rc == 0 and (run / "samples.png").is_file(), err
    shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "loose.ckpt")
    rc, _, err = cli(capsys, "evaluate", tmp_path / "loose.ckpt", "--iwae-k", "0", "--pictures")
    assert_one_line_error(rc, err, "--pictures", "run folder")


def test_report_evaluates_with_the_run_seed(round_trip, capsys):
    """The run was trained with --seed 1: the report's -ELBO is the last test_neg_elbo."""
    run = round_trip[0]
    rc, out, err = cli(capsys, "report", run, "--iwae-k", "0", "--out", run / "page.md")
    assert rc == 0, err
    text = (run / "page.md").read_text()
    reported = float(re.search(r"^\| -ELBO \| ([-\d.]+) \|", text, re.M).group(1))
    with open(run / "metrics.csv", newline="") as f:
        last = float(list(csv.DictReader(f))[-1]["test_neg_elbo"])
    assert reported == pytest.approx(last, abs=5.1e-5)  # the page shows 4 decimals
    rc, out, err = cli(capsys, "report", run, "--iwae-k", "0", "--seed", "0", "--out", run / "seed0.md")
    seed0 = float(re.search(r"^\| -ELBO \| ([-\d.]+) \|", (run / "seed0.md").read_text(), re.M).group(1))
    assert seed0 != pytest.approx(last, abs=1e-3)  # another seed, other noise: the default matters


def test_run_folder_files(round_trip):
    run = round_trip[0]
    saved = json.loads((run / "config.json").read_text())
    assert set(saved) == {f.name for f in fields(TrainConfig)}  # every setting
    # defaults < config file < flags
    assert saved["hidden_dim"] == 32 and saved["latent_dim"] == 4 and saved["epochs"] == 2
    assert saved["seed"] == 1 and saved["pictures"] is False and saved["data"] == "digits"
    assert saved["lr"] == TrainConfig().lr
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:6] == ["epoch", "step", "train_loss", "train_recon", "train_kl", "epoch_time_s"]
    assert set(rows[0][6:]) == {"test_neg_elbo", "test_recon", "test_kl"}
    assert [r[:2] for r in rows[1:]] == [["1", "24"], ["2", "48"]]
    assert all(math.isfinite(float(v)) for r in rows[1:] for v in r)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 2 and state["config"] == saved


def test_config_json_repeats_the_run(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    rc, _, err = cli(capsys, "train", *TINY, "--seed", "7", "--batch-size", "128", "--out", first)
    assert rc == 0, err
    rc, _, err = cli(capsys, "train", "--config", first / "config.json", "--out", second)
    assert rc == 0, err
    assert json.loads((second / "config.json").read_text()) == {
        **json.loads((first / "config.json").read_text()), "out": str(second)}
    assert max_weight_diff(state_dict_of(first), state_dict_of(second)) == 0.0


def test_json_config_file_and_flag_precedence(tmp_path, capsys):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"latent_dim": 3, "hidden_dim": 16, "beta": 0.5,
                                       "kl_warmup_steps": 10, "free_bits": 0.1, "epochs": 3}))
    rc, _, err = cli(capsys, "train", "--config", config_file, "--epochs", "1", "--quiet",
                     "--no-pictures", "--out", tmp_path / "run")
    assert rc == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["latent_dim"], saved["hidden_dim"], saved["beta"]) == (3, 16, 0.5)
    assert (saved["kl_warmup_steps"], saved["free_bits"], saved["epochs"]) == (10, 0.1, 1)


# ----------------------------------------------------------------------------- help and entry points


@pytest.mark.parametrize("command, flags", [
    ("train", ["--data", "--model", "--kind", "--latent-dim", "--hidden-dim", "--likelihood",
               "--epochs", "--batch-size", "--lr", "--seed", "--beta", "--kl-warmup-steps",
               "--free-bits", "--on-nonfinite", "--precision", "--devices", "--num-nodes",
               "--strategy", "--accelerator", "--compile", "--compile-mode", "--out", "--config", "--resume",
               "--overwrite", "--quiet", "--checkpoint-every", "--checkpoint-minutes"]),
    ("evaluate", ["--iwae-k", "--json", "--seed", "--data"]),
])
def test_command_help(command, flags):
    rc, out, err = run_cli(command, "--help")
    assert rc == 0, err
    for flag in flags:
        assert flag in out, flag


def test_help_names_each_default_once(capsys):
    rc, out, _ = cli(capsys, "train", "--help")
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "(default 32-true)" in " ".join(out.split())
    rc, out, _ = cli(capsys, "sample", "--help")
    assert "(default: 0)" in out and "(default 1000; fewer for a spatial decoder" in " ".join(out.split())  # 0 is a default, not "none"
    assert "(default: None)" not in out


def test_flags_without_a_value_say_what_they_do(capsys):
    """A flag's help says what giving it does, never "(default: True)" or "(default: False)"."""
    from fastvae.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        for action in parser._actions:
            if action.nargs == 0 and action.option_strings and action.dest != "help":
                text = parser.format_help()
                assert action.help and "(default: True)" not in text and "(default: False)" not in text, name
    for command in ("report", "evaluate"):  # the IWAE bar: hidden as train's and prepare's are
        rc, out, _ = cli(capsys, command, "--help")
        assert "--quiet, --no-progress" in out and "hide the IWAE progress bar" in " ".join(out.split())
        assert build_parser().parse_args([command, "run", "--quiet"]).progress is False


def test_every_command_has_help(capsys):
    from fastvae.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "evaluate"} <= set(commands)
    for name in commands:
        rc, out, err = cli(capsys, name, "--help")
        assert rc == 0 and name in out and "usage" in out.lower(), (name, err)


def test_top_level_help_version_and_no_command():
    rc, out, _ = run_cli("--help")
    assert rc == 0 and "train" in out and "evaluate" in out
    rc, out, _ = run_cli("--version")
    assert rc == 0 and "fastvae" in out
    rc, _, err = run_cli()
    assert_one_line_error(rc, err, "fastvae")


def test_console_script_is_installed():
    import shutil
    import subprocess
    import sys

    script = Path(sys.executable).with_name("fastvae")
    script = str(script) if script.exists() else shutil.which("fastvae")
    assert script, "the 'fastvae' console script is not installed"
    proc = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--latent-dim" in proc.stdout


# ----------------------------------------------------------------------------- bad input: one line, exit 2


@pytest.mark.parametrize("args, needles", [
    (["--epochs", "0"], ["--epochs", "positive"]),
    (["--epochs", "-3"], ["--epochs"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--latent-dim", "-1"], ["--latent-dim"]),
    (["--hidden-dim", "0"], ["--hidden-dim"]),
    (["--devices", "0"], ["--devices"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "-0.001"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--beta", "-1"], ["--beta"]),
    (["--free-bits", "-0.5"], ["--free-bits"]),
    (["--kl-warmup-steps", "-1"], ["--kl-warmup-steps"]),
    (["--test-fraction", "0"], ["--test-fraction", "above 0 and below 1", "give it its own test split"]),
    (["--checkpoint-every", "-5"], ["--checkpoint-every", "zero (off) or positive"]),
    (["--checkpoint-minutes", "-1"], ["--checkpoint-minutes", "zero (off) or positive"]),
    (["--checkpoint-minutes", "inf"], ["--checkpoint-minutes", "finite"]),
    (["--sigma", "0"], ["--sigma"]),
    # an extra digit: an integer overflow inside torch (a traceback), or hours building modules
    (["--hidden-dim", "99999999999999999999"], ["--hidden-dim", "beyond", "1,048,576"]),
    (["--model", "convkl", "--blocks-per-level", "99999999999999999999"], ["--blocks-per-level", "64"]),
    (["--model", "convkl", "--channel-mult", "1,99999999999999999999,1"], ["--channel-mult", "from 1 to 64"]),
    (["--iwae-k", "100000000000"], ["--iwae-k", "1,048,576"]),
    (["--data", ""], ["--data is empty"]),  # pathlib's "" is the current folder: trained on its files
    (["--model", "transformer"], ["--model", "invalid choice"]),
    (["--likelihood", "poisson"], ["--likelihood"]),
    (["--precision", "8-bit"], ["--precision"]),
    (["--compile-mode", "turbo"], ["--compile-mode"]),
    (["--epochs", "1.5"], ["--epochs", "int"]),
    (["--batch-size", "abc"], ["--batch-size"]),
    (["--lr", "fast"], ["--lr"]),
    (["--no-such-flag"], ["--no-such-flag", "see 'fastvae train --help'"]),  # the command's flags, not the list of commands
    (["--seed", "-1"], ["--seed", "from 0 to 4294967295"]),
    (["--seed", "4294967296"], ["--seed", "from 0 to 4294967295"]),
    (["--split-seed", "-2"], ["--split-seed"]),
    (["--no-compile", "--compile-mode", "reduce-overhead"], ["--no-compile", "--compile-mode"]),
    (["--learn-sigma", "--likelihood", "bernoulli"], ["--learn-sigma", "bernoulli"]),
    (["--kind", "ae", "--beta", "2"], ["--beta", "--kind ae"]),
    (["--kind", "ae", "--iwae-k", "5"], ["--iwae-k 5", "--kind ae"]),  # trained, then crashed
    (["--kind", "ae", "--free-bits", "2"], ["--free-bits", "--kind ae"]),
    (["--kind", "ae", "--kl-warmup-steps", "100"], ["--kl-warmup-steps", "--kind ae"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_bad_train_flags(tmp_path, args, needles):
    # validated before torch is imported: each case takes a fraction of a second
    rc, _, err = run_cli("train", *args, "--out", tmp_path / "run")
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "run").exists()


def test_callbacks_and_config_files_that_fail_are_one_line(tmp_path, capsys):
    """A callback module that raises or does not parse, a class that needs arguments; a YAML
    or upper-case .TOML config; a bad flag value is not blamed on the config file."""
    modules = tmp_path / "mods"
    modules.mkdir()
    (modules / "needs_arg.py").write_text("class NeedsArg:\n    def __init__(self, x): pass\n")
    (modules / "raises.py").write_text("raise RuntimeError('broken module')\n")
    (modules / "bad_syntax.py").write_text("def (:\n")
    env = {**SUBPROCESS_ENV, "PYTHONPATH": f"{modules}{os.pathsep}{SUBPROCESS_ENV.get('PYTHONPATH', '')}"}
    for spec, needles in (("needs_arg:NeedsArg", ["NeedsArg()", "no arguments"]),
                          ("raises:X", ["broken module"]), ("bad_syntax:X", ["SyntaxError"])):
        rc, _, err = run_cli("train", "--callback", spec, "--epochs", "1", "--out", tmp_path / "r", env=env)
        assert_one_line_error(rc, err, f"--callback '{spec}'", *needles)
    (tmp_path / "c.yaml").write_text("epochs: 1\n")
    (tmp_path / "C.TOML").write_text("epochs = 1\nhidden_dim = 0\n")
    (tmp_path / "c.toml").write_text("epochs = 1\n")
    for args, needles in ((["--config", tmp_path / "c.yaml"], ["YAML", ".json or .toml"]),
                          (["--config", tmp_path / "C.TOML"], ["C.TOML", "--hidden-dim"])):
        rc, _, err = run_cli("train", *args, "--out", tmp_path / "r")
        assert_one_line_error(rc, err, *needles)
    (tmp_path / "s.json").write_text('{"epochs": 1, "pictures": "no"}')  # a file spells them true/false
    rc, _, err = run_cli("train", "--config", tmp_path / "s.json", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "s.json", "setting 'pictures' must be true or false, got 'no'")
    rc, _, err = run_cli("train", "--config", tmp_path / "c.toml", "--epochs", "0", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "--epochs must be a positive integer")
    assert "c.toml" not in err  # the 0 came from the command line, not the file
    (tmp_path / "lg.json").write_text('{"loggers": "csv, foo"}')  # --logger's key is loggers
    rc, _, err = run_cli("train", "--config", tmp_path / "lg.json", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, f"{tmp_path / 'lg.json'}: --logger 'foo' is not supported")


def test_a_compile_mode_implies_compile_and_is_validated_in_config_files():
    from fastvae.errors import FastVAEError

    assert not TrainConfig().compiled and TrainConfig(compile=True).compiled
    implied = TrainConfig(compile_mode="reduce-overhead").validate()
    assert implied.compiled and implied.to_dict()["compile"] is True  # config.json says it compiles
    with pytest.raises(FastVAEError, match="--seed must be an integer from 0"):
        TrainConfig(seed=-1).validate()  # from a config file
    with pytest.raises(FastVAEError, match="--compile-mode 'fast' is not supported: use one of default"):
        TrainConfig(compile_mode="fast").validate()


@pytest.mark.parametrize("name", ["lr", "sigma", "beta", "free_bits"])
def test_infinite_settings_are_refused(name):
    from fastvae.errors import FastVAEError

    with pytest.raises(FastVAEError, match=name.replace("_", "-")):
        TrainConfig(**{name: math.inf}).validate()


@pytest.mark.parametrize("text, suffix, needles", [
    ('{"epochs": 1, "hiden_dim": 8}', ".json", ["hiden_dim", "unknown"]),
    ('epochs = 1\nlearning_rate = 0.1\n', ".toml", ["learning_rate", "unknown"]),
    ('{"epochs": "three"}', ".json", ["epochs"]),
    ('{"epochs": 0}', ".json", ["epochs", "positive"]),
    ('{"epochs": 1,', ".json", ["could not be read"]),
    ('epochs = = 1', ".toml", ["could not be read"]),
    ('[1, 2]', ".json", ["one object"]),
])
def test_bad_config_files(tmp_path, text, suffix, needles):
    path = tmp_path / f"settings{suffix}"
    path.write_text(text)
    rc, _, err = run_cli("train", "--config", path, "--out", tmp_path / "run")
    # a parse error or an unknown key names the file; a bad value names the setting
    assert_one_line_error(rc, err, *needles)
    if "epochs" not in needles:
        assert path.name in err


def test_missing_config_file(tmp_path):
    rc, _, err = run_cli("train", "--config", tmp_path / "nope.toml")
    assert_one_line_error(rc, err, "nope.toml", "does not exist")


def test_a_folder_as_config_file_and_an_empty_out_are_named(tmp_path, capsys):
    rc, _, err = cli(capsys, "train", "--config", tmp_path)
    assert_one_line_error(rc, err, "is a folder")
    for command in (["train"], ["sample", tmp_path / "d.onnx"], ["report", tmp_path]):
        rc, _, err = cli(capsys, *command, "--out", "")
        assert_one_line_error(rc, err, "--out", "must not be empty")


def test_bad_data_path(tmp_path):
    rc, _, err = run_cli("train", "--data", tmp_path / "mnist.npz", *TINY, "--out", tmp_path / "run")
    assert_one_line_error(rc, err, "mnist.npz", "does not exist")
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_bad_data_file_in_process(tmp_path, capsys):
    bad = tmp_path / "x.npy"
    import numpy as np

    np.save(bad, np.full((10, 4, 4), 300.0))
    rc, _, err = cli(capsys, "train", "--data", bad, *TINY, "--out", tmp_path / "run")
    assert_one_line_error(rc, err, "x.npy", "[0, 1]")


def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", *TINY, "--out", run)[0] == 0
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    rc, _, err = cli(capsys, "train", *TINY, "--out", run)
    assert_one_line_error(rc, err, str(run), "--resume", "--overwrite")
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    # --resume with more epochs continues; --overwrite starts again from scratch
    rc, out, err = cli(capsys, "train", "--resume", "--epochs", "2", "--out", run)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["epochs"] == 2
    rc, out, err = cli(capsys, "train", *TINY, "--overwrite", "--out", run)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["epochs"] == 1
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    with open(run / "metrics.csv") as f:
        assert len(f.read().strip().splitlines()) == 2  # header + the new run's one epoch
    rc, _, err = cli(capsys, "train", *TINY, "--resume", "--overwrite", "--out", run)
    assert_one_line_error(rc, err, "--resume", "--overwrite")


def test_a_resume_keeps_the_runs_threads_lists_loggers_once_and_can_undo_display_flags(tmp_path, capsys,
                                                                                       monkeypatch):
    """--threads stays (other kernels: not the uninterrupted run's numbers) unless this machine
    has fewer cores; a repeated --logger is not added again (a requeued job's same command);
    --no-quiet and --pictures undo a run's --quiet and --no-pictures."""
    run = tmp_path / "run"
    assert cli(capsys, "train", *TINY, "--threads", "1", "--logger", "csv", "--out", run)[0] == 0
    rc, _, err = cli(capsys, "train", "--resume", "--epochs", "2", "--logger", "csv,csv", "--no-quiet", "--pictures",
                     "--out", run)
    assert rc == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert (saved["threads"], saved["loggers"], saved["progress"], saved["pictures"]) == (1, "csv", True, True)
    assert (run / "samples.png").is_file()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)  # a run made on a machine with more cores
    monkeypatch.setattr("os.cpu_count", lambda: 1)  # where there is no affinity (macOS)
    (run / "config.json").write_text(json.dumps({**saved, "threads": 2}))
    rc, _, err = cli(capsys, "train", "--resume", "--epochs", "3", "--quiet", "--out", run)
    assert rc == 0, err
    assert "note: the run used --threads 2; this machine has 1 core:" in err
    assert json.loads((run / "config.json").read_text())["threads"] == 0


def test_split_settings_that_change_nothing_are_said(tmp_path, capsys, monkeypatch):
    """--test-fraction / --split-seed with data that has its own test split (digits) are a note
    (they were taken silently, and config.json and the report showed them as if used); with
    data they split (an .npy), no note."""
    import numpy as np

    rc, _, err = cli(capsys, "train", *TINY, "--test-fraction", "0.5", "--split-seed", "3", "--out", tmp_path / "a")
    assert rc == 0, err
    assert "note: digits has a test split of its own: --test-fraction 0.5 and --split-seed 3 change nothing" in err
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 4, 4), dtype=np.float32))
    rc, _, err = cli(capsys, "train", *TINY, "--data", tmp_path / "x.npy", "--test-fraction", "0.5",
                     "--out", tmp_path / "b")
    assert rc == 0 and "note:" not in err, err
    monkeypatch.chdir(tmp_path)  # a relative --data is named as the run's own data is: absolute
    rc, out, err = cli(capsys, "evaluate", tmp_path / "b", "--json", "--data", "x.npy")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["data"] == str(tmp_path / "x.npy")


def test_outputs_of_an_unfinished_run_say_so_and_training_names_the_stale_ones(tmp_path, capsys):
    """Export and report of a run lost in epoch 2 of 2 say it is unfinished (they looked like
    any other); resuming it names the exported decoder and report left showing the old model."""
    from testkit import CheckpointSteps, Crash, tiny_config
    from fastvae.trainer import train

    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(tiny_config(run, epochs=2), callbacks=[CheckpointSteps(crash_at=30)])  # 24 steps an epoch
    rc, _, err = cli(capsys, "export", run)
    assert rc == 0, err
    assert f"note: {run} is an unfinished run (its checkpoint: step 24, epoch 1 of 2)" in err
    assert cli(capsys, "report", run)[0] == 0
    assert "an unfinished run: its checkpoint is at step 24, epoch 1 of 2" in (run / "report.md").read_text()
    rc, _, err = cli(capsys, "train", "--resume", "--out", run)
    assert rc == 0, err
    assert (f"note: report.md, decoder.onnx in {run} show the model before this training: run 'fastvae export' "
            "and 'fastvae report' again") in err
    rc, _, err = cli(capsys, "export", run)  # finished now: no note
    assert rc == 0 and "unfinished" not in err, err


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc, _, err = cli(capsys, "train", *TINY, "--out", tmp_path / "file")
    assert_one_line_error(rc, err, "file", "folder")


def test_resume_without_a_run(tmp_path, capsys):
    rc, _, err = cli(capsys, "train", "--resume", "--out", tmp_path / "nothing")
    assert_one_line_error(rc, err, "nothing", "resume")


def test_evaluate_errors(tmp_path, capsys):
    rc, _, err = cli(capsys, "evaluate", tmp_path / "missing", "--json")
    assert_one_line_error(rc, err, "missing")
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    rc, _, err = cli(capsys, "evaluate", tmp_path / "junk.ckpt")
    assert_one_line_error(rc, err, "junk.ckpt")
    run = tmp_path / "ae"
    assert cli(capsys, "train", *TINY, "--kind", "ae", "--out", run)[0] == 0
    rc, _, err = cli(capsys, "evaluate", run, "--iwae-k", "2")
    assert_one_line_error(rc, err, "ae")
    rc, _, err = cli(capsys, "evaluate", run, "--iwae-k", "-1")
    assert_one_line_error(rc, err, "--iwae-k")


def test_evaluate_on_data_of_another_shape(tmp_path, capsys):
    import numpy as np

    run = tmp_path / "run"
    assert cli(capsys, "train", *TINY, "--out", run)[0] == 0
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((20, 5, 5), dtype=np.uint8))
    rc, _, err = cli(capsys, "evaluate", run, "--data", other)
    assert_one_line_error(rc, err, "other.npy", "shape")
    rc, out, err = cli(capsys, "evaluate", run, "--iwae-k", "0", "--json")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert "iwae_nll" not in result and math.isfinite(result["neg_elbo"])


def test_piped_output_has_epoch_lines_but_no_progress_bar(tmp_path):
    """Progress bars only on a terminal: a run piped into a log (CI, SLURM) gets the per-epoch
    lines without carriage-return bar updates in between."""
    rc, out, err = run_cli("train", "--epochs", "2", "--hidden-dim", "16", "--no-pictures",
                           "--reparam", "torch", "--iwae-k", "2", "--out", tmp_path / "run")
    assert rc == 0, err
    log = out + err
    assert "epoch 1/2  loss" in log and "epoch 2/2  loss" in log
    assert "\r" not in log and "it/s" not in log and "IWAE k=" not in log


# ----------------------------------------------------------------------------- files, memory, overwrite


def test_unwritable_out_and_too_much_memory_are_one_line(tmp_path, capsys, monkeypatch):
    rc, _, err = cli(capsys, "train", *TINY, "--reparam", "torch", "--out", "/proc/fastvae-run")
    assert_one_line_error(rc, err, "/proc/fastvae-run")
    # a model whose weights alone exceed the machine's memory: refused before it is built
    rc, _, err = cli(capsys, "train", "--epochs", "1", "--hidden-dim", "1048576", "--latent-dim", "1048576", "--quiet",
                     "--no-pictures", "--reparam", "torch", "--out", tmp_path / "huge")
    assert_one_line_error(rc, err, "parameters", "more than the memory here", "--latent-dim")
    assert not (tmp_path / "huge").exists()
    import fastvae.trainer

    def allocation_fails(*args, **kwargs):  # what torch raises where an allocation fails later
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 25600000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(fastvae.trainer, "command_line_train", allocation_fails)
    rc, _, err = cli(capsys, "train", *TINY, "--out", tmp_path / "oom")
    assert_one_line_error(rc, err, "not enough memory", "--latent-dim")


def test_export_never_writes_over_the_checkpoint_and_checks_triton_flags_first(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", *TINY, "--reparam", "torch", "--out", run)[0] == 0
    checkpoint = run / "checkpoints" / "last.ckpt"
    before = checkpoint.read_bytes()
    rc, _, err = cli(capsys, "export", run, "--out", checkpoint)
    assert_one_line_error(rc, err, "not an .onnx file")
    assert checkpoint.read_bytes() == before
    # the sampler's hint for a file that is no decoder names a decoder file, never the checkpoint
    rc, _, err = cli(capsys, "sample", checkpoint, "-n", "2", "--out", tmp_path / "s.npy")
    assert_one_line_error(rc, err, "--out decoder.onnx")
    for flags, needle in ((["--name", ".."], "--name"), (["--triton-repo", checkpoint], "is a file"),
                          (["--max-batch", "0"], "--max-batch")):
        extra = flags if flags[0] == "--triton-repo" else ["--triton-repo", tmp_path / "repo", *flags]
        rc, _, err = cli(capsys, "export", run, *extra)
        assert_one_line_error(rc, err, needle)
        assert not (run / "decoder.onnx").exists()  # refused before the export's work


def test_overwrite_removes_the_old_runs_outputs_and_resume_survives_a_deleted_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", *TINY, "--reparam", "torch", "--out", run)[0] == 0
    assert cli(capsys, "export", run, "--exporter", "torchscript")[0] == 0
    (run / "samples.png").write_bytes(b"the old model's samples")
    (run / "notes.txt").write_text("mine")
    rc, _, err = cli(capsys, "train", *TINY, "--reparam", "torch", "--latent-dim", "3", "--overwrite", "--out", run)
    assert rc == 0, err
    assert not (run / "decoder.onnx").exists() and not (run / "samples.png").exists()
    assert (run / "notes.txt").read_text() == "mine"
    # a deleted config.json: --resume takes the settings stored in the checkpoint
    (run / "config.json").unlink()
    rc, out, err = cli(capsys, "train", "--resume", "--epochs", "2", "--quiet", "--out", run)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["epochs"] == 2
    assert json.loads((run / "config.json").read_text())["latent_dim"] == 3


def test_settings_from_the_config_audit_are_one_line_or_obeyed(tmp_path, capsys, monkeypatch):
    """A free-bits value beyond float32 crashed in the step (after --overwrite had cleared the old
    run); a 400-digit integer in a config file was an OverflowError traceback; --resume with a
    relative --data blamed the data for a bad --beta; --no-compile lost to a file's or the run's
    compile mode (it compiled)."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "train", *TINY, "--free-bits", "1e39", "--out", "fb")
    assert_one_line_error(rc, err, "--free-bits must be from 0 (off) to 10000")
    assert not (tmp_path / "fb").exists()
    (tmp_path / "big.toml").write_text("lr = 1" + "0" * 400 + "\n")
    rc, _, err = cli(capsys, "train", *TINY, "--config", "big.toml", "--out", "big")
    assert_one_line_error(rc, err, "big.toml", "'lr' must be a finite number", "401 digits")
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "x.npy", np.random.default_rng(0).random((40, 4, 4), dtype=np.float32))
    assert cli(capsys, "train", *TINY, "--data", "sub/x.npy", "--out", "npy")[0] == 0
    rc, _, err = cli(capsys, "train", "--out", "npy", "--data", "sub/x.npy", "--resume", "--epochs", "2",
                     "--beta", "-1")
    assert_one_line_error(rc, err, "--beta must be zero or positive")
    (tmp_path / "cm.toml").write_text('compile_mode = "max-autotune"\n')
    rc, _, err = cli(capsys, "train", *TINY, "--config", "cm.toml", "--no-compile", "--out", "nc")
    assert rc == 0, err
    saved = json.loads((tmp_path / "nc" / "config.json").read_text())
    assert (saved["compile"], saved["compile_mode"]) == (False, "default")
    (tmp_path / "both.toml").write_text('compile = false\ncompile_mode = "reduce-overhead"\n')
    rc, _, err = cli(capsys, "train", *TINY, "--config", "both.toml", "--out", "both")
    assert_one_line_error(rc, err, "both.toml", "compile = false contradicts compile_mode = 'reduce-overhead'")


def test_quiet_hides_lightnings_info_lines_and_flags_are_never_abbreviated(tmp_path, capsys):
    """--quiet showed Lightning's precision line and its 6-line distributed banner; --over was
    taken for --overwrite (and replaced a run); a mistyped flag or config key names the setting
    meant."""
    args = ("train", *TINY, "--strategy", "ddp", "--devices", "1", "--precision", "bf16-mixed")
    rc, out, err = run_cli(*args, "--out", tmp_path / "quiet")
    assert rc == 0, err
    assert "Automatic Mixed Precision" not in out + err and "Initializing distributed" not in out + err, out + err
    rc, out, err = run_cli(*args[:-1], "32-true", "--no-quiet", "--out", tmp_path / "loud")
    assert rc == 0 and "Initializing distributed" in out + err, out + err  # not quiet: Lightning's own
    # ranks that ddp_spawn starts import fastvae.trainer before Lightning sets up their group
    quiet = subprocess.run([sys.executable, "-c", "import logging, fastvae.trainer; "
                            "print(logging.getLogger('lightning_fabric').getEffectiveLevel())"],
                           capture_output=True, text=True, env={**SUBPROCESS_ENV, "FASTVAE_QUIET_LIGHTNING": "1"})
    assert quiet.stdout.strip() == str(logging.WARNING), quiet.stderr
    rc, _, err = cli(capsys, "train", *TINY, "--out", str(tmp_path / "quiet"), "--over")
    assert_one_line_error(rc, err, "unrecognized arguments: --over")
    rc, _, err = cli(capsys, "train", *TINY, "--latnet-dim", "3")
    assert_one_line_error(rc, err, "--latnet-dim 3; did you mean --latent-dim?")
    (tmp_path / "typo.toml").write_text("latnet_dim = 4\nquiet = true\n")
    rc, _, err = cli(capsys, "train", "--config", str(tmp_path / "typo.toml"))
    assert_one_line_error(rc, err, "latnet_dim: did you mean latent_dim?", "quiet: did you mean progress = false?")


def test_the_command_exits_with_a_thread_pool_left_open(tmp_path):
    """A callback's (or torch inductor's, on a cold --compile) idle thread pool: the command
    trained, printed its summary and then waited forever, joining the pool's worker before
    anything told it to stop (the interpreter's threading hooks do, before its own join)."""
    from testkit import REPO, SUBPROCESS_ENV, run_cli

    env = {**SUBPROCESS_ENV, "PYTHONPATH": str(REPO / "tests")}
    rc, out, err = run_cli("train", "--epochs", "1", "--hidden-dim", "8", "--latent-dim", "2", "--reparam", "torch",
                           "--no-pictures", "--quiet", "--out", tmp_path / "run", "--callback",
                           "pause_points:ThreadPoolAtStart", env=env, timeout=90)
    assert rc == 0 and "pool started" in out, err[-2000:]


def test_flags_the_model_does_not_read_are_one_note(tmp_path, capsys):
    """--latent-dim / --hidden-dim with --model convkl, --downsample / --attention with an MLP:
    trained with nothing said (the report's "Left out" said it afterwards); now one note."""
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, (40, 3, 8, 8), dtype=np.uint8))
    rc = main(["train", "--model", "convkl", "--data", str(images), "--downsample", "2", "--width", "4",
               "--channel-mult", "1,1", "--epochs", "1", "--quiet", "--no-pictures", "--latent-dim", "5",
               "--hidden-dim", "7", "--out", str(tmp_path / "k")])
    err = capsys.readouterr().err
    assert rc == 0 and "note: --latent-dim and --hidden-dim change nothing for --model convkl" in err, err
    rc = main(["train", "--epochs", "1", "--quiet", "--no-pictures", "--hidden-dim", "8", "--downsample", "8",
               "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 0 and "note: --downsample changes nothing for --model mlp" in err, err
    assert main(["train", "--epochs", "1", "--quiet", "--no-pictures", "--hidden-dim", "8",
                 "--out", str(tmp_path / "plain")]) == 0
    assert "changes nothing" not in capsys.readouterr().err
