"""``fastvae prepare`` of array sources (.npy, .npz, IDX, the bundled data), a slice at a time:
the same dataset whatever the slice size, the in-memory loader's split and pixels, memory that
does not grow with the file, and the source's pixel grid recorded for bits per dim."""

from __future__ import annotations

import gzip
import io
import json
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

import fastvae.array_prepare
import fastvae.data
import fastvae.npz_members
import fastvae.shards
from fastvae.data import data_grid, load_dataset
from fastvae.loaders import StreamSource, eval_batches
from fastvae.shards import open_dataset, prepare

RNG = np.random.default_rng(0)


def idx_file(path, array, gz=False):
    dtype_code = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}[array.dtype]
    raw = bytes([0, 0, dtype_code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw += array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)
    return path


def sources(root):
    colour = RNG.integers(0, 256, (50, 3, 6, 5), dtype=np.uint8)
    np.save(root / "colour.npy", colour)
    np.save(root / "fortran.npy", np.asfortranarray(RNG.integers(0, 256, (40, 7, 6), dtype=np.uint8)))
    np.save(root / "on_grid.npy", (RNG.integers(0, 256, (40, 1, 4, 4)) / 255).astype(np.float32))
    np.save(root / "continuous.npy", RNG.random((40, 9), dtype=np.float32))  # (N, D) rows
    np.save(root / "binary.npy", RNG.random((40, 4, 4)) < 0.3)
    np.savez(root / "split.npz", x_train=RNG.integers(0, 256, (30, 4, 4), dtype=np.uint8),
             x_test=RNG.integers(0, 256, (9, 4, 4), dtype=np.uint8),
             y_train=RNG.integers(0, 3, 30), y_test=RNG.integers(0, 3, 9))
    np.savez(root / "labelled.npz", RNG.integers(0, 256, (40, 3, 4, 4), dtype=np.uint8),
             np.repeat(np.arange(4), 10))  # images and labels as arr_0, arr_1
    idx_file(root / "images-idx3-ubyte", RNG.integers(0, 256, (40, 5, 5), dtype=np.uint8))
    idx_file(root / "floats-idx3.gz", (RNG.integers(0, 17, (40, 3, 3)) / 16).astype(">f4"), gz=True)
    return ["colour.npy", "fortran.npy", "on_grid.npy", "continuous.npy", "binary.npy", "split.npz",
            "labelled.npz", "images-idx3-ubyte", "floats-idx3.gz"]


def blocks(out, split):
    s = getattr(open_dataset(str(out)), split)
    return [s.read_block(i) for i in range(s.blocks)]


def all_rows(data):
    test = torch.cat([x for _, x in eval_batches(data.test, 7, "cpu")])
    train = torch.cat(list(StreamSource(data.train, "cpu", 0).epoch_batches(
        epoch=0, seed=0, rank=0, world=1, batch_size=len(data.train))))
    return train, test


def u8_rows(x):
    return sorted(map(bytes, (x * 255).round().byte().flatten(1).numpy()))


def test_slices_give_the_whole_arrays_dataset_and_the_in_memory_split(tmp_path, monkeypatch):
    """Every array source, sliced down to a few rows: byte-identical to one slice, and the
    in-memory loader's held-out rows and pixels (8-bit sources exactly, others within half a
    level of 8 bits)."""
    names = sources(tmp_path)
    for name in names + ["digits"]:
        src = name if name == "digits" else str(tmp_path / name)
        prepare(src, tmp_path / f"{name}.whole", workers=0, progress=False, test_fraction=0.2, split_seed=5)
        monkeypatch.setattr(fastvae.array_prepare, "SLICE_BYTES", 3 * 4 * 75)  # a few rows a slice
        prepare(src, tmp_path / f"{name}.sliced", workers=0, progress=False, test_fraction=0.2, split_seed=5)
        monkeypatch.undo()
        for split in ("train", "test"):
            whole, sliced = blocks(tmp_path / f"{name}.whole", split), blocks(tmp_path / f"{name}.sliced", split)
            assert len(whole) == len(sliced)
            for (a, la), (b, lb) in zip(whole, sliced):
                assert np.array_equal(a, b) and np.array_equal(la, lb), (name, split)
        memory = load_dataset(src, test_fraction=0.2, split_seed=5)
        train, test = all_rows(open_dataset(str(tmp_path / f"{name}.whole")))
        assert test.shape == memory.test.shape and train.shape == memory.train.shape, name
        assert (test - memory.test).abs().max() <= 0.5 / 255 + 1e-6, name
        assert u8_rows(train) == u8_rows(memory.train), name
        if name in ("colour.npy", "fortran.npy", "on_grid.npy", "images-idx3-ubyte", "split.npz", "labelled.npz"):
            assert torch.equal(test, memory.test), name


def test_grayscale_of_colour_arrays_is_pillows_luma(tmp_path, capsys):
    """--grayscale on a colour array crashed (uint8 x 299 overflows in numpy 2)."""
    colour = RNG.integers(0, 256, (30, 3, 6, 5), dtype=np.uint8)
    colour[0] = 255  # the largest sums
    np.savez(tmp_path / "c.npz", train=colour[:24], test=colour[24:])
    prepare(str(tmp_path / "c.npz"), tmp_path / "s", grayscale=True, workers=0, progress=False)
    expected = np.stack([np.asarray(Image.fromarray(i.transpose(1, 2, 0)).convert("L")) for i in colour[24:]])
    (test, _), = blocks(tmp_path / "s", "test")
    assert test.shape == (6, 1, 6, 5) and np.array_equal(test[:, 0], expected)
    prepare("photos:32", tmp_path / "p", grayscale=True, workers=0, progress=False)
    assert open_dataset(str(tmp_path / "p")).data_shape == (1, 32, 32)


def test_the_sources_pixel_grid_is_recorded_and_float_rounding_is_named(tmp_path, capsys):
    """Bits per dim use the source's grid on the prepared dataset too (it said 255 for all:
    4 bits per dim apart from the in-memory digits, and 8 bits for binary images); float
    pixels that 8 bits round get a note."""
    sources(tmp_path)
    expected = {"digits": 16, "colour.npy": 255, "on_grid.npy": 255, "binary.npy": 1,
                "floats-idx3.gz": 16, "continuous.npy": 255}
    for name, grid in expected.items():
        src = name if name == "digits" else str(tmp_path / name)
        capsys.readouterr()
        meta, _ = prepare(src, tmp_path / f"{name}.s", workers=0, progress=False)
        err = capsys.readouterr().err
        assert meta["pixel_grid"] == grid, name
        data = open_dataset(str(tmp_path / f"{name}.s"))
        assert data_grid(data) == data_grid(data.test) == grid
        if name != "continuous.npy":  # the in-memory loader finds none there: continuous
            assert data_grid(load_dataset(src)) == grid, name
        assert ("8 bits do not hold exactly" in err) == (name in ("continuous.npy", "floats-idx3.gz")), (name, err)
    meta_file = tmp_path / "colour.npy.s" / "fastvae.json"
    meta = json.loads(meta_file.read_text())
    del meta["pixel_grid"]  # a dataset prepared before the grid was recorded: 8 bits
    meta_file.write_text(json.dumps(meta))
    assert data_grid(open_dataset(str(tmp_path / "colour.npy.s"))) == 255


def _save(path, array, how):
    if how == "npy":
        np.save(path, array)
    else:  # one member: the seeded split, as a .npy
        (np.savez if how == "npz" else np.savez_compressed)(path, images=array)
    return path


# run in a process of its own: in the whole suite the peak grew now and then (2 of 3 runs;
# alone, never; not reference cycles: the same with gc off), most likely a thread left by
# another test (a loader's prefetch) allocating during the measurement
_MEMORY_CHILD = """
import json, sys, tracemalloc
from pathlib import Path
import numpy as np
import fastvae.array_prepare, fastvae.npz_members, fastvae.shards
from fastvae.shards import prepare
from test_array_prepare import _save
how, root = sys.argv[1], Path(sys.argv[2])
fastvae.array_prepare.SLICE_BYTES = 1 << 20
fastvae.shards.CHUNK_BYTES = 1 << 20  # litdata's chunk buffer
fastvae.npz_members.SPILL_BYTES = 1 << 20
suffix = "npy" if how == "npy" else "npz"
peaks = []
for n in (100, 4_000, 16_000):  # (imports, caches), then 4 and 16 MB of uint8
    images = np.zeros((n, 1, 32, 32), np.uint8) + np.arange(n, dtype=np.uint8)[:, None, None, None]
    _save(root / f"{n}.{suffix}", images, how)
    _save(root / f"f{n}.{suffix}", np.zeros((n // 4, 1, 32, 32), np.float32), how)  # floats too
    tracemalloc.start()
    prepare(str(root / f"{n}.{suffix}"), root / f"{n}", workers=0, progress=False)
    prepare(str(root / f"f{n}.{suffix}"), root / f"f{n}", workers=0, progress=False)
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
print(json.dumps(peaks))
"""


@pytest.mark.parametrize("how", ["npy", "npz", "npz_compressed"])
def test_preparing_a_larger_array_file_takes_no_more_memory(tmp_path, how):
    """A .npy was loaded whole and converted to float32 several times over (~11x the file in
    memory): now memory-mapped and converted a slice at a time. An .npz member was read whole
    (np.load's NpzFile[key]): now mapped in the archive, or, compressed, inflated to disk."""
    import os
    import subprocess
    from pathlib import Path

    here = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, how, str(tmp_path)], capture_output=True,
                           text=True, timeout=300, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    peaks = json.loads(child.stdout.strip().splitlines()[-1])
    assert peaks[2] - peaks[1] < 3 << 20, peaks  # 12 MB more data (and 12 MB more floats)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no spill left
    (test, _), *_ = blocks(tmp_path / "16000", "test")
    split = fastvae.data.split_indices(16_000, None, 0.1, 0, fastvae.data.SPLIT_RULE)[1]
    assert np.array_equal(test[:, 0, 0, 0], np.arange(16_000, dtype=np.uint8)[split][:len(test)])


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("array", [
    RNG.integers(0, 256, (9, 3, 4, 5), dtype=np.uint8), np.asfortranarray(RNG.random((6, 4, 4))),
    RNG.random((5, 3, 3)).astype(">f4"), np.zeros((0, 4, 4), np.uint8), RNG.random((6, 7)) < 0.5])
def test_an_npz_member_is_read_in_place_with_its_values(tmp_path, monkeypatch, save, array):
    """Against numpy's own reading: a stored member is a map of the archive, a compressed one
    above SPILL_BYTES a map of an unlinked inflated copy (nothing left on disk); order, byte
    order and empty arrays kept."""
    from fastvae.npz_members import member_array

    monkeypatch.setattr(fastvae.npz_members, "SPILL_BYTES", 0)
    path = tmp_path / "a.npz"
    save(path, first=np.arange(3), images=array)  # not the archive's first member
    with np.load(path) as npz:
        got = member_array(npz, "images", path, spill_dir=tmp_path)
        expected = npz["images"]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected) and got.flags.f_contiguous == expected.flags.f_contiguous
    assert isinstance(got, np.memmap) == (array.size > 0)
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]


def test_inflating_a_compressed_member_without_room_is_one_line(tmp_path, monkeypatch, capsys):
    """A compressed member larger than the free space beside the output: said before any work,
    with what to do."""
    from collections import namedtuple

    from testkit import assert_one_line_error

    from fastvae.cli import main

    monkeypatch.setattr(fastvae.npz_members, "SPILL_BYTES", 0)
    np.savez_compressed(tmp_path / "a.npz", images=np.zeros((300, 8, 8), np.uint8))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fastvae.npz_members.shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 1000))
    rc = main(["prepare", str(tmp_path / "a.npz"), "--out", str(tmp_path / "out" / "s"), "--workers", "0"])
    assert_one_line_error(rc, capsys.readouterr().err, "a.npz:images is compressed")
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]  # no out/, nothing spilled


def test_idx_files_are_mapped_and_still_checked(tmp_path):
    from fastvae.data import read_idx
    from fastvae.errors import FastVAEError

    array = RNG.integers(0, 256, (7, 4, 3), dtype=np.uint8)
    path = idx_file(tmp_path / "a-idx3-ubyte", array)
    mapped = read_idx(path, mmap=True)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, array)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(FastVAEError, match="truncated or has the wrong sizes"):
        read_idx(path, mmap=True)


@pytest.mark.parametrize("array, expected", [
    (np.array(0.5), "has shape ()"), (np.arange(6, dtype=np.uint8), "has shape (6,)"),
    (np.zeros((7, 2, 4, 4), np.uint8), "has shape (7, 2, 4, 4)"), (np.zeros((0, 4, 4), np.uint8), "is empty"),
    (np.zeros((7, 4, 4), np.int16), "has dtype int16"), (np.full((3, 4), np.nan, np.float32), "NaN")])
def test_bad_arrays_are_one_line_naming_the_whole_array(tmp_path, capsys, array, expected):
    """A 0-d .npy crashed prepare with a traceback (len() of an unsized object), and shape
    errors named the first row's shape, (1, 2, 4, 4) for a (7, 2, 4, 4) array."""
    from testkit import assert_one_line_error

    from fastvae.cli import main

    np.save(tmp_path / "a.npy", array)
    for command in (["prepare", str(tmp_path / "a.npy"), "--out", str(tmp_path / "s")],
                    ["train", "--data", str(tmp_path / "a.npy"), "--epochs", "1", "--out", str(tmp_path / "r")]):
        capsys.readouterr()
        rc = main(command)
        err = capsys.readouterr().err
        assert_one_line_error(rc, err, expected)
        assert not (tmp_path / "s").exists()


def _rss_file_bytes() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.mark.skipif(_rss_file_bytes() is None, reason="needs Linux's /proc/self/status RssFile")
@pytest.mark.parametrize("how", ["npy", "npz"])
def test_a_mapped_files_pages_do_not_accumulate(tmp_path, monkeypatch, how):
    """The pages of a memory-mapped file that prepare has read count as its resident memory
    until released (tracemalloc sees none): they grew to the whole file without the release,
    and within one slice, whose train rows lie all over the file, each row read mapped its
    neighbours too (a 921 MB .npy prepared in 1.2 GB): rows are gathered a group at a time."""
    monkeypatch.setattr(fastvae.array_prepare, "SLICE_BYTES", 8 << 20)  # 2048 rows of 1 KB a slice
    monkeypatch.setattr(fastvae.array_prepare, "GATHER_BYTES", 2 << 20)  # 7 rows a group
    monkeypatch.setattr(fastvae.shards, "CHUNK_BYTES", 1 << 20)
    suffix = "npy" if how == "npy" else "npz"
    _save(tmp_path / f"big.{suffix}", np.ones((48_000, 1, 32, 32), np.uint8), how)  # 48 MB
    _save(tmp_path / f"small.{suffix}", np.ones((100, 1, 32, 32), np.uint8), how)
    prepare(str(tmp_path / f"small.{suffix}"), tmp_path / "warm", workers=0, progress=False)  # libraries mapped
    grown, after = [], [0]
    real = fastvae.array_prepare._release_pages

    def release(array):  # after each group's read: what the read mapped
        grown.append(_rss_file_bytes() - after[0])
        real(array)
        after[0] = _rss_file_bytes()

    gather = fastvae.array_prepare._gather

    def gathered(array, rows):  # a slice's first read counts from here (not from the writer's work)
        after[0] = _rss_file_bytes()
        return gather(array, rows)

    monkeypatch.setattr(fastvae.array_prepare, "_release_pages", release)
    monkeypatch.setattr(fastvae.array_prepare, "_gather", gathered)
    prepare(str(tmp_path / f"big.{suffix}"), tmp_path / "s", workers=0, progress=False)
    # a slice's rows span the whole file: read at once, they mapped all of it
    assert len(grown) > 1000 and max(grown) < 16 << 20, (len(grown), max(grown))


def test_converting_an_array_shows_a_progress_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    """An image folder had a bar; an array, however large, converted in silence."""
    np.save(tmp_path / "a.npy", RNG.integers(0, 256, (50, 4, 4), dtype=np.uint8))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stream
    for progress in (True, False):
        prepare(str(tmp_path / "a.npy"), tmp_path / f"s{progress}", workers=0, progress=progress)
        err = capsys.readouterr().err
        assert ("converting" in err and "/50" in err) == progress, err


def test_damaged_npz_members_are_one_line_without_reading_them_whole(tmp_path, monkeypatch, capsys):
    """A stored member shorter than its header says was mapped anyway (its last rows read from
    the next member and the zip directory); a compressed one that fails to inflate was read
    again, whole, by numpy to say so."""
    import zipfile

    from testkit import assert_one_line_error

    from fastvae.cli import main

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (100, 8, 8)})
    with zipfile.ZipFile(tmp_path / "short.npz", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("train.npy", header.getvalue() + bytes(50 * 64))  # 50 of its 100 rows
        buffer = io.BytesIO()
        np.save(buffer, np.ones((10, 8, 8), np.uint8))
        archive.writestr("test.npy", buffer.getvalue())
    rc = main(["prepare", str(tmp_path / "short.npz"), "--out", str(tmp_path / "s"), "--workers", "0"])
    assert_one_line_error(rc, capsys.readouterr().err, "not a readable .npz archive")

    monkeypatch.setattr(fastvae.npz_members, "SPILL_BYTES", 0)
    np.savez_compressed(tmp_path / "c.npz", images=RNG.integers(0, 4, (4000, 64, 64), dtype=np.uint8))  # 16 MB
    raw = bytearray((tmp_path / "c.npz").read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)  # the deflate stream broken half-way
    (tmp_path / "c.npz").write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        rc = main(["prepare", str(tmp_path / "c.npz"), "--out", str(tmp_path / "s"), "--workers", "0"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_error(rc, capsys.readouterr().err, "member 'images'")
    assert peak < 8 << 20, peak
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "short.npz"]


def test_progress_bars_end_before_an_error_and_quiet_hides_the_inflating_one(tmp_path, monkeypatch, capsys):
    from fastvae.cli import main

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stream
    monkeypatch.setattr(fastvae.array_prepare, "SLICE_BYTES", 4 * 16 * 10)  # 10 rows a slice
    bad = RNG.random((60, 4, 4)).astype(np.float32)
    bad[-1, 0, 0] = np.nan  # in the last slice: the bar is showing
    np.save(tmp_path / "nan.npy", bad)
    assert main(["prepare", str(tmp_path / "nan.npy"), "--out", str(tmp_path / "s"), "--workers", "0",
                 "--test-fraction", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "converting" in err and err.split("\r")[-1].lstrip().startswith("fastvae prepare: error"), repr(err[-300:])
    monkeypatch.setattr(fastvae.npz_members, "SPILL_BYTES", 0)
    np.savez_compressed(tmp_path / "c.npz", images=RNG.integers(0, 256, (20, 4, 4), dtype=np.uint8))
    for flags, shown in (([], True), (["--quiet"], False)):
        assert main(["prepare", str(tmp_path / "c.npz"), "--out", str(tmp_path / f"c{shown}"), "--workers", "0",
                     *flags]) == 0
        assert ("inflating c.npz:images" in capsys.readouterr().err) == shown


def test_an_npz_of_images_and_their_labels_is_split_by_label(tmp_path, capsys):
    """np.savez(f, x=images, y=labels) (or positional: arr_0, arr_1) was refused ("use keys
    'train' and 'test'"): the labels are found by shape (one integer per image), the held-out
    split stratified by them, on both paths."""
    from testkit import assert_one_line_error

    from fastvae.cli import main

    images, labels = RNG.integers(0, 256, (60, 6, 6), dtype=np.uint8), np.repeat([0, 1, 2], [30, 20, 10])
    np.savez(tmp_path / "xy.npz", y=labels, x=images)  # the labels first
    memory = load_dataset(str(tmp_path / "xy.npz"), test_fraction=0.5, split_seed=2)
    assert np.bincount(memory.test_labels.numpy()).tolist() == [15, 10, 5]
    meta, _ = prepare(str(tmp_path / "xy.npz"), tmp_path / "s", workers=0, progress=False,
                      test_fraction=0.5, split_seed=2)
    assert meta["labels"] and meta["split"] == "seeded"
    (test, test_labels), = blocks(tmp_path / "s", "test")
    assert np.array_equal(test_labels, memory.test_labels.numpy())
    assert np.array_equal(test[:, 0], (memory.test[:, 0] * 255).round().byte().numpy())
    for name, arrays in (("two_images.npz", {"a": images, "b": images}),
                         ("short_labels.npz", {"x": images, "y": labels[:-1]}),
                         ("float_labels.npz", {"x": images, "y": labels.astype(np.float32)})):
        np.savez(tmp_path / name, **arrays)
        rc = main(["prepare", str(tmp_path / name), "--out", str(tmp_path / "t"), "--workers", "0"])
        assert_one_line_error(rc, capsys.readouterr().err, "one integer per image, as a second array")
