"""Prepared (sharded) datasets: prepare -> train -> evaluate, the streamed epoch plan, ranks,
mid-epoch resume, trackers, and one clear error for every bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from testkit import (PausedChild, max_weight_diff, metrics_without_time, run_cli, state_dict_of,
                      tiny_config)
from fastvae.cli import main
from fastvae.data import load_dataset
from fastvae.loaders import StreamSource, eval_batches
from fastvae.shards import open_dataset, prepare

RNG = np.random.default_rng(0)


def cli(capsys, *args):
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, *args) -> str:
    rc, _, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def image_folder(root: Path, n_per_label=12, size=(10, 12), suffix=".png", labels=("cat", "dog")):
    """Colour images with distinct random pixels in label subfolders."""
    for label in labels:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_label):
            Image.fromarray(RNG.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / label / f"{i:03d}{suffix}")
    return root


def indexed_npz(path: Path, n_train=200, n_test=40) -> Path:
    """2x2 images whose first two pixels spell their row number (train, then test)."""
    rows = np.arange(n_train + n_test)
    images = np.zeros((len(rows), 1, 2, 2), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = rows % 256, rows // 256
    np.savez(path, train=images[:n_train], test=images[n_train:])
    return path


def row_numbers(x: torch.Tensor) -> list[int]:
    u8 = (x * 255).round().long()
    return (u8[:, 0, 0, 0] + 256 * u8[:, 0, 0, 1]).tolist()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    out = root / "shards"
    prepare(str(indexed_npz(root / "rows.npz")), out, workers=0, progress=False)
    return out


# ----------------------------------------------------------------------------- round trips


def test_png_folder_round_trip_equals_the_in_memory_split(tmp_path, capsys):
    src = image_folder(tmp_path / "photos")
    rc, out, err = cli(capsys, "prepare", src, "--out", tmp_path / "shards", "--workers", "2", "--quiet")
    assert rc == 0, err
    assert "24 images (22 train, 2 test) of 3x10x12 uint8" in out and "shards" in out
    prepared, memory = open_dataset(str(tmp_path / "shards")), load_dataset(src)
    meta = json.loads((tmp_path / "shards" / "fastvae.json").read_text())
    assert meta["label_names"] == ["cat", "dog"]  # label k is the k-th sorted label folder
    # the same held-out examples, in colour, as the in-memory loader's seeded stratified split
    test = torch.cat([x for _, x in eval_batches(prepared.test, 5, "cpu")])
    assert torch.equal(test, memory.test)
    train = torch.cat(list(StreamSource(prepared.train, "cpu", 0).epoch_batches(
        epoch=0, seed=0, rank=0, world=1, batch_size=7)))
    assert sorted(map(bytes, (train * 255).round().byte().flatten(1).numpy())) == \
        sorted(map(bytes, (memory.train * 255).round().byte().flatten(1).numpy()))
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--data", tmp_path / "shards", "--epochs", "2", "--hidden-dim", "16",
                     "--latent-dim", "2", "--batch-size", "8", "--reparam", "torch", "--quiet", "--out", run)
    assert rc == 0, err
    rc, out, err = cli(capsys, "evaluate", run, "--iwae-k", "4", "--json", "--pictures")
    assert rc == 0, err
    streamed = json.loads(out.splitlines()[-1])
    from fastvae.checkpoint import load
    from fastvae.evaluation import evaluate

    in_memory = evaluate(load(run), memory.test, iwae_k=4, seed=0)  # the same rows, in memory
    for key in ("neg_elbo", "iwae_nll", "recon", "kl", "bits_per_dim", "pixel_levels"):
        assert streamed[key] == pytest.approx(in_memory[key], rel=1e-5), key
    assert streamed["n"] == 2
    assert (run / "latent_scatter.png").is_file()  # labels come along for the pictures
    rc, out, err = cli(capsys, "report", run, "--iwae-k", "0")
    assert rc == 0 and (run / "report.md").is_file(), err


def test_large_images_are_decoded_a_few_per_task_with_the_same_result(tmp_path, capsys, monkeypatch):
    """A task held 256 decoded images: 9 GB for full-size 12 MP photos. Tasks are bounded in
    bytes; the dataset is byte-identical whatever the task size."""
    import fastvae.shards

    src = image_folder(tmp_path / "photos", n_per_label=7)
    rc, _, err = cli(capsys, "prepare", src, "--out", tmp_path / "whole", "--workers", "0", "--quiet")
    assert rc == 0, err
    monkeypatch.setattr(fastvae.shards, "DECODE_TASK_BYTES", 2 * 3 * 10 * 12)  # two images per task
    tasks = []
    real = fastvae.shards._decode_files
    monkeypatch.setattr(fastvae.shards, "_decode_files", lambda files, **kw: tasks.append(len(files)) or real(files, **kw))
    rc, _, err = cli(capsys, "prepare", src, "--out", tmp_path / "small", "--workers", "0", "--quiet")
    assert rc == 0, err
    assert max(tasks) == 2 and sum(tasks) == 14
    for split in ("train", "test"):
        a, b = (open_dataset(str(tmp_path / name)) for name in ("whole", "small"))
        a, b = getattr(a, split), getattr(b, split)
        assert [a.read_block(i)[0].tobytes() for i in range(a.blocks)] == [b.read_block(i)[0].tobytes() for i in range(b.blocks)]


def test_jpeg_folder_of_mixed_sizes_with_size_and_grayscale(tmp_path, capsys):
    src = tmp_path / "jpegs"
    image_folder(src, 6, (16, 16), ".jpg", labels=("a",))
    image_folder(src, 6, (24, 24), ".jpeg", labels=("b",))
    assert "one size" in one_line_error(capsys, "prepare", src, "--out", tmp_path / "no")
    assert not (tmp_path / "no").exists()
    rc, out, err = cli(capsys, "prepare", src, "--out", tmp_path / "s", "--size", "8", "--grayscale",
                       "--test-fraction", "0.5", "--workers", "0")
    assert rc == 0, err
    prepared = open_dataset(str(tmp_path / "s"))
    assert prepared.data_shape == (1, 8, 8) and len(prepared.test) == 6 and len(prepared.train) == 6
    # reference: Pillow's own decode, grayscale conversion and resize of every file
    files = sorted(p for p in src.rglob("*") if p.is_file())
    reference = {Image.open(f).convert("L").resize((8, 8), Image.Resampling.BICUBIC).tobytes() for f in files}
    from fastvae.loaders import head

    stored = {bytes(x) for split in (prepared.train, prepared.test)
              for x in (head(split, 100)[0] * 255).round().byte().flatten(1).numpy()}
    assert stored == reference
    rc, _, err = cli(capsys, "train", "--data", tmp_path / "s", "--epochs", "1", "--hidden-dim", "8",
                     "--latent-dim", "2", "--batch-size", "4", "--quiet", "--no-pictures", "--out", tmp_path / "r")
    assert rc == 0, err


def test_a_train_and_test_folder_is_prepared_with_its_own_split(tmp_path, capsys):
    src = tmp_path / "published"
    image_folder(src / "train", 5, (6, 6))
    image_folder(src / "test", 2, (6, 6))
    rc, out, err = cli(capsys, "prepare", src, "--out", tmp_path / "s", "--workers", "0", "--quiet")
    assert rc == 0 and "14 images (10 train, 4 test)" in out, err
    meta = json.loads((tmp_path / "s" / "fastvae.json").read_text())
    assert meta["split"] == "own" and meta["labels"]
    from fastvae.loaders import head

    memory = load_dataset(src)
    test, labels = head(open_dataset(str(tmp_path / "s")).test, 100)
    assert torch.equal(test, memory.test) and torch.equal(labels, memory.test_labels)


def test_bundled_names_mean_the_bundled_data_beside_a_folder_of_that_name(tmp_path, capsys, monkeypatch):
    """A user's folder called photos/ (the README's own example name) did not change what
    'photos' means for evaluate, but train and prepare read the folder: one rule, with a note."""
    image_folder(tmp_path / "photos", 2, (6, 6))
    monkeypatch.chdir(tmp_path)
    import fastvae.trainer

    seen = []
    monkeypatch.setattr(fastvae.trainer, "command_line_train", lambda config, **kw: seen.append(config.data))
    rc, _, err = cli(capsys, "train", "--data", "photos", "--model", "convkl", "--quiet", "--out", tmp_path / "r")
    assert rc == 0 and seen == ["photos"] and "means the bundled data" in err, err
    rc, _, err = cli(capsys, "train", "--data", "./photos", "--quiet", "--out", tmp_path / "r2")
    assert rc == 0 and seen[1] == str(tmp_path / "photos"), err  # the folder, by its path
    np.save(tmp_path / "rows.npy", RNG.integers(0, 256, (30, 12), dtype=np.uint8))
    assert "not images" in one_line_error(capsys, "prepare", "rows.npy", "--out", "s", "--size", "4")
    np.save(tmp_path / "strips.npy", RNG.integers(0, 256, (30, 1, 12), dtype=np.uint8))  # 1 x 12 images
    rc, _, err = cli(capsys, "prepare", "strips.npy", "--out", "s2", "--size", "4", "--quiet")
    assert rc == 0 and open_dataset(str(tmp_path / "s2")).data_shape == (1, 4, 4), err
    np.savez(tmp_path / "one.npz", x=RNG.integers(0, 256, (30, 4, 4), dtype=np.uint8))
    rc, _, err = cli(capsys, "prepare", "one.npz", "--out", "s1", "--quiet")
    assert rc == 0 and json.loads((tmp_path / "s1" / "fastvae.json").read_text())["split"] == "seeded", err


def test_a_run_made_before_the_split_rule_changed_keeps_its_split(tmp_path, capsys):
    """20 labels x 3 images at --test-fraction 0.1: today's rule holds out 6 rows, the rule
    before it (each label rounded alone) 1. A run saved without split_rule (made before) is
    evaluated and resumed on its own split, not on today's."""
    src = image_folder(tmp_path / "many", 3, (4, 4), labels=[f"l{i:02d}" for i in range(20)])
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--data", src, "--epochs", "1", "--hidden-dim", "8", "--latent-dim", "2",
                     "--batch-size", "16", "--reparam", "torch", "--quiet", "--no-pictures", "--out", run)
    assert rc == 0, err

    def evaluated_rows() -> int:
        rc, out, err = cli(capsys, "evaluate", run, "--iwae-k", "0", "--json")
        assert rc == 0, err
        return json.loads(out.splitlines()[-1])["n"]

    assert evaluated_rows() == 6
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["split_rule"]  # as a checkpoint written before the setting existed
    del state["data_id"]  # (and before data read into memory had a digest)
    torch.save(state, ckpt)
    saved = json.loads((run / "config.json").read_text())
    del saved["split_rule"]
    (run / "config.json").write_text(json.dumps(saved))
    assert evaluated_rows() == 1
    rc, out, err = cli(capsys, "train", "--resume", "--epochs", "2", "--out", run, "--quiet", "--no-pictures")
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["split_rule"] == 1
    assert evaluated_rows() == 1


# ----------------------------------------------------------------------------- the epoch plan


def epoch_rows(shards, *, world=1, rank=0, epoch=0, seed=0, batch_size=16, start=0, workers=0):
    split = open_dataset(str(shards)).train
    batches = StreamSource(split, "cpu", workers).epoch_batches(
        epoch=epoch, seed=seed, rank=rank, world=world, batch_size=batch_size, start=start)
    return [row_numbers(x) for x in batches], len(batches)


def test_streamed_epoch_sees_each_example_once_and_depends_only_on_seed_and_epoch(indexed):
    batches, total = epoch_rows(indexed)
    rows = sum(batches, [])
    assert sorted(rows) == list(range(200)) and total == len(batches) == 13
    assert rows != list(range(200))  # shuffled
    assert epoch_rows(indexed, workers=2)[0] == batches  # whatever the worker count
    assert epoch_rows(indexed)[0] == batches
    assert sum(epoch_rows(indexed, epoch=1)[0], []) != rows
    assert sum(epoch_rows(indexed, seed=1)[0], []) != rows
    # resuming at batch 5 gives the rest of the same epoch without reading what came before
    assert epoch_rows(indexed, start=5)[0] == batches[5:]
    # ranks: equal step counts; disjoint parts whose union is the epoch
    parts = [sum(epoch_rows(indexed, world=2, rank=r, workers=1)[0], []) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 100
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == list(range(200))
    # 3 ranks: padded by wrap-around to 67 rows each, every example at least once
    thirds = [sum(epoch_rows(indexed, world=3, rank=r)[0], []) for r in range(3)]
    assert [len(t) for t in thirds] == [67, 67, 67] and set(sum(thirds, [])) == set(range(200))


@pytest.fixture(scope="module")
def indexed_9k(tmp_path_factory):
    """9,000 indexed rows: three windows, so several items and workers per epoch."""
    root = tmp_path_factory.mktemp("indexed9k")
    prepare(str(indexed_npz(root / "rows.npz", n_train=9000)), root / "shards", workers=0, progress=False)
    return root / "shards"


@pytest.mark.parametrize("workers,world,rank,batch", [(2, 1, 0, 1000), (3, 3, 1, 999)])
def test_stream_workers_start_once_and_read_on_into_the_next_epoch(indexed_9k, tmp_path, monkeypatch,
                                                                     workers, world, rank, batch):
    """The DataLoader workers persist across epochs (a restart per epoch cost more than a small
    dataset's epoch on a GPU) and read on into the next epoch: over six epochs (one abandoned,
    one resumed at a batch) the stream starts three times and the workers once; every epoch's
    batches equal those read in the process itself."""
    import os

    import fastvae.loaders as loaders

    started, resets = tmp_path / "worker-starts", []
    original_init, original_iter = loaders._worker_init, loaders._StreamReads.__iter__

    def recording_init(worker_id):
        with open(started, "a") as f:
            f.write(f"{os.getpid()}\n")
        original_init(worker_id)

    def counting_iter(self):
        resets.append((self.part.epoch, self.part.start))
        return original_iter(self)

    monkeypatch.setattr(loaders, "_worker_init", recording_init)
    monkeypatch.setattr(loaders._StreamReads, "__iter__", counting_iter)
    split = open_dataset(str(indexed_9k)).train
    source = StreamSource(split, "cpu", workers)
    part = dict(world=world, rank=rank, batch_size=batch)

    def rows(epoch, start=0, stop=None):
        out = []
        for x in source.epoch_batches(epoch=epoch, seed=0, start=start, **part):
            out.append(row_numbers(x))
            if len(out) == stop:
                break
        return out

    def reference(epoch, start=0):
        return epoch_rows(indexed_9k, epoch=epoch, start=start, **part)[0]

    assert rows(0, stop=2) == reference(0)[:2]  # abandoned after 2 batches
    assert rows(1) == reference(1)
    assert rows(2) == reference(2)  # read on from where epoch 1 ended
    assert rows(4, start=1) == reference(4, start=1)  # not epoch 3: starts anew
    assert rows(5) == reference(5)
    # (a DataLoader's first iterator asks its sampler twice: once on creation, once on reset)
    assert [r for i, r in enumerate(resets) if i == 0 or r != resets[i - 1]] == [(0, 0), (1, 0), (4, 1)]
    starts = started.read_text().split()  # one line per worker start
    assert len(starts) == len(set(starts)) == source._loader.num_workers >= 2
    if world == 1:  # an epoch of several items: a second live iteration is refused, not mixed in
        first = iter(source.epoch_batches(epoch=6, seed=0, **part))
        next(first)
        assert [row_numbers(x) for x in source.epoch_batches(epoch=6, seed=0, **part)] == reference(6)
        with pytest.raises(RuntimeError, match="one epoch at a time"):
            list(first)
        assert rows(7) == reference(7)
    source.close()


def test_the_stream_ends_with_the_last_epoch(indexed_9k):
    """Given the training's epoch count the workers' stream ends after its last epoch (no reads
    of an epoch that never comes); without one it goes on."""
    import itertools

    from fastvae.loaders import EpochPlan, _Part, _StreamReads

    split = open_dataset(str(indexed_9k)).train
    resumed = _Part(0, 1, 0, 1, 1000, start=2)
    expected = [(1, s) for s in resumed.segments(EpochPlan(split, seed=0, epoch=1))] + [
        (2, s) for s in resumed.next_epoch().segments(EpochPlan(split, seed=0, epoch=2))]
    reads = _StreamReads(split, epochs=3)
    reads.part = resumed
    assert [(r.epoch, r.segment) for r in itertools.islice(reads, 100)] == expected
    endless = _StreamReads(split)
    endless.part = reads.part
    assert len(list(itertools.islice(endless, 100))) == 100


def test_a_stream_kept_until_exit_stops_its_workers_quietly(tmp_path):
    """A StreamSource still referenced at interpreter exit (a script holding its Trainer):
    its persistent workers are stopped before multiprocessing's exit hook terminates them
    (torch then printed "Exception ignored in atexit callback ... DataLoader worker (pid N) is
    killed by signal: Terminated" for 4 workers); a closed source starts them again."""
    import subprocess
    import sys

    from fastvae.shards import FORMAT, block_size, write_dataset

    images = np.random.default_rng(0).integers(0, 256, (20_000, 1, 28, 28), dtype=np.uint8)
    pieces = {name: [(a, np.full(len(a), -1, np.int64))] for name, a in (("train", images), ("test", images[:64]))}
    write_dataset(tmp_path / "shards", pieces, {"format": FORMAT, "version": 1, "source": "test", "shape": [1, 28, 28],
                                                "block": block_size((1, 28, 28)), "labels": False, "split": "own"})
    script = f"""
from fastvae.loaders import StreamSource
from fastvae.shards import open_dataset
source = StreamSource(open_dataset({str(tmp_path / "shards")!r}).train, "cpu", 4)
def rows(epoch):
    return sum(len(x) for x in source.epoch_batches(epoch=epoch, seed=0, rank=0, world=1, batch_size=512))
assert rows(0) == rows(1) == 20_000
source.close()
assert rows(2) == 20_000
print("read", flush=True)
"""
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "read\n", proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_streamed_evaluation_counts_each_test_example_once_whatever_the_ranks(indexed):
    from fastvae.evaluation import elbo_sums
    from fastvae.loaders import head
    from fastvae.models import build_model

    torch.manual_seed(0)
    model = build_model({"data_shape": [1, 2, 2], "hidden_dim": 8, "latent_dim": 2})
    split = open_dataset(str(indexed)).test
    in_memory = elbo_sums(model, head(split, 100)[0], seed=3, batch_size=7)  # the reference
    for world in (1, 3):
        shards = sum(elbo_sums(model, split, seed=3, batch_size=5, rank=r, world_size=world)
                     for r in range(world))
        torch.testing.assert_close(shards, in_memory, rtol=1e-6, atol=0)
    assert int(in_memory[3]) == 40


class RecordRows:
    """Callback: each rank writes the row numbers of the batches it trained on to a file."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_train_start(self, trainer):
        source, seen = trainer.source, []
        original = source.epoch_batches

        def recording(**kwargs):
            batches = original(**kwargs)
            inner = batches.iterator
            batches.iterator = (seen.extend(row_numbers(x.cpu())) or x for x in inner)
            return batches

        source.epoch_batches = recording
        self.seen = seen

    def on_train_end(self, trainer, interrupted):
        Path(self.folder, f"rank{trainer.rank}.json").write_text(json.dumps(self.seen))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_ranks_see_disjoint_examples_whose_union_is_the_epoch(indexed, tmp_path):
    from fastvae.trainer import train

    config = tiny_config(tmp_path / "run", data=str(indexed), kind="ae", hidden_dim=8, epochs=1,
                         batch_size=10, devices=2, strategy="ddp_spawn", accelerator="cpu", workers=1)
    train(config, callbacks=[RecordRows(tmp_path)])
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 100
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(200))


def test_array_sources_keep_their_split_rules(tmp_path, digits_shards):
    from fastvae.loaders import head

    digits = load_dataset("digits")  # the fixed published split, rows 1500-1796, kept
    test, labels = head(open_dataset(str(digits_shards)).test, 10_000)
    assert torch.equal(test, (digits.test * 255).round() / 255) and torch.equal(labels, digits.test_labels)
    images = RNG.integers(0, 256, (50, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)  # no split of its own: the in-memory loader's seeded one
    prepare(str(tmp_path / "a.npy"), tmp_path / "s", workers=0, progress=False, test_fraction=0.2, split_seed=3)
    test, labels = head(open_dataset(str(tmp_path / "s")).test, 100)
    assert torch.equal(test, load_dataset(tmp_path / "a.npy", test_fraction=0.2, split_seed=3).test)
    assert labels is None


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_keras_cifar_layout_channels_last_and_label_columns(tmp_path, dtype):
    """Keras' CIFAR .npz: images (N, H, W, 3), labels (N, 1). Both were refused; now the images
    are read as (N, 3, H, W) - pixel (c, y, x) is stored [y, x, c] - in memory and in prepare
    alike, and the label columns are the labels (also when found by shape: two arrays)."""
    from fastvae.loaders import head

    x = RNG.integers(0, 256, (30, 5, 7, 3), dtype=np.uint8)
    y = RNG.integers(0, 10, (30, 1)).astype(np.uint8)
    if dtype == "float32":
        x = (x / np.float32(255)).astype(np.float32)
    expected = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float()
    expected = expected if dtype == "float32" else expected / 255
    keras = tmp_path / "cifar.npz"
    np.savez_compressed(keras, x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    splits = load_dataset(keras)
    assert splits.train.shape == (20, 3, 5, 7)
    torch.testing.assert_close(splits.train, expected[:20], rtol=0, atol=1e-7)
    assert splits.test_labels.tolist() == y[20:, 0].tolist()
    prepare(str(keras), tmp_path / "s", workers=0, progress=False)
    test, labels = head(open_dataset(str(tmp_path / "s")).test, 100)
    torch.testing.assert_close(test, (expected[20:] * 255).round() / 255, rtol=0, atol=1e-6)
    assert labels.tolist() == y[20:, 0].tolist()
    pair = tmp_path / "pair.npz"  # images and labels under any keys: told apart by their shapes
    np.savez(pair, pictures=x, classes=y)
    held_out = load_dataset(pair, test_fraction=0.2, split_seed=1)
    assert held_out.train.shape[1:] == (3, 5, 7) and len(held_out.test) == 6
    assert sorted(held_out.train_labels.tolist() + held_out.test_labels.tolist()) == sorted(y[:, 0].tolist())


def test_evaluate_and_report_on_the_source_of_a_prepared_dataset_hold_out_its_split(tmp_path, capsys):
    """evaluate/report RUN --data SRC (the array the shards were prepared from) cut SRC with the
    run's config.json split (the defaults: a prepared dataset ignores them), not prepare's: 948
    of 1001 "test" images had been trained on. The checkpoint records prepare's split now."""
    images = RNG.integers(0, 256, (300, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    prepare(str(tmp_path / "a.npy"), tmp_path / "s", workers=0, progress=False, test_fraction=0.2, split_seed=3)
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--data", tmp_path / "s", "--epochs", "1", "--hidden-dim", "8",
                     "--latent-dim", "2", "--reparam", "torch", "--quiet", "--no-pictures", "--workers", "0",
                     "--test-fraction", "0.5", "--out", run)  # ignored (a note says so), and not used below
    assert rc == 0 and "--test-fraction 0.5 changes nothing" in err, err
    results = []
    for data in (tmp_path / "s", tmp_path / "a.npy"):
        rc, out, err = cli(capsys, "evaluate", run, "--json", "--iwae-k", "2", "--data", data)
        assert rc == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    assert results[0]["n"] == results[1]["n"] == 60
    assert results[1]["neg_elbo"] == pytest.approx(results[0]["neg_elbo"], rel=1e-6)
    rc, _, err = cli(capsys, "report", run, "--iwae-k", "0", "--data", tmp_path / "a.npy")
    assert rc == 0, err
    assert "60 test images" in (run / "report.md").read_text()
    (tmp_path / "s").rename(tmp_path / "moved")  # a resume names the way on
    line = one_line_error(capsys, "train", "--resume", "--out", run, "--epochs", "2")
    assert "does not exist" in line and "--data NEWPATH" in line
    (tmp_path / "moved").rename(tmp_path / "s")
    rc, _, err = cli(capsys, "report", run, "--iwae-k", "0")  # on the prepared dataset itself
    assert rc == 0, err
    from fastvae.config import SPLIT_RULE

    assert (f"split by `fastvae prepare` (test_fraction 0.2, split_seed 3, split_rule {SPLIT_RULE}): the settings "
            "test_fraction and split_seed above are not used") in (run / "report.md").read_text()


def test_pictures_of_a_streamed_run_read_a_bounded_sample(digits_shards, monkeypatch):
    """1024 test images as float32 whatever their size (13 GB at 3x1024x1024): the sample is
    bounded in bytes, at least MIN_PICTURE_EXAMPLES images, the first ones of the test split."""
    import fastvae.loaders
    from fastvae.loaders import MIN_PICTURE_EXAMPLES, head, in_memory_sample

    data = open_dataset(str(digits_shards))
    assert len(in_memory_sample(data).test) == 297  # the whole (small) test split
    monkeypatch.setattr(fastvae.loaders, "PICTURE_BYTES", 40 * 4 * 64)  # forty 8x8 images
    sample = in_memory_sample(data)
    assert len(sample.test) == 40 and torch.equal(sample.test, head(data.test, 40)[0])
    monkeypatch.setattr(fastvae.loaders, "PICTURE_BYTES", 1)
    assert len(in_memory_sample(data).test) == MIN_PICTURE_EXAMPLES


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "shards"
    prepare("digits", out, workers=0, progress=False)
    return out


STREAM_RUN = ("train", "--epochs", "2", "--batch-size", "128", "--hidden-dim", "16", "--latent-dim", "4",
              "--seed", "5", "--reparam", "torch", "--quiet", "--no-pictures", "--workers", "1")
STOP = 12 + 5  # ceil(1500 / 128) = 12 steps per epoch: the fifth step of epoch 2


@pytest.fixture(scope="module")
def straight_stream(digits_shards):
    out = digits_shards.parent / "straight"
    rc, _, err = run_cli(*STREAM_RUN, "--data", digits_shards, "--out", out)
    assert rc == 0, err
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum, every, expected, group", [
    (signal.SIGKILL, 0, (1, 0), False),  # the checkpoint of epoch 1's end
    (signal.SIGKILL, 3, (1, 3), False),  # --checkpoint-every 3: step 15's
    (signal.SIGINT, 0, (1, 5), False),  # a stop request writes one at the step
    # a scheduler's SIGTERM to every process of the job (torchrun's killpg, SLURM): the loader's
    # workers died of it and failed the step, before the stop's checkpoint
    (signal.SIGTERM, 0, (1, 5), True),
], ids=["SIGKILL", "SIGKILL-checkpoint-every", "SIGINT", "SIGTERM-to-the-group"])
def test_streamed_run_stopped_mid_epoch_resumes_exactly(tmp_path, digits_shards, straight_stream, signum, every,
                                                        expected, group):
    out = tmp_path / "stopped"
    child = PausedChild(*STREAM_RUN, "--data", digits_shards, "--out", out, "--checkpoint-every", every,
                        "--callback", "pause_points:PauseAtStep", env={"PAUSE_AT_STEP": str(STOP)}, session=group)
    (child.signal_group if group else child.send_signal)(signum)
    rc, _, err = child.finish()
    assert rc == (-signal.SIGKILL if signum == signal.SIGKILL else 130), err
    assert "Traceback" not in err, err
    from fastvae.checkpoint import read_checkpoint

    state = read_checkpoint(out)
    assert (state["epoch"], state["batch_in_epoch"]) == expected
    rc, _, err = run_cli("train", "--resume", "--out", out, "--quiet", "--workers", "2")
    assert rc == 0, err
    assert max_weight_diff(state_dict_of(straight_stream), state_dict_of(out)) <= 1e-6
    assert metrics_without_time(straight_stream) == metrics_without_time(out)


# ----------------------------------------------------------------------------- trackers


def test_csv_and_tensorboard_trackers(tmp_path, capsys):
    import importlib.util

    run = tmp_path / "run"
    args = ("train", "--epochs", "2", "--hidden-dim", "16", "--latent-dim", "2", "--quiet", "--no-pictures",
            "--reparam", "torch", "--out", run, "--logger", "csv")
    rc, _, err = cli(capsys, *args)
    assert rc == 0, err
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as f:
        logged = [row for row in csv.DictReader(f) if row.get("train_loss")]
    ours = metrics_without_time(run)
    assert [float(r["train_loss"]) for r in logged] == pytest.approx([float(r["train_loss"]) for r in ours])
    assert [float(r["epoch"]) for r in logged] == [1.0, 2.0]  # which epoch each row is, as in RUN/metrics.csv
    # a resumed run appends to the tracker's file (Fabric's own writer would delete it)
    rc, _, err = cli(capsys, "train", "--resume", "--out", run, "--epochs", "3", "--quiet", "--no-pictures")
    assert rc == 0 and "deleted" not in err, err
    with open(run / "csv" / "metrics.csv", newline="") as f:
        logged = [row for row in csv.DictReader(f) if row.get("train_loss")]
    ours = metrics_without_time(run)
    assert len(ours) == 3 and [int(r["step"]) for r in logged] == [int(r["step"]) for r in ours]
    assert [float(r["train_loss"]) for r in logged] == pytest.approx([float(r["train_loss"]) for r in ours])
    tb = args[:-2] + ("--logger", "tensorboard", "--overwrite")
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        rc, _, err = cli(capsys, *tb)
        assert rc == 0 and any((run / "tensorboard").glob("events.*")), err
    else:
        assert "pip install tensorboard" in one_line_error(capsys, *tb)


@pytest.mark.timeout(300)
def test_the_csv_tracker_under_spawned_ranks(tmp_path, capsys):
    """--strategy ddp_spawn pickles the Fabric, trackers too, for its ranks: the csv tracker
    (a class made inside a function) ended the run in a traceback; wandb and mlflow, whose
    run is open in the launching process, are refused before anything starts."""
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--epochs", "1", "--hidden-dim", "8", "--latent-dim", "2", "--quiet",
                     "--no-pictures", "--reparam", "torch", "--devices", "2", "--accelerator", "cpu",
                     "--strategy", "ddp_spawn", "--logger", "csv", "--out", run)
    assert rc == 0, err
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as f:
        logged = [row for row in csv.DictReader(f) if row.get("train_loss")]
    assert [float(r["train_loss"]) for r in logged] == pytest.approx(
        [float(r["train_loss"]) for r in metrics_without_time(run)])
    for name in ("wandb", "mlflow"):
        line = one_line_error(capsys, "train", "--devices", "2", "--strategy", "ddp_spawn", "--logger", name,
                              "--out", tmp_path / name)
        assert f"--logger {name} does not work with --strategy ddp_spawn" in line, line
        assert not (tmp_path / name).exists()


def test_a_damaged_metrics_csv_is_one_line_before_any_training(tmp_path, capsys):
    """RUN/metrics.csv or the csv tracker's file that is not text, or holds a runaway quoted
    field: resume and report ended in a traceback (the tracker's only after another epoch
    was trained); now one line, before anything runs or is written."""
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--epochs", "1", "--hidden-dim", "8", "--latent-dim", "2", "--quiet",
                     "--no-pictures", "--reparam", "torch", "--out", run, "--logger", "csv")
    assert rc == 0, err
    resume = ("train", "--resume", "--out", run, "--epochs", "2", "--quiet")
    for damaged in (run / "metrics.csv", run / "csv" / "metrics.csv"):
        kept = damaged.read_bytes()
        for content, why in ((b"\x00\xff\xfe", "codec can't decode"),
                             (b'epoch,step\n"' + b"x" * 200_000 + b'"\n', "field larger than field limit")):
            damaged.write_bytes(content)
            for command in (resume, ("report", run, "--iwae-k", "0")):
                if damaged.parent.name == "csv" and command[0] == "report":
                    continue  # the report does not read the tracker's file
                line = one_line_error(capsys, *command)
                assert line.startswith(f"fastvae {command[0]}: error: {damaged} is damaged (") and why in line, line
                assert line.endswith("repair it, or delete it (its history of metrics is lost; checkpoints are kept)")
        damaged.write_bytes(kept)
    assert cli(capsys, *resume)[0] == 0
    assert [int(r["epoch"]) for r in metrics_without_time(run)] == [1, 2]  # the refused resumes trained nothing


def test_a_tracker_package_that_fails_to_import_is_one_line(tmp_path, capsys, monkeypatch):
    """Installed but broken (a dependency missing or of the wrong version): one line."""
    broken = tmp_path / "site" / "mlflow"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("import a_dependency_that_is_not_installed_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(__import__("sys").modules, "mlflow", raising=False)
    line = one_line_error(capsys, "train", "--epochs", "1", "--out", tmp_path / "r", "--logger", "mlflow")
    assert "cannot be imported" in line and "a_dependency_that_is_not_installed_xyz" in line


def test_a_missing_tracker_package_starts_no_other_tracker(tmp_path, capsys, monkeypatch):
    """--logger mlflow --tensorboard without tensorboard: the one-line error came after MLflow
    had started its run (RUN/mlflow.db, trackers.json, a run the next train took over); every
    package is now checked before any tracker starts."""
    pytest.importorskip("mlflow")
    from lightning_fabric.loggers import tensorboard as tb

    monkeypatch.setattr(tb, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(tb, "_TENSORBOARDX_AVAILABLE", False)
    run = tmp_path / "r"
    line = one_line_error(capsys, "train", "--epochs", "1", "--out", run, "--logger", "mlflow", "--tensorboard")
    assert "needs the tensorboard package" in line, line
    assert not run.exists() or sorted(p.name for p in run.iterdir()) == [], sorted(run.iterdir())


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_optional_trackers_missing_package_is_one_line(tmp_path, capsys, monkeypatch, name):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))
    line = one_line_error(capsys, "train", "--epochs", "1", "--out", tmp_path / "r", "--logger", name)
    assert f"pip install {name}" in line and not (tmp_path / "r" / "checkpoints").exists()
    assert "not supported" in one_line_error(capsys, "train", "--out", tmp_path / "r", "--logger", "nope")


# ----------------------------------------------------------------------------- bad input


def test_bad_sources_and_flags_for_prepare(tmp_path, capsys):
    out = tmp_path / "out"
    assert "does not exist" in one_line_error(capsys, "prepare", tmp_path / "nope", "--out", out)
    (tmp_path / "empty").mkdir()
    assert "no images" in one_line_error(capsys, "prepare", tmp_path / "empty", "--out", out)
    src = image_folder(tmp_path / "imgs", 5)
    assert "--workers" in one_line_error(capsys, "prepare", src, "--out", out, "--workers", "-1")
    assert "--workers" in one_line_error(capsys, "prepare", src, "--out", out, "--workers", "1000")
    # 8x8 images upscaled to 100000x100000: ran until killed (and left its workers behind)
    assert "from 1 to 8192" in one_line_error(capsys, "prepare", src, "--out", out, "--size", "100000")
    assert not out.exists()
    (src / "dog" / "zz.png").write_bytes(b"not an image")
    line = one_line_error(capsys, "prepare", src, "--out", out, "--workers", "2")
    assert "zz.png" in line and "--skip-bad" in line and not out.exists()
    assert list(tmp_path.glob(".out*")) == []  # no staging folder left behind
    rc, text, err = cli(capsys, "prepare", src, "--out", out, "--skip-bad", "--workers", "2")
    assert rc == 0 and "10 images" in text and "skipped 1 unreadable image(s): " in text, err
    assert str(src / "dog" / "zz.png") in text  # which file, so it can be fixed
    # a truncated image whose header still reads: caught while decoding
    (src / "dog" / "zz.png").unlink()
    raw = (src / "cat" / "000.png").read_bytes()
    (src / "cat" / "000.png").write_bytes(raw[: len(raw) // 2])
    line = one_line_error(capsys, "prepare", src, "--out", tmp_path / "o2", "--workers", "0")
    assert "000.png" in line
    assert "already holds" in one_line_error(capsys, "prepare", "digits", "--out", out)
    assert "--workers" in one_line_error(capsys, "train", "--data", out, "--workers", "65", "--out", tmp_path / "r")
    # JPEGs cut short: their headers read, so the split is made, then every one of them fails
    # to decode and --skip-bad leaves a split empty (litdata's merge then waited forever)
    cut = image_folder(tmp_path / "cut", 3, size=(64, 64), suffix=".jpg")
    for file in cut.rglob("*.jpg"):
        raw = file.read_bytes()
        file.write_bytes(raw[: len(raw) // 3])
    line = one_line_error(capsys, "prepare", cut, "--out", tmp_path / "o3", "--skip-bad", "--workers", "0")
    assert "split" in line and "came out empty" in line and "unreadable and skipped" in line
    assert not (tmp_path / "o3").exists() and list(tmp_path.glob(".o3*")) == []


def test_out_url_link_and_grayscale_of_a_colour_dataset(tmp_path, capsys):
    src = image_folder(tmp_path / "imgs", 3)
    line = one_line_error(capsys, "prepare", src, "--out", "s3://bucket/shards")
    assert "local folder" in line and "s3://bucket/shards" in line
    # every command that writes refuses a URL for --out (it wrote a local folder "s3:/..."),
    # and so does a config file's out
    for cmd in (["train", "--epochs", "1"], ["sample", str(tmp_path / "run")], ["export", str(tmp_path / "run")]):
        line = one_line_error(capsys, *cmd, "--out", "gs://bucket/x")
        assert "gs://bucket/x is a URL" in line and "local folder" in line, line
    config = tmp_path / "imgs" / "c.toml"
    config.write_text('epochs = 1\nout = "s3://bucket/run"\n')
    line = one_line_error(capsys, "train", "--config", config)
    config.unlink()
    assert "--out: s3://bucket/run is a URL" in line
    assert not (Path.cwd() / "s3:").exists() and not (Path.cwd() / "gs:").exists()
    # --out a link to a folder elsewhere (a larger disk): the dataset goes into its target
    target = tmp_path / "disk" / "target"
    target.mkdir(parents=True)
    (tmp_path / "link").symlink_to(target)
    rc, _, err = cli(capsys, "prepare", src, "--out", tmp_path / "link", "--workers", "0", "--quiet")
    assert rc == 0, err
    assert (tmp_path / "link").is_symlink() and (target / "fastvae.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "imgs", "link"]  # nothing left over
    assert open_dataset(str(tmp_path / "link")).data_shape == (3, 10, 12)
    line = one_line_error(capsys, "train", "--data", tmp_path / "link", "--grayscale", "--epochs", "1",
                          "--out", tmp_path / "run")
    assert "--grayscale" in line and "prepared in colour" in line and not (tmp_path / "run").exists()


def test_out_is_the_current_folder_or_a_mount_point(tmp_path, capsys, monkeypatch):
    """--out . crashed with a traceback (a path without a name to stage beside), and replacing
    the current folder would leave the shell in a deleted one: refused in one line, as is an
    --out that holds the current folder; a mount point was staged on the disk above it and
    failed only at the end, after all the work."""
    src = image_folder(tmp_path / "imgs", 3)
    (tmp_path / "here" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    line = one_line_error(capsys, "prepare", src, "--out", ".", "--workers", "0")
    assert "is the current folder" in line and f"run from {tmp_path} and give here" in line
    monkeypatch.chdir(tmp_path / "here" / "deeper")
    assert "holds it" in one_line_error(capsys, "prepare", src, "--out", "..", "--workers", "0")
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "prepare", src, "--out", "here/deeper", "--workers", "0", "--quiet")
    assert rc == 0 and open_dataset(str(tmp_path / "here" / "deeper")).data_shape == (3, 10, 12), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "imgs"]
    mount = tmp_path / "disk"
    mount.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(mount) or real_ismount(p))
    decoded = []
    monkeypatch.setattr("fastvae.shards._decode_files", lambda *a, **k: decoded.append(1))
    line = one_line_error(capsys, "prepare", src, "--out", mount, "--workers", "0")
    assert "mount point" in line and str(mount / "out") in line and not decoded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "here", "imgs"]


def test_folders_left_by_a_killed_prepare_are_reported_not_removed(tmp_path, capsys):
    left = tmp_path / ".shards.tmp-4194301"  # another process's (it may run on another machine)
    (left / "train").mkdir(parents=True)
    old = tmp_path / ".shards.old-4194301"  # the old dataset, put aside by a killed replace
    old.mkdir()
    rc, _, err = cli(capsys, "prepare", "digits", "--out", tmp_path / "shards", "--quiet", "--overwrite")
    assert rc == 0 and left.is_dir() and old.is_dir()
    assert [line for line in err.splitlines() if line.strip()] == [
        f"note: {left} was left by a 'fastvae prepare' that did not finish (killed?): remove it to "
        "free its space if none is running",
        f"note: {old} is an earlier version of {tmp_path / 'shards'}, put aside by a replace that was "
        "killed: remove it to free its space (or move it back)"]


@pytest.mark.parametrize("appears", ["notes", "dataset"])
def test_an_out_folder_that_appears_while_prepare_runs_is_kept(tmp_path, appears):
    """--out was free at the start; a user's folder, or another prepare's dataset, arrives
    while this prepare writes: it is refused as at the start, not set aside and removed."""
    from fastvae.errors import FastVAEError
    from fastvae.shards import FORMAT, block_size, write_dataset

    out, other = tmp_path / "shards", tmp_path / "other"
    images = np.zeros((64, 1, 4, 4), np.uint8)
    if appears == "dataset":
        prepare("digits", other, workers=0, progress=False)

    def train_pieces():
        yield images, np.zeros(64, np.int64)
        if appears == "notes":
            out.mkdir()
            (out / "precious.txt").write_text("notes")
        else:  # (another process's prepare: its own staging folder, moved into place)
            shutil.copytree(other, out)

    meta = {"format": FORMAT, "version": 1, "source": "test", "shape": [1, 4, 4], "block": block_size((1, 4, 4)),
            "labels": False, "split": "own"}
    with pytest.raises(FastVAEError, match="changed while this prepare ran: nothing was replaced"):
        write_dataset(out, {"train": train_pieces(), "test": [(images, np.zeros(64, np.int64))]}, meta)
    if appears == "notes":
        assert (out / "precious.txt").read_text() == "notes"
    else:
        assert open_dataset(out).meta["dataset_id"] == open_dataset(other).meta["dataset_id"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_resume_on_a_dataset_prepared_again_under_the_same_path_is_refused(tmp_path, capsys):
    """Same path, shape and counts, other contents: the checkpoint's dataset_id tells them apart
    (the path alone did not, and a mid-epoch resume went on with other images); evaluate and
    report of the run's own data refuse it too (they scored another held-out split, which may
    hold training images), and take it when it is named with --data. A copy of the same
    dataset elsewhere resumes the run (--data COPY; it used to be refused as other data)."""
    shards, run = tmp_path / "shards", tmp_path / "run"
    prepare("digits", shards, workers=0, progress=False)
    args = ("train", "--data", shards, "--epochs", "1", "--hidden-dim", "8", "--quiet", "--no-pictures",
            "--workers", "0", "--out", run)
    assert cli(capsys, *args)[0] == 0
    assert cli(capsys, "train", "--resume", "--out", run, "--epochs", "2", "--quiet")[0] == 0  # same data
    copy = tmp_path / "elsewhere" / "shards"  # a copy on another disk: the same dataset_id
    shutil.copytree(shards, copy)
    assert cli(capsys, "train", "--resume", "--out", run, "--epochs", "3", "--quiet", "--data", copy)[0] == 0
    assert json.loads((run / "config.json").read_text())["data"] == str(copy)
    assert cli(capsys, "train", "--resume", "--out", run, "--epochs", "4", "--quiet", "--data", "digits")[0] == 2
    capsys.readouterr()
    shutil.rmtree(copy)
    line = one_line_error(capsys, "evaluate", run, "--json")  # the run's data is gone: say what to do
    assert str(copy) in line and line.endswith("(the run's data; pass --data to use another copy)"), line
    assert cli(capsys, "train", "--resume", "--out", run, "--epochs", "4", "--quiet", "--data", shards)[0] == 0
    prepare("digits", shards, workers=0, progress=False, overwrite=True)
    line = one_line_error(capsys, "train", "--resume", "--out", run, "--epochs", "5", "--quiet")
    assert "is not the prepared dataset the run trained on" in line and str(run) in line
    for command in (("evaluate", run, "--json"), ("report", run)):
        line = one_line_error(capsys, *command)
        assert f"is not the prepared dataset {run} trained on" in line and f"pass --data {shards}" in line, line
    assert cli(capsys, "evaluate", run, "--json", "--data", shards)[0] == 0


def test_split_writer_cuts_pieces_of_any_size_into_whole_blocks(tmp_path):
    """Pieces smaller and larger than a block, and one of many blocks: blocks hold the rows in
    order, every block but the last full."""
    from fastvae.shards import ShardSplit, SplitWriter

    rows = np.arange(1000)
    images = np.stack([rows % 256, rows // 256], axis=1).astype(np.uint8).reshape(-1, 1, 1, 2)
    writer = SplitWriter(tmp_path / "train", block=64)
    cuts = [0, 3, 4, 70, 71, 600, 601, 1000]
    for lo, hi in zip(cuts, cuts[1:]):
        writer.add(images[lo:hi], rows[lo:hi])
    info = writer.finish()
    assert info["examples"] == 1000 and info["blocks"] == 16
    index = json.loads((tmp_path / "train" / "index.json").read_text())
    split = ShardSplit(str(tmp_path), "train", 1000, 64, (1, 1, 2),
                       tuple(int(c["chunk_size"]) for c in index["chunks"]))
    blocks = [split.read_block(b) for b in range(16)]
    assert [len(x) for x, _ in blocks] == [64] * 15 + [40]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in blocks]), images)
    np.testing.assert_array_equal(np.concatenate([y for _, y in blocks]), rows)


def test_damaged_prepared_datasets_are_refused(tmp_path, capsys, digits_shards):
    import shutil

    def train_on(data):
        return one_line_error(capsys, "train", "--data", data, "--epochs", "1", "--out", tmp_path / "run")

    copy = tmp_path / "copy"
    shutil.copytree(digits_shards, copy)
    (copy / "fastvae.json").unlink()  # what an interrupted copy or prepare looks like
    assert "not a prepared dataset" in train_on(copy)
    shutil.rmtree(copy)
    shutil.copytree(digits_shards, copy)
    chunk = next((copy / "train").glob("chunk-*.bin"))
    chunk.write_bytes(chunk.read_bytes()[:1000])
    assert "truncated" in train_on(copy) and chunk.name in train_on(copy)
    shutil.rmtree(copy)
    shutil.copytree(digits_shards, copy)
    meta = json.loads((copy / "fastvae.json").read_text())
    meta["splits"]["train"]["examples"] = 5000
    (copy / "fastvae.json").write_text(json.dumps(meta))
    assert "different runs" in train_on(copy)
    meta["splits"]["train"]["examples"] = 1500
    for key, value, words in (("shape", [1, 8, 9], ("damaged", "1, 8, 9)", "prepare it again")),  # a traceback in the first step
                              ("shape", [1, -8, 8], ("not the metadata",)),
                              ("version", 99, ("format version 99", "reads version 1"))):
        (copy / "fastvae.json").write_text(json.dumps({**meta, key: value}))
        line = train_on(copy)
        assert all(w in line for w in words), line
    (copy / "fastvae.json").write_text("{not json")
    assert "not the metadata" in train_on(copy)
    # fastvae.json of another dataset with as many blocks per split but another image size (a
    # half-finished sync of a dataset prepared again with another --size)
    other = tmp_path / "other"
    prepare(str(indexed_npz(tmp_path / "rows.npz", n_train=1500, n_test=297)), other, workers=0,
            progress=False)
    (copy / "fastvae.json").write_bytes((other / "fastvae.json").read_bytes())
    assert "different runs" in train_on(copy)


def test_damage_in_either_split_and_mixed_prepares_are_refused_at_start_up(tmp_path, capsys, digits_shards):
    """A test chunk of the right size whose header is damaged failed only at the first
    evaluation, after a whole epoch of training; a test/ folder from another prepare of the
    same source (same counts and bytes, other rows: it held training images) was accepted."""
    def refusal(data):
        line = one_line_error(capsys, "train", "--data", data, "--epochs", "1", "--out", tmp_path / "run")
        assert not (tmp_path / "run").exists()  # refused before the run started
        return line

    copy = tmp_path / "copy"
    shutil.copytree(digits_shards, copy)
    chunk = sorted((copy / "test").glob("chunk-*.bin"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[:4] = b"\xff" * 4  # litdata's item count
    chunk.write_bytes(bytes(raw))
    line = refusal(copy)
    assert f"test/{chunk.name} says it holds 4294967295 blocks" in line and "damaged" in line, line
    shutil.rmtree(copy)

    again = tmp_path / "again"  # the same source prepared again: another dataset_id
    prepare("digits", again, workers=0, progress=False)
    shutil.copytree(digits_shards, copy)
    shutil.rmtree(copy / "test")
    shutil.copytree(again / "test", copy / "test")
    line = refusal(copy)
    assert "test/ has another fastvae-split.json" in line and "different runs of 'fastvae prepare'" in line, line
    (copy / "test" / "fastvae-split.json").unlink()
    assert "test/ has no fastvae-split.json" in refusal(copy)


def test_a_block_that_cannot_be_read_in_a_loader_worker_is_one_line(tmp_path, capsys, digits_shards):
    """A chunk of the right size whose contents are damaged fails in a DataLoader worker: the
    error reaches the user as one line (torch would add the worker's traceback)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digits_shards, copy)
    chunk = sorted((copy / "train").glob("chunk-*.bin"))[-1]
    raw = bytearray(chunk.read_bytes())
    # litdata's chunk: item count, then item offsets (uint32); the last item's own header is
    # damaged (block 0 is read when the dataset is opened, in this process)
    count = int(np.frombuffer(raw, np.uint32, 1)[0])
    last = int(np.frombuffer(raw, np.uint32, count + 1, offset=4)[count - 1])
    raw[last:last + 64] = b"\xff" * 64
    chunk.write_bytes(bytes(raw))
    line = one_line_error(capsys, "train", "--data", copy, "--epochs", "1", "--workers", "2",
                          "--no-pictures", "--quiet", "--out", tmp_path / "run")
    assert "cannot read block" in line and "train" in line


def test_unreachable_or_uncredentialed_urls_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    line = one_line_error(capsys, "train", "--data", "s3://fastvae-test/shards", "--out", tmp_path / "r")
    assert "s3://fastvae-test/shards" in line and "credentials" in line
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    line = one_line_error(capsys, "train", "--data", "s3://fastvae-test/shards", "--out", tmp_path / "r")
    assert "cannot read s3://fastvae-test/shards" in line


# ----------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
@pytest.mark.parametrize("where", ["call:fastvae.data:probe_image", "rename:fastvae.json"],
                         ids=["reading", "finishing"])
def test_interrupted_prepare_leaves_nothing(tmp_path, where):
    src = image_folder(tmp_path / "imgs", 3)
    out = tmp_path / "shards"
    child = PausedChild("prepare", src, "--out", out, "--workers", "0", where=where)
    child.send_signal(signal.SIGINT)
    rc, stdout, stderr = child.finish()
    assert rc == 130, stderr
    assert [line for line in (stdout + stderr).splitlines() if line.strip()] == ["fastvae prepare: interrupted"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no dataset, no staging folder
