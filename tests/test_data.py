"""Datasets: the digits split, every supported file format, and one clear error per bad input."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, TiffImagePlugin

from fastvae.data import (EpochBatches, decode_image, image_files, image_folder_files, load_dataset, probe_image, split_indices,
                          unit_pixels)
from fastvae.errors import FastVAEError

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    """IDX encoding written from the format's description: 0 0 type ndim, big-endian sizes, data."""
    header = bytes([0, 0, dtype_code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    big_endian = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    return header + array.astype(big_endian[dtype_code]).tobytes()


def write_idx(path, array, gz=False, dtype_code=0x08):
    data = idx_bytes(np.asarray(array), dtype_code)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def images_u8(n, h=6, w=5):
    return RNG.integers(0, 256, size=(n, h, w), dtype=np.uint8)


def expect_error(source, *needles):
    """``load_dataset(source)`` raises FastVAEError whose message contains every needle."""
    with pytest.raises(FastVAEError) as info:
        load_dataset(source)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    for needle in needles:
        assert str(needle).lower() in message.lower(), f"{needle!r} not in {message!r}"
    return message


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def split_rows(splits, originals) -> tuple[list[int], list[int]]:
    """The indices into ``originals`` (float rows as loaded) of the train and test rows, found
    by content (the generated rows are distinct)."""
    index = {np.asarray(row, dtype=np.float32).tobytes(): i for i, row in enumerate(originals)}
    assert len(index) == len(originals), "test data must have distinct rows"
    find = lambda part: [index[row.numpy().astype(np.float32).tobytes()] for row in part]  # noqa: E731
    return find(splits.train), find(splits.test)


def assert_held_out(splits, originals, n_test):
    """train and test partition the rows, each in the source's order, with n_test test rows."""
    train, test = split_rows(splits, originals)
    assert len(test) == n_test and sorted(train + test) == list(range(len(originals)))
    assert train == sorted(train) and test == sorted(test)
    return train, test


# ----------------------------------------------------------------------------- digits


def test_digits_split_matches_sklearn(digits):
    from sklearn.datasets import load_digits

    reference = load_digits().images.astype(np.float64) / 16.0
    assert digits.train.shape == (1500, 1, 8, 8) and digits.test.shape == (297, 1, 8, 8)
    assert digits.train.dtype == torch.float32
    assert float(digits.train.min()) >= 0.0 and float(digits.train.max()) == 1.0
    assert float(digits.test.min()) >= 0.0 and float(digits.test.max()) <= 1.0
    # no shuffle before the split: rows line up with scikit-learn's order
    np.testing.assert_allclose(digits.train[0, 0].numpy(), reference[0], atol=1e-7)
    np.testing.assert_allclose(digits.train[1499, 0].numpy(), reference[1499], atol=1e-7)
    np.testing.assert_allclose(digits.test[0, 0].numpy(), reference[1500], atol=1e-7)
    np.testing.assert_allclose(digits.test[-1, 0].numpy(), reference[1796], atol=1e-7)
    assert digits.data_shape == (1, 8, 8)
    assert digits.train_labels is not None and len(digits.train_labels) == 1500
    assert int(digits.test_labels[0]) == int(load_digits().target[1500])


def test_digits_read_as_a_file_equal_load_digits_without_importing_sklearn(monkeypatch):
    """Read from scikit-learn's wheel as a file: every pixel and label equals ``load_digits``,
    the fallback through ``load_digits`` too, and a fresh process never imports sklearn."""
    import fastvae.data
    from sklearn.datasets import load_digits

    reference = load_digits()
    pixels = torch.from_numpy(reference.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(reference.target.astype(np.int64))
    read = load_dataset("digits")
    monkeypatch.setattr(fastvae.data, "bundled_file", lambda *parts: None)
    fallback = load_dataset("digits")
    for splits in (read, fallback):
        assert torch.equal(torch.cat([splits.train, splits.test]), pixels)
        assert torch.equal(torch.cat([splits.train_labels, splits.test_labels]), labels)
    code = ("import sys; from fastvae.data import load_dataset; load_dataset('digits'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_single_idx_file_holds_out_a_seeded_tenth(tmp_path, gz):
    images = images_u8(100)
    path = write_idx(tmp_path / ("imgs.idx3-ubyte" + (".gz" if gz else "")), images, gz=gz)
    splits = load_dataset(path)
    assert splits.train.shape == (90, 1, 6, 5) and splits.test.shape == (10, 1, 6, 5)
    originals = (images[:, None] / np.float32(255.0)).astype(np.float32)
    _, test = assert_held_out(splits, originals, 10)
    assert test != list(range(90, 100))  # random, not the last rows
    assert split_rows(load_dataset(path), originals)[1] == test  # the same seed, the same split
    assert split_rows(load_dataset(path, split_seed=1), originals)[1] != test
    assert len(load_dataset(path, test_fraction=0.25).test) == 25


def test_idx_float_file(tmp_path):
    images = RNG.random((20, 4, 4)).astype(np.float32)
    splits = load_dataset(write_idx(tmp_path / "floats.idx", images, dtype_code=0x0D))
    np.testing.assert_allclose(splits.train[3, 0].numpy(), images[3], atol=1e-7)


@pytest.mark.parametrize("names", [
    ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"),
    ("train-images.idx3-ubyte", "t10k-images.idx3-ubyte", "train-labels.idx1-ubyte", "t10k-labels.idx1-ubyte"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_with_labels(tmp_path, names, gz):
    train, test = images_u8(12), images_u8(7)
    ytrain, ytest = RNG.integers(0, 10, 12, dtype=np.uint8), RNG.integers(0, 10, 7, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    for name, array in zip(names, (train, test, ytrain, ytest)):
        write_idx(tmp_path / (name + suffix), array, gz=gz)
    splits = load_dataset(tmp_path)
    assert splits.train.shape == (12, 1, 6, 5) and splits.test.shape == (7, 1, 6, 5)
    np.testing.assert_allclose(splits.test[6, 0].numpy(), test[6] / 255.0, atol=1e-7)
    assert splits.train_labels.tolist() == ytrain.tolist()
    assert splits.test_labels.tolist() == ytest.tolist()
    assert splits.train_labels.dtype == torch.int64


def test_idx_folder_without_labels(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", images_u8(5))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images_u8(3))
    splits = load_dataset(tmp_path)
    assert len(splits.train) == 5 and len(splits.test) == 3 and splits.train_labels is None


# ----------------------------------------------------------------------------- npy / npz


@pytest.mark.parametrize("shape, expected", [
    ((30, 6, 5), (1, 6, 5)),          # (N, H, W)
    ((30, 1, 6, 5), (1, 6, 5)),       # (N, C, H, W), C = 1
    ((30, 3, 4, 4), (3, 4, 4)),       # (N, C, H, W), C = 3
    ((30, 17), (1, 1, 17)),           # (N, D)
])
@pytest.mark.parametrize("kind", ["uint8", "float32", "float64"])
def test_npy_shapes_and_dtypes(tmp_path, shape, expected, kind):
    if kind == "uint8":
        array = RNG.integers(0, 256, size=shape, dtype=np.uint8)
        scaled = array.astype(np.float64) / 255.0
    else:
        array = RNG.random(shape).astype(kind)
        scaled = array.astype(np.float64)
    path = tmp_path / "data.npy"
    np.save(path, array)
    splits = load_dataset(path)
    assert splits.train.dtype == torch.float32
    assert splits.train.shape == (27, *expected) and splits.test.shape == (3, *expected)
    train, test = split_rows(splits, scaled.reshape(30, *expected).astype(np.float32))
    assert sorted(train + test) == list(range(30))


def test_npz_train_test_keys(tmp_path):
    train, test = images_u8(10), images_u8(4)
    path = tmp_path / "d.npz"
    np.savez(path, train=train, test=test)
    splits = load_dataset(path)
    assert len(splits.train) == 10 and len(splits.test) == 4
    np.testing.assert_allclose(splits.test[2, 0].numpy(), test[2] / 255.0, atol=1e-7)


def test_npz_keras_keys_with_labels(tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez_compressed(path, x_train=images_u8(10), x_test=images_u8(4),
                        y_train=np.arange(10), y_test=np.array([3, 1, 4, 1]))
    splits = load_dataset(path)
    assert splits.train_labels.tolist() == list(range(10))
    assert splits.test_labels.tolist() == [3, 1, 4, 1]


def test_npz_single_array_is_split(tmp_path):
    images = images_u8(20)
    path = tmp_path / "one.npz"
    np.savez(path, images=images)
    splits = load_dataset(path)
    assert_held_out(splits, (images[:, None] / np.float32(255.0)).astype(np.float32), 2)


def test_split_indices_are_seeded_and_stratified():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    train, test = split_indices(100, labels, 0.1, seed=7)
    assert [int((labels[test] == c).sum()) for c in range(3)] == [5, 3, 2]  # round(0.1 x count)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    assert np.array_equal(split_indices(100, labels, 0.1, seed=7)[1], test)
    assert not np.array_equal(split_indices(100, labels, 0.1, seed=8)[1], test)
    assert len(split_indices(3, None, 0.1, seed=0)[1]) == 1  # at least one test row
    with pytest.raises(FastVAEError, match="test-fraction"):
        split_indices(10, None, 1.0, seed=0)


@pytest.mark.parametrize("sizes, fraction", [([5] * 50, 0.1), ([3] * 100, 0.1), ([3] * 100, 0.5),
                                             ([1, 2, 3, 4, 7, 40, 9], 0.15), ([2] * 7 + [30], 0.3)])
def test_stratified_split_holds_out_the_fraction_of_many_small_labels(sizes, fraction):
    """Many labels of a few rows each (identities, albums): the test set is round(fraction x n)
    rows (rounding each label alone held out 1 row of 250, or 200 of 300 at 0.5), and each
    label gives floor or ceil of its own share."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    n = len(labels)
    for seed in range(3):
        train, test = split_indices(n, labels, fraction, seed)
        assert len(test) == min(max(round(fraction * n), 1), n - 1)
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
        per_label = np.bincount(labels[test], minlength=len(sizes))
        share = fraction * np.array(sizes)
        assert (per_label >= np.floor(share)).all() and (per_label <= np.ceil(share)).all()


# ----------------------------------------------------------------------------- image folders


def test_png_folder_with_class_subfolders(tmp_path):
    root = tmp_path / "imgs"
    arrays = {}
    for label in ("cat", "dog"):
        for i in range(10):
            arrays[(label, i)] = images_u8(1, 7, 9)[0]
            save_png(root / label / f"{i:02d}.png", arrays[(label, i)])
    splits = load_dataset(root)
    assert splits.train.shape == (18, 1, 7, 9) and splits.test.shape == (2, 1, 7, 9)
    # sorted order: cat/00..09, dog/00..09; stratified: one test image of each label
    originals = np.stack([arrays[k][None] / np.float32(255.0) for k in sorted(arrays)]).astype(np.float32)
    train, test = assert_held_out(splits, originals, 2)
    assert splits.test_labels.tolist() == [0, 1] and [t // 10 for t in test] == [0, 1]
    assert splits.train_labels.tolist() == [t // 10 for t in train]


def test_flat_png_folder_has_no_labels(tmp_path):
    for i in range(5):
        save_png(tmp_path / f"{i}.png", images_u8(1, 4, 4)[0])
    splits = load_dataset(tmp_path)
    assert len(splits.train) == 4 and len(splits.test) == 1 and splits.train_labels is None


def test_rgb_png_keeps_its_colour_unless_grayscale(tmp_path):
    rgbs = [RNG.integers(0, 256, size=(5, 5, 3), dtype=np.uint8) for _ in range(4)]
    for i, rgb in enumerate(rgbs):
        save_png(tmp_path / f"{i}.png", rgb)
    splits = load_dataset(tmp_path)
    assert splits.data_shape == (3, 5, 5)
    assert_held_out(splits, [(r.transpose(2, 0, 1) / np.float32(255.0)).astype(np.float32) for r in rgbs], 1)
    gray = load_dataset(tmp_path, grayscale=True)
    assert gray.data_shape == (1, 5, 5)
    luma = [np.asarray(Image.fromarray(r).convert("L"))[None] / np.float32(255.0) for r in rgbs]
    assert_held_out(gray, [x.astype(np.float32) for x in luma], 1)


# ----------------------------------------------------------------------------- bad inputs


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope.npy", "nope.npy", "does not exist")


def test_empty_file(tmp_path):
    (tmp_path / "empty.idx").write_bytes(b"")
    expect_error(tmp_path / "empty.idx", "empty.idx", "empty")


def test_wrong_idx_magic(tmp_path):
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    expect_error(path, path.name, "IDX", "magic")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx(tmp_path, gz):
    raw = idx_bytes(images_u8(10))
    path = tmp_path / ("t.idx" + (".gz" if gz else ""))
    data = raw[:-7]
    path.write_bytes(gzip.compress(data) if gz else data)
    expect_error(path, path.name, "truncated")


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(gzip.compress(idx_bytes(images_u8(50)))[:-30])
    expect_error(path, path.name)


def test_idx_sizes_longer_than_header(tmp_path):
    path = tmp_path / "long.idx"
    path.write_bytes(idx_bytes(images_u8(10)) + b"\x00" * 30)
    expect_error(path, path.name, "sizes")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_values(tmp_path, bad):
    array = RNG.random((10, 4, 4)).astype(np.float32)
    array[7, 1, 2] = bad
    np.save(tmp_path / "x.npy", array)
    expect_error(tmp_path / "x.npy", "x.npy", "NaN or Inf")


@pytest.mark.parametrize("lo, hi", [(0.0, 255.0), (-0.5, 1.0), (0.0, 1.0001)])
def test_out_of_range_floats(tmp_path, lo, hi):
    array = np.linspace(lo, hi, 10 * 16, dtype=np.float32).reshape(10, 4, 4)
    np.save(tmp_path / "x.npy", array)
    expect_error(tmp_path / "x.npy", "x.npy", "[0, 1]")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.complex64, np.uint16])
def test_wrong_dtype(tmp_path, dtype):
    np.save(tmp_path / "x.npy", np.ones((10, 4, 4), dtype=dtype))
    expect_error(tmp_path / "x.npy", "x.npy", "dtype", np.dtype(dtype).name)


@pytest.mark.parametrize("shape", [(10,), (10, 2, 4, 4), (10, 4, 4, 5), (2, 3, 1, 4, 4)])
def test_wrong_shape(tmp_path, shape):
    np.save(tmp_path / "x.npy", np.zeros(shape, dtype=np.uint8))
    expect_error(tmp_path / "x.npy", "x.npy", "shape", str(shape))


def test_too_few_examples(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 4), dtype=np.uint8))
    expect_error(tmp_path / "x.npy", "x.npy", "at least 2")


def test_object_npy_is_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "x.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    expect_error(tmp_path / "x.npy", "x.npy")


def test_mismatched_train_test_shapes(tmp_path):
    np.savez(tmp_path / "d.npz", train=images_u8(5, 6, 5), test=images_u8(3, 6, 6))
    expect_error(tmp_path / "d.npz", "d.npz", "(1, 6, 5)", "(1, 6, 6)")


def test_mismatched_idx_folder_shapes(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", images_u8(5, 6, 5))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images_u8(3, 5, 5))
    expect_error(tmp_path, tmp_path.name, "one shape")


def test_label_count_mismatch_npz(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=images_u8(5), x_test=images_u8(3),
             y_train=np.arange(4), y_test=np.arange(3))
    expect_error(tmp_path / "d.npz", "d.npz", "y_train", "5")


def test_label_count_mismatch_idx(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", images_u8(5))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images_u8(3))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(6, dtype=np.uint8))
    expect_error(tmp_path, "train-labels-idx1-ubyte", "5")


def test_idx_folder_without_test_file(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", images_u8(5))
    expect_error(tmp_path, "t10k")


def test_npz_with_unknown_keys(tmp_path):
    np.savez(tmp_path / "d.npz", a=images_u8(3), b=images_u8(3))
    expect_error(tmp_path / "d.npz", "d.npz", "'a'", "train")


def test_labels_are_top_level_folders_and_hidden_files_are_not_data(tmp_path):
    """As torchvision's ImageFolder: cat/2019/x.png and cat/2020/y.png are both "cat"; a
    .thumbs folder or a macOS ._x.png file (not an image at all) is skipped, not a label."""
    for path in ("cat/2019/a.png", "cat/2020/b.png", "cat/c.png", "dog/a.png", "dog/b.png", "dog/c.png"):
        save_png(tmp_path / path, images_u8(1, 4, 4)[0])
    save_png(tmp_path / ".thumbs" / "t.png", images_u8(1, 4, 4)[0])
    (tmp_path / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    files, labels = image_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "cat/2019/a.png", "cat/2020/b.png", "cat/c.png", "dog/a.png", "dog/b.png", "dog/c.png"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    splits = load_dataset(tmp_path, test_fraction=0.34)
    assert sorted(splits.test_labels.tolist()) == [0, 1] and len(splits.train) == 4


def test_linked_label_folders_are_followed_and_a_link_loop_ends(tmp_path):
    """As ImageFolder (os.walk followlinks): a label folder that is a link to another disk's
    folder is read; a link back to an ancestor is not walked again (no endless loop)."""
    elsewhere = tmp_path / "elsewhere" / "dog"
    for path in ("data/cat/a.png", "data/cat/b.png"):
        save_png(tmp_path / path, images_u8(1, 4, 4)[0])
    for name in ("a.png", "b.png", "c.png"):
        save_png(elsewhere / name, images_u8(1, 4, 4)[0])
    (tmp_path / "data" / "dog").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    files, labels = image_files(tmp_path / "data")
    assert [f.relative_to(tmp_path / "data").as_posix() for f in files] == [
        "cat/a.png", "cat/b.png", "dog/a.png", "dog/b.png", "dog/c.png"]
    assert labels.tolist() == [0, 0, 1, 1, 1]


def test_images_beside_label_folders_are_left_out_with_a_note(tmp_path, capsys):
    """A stray preview.png in the top folder would be label 0 and shift every real label."""
    for path in ("cat/a.png", "cat/b.png", "dog/a.png", "dog/b.png", "preview.webp"):
        save_png(tmp_path / path, images_u8(1, 4, 4)[0])
    files, labels = image_files(tmp_path)
    assert [f.name for f in files] == ["a.png", "b.png", "a.png", "b.png"] and labels.tolist() == [0, 0, 1, 1]
    err = capsys.readouterr().err
    assert "1 image(s) directly in" in err and "preview.webp" in err
    (tmp_path / "dog" / "a.png").unlink()
    (tmp_path / "dog" / "b.png").unlink()
    (tmp_path / "dog").rmdir()
    files, labels = image_files(tmp_path)  # one label folder left: unlabelled, still no stray
    assert [f.name for f in files] == ["a.png", "b.png"] and labels is None


def test_a_train_and_test_folder_keeps_its_own_split(tmp_path, capsys):
    """data/train/{cat,dog}, data/test/{cat,dog}: the published split, labels from the inner
    folders (one set of names across both), not two labels 'train' and 'test'."""
    images = {}
    for split, label, n in (("train", "cat", 4), ("train", "dog", 3), ("test", "cat", 2), ("test", "dog", 1),
                            ("train", "eel", 2)):
        for i in range(n):
            images[f"{split}/{label}/{i}.png"] = images_u8(1, 5, 5)[0]
            save_png(tmp_path / "data" / split / label / f"{i}.png", images[f"{split}/{label}/{i}.png"])
    save_png(tmp_path / "data" / "preview.png", images_u8(1, 5, 5)[0])  # not data: a note says so
    splits = load_dataset(tmp_path / "data", test_fraction=0.5)
    assert "preview.png" in capsys.readouterr().err
    expect = {s: sorted(k for k in images if k.startswith(s)) for s in ("train", "test")}
    for name, x, y in (("train", splits.train, splits.train_labels), ("test", splits.test, splits.test_labels)):
        ref = torch.stack([torch.from_numpy(images[k]).float()[None] / 255 for k in expect[name]])
        assert torch.equal(x, ref)
        assert y.tolist() == [{"cat": 0, "dog": 1, "eel": 2}[k.split("/")[1]] for k in expect[name]]
    save_png(tmp_path / "half" / "train" / "cat" / "0.png", images_u8(1, 5, 5)[0])
    save_png(tmp_path / "half" / "test" / "0.png", images_u8(1, 5, 5)[0])  # no label folders here
    expect_error(tmp_path / "half", "has label subfolders but", "neither")


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    wide = RNG.integers(0, 65536, size=(6, 7), dtype=np.uint16)
    for i in range(2):
        Image.fromarray(wide).save(tmp_path / f"{i}.png")
    assert Image.open(tmp_path / "0.png").mode.startswith("I")  # Pillow reads it as 16-bit
    decoded = decode_image(tmp_path / "0.png", 1)
    np.testing.assert_array_equal(decoded[0], (wide >> 8).astype(np.uint8))
    assert load_dataset(tmp_path).data_shape == (1, 6, 7)


def test_16_bit_files_of_8_bit_values_come_out_black_with_a_note(tmp_path, capsys):
    """16-bit PNGs holding 0-255 (or 12-bit) values are, at value / 256, black: a whole folder of
    them trained on zeros with nothing said; now one note, in memory and in prepare alike, and
    none for full-range 16-bit files."""
    from fastvae.shards import prepare

    for name, top in (("eight", 256), ("full", 65536)):
        for label in ("a", "b"):
            for i in range(3):
                path = tmp_path / name / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(RNG.integers(0, top, size=(6, 7)).astype(np.uint16)).save(path)
    capsys.readouterr()
    assert float(load_dataset(tmp_path / "eight").train.max()) == 0.0
    err = capsys.readouterr().err
    assert f"note: the brightest pixel of the images in {tmp_path / 'eight'} is 0 of 255" in err, err
    prepare(str(tmp_path / "eight"), tmp_path / "shards", workers=0, progress=False)
    assert "brightest pixel" in capsys.readouterr().err
    load_dataset(tmp_path / "full")
    prepare(str(tmp_path / "full"), tmp_path / "shards-full", workers=0, progress=False)
    for label in ("a", "b"):  # dark 8-bit images (class masks): no note
        for i in range(3):
            save_png(tmp_path / "masks" / label / f"{i}.png", RNG.integers(0, 4, (6, 7), dtype=np.uint8))
    load_dataset(tmp_path / "masks")
    assert "brightest" not in capsys.readouterr().err


def test_pillow_warnings_about_a_readable_file_are_one_note_naming_it(tmp_path, capsys, monkeypatch):
    """A TIFF whose description tag points past its end: Pillow reads the pixels and warned
    "UserWarning: Tag data larger than file" three times, two lines each, naming no file."""
    import struct

    from fastvae import image_decoding

    pixels = RNG.integers(0, 256, size=(6, 8), dtype=np.uint8)
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[270] = "a description stored after the header"
    for i in range(7):
        Image.fromarray(pixels).save(tmp_path / f"{i}.tif", tiffinfo=info)
    raw = bytearray((tmp_path / "0.tif").read_bytes())
    ifd = struct.unpack("<I", raw[4:8])[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", raw[ifd:ifd + 2])[0], 12):
        if struct.unpack("<H", raw[entry:entry + 2])[0] == 270:
            raw[entry + 4:entry + 8] = struct.pack("<I", 10**6)  # its byte count
    for i in range(7):
        (tmp_path / f"{i}.tif").write_bytes(bytes(raw))
    monkeypatch.setattr(image_decoding, "_pillow_notes", [0])
    capsys.readouterr()
    np.testing.assert_array_equal(decode_image(tmp_path / "0.tif", 1)[0], pixels)
    err = capsys.readouterr().err
    assert err == (f"note: {tmp_path / '0.tif'}: Tag data larger than file. Skipping tag 270 (Pillow; the image is "
                   "read as decoded)\n"), err
    for i in range(1, 7):
        decode_image(tmp_path / f"{i}.tif", 1)
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == image_decoding.PILLOW_NOTES - 1 and "further such notes" in notes[-1]  # then no more


def test_float_tiffs_are_read_in_their_range_not_clipped_to_black(tmp_path):
    """Pillow's mode F (32-bit float TIFF) in [0, 1] came out all black (convert("L") clips);
    [0, 1] is scaled by 255, [0, 255] rounded, anything else is one reason, not wrong pixels."""
    unit = RNG.random((6, 7), dtype=np.float32)
    Image.fromarray(unit, "F").save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    np.testing.assert_array_equal(decode_image(tmp_path / "unit.tif", 1)[0], np.round(unit.astype(np.float64) * 255))
    levels = (unit * 200 + 10).astype(np.float32)
    Image.fromarray(levels, "F").save(tmp_path / "levels.tif")
    np.testing.assert_array_equal(decode_image(tmp_path / "levels.tif", 3)[1], np.round(levels.astype(np.float64)))
    Image.fromarray(levels * 10 - 100, "F").save(tmp_path / "wide.tif")
    reason = decode_image(tmp_path / "wide.tif", 1)
    assert isinstance(reason, str) and "values in [" in reason and "8- or 16-bit" in reason


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored 6x4 with "rotate 90" in its EXIF is a 4x6 image, as viewers show it."""
    stored = RNG.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)  # (H, W, C)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    Image.fromarray(stored).save(tmp_path / "p.png", exif=exif)
    assert probe_image(tmp_path / "p.png") == (True, (4, 6))  # (width, height) as shown
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "p.png")))
    assert upright.shape == (6, 4, 3)
    np.testing.assert_array_equal(decode_image(tmp_path / "p.png", 3), upright.transpose(2, 0, 1))


def test_a_decompression_bomb_is_one_error_naming_the_file(tmp_path, monkeypatch):
    save_png(tmp_path / "a.png", images_u8(1, 4, 4)[0])
    save_png(tmp_path / "huge.png", images_u8(1, 40, 40)[0])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 1,600 pixels > 2 x the limit: an error
    assert "decompression bomb" in probe_image(tmp_path / "huge.png")
    assert "decompression bomb" in decode_image(tmp_path / "huge.png", 1)
    expect_error(tmp_path, "huge.png", "decompression bomb")


@pytest.mark.parametrize("source", ["npy", "photos"])
def test_grayscale_converts_every_in_memory_colour_source(tmp_path, source):
    if source == "npy":
        np.save(tmp_path / "rgb.npy", RNG.random((10, 3, 4, 4), dtype=np.float32))
        source = tmp_path / "rgb.npy"
    colour, gray = load_dataset(source), load_dataset(source, grayscale=True)
    assert colour.data_shape[0] == 3 and gray.data_shape == (1, *colour.data_shape[1:])
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close(gray.test, (colour.test * weights).sum(1, keepdim=True))


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    (tmp_path / "sub").mkdir()
    expect_error(tmp_path, tmp_path.name, "no images")


def test_images_of_different_sizes(tmp_path):
    save_png(tmp_path / "a.png", images_u8(1, 4, 4)[0])
    save_png(tmp_path / "b.png", images_u8(1, 4, 6)[0])
    expect_error(tmp_path, "b.png", "a.png", "one size")


@pytest.mark.parametrize("content", [b"", b"not a png at all", "truncated"])
def test_unreadable_image(tmp_path, content):
    save_png(tmp_path / "good.png", images_u8(1, 8, 8)[0])
    if content == "truncated":
        save_png(tmp_path / "zbad.png", images_u8(1, 8, 8)[0])
        raw = (tmp_path / "zbad.png").read_bytes()
        (tmp_path / "zbad.png").write_bytes(raw[: len(raw) // 2])
    else:
        (tmp_path / "zbad.png").write_bytes(content)
    expect_error(tmp_path, "zbad.png")


def test_single_image_file(tmp_path):
    save_png(tmp_path / "a.png", images_u8(1, 4, 4)[0])
    expect_error(tmp_path / "a.png", "a.png", "folder")


@pytest.mark.parametrize("corrupt", ["garbage", "truncated", "pickled"])
def test_corrupt_npz(tmp_path, corrupt):
    path = tmp_path / "d.npz"
    if corrupt == "garbage":
        path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    elif corrupt == "truncated":
        np.savez(path, train=images_u8(50), test=images_u8(10))
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    else:  # an object array inside: loading it would need pickle
        with zipfile.ZipFile(path, "w") as z:
            import io

            buf = io.BytesIO()
            np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
            z.writestr("images.npy", buf.getvalue())
    expect_error(path, "d.npz")


def test_corrupt_npy(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY garbage")
    expect_error(tmp_path / "x.npy", "x.npy")


# ----------------------------------------------------------------------------- batches


def test_epoch_batches_cover_each_row_once_and_depend_only_on_seed_and_epoch():
    data = torch.arange(103).float().unsqueeze(1)
    rows = torch.cat(list(EpochBatches(data, 10, seed=3, epoch=1)))
    assert sorted(rows.squeeze(1).tolist()) == list(range(103))
    again = torch.cat(list(EpochBatches(data, 10, seed=3, epoch=1)))
    other = torch.cat(list(EpochBatches(data, 10, seed=3, epoch=2)))
    assert torch.equal(rows, again) and not torch.equal(rows, other)
    assert len(EpochBatches(data, 10, seed=3, epoch=1)) == 11


def test_epoch_batches_shard_across_ranks():
    data = torch.arange(103).float().unsqueeze(1)
    single = EpochBatches(data, 8, seed=0, epoch=0).indices
    shards = [EpochBatches(data, 4, seed=0, epoch=0, rank=r, world_size=2).indices for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 52  # padded by wrap-around
    covered = set(torch.cat(shards).tolist())
    assert covered == set(range(103))
    # the ranks' k-th rows interleave to the single process's order
    assert torch.equal(torch.stack(shards, 1).flatten()[:103], single)


def test_split_arguments_are_checked_like_a_runs_settings():
    """load_dataset(..., test_fraction="0.1") failed inside a comparison (or was ignored for
    digits); split_seed=-1 and 1.5 were numpy's errors."""
    from fastvae.data import load_dataset
    from fastvae.errors import FastVAEError

    for kwargs, words in (({"test_fraction": "0.1"}, "'test_fraction' must be a number"),
                          ({"split_seed": -1}, "^split_seed must be an integer from 0"),  # a keyword
                          ({"test_fraction": 1.0}, "^test_fraction must be above 0 and below 1"),
                          ({"split_seed": 1.5}, "'split_seed' must be an integer")):
        with pytest.raises(FastVAEError, match=words):
            load_dataset("digits", **kwargs)
    with pytest.raises(FastVAEError, match="must be a string"):
        load_dataset(None)


def test_one_pixel_rule_for_numpy_arrays_and_tensors():
    """Files (numpy) and evaluate's tensors go through one rule: the same values, the same
    refusals in the same words."""
    pixels = np.array([[0, 128, 255]], np.uint8)
    expected = torch.tensor([[0.0, 128 / 255, 1.0]])
    for data in (pixels, torch.from_numpy(pixels)):
        assert torch.equal(unit_pixels(data, "x"), expected)
    for dtype in (np.float16, np.float64, np.longdouble):  # torch has no float128
        out = unit_pixels(np.array([0.25, 1.0], dtype), "x")
        assert out.dtype == torch.float32 and out.tolist() == [0.25, 1.0]
    assert unit_pixels(np.array([True, False]), "x").tolist() == [1.0, 0.0]
    read_only = np.frombuffer(pixels.tobytes(), np.uint8).reshape(1, 3)  # as IDX files are read
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warned about non-writable arrays: a stray stderr line
        assert torch.equal(unit_pixels(read_only, "x"), expected)
    for bad, words in ((np.array([1, 2], np.int64), "x has dtype int64: use uint8 pixels"),
                       (np.array([0.5, np.nan], np.float32), "x contains NaN or Inf"),
                       (np.array([0.5, np.inf]), "x contains NaN or Inf"),
                       (np.array([-0.5, 2.0], np.float32), r"x has values in \[-0.5, 2\]: float data"),
                       (np.array([0.5, 1e300]), r"x has values in \[0.5, 1e\+300\]")):  # not "Inf" (float32's)
        for data in (bad, torch.from_numpy(bad)):
            with pytest.raises(FastVAEError, match=words):
                unit_pixels(data, "x")
    with pytest.raises(FastVAEError, match="x has dtype <U1"):
        unit_pixels(np.array(["a"]), "x")


def test_every_exif_orientation_for_jpeg_png_and_webp_and_a_large_jpeg_drafted(tmp_path):
    """All 8 orientations as Pillow's exif_transpose shows them (the independent reference), in
    every format that carries EXIF; a JPEG large enough to be decoded at a reduced DCT scale
    (with --size) is turned the same way and stays within ~1 grey level of a full decode."""
    from fastvae.image_decoding import fit_image

    stored = np.asarray(Image.fromarray(RNG.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)).resize((60, 40)))
    for suffix in (".jpg", ".png", ".webp"):
        for turn in range(1, 9):
            exif = Image.Exif()
            exif[0x0112] = turn
            path = tmp_path / f"o{turn}{suffix}"
            Image.fromarray(stored).save(path, exif=exif, **({"quality": 95} if suffix != ".png" else {}))
            with Image.open(path) as img:
                upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
            h, w = upright.shape[:2]
            assert probe_image(path) == (True, (w, h)), (suffix, turn)
            np.testing.assert_array_equal(decode_image(path, 3), upright.transpose(2, 0, 1), err_msg=f"{suffix} {turn}")
    smooth = np.asarray(Image.fromarray(RNG.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).resize((1600, 1200),
                                                                                                   Image.Resampling.BICUBIC))
    for turn in (1, 6):
        exif = Image.Exif()
        exif[0x0112] = turn
        Image.fromarray(smooth).save(tmp_path / f"big{turn}.jpg", exif=exif, quality=95)
        with Image.open(tmp_path / f"big{turn}.jpg") as img:  # full decode, turned, fitted
            full = np.asarray(fit_image(ImageOps.exif_transpose(img).convert("RGB"), 64)).transpose(2, 0, 1)
        drafted = decode_image(tmp_path / f"big{turn}.jpg", 3, 64)
        assert drafted.shape == full.shape == (3, 64, 64)
        assert np.abs(drafted.astype(float) - full).mean() < 1.5, turn


def test_a_damaged_exif_block_keeps_the_image_as_stored(tmp_path):
    """Pillow's exif_transpose raised struct.error (a traceback through --skip-bad) on an EXIF
    block with a mistyped tag; the image is read as stored, upright by what can be read."""
    import io

    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Canon"
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)).save(buffer, format="JPEG", exif=exif)
    # tag 0x0121 (FreeByteCounts, a LONG) stored as ASCII text
    (tmp_path / "odd.jpg").write_bytes(buffer.getvalue().replace(b"\x01\x0f\x00\x02", b"\x01\x21\x00\x02", 1))
    probe = probe_image(tmp_path / "odd.jpg")
    decoded = decode_image(tmp_path / "odd.jpg", 3)
    assert not isinstance(decoded, str) and decoded.shape[1:] == probe[1][::-1]


def test_tiff_jfif_read_other_formats_and_broken_links_named(tmp_path, capsys):
    """.tif/.tiff/.jfif/.jpe were dropped without a word (a label folder of TIFFs vanished,
    shifting the labels after it); other formats Pillow knows and broken links get a note."""
    formats = {"a/x.tif": "TIFF", "a/y.tiff": "TIFF", "b/x.jfif": "JPEG", "b/y.jpe": "JPEG", "c/x.png": "PNG"}
    for i, (name, fmt) in enumerate(formats.items()):
        (tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6), 40 * i, np.uint8)).save(tmp_path / "d" / name, format=fmt)
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "d" / "c" / "icon.ico")
    (tmp_path / "d" / "c" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    files, labels = image_files(tmp_path / "d")
    assert [f.relative_to(tmp_path / "d").as_posix() for f in files] == list(formats)
    assert labels.tolist() == [0, 0, 1, 1, 2]
    err = capsys.readouterr().err
    assert "1 file(s) of image formats fastvae does not read (e.g. icon.ico" in err and "1 broken link(s)" in err
    splits = load_dataset(tmp_path / "d", test_fraction=0.4)
    assert splits.data_shape == (1, 6, 6)
    assert sorted(round(float(x.mean()) * 255) for x in (*splits.train, *splits.test)) == [0, 40, 80, 120, 160]


@pytest.mark.parametrize("held", [("val",), ("validation",), ("val", "test")])
def test_a_train_and_val_folder_keeps_its_split_and_its_labels(tmp_path, capsys, held):
    """data/train/{cat,dog} + data/val/{cat,dog} (the ImageNet layout) became two labels
    'train' and 'val', the published validation images mixed into training."""
    for split, n in (("train", 3), *((name, 1) for name in held)):
        for label in ("cat", "dog"):
            for i in range(n):
                save_png(tmp_path / "data" / split / label / f"{i}.png", images_u8(1, 5, 5)[0])
    folder = image_folder_files(tmp_path / "data")
    assert folder.label_names == ["cat", "dog"] and folder.labels.tolist() == [0, 0, 0, 1, 1, 1, 0, 1]
    assert folder.is_test.tolist() == [False] * 6 + [True] * 2
    held_out = "test" if "test" in held else held[0]
    assert all(f.relative_to(tmp_path / "data").parts[0] == held_out for f, t in zip(folder.files, folder.is_test) if t)
    err = capsys.readouterr().err
    assert ("val is not used: fastvae holds out one split, test/" in err) == (len(held) > 1), err
    splits = load_dataset(tmp_path / "data")
    assert len(splits.test) == 2 and sorted(splits.test_labels.tolist()) == [0, 1]


def test_train_and_test_folders_beside_others_are_still_the_split(tmp_path, capsys):
    """STL-10's layout, train/ + test/ + unlabeled/: rule 3 read the three as labels (the
    published test images trained on, no word said); rule 4 holds out test/ and names the
    folder it leaves out. Runs made under rule 3 read it as they did."""
    for split, n in (("train", 4), ("test", 2), ("unlabeled", 3)):
        for label in ("cat", "dog"):
            for i in range(n):
                save_png(tmp_path / "data" / split / label / f"{i}.png", images_u8(1, 5, 5)[0])
    capsys.readouterr()
    today = load_dataset(tmp_path / "data")
    assert (len(today.train), len(today.test)) == (8, 4) and not today.held_out
    assert sorted(today.test_labels.tolist()) == [0, 0, 1, 1]
    err = capsys.readouterr().err
    assert "unlabeled/ in" in err and "is not used" in err and "train/ and test/ are the dataset's split" in err
    before = load_dataset(tmp_path / "data", split_rule=3, test_fraction=0.5)
    assert before.held_out and len(before.train) + len(before.test) == 18  # labels test/train/unlabeled


def test_runs_made_under_rule_2_read_a_folder_as_they_did(tmp_path):
    """The folder reading of rule 3 (TIFF and other new suffixes, train/ + val/ as a split) would
    give a run made before it other images and another split on --resume or evaluate: rules 1
    and 2 keep reading PNG/JPEG/BMP/GIF/WebP only, and train/ + val/ as two labels."""
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            save_png(tmp_path / "data" / split / "cat" / f"{i}.png", images_u8(1, 5, 5)[0])
    Image.fromarray(images_u8(1, 5, 5)[0]).save(tmp_path / "data" / "train" / "cat" / "x.tif")
    today = load_dataset(tmp_path / "data")
    assert len(today.train) == 5 and len(today.test) == 2 and not today.held_out  # val/ is the test split
    before = load_dataset(tmp_path / "data", split_rule=2, test_fraction=0.5)
    assert before.held_out and len(before.train) + len(before.test) == 6  # no .tif, labels train/val
    assert sorted(before.train_labels.tolist() + before.test_labels.tolist()) == [0, 0, 0, 0, 1, 1]
