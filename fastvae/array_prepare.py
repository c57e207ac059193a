"""Array sources (.npy, .npz, MNIST IDX, the bundled data) for ``fastvae prepare``, a slice at
a time: a .npy or an uncompressed IDX file is memory-mapped, so preparing a file larger than
memory holds about one slice of it (``SLICE_BYTES`` as float32) plus its labels. The rows,
checks and pixels are those of ``fastvae.data``'s in-memory loader: the same split
(``split_indices``), values x in [0, 1] stored as round(255 x), train rows in a seeded order.
An .npz member is memory-mapped in place, or, compressed, inflated to disk once
(``fastvae.npz_members``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastvae.errors import FastVAEError

# float32 bytes of one slice: the rows converted, checked and written together
SLICE_BYTES = 32 << 20


@dataclass
class ArrayRows:
    """The rows ``rows`` (in write order) of ``array`` as stored; labels per row of ``array``."""

    array: np.ndarray
    rows: np.ndarray
    labels: np.ndarray | None
    path: Path
    key: str | None = None
    grid: int | None | str = "scan"  # the pixels' grid if the source declares it, else scanned


def array_pieces(source: str, size, grayscale: bool, test_fraction: float, split_seed: int,
                 spill_dir: Path | None = None, progress: bool = True):
    """``(pieces, info)`` for ``fastvae.shards.write_dataset``: per split an iterable of
    ``(uint8 images, int64 labels)`` slices; ``info`` has the shape, whether there are labels,
    the split ("own" or "seeded") and the pixels' grid (``pixel_grid``, see ``GridScan``).
    ``spill_dir``: where a large compressed .npz member is inflated (on disk, unlinked);
    ``progress``: a bar of images converted (on a terminal)."""
    from fastvae.data import is_bundled

    train, test, own = _open(source, test_fraction, split_seed, spill_dir, progress)
    train.rows = train.rows[np.random.default_rng(split_seed).permutation(len(train.rows))]
    shape = _image_shape(train)
    if size is not None and train.array.ndim == 2:  # (N, D) rows are 1 x D "images"
        raise FastVAEError(f"--size {size}: {source} holds rows of {shape[2]} values, not images: "
                           "prepare it without --size (or save it as (N, H, W) images)")
    scan = GridScan()
    convert = _Converter(shape, size, grayscale, scan)
    channels = 1 if grayscale else shape[0]
    side = (size, size) if size is not None else shape[1:]
    info = {"shape": [channels, *side], "labels": train.labels is not None,
            "split": "own" if own else "seeded", "skipped": 0}
    pieces = _ArrayPieces({"train": train, "test": test}, convert, info, quantized_note=(
        None if is_bundled(source) else source), progress=progress)
    return pieces, info


def _open(source: str, test_fraction: float, split_seed: int, spill_dir: Path | None,
          progress: bool) -> tuple[ArrayRows, ArrayRows, bool]:
    """(train, test, whether the split is the source's own) for a non-folder source."""
    from fastvae import data

    path = Path(source)
    if data.is_bundled(source) or (path.is_dir() and data._find_idx(path, "train") is not None):
        splits = data.load_dataset(source) if data.is_bundled(source) else None
        if splits is not None:  # small: the package's own, already float in [0, 1]
            def whole(images, labels):
                labels = None if labels is None else labels.numpy()
                return ArrayRows(images.numpy(), np.arange(len(images)), labels, path)

            train, test = whole(splits.train, splits.train_labels), whole(splits.test, splits.test_labels)
            train.grid = test.grid = splits.pixel_grid  # declared by the source (crops of 8-bit photos)
            return train, test, True
        return (*idx_folder_rows(path), True)
    if not path.exists():
        data.load_dataset(source)  # its error: what is missing, what to give
    if path.stat().st_size == 0:
        raise FastVAEError(f"data file {path} is empty")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return npz_rows(path, test_fraction, split_seed, spill_dir=spill_dir, progress=progress)
    if suffix in data.IMAGE_SUFFIXES:
        raise FastVAEError(f"data {path} is a single image: give the folder that holds the images")
    array = _load_npy(path) if suffix == ".npy" else data.read_idx(path, mmap=True)
    return (*_held_out(array, None, path, None, test_fraction, split_seed), False)


def _held_out(array, labels, path: Path, key, test_fraction: float, split_seed: int,
              split_rule: int | None = None):
    """(train, test) rows of one array: ``split_indices``' seeded, stratified split."""
    from fastvae.data import SPLIT_RULE, split_indices

    _check_rows(array, path, key)
    if len(array) < 2:
        raise FastVAEError(f"data {path} has {len(array)} example(s): need at least 2 (train and test)")
    train, test = split_indices(len(array), labels, test_fraction, split_seed, split_rule or SPLIT_RULE)
    return ArrayRows(array, train, labels, path, key), ArrayRows(array, test, labels, path, key)


def _whole(array, path: Path, key=None, labels=None, labels_path: Path | None = None,
           labels_key=None) -> ArrayRows:
    """All rows of an array that is a split of its own (labels named by their own file)."""
    from fastvae.data import _labels

    _check_rows(array, path, key)
    if labels is not None:
        labels = _labels(labels, len(array), labels_path or path, labels_key).numpy()
    return ArrayRows(array, np.arange(len(array)), labels, path, key)


def _same_shape(train: ArrayRows, test: ArrayRows) -> tuple[ArrayRows, ArrayRows]:
    if _image_shape(train) != _image_shape(test):
        raise FastVAEError(f"data {train.path}: train images are {_image_shape(train)} but test images "
                           f"are {_image_shape(test)}: both splits need one shape")
    return train, test


def idx_folder_rows(folder: Path) -> tuple[ArrayRows, ArrayRows]:
    """The train and test files of an MNIST IDX folder (memory-mapped) and their labels."""
    from fastvae.data import IDX_NAMES, _find_idx, read_idx

    parts = {key: _find_idx(folder, key) for key in IDX_NAMES}
    if parts["test"] is None:
        raise FastVAEError(
            f"data folder {folder} has {parts['train'].name} but no t10k-images-idx3-ubyte[.gz]: "
            "add the test file, or give the single train file as --data to split it"
        )
    splits = []
    for key in ("train", "test"):
        labels = parts[f"{key}_labels"]
        splits.append(_whole(read_idx(parts[key], mmap=True), parts[key],
                             labels=None if labels is None else read_idx(labels), labels_path=labels))
    return _same_shape(splits[0], splits[1])


def npz_rows(path: Path, test_fraction: float, split_seed: int, split_rule: int | None = None,
             spill_dir: Path | None = None, progress: bool = True) -> tuple[ArrayRows, ArrayRows, bool]:
    """An .npz's train and test arrays (keys train/test or x_train/x_test, labels beside them),
    or the seeded split of its one array (with its labels: a second array of one integer per
    image, under any key); and whether the split is its own. Image arrays are
    ``fastvae.npz_members.member_array``s (memory-mapped where stored; ``spill_dir``: see there)."""
    from fastvae.data import _labels
    from fastvae.npz_members import member_array

    try:
        npz = np.load(path, allow_pickle=False)
        files = list(npz.files)
    except Exception as exc:  # zipfile/pickle/format errors all mean the same thing to a user
        raise FastVAEError(f"data file {path} is not a readable .npz archive: {exc}") from None
    with npz:
        def member(key, images=True):
            try:
                return member_array(npz, key, path, spill_dir, progress) if images else npz[key]
            except FastVAEError:  # said in full already (no room to inflate it, a damaged member)
                raise
            except Exception as exc:
                raise FastVAEError(f"data file {path} is not a readable .npz archive: {exc}") from None

        for train_key, test_key, ytr, yte in (("train", "test", "train_labels", "test_labels"),
                                              ("x_train", "x_test", "y_train", "y_test")):
            if train_key in files and test_key in files:
                train = _whole(member(train_key), path, train_key,
                               member(ytr, False) if ytr in files else None, labels_key=ytr)
                test = _whole(member(test_key), path, test_key,
                              member(yte, False) if yte in files else None, labels_key=yte)
                return (*_same_shape(train, test), True)
        if len(files) == 1:
            return (*_held_out(member(files[0]), None, path, files[0], test_fraction, split_seed,
                               split_rule), False)
        labelled = _images_and_labels(npz, files)
        if labelled is not None:  # np.savez(f, x=images, y=labels), or (f, images, labels): arr_0, arr_1
            images, labels = member(labelled[0]), member(labelled[1], False)
            labels = _labels(labels, len(images), path, labelled[1]).numpy()
            return (*_held_out(images, labels, path, labelled[0], test_fraction, split_seed, split_rule), False)
    raise FastVAEError(f"data file {path} holds arrays {sorted(files)}: use keys 'train' and 'test' "
                       "(or 'x_train' and 'x_test'), or save a single array (with its labels: one "
                       "integer per image, as a second array)")


def _images_and_labels(npz, files: list[str]) -> tuple[str, str] | None:
    """(images key, labels key) of a two-array .npz whose one array holds an integer per row of
    the other (read from the headers alone), else None."""
    from fastvae.npz_members import member_header

    if len(files) != 2:
        return None
    headers = {key: member_header(npz, key) for key in files}
    if None in headers.values():
        return None
    found = [(images, labels) for images, labels in (files, files[::-1])
             if len(headers[labels][0]) in (1, 2) and headers[labels][0][1:] in ((), (1,)) and headers[labels][2].kind in "iu"
             and len(headers[images][0]) >= 2 and headers[images][0][0] == headers[labels][0][0]]
    return found[0] if len(found) == 1 else None


def _load_npy(path: Path) -> np.ndarray:
    from fastvae.data import _load_array

    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # not mappable (an object array, no .npy at all): the loader's error
        return _load_array(path)


def _check_rows(array, path: Path, key) -> None:
    """The in-memory loader's checks that need no values: shape, not empty, dtype."""
    from fastvae.data import data_where, image_shape, unit_pixels

    where = data_where(path, key)
    image_shape(array.shape, where)
    unit_pixels(np.asarray(array[:0]), where)  # the dtype: no rows read


def _image_shape(split: ArrayRows) -> tuple[int, int, int]:
    from fastvae.data import data_where, image_shape

    return image_shape(split.array.shape, data_where(split.path, split.key))


class GridScan:
    """The grid k / L that all pixels seen so far lie on: 255 for uint8, 1 for bool, for floats
    the smallest L of ``PIXEL_GRIDS`` every value is on (None: none). Unlike
    ``fastvae.data.source_grid``, splits stored on different grids (binary train, 8-bit test)
    get the finest one they share rather than none: what the prepared uint8 pixels stand for."""

    def __init__(self):
        from fastvae.data import PIXEL_GRIDS

        self.candidates = list(PIXEL_GRIDS)

    def update(self, values: np.ndarray) -> None:
        from fastvae.data import _grid_of

        if not np.issubdtype(values.dtype, np.floating):
            fixed = _grid_of(values)
            self.candidates = [g for g in self.candidates if g == fixed]
            return
        from fastvae.data import _on_grid

        flat = values.reshape(-1)
        self.candidates = [g for g in self.candidates
                           if _on_grid(flat[:4096], g) and _on_grid(flat, g)]  # a cheap look first

    @property
    def grid(self) -> int | None:
        return min(self.candidates) if self.candidates else None


class _Converter:
    """Rows as stored -> uint8 (C, H, W) images as the writer takes them."""

    def __init__(self, shape, size, grayscale: bool, scan: GridScan):
        self.shape, self.size, self.grayscale, self.scan = shape, size, grayscale, scan
        self.off_8bit = False  # float pixels that 8 bits do not hold exactly

    def __call__(self, raw: np.ndarray, path: Path, key) -> np.ndarray:
        from fastvae.data import _as_images, channels_first

        self.scan.update(raw)
        raw = channels_first(raw)
        if raw.dtype == np.uint8:
            x = np.ascontiguousarray(raw).reshape(len(raw), *self.shape)
        else:  # checked (NaN, range) and scaled as the in-memory loader does
            scaled = _as_images(raw, path, key).numpy() * 255.0
            x = scaled.round()
            self.off_8bit = self.off_8bit or bool(np.abs(scaled - x).max(initial=0.0) > 1e-3)
            x = x.astype(np.uint8)
        if self.grayscale and x.shape[1] == 3:  # ITU-R 601 luma, as Pillow's convert("L")
            wide = x.astype(np.uint32)
            x = ((wide[:, 0] * 299 + wide[:, 1] * 587 + wide[:, 2] * 114 + 500) // 1000).astype(np.uint8)[:, None]
        if self.size is not None:
            x = _fit(x, self.size)
        return x


def _fit(x: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    from fastvae.image_decoding import fit_image

    mode = "L" if x.shape[1] == 1 else "RGB"
    fitted = [np.asarray(fit_image(Image.fromarray(i[0] if mode == "L" else i.transpose(1, 2, 0), mode), size))
              for i in x]
    return np.stack([f[None] if f.ndim == 2 else f.transpose(2, 0, 1) for f in fitted])


def _release_pages(array: np.ndarray) -> None:
    """Drop a memory map's pages read so far from this process (the system's file cache keeps
    them): they count as its resident memory, which then grew with the file read."""
    import mmap

    mapped = getattr(array, "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


# what one gather from a memory map may leave mapped: each row read maps its own pages and the
# kernel's read-around beside them (~300 KiB a row measured: large page-cache folios on a
# disk with 8 MiB read-ahead), however small the row
GATHER_BYTES = 16 << 20
_ROW_WINDOW = 256 << 10


def _gather(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``, read in file order (a memory map reads forward) a few rows at a time,
    each group's pages released (``_release_pages``) before the next: rows spread over a whole
    file mapped most of it at once (a 921 MB .npy prepared in 1.2 GB, 0.48 GB now)."""
    order = np.argsort(rows, kind="stable")
    raw = np.empty((len(rows), *array.shape[1:]), array.dtype)
    step = max(1, GATHER_BYTES // (array[:1].nbytes + _ROW_WINDOW))
    for start in range(0, len(rows), step):
        group = order[start:start + step]
        raw[group] = array[rows[group]]
        _release_pages(array)
    return raw


class _ArrayPieces(dict):
    """Each split's slices, read, converted and yielded one at a time; ``info["pixel_grid"]``
    is final once both splits are consumed."""

    def __init__(self, splits: dict, convert: _Converter, info: dict, quantized_note: str | None,
                 progress: bool = True):
        from fastvae.progress_bars import progress_bar

        super().__init__(splits)
        self.convert, self.info, self.quantized_note = convert, info, quantized_note
        self.done = set()
        self.bar = progress_bar(total=sum(len(split.rows) for split in splits.values()), desc="converting",
                                unit="img", leave=False, mininterval=0.5,
                                disable=None if progress else True)  # None: only on a terminal

    def __getitem__(self, name):
        split: ArrayRows = dict.__getitem__(self, name)
        row_bytes = 4 * int(np.prod(split.array.shape[1:]))
        per = max(1, SLICE_BYTES // max(row_bytes, 1))
        try:
            for start in range(0, len(split.rows), per):
                rows = split.rows[start:start + per]
                raw = _gather(split.array, rows)
                labels = (np.full(len(rows), -1, np.int64) if split.labels is None
                          else split.labels[rows].astype(np.int64))
                yield self.convert(raw, split.path, split.key), labels
                self.bar.update(len(rows))
        except BaseException:  # an error's line must not land on the bar's
            self.close()
            raise
        self.done.add(name)
        if len(self.done) == len(self):
            self._finish()

    def close(self) -> None:
        """End the progress bar (the writer calls this on its own errors too)."""
        self.bar.close()

    def _finish(self) -> None:
        import sys

        self.close()
        declared = dict.__getitem__(self, "train").grid
        grid = self.convert.scan.grid if declared == "scan" else declared
        # the grid the stored pixels stand for: the source's where it has one (the digits' 16
        # levels stored as the nearest k / 255 are still 16 levels), else 8 bits
        self.info["pixel_grid"] = grid if grid is not None else 255
        if self.quantized_note and self.convert.off_8bit:
            print(f"note: {self.quantized_note} holds float pixels that 8 bits do not hold exactly: "
                  "the prepared dataset stores the nearest k / 255 (within 0.002); train on the "
                  "file itself to keep them", file=sys.stderr)
