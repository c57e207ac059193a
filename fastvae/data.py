"""Datasets as float32 tensors (N, C, H, W) in [0, 1], split into train and test.

Sources (``load_dataset(source)``):
- ``digits``: scikit-learn's bundled 8x8 digits / 16; train = rows 0-1499, test = 1500-1796.
- ``photos`` / ``photos:64``: colour crops of bundled photos, test from other photos (fastvae.photos).
- an MNIST-format IDX file (raw or .gz), or a folder holding the usual
  ``train-images-idx3-ubyte`` / ``t10k-images-idx3-ubyte`` (+ labels) names;
- ``.npy`` (N, H, W), (N, C, H, W) or (N, D); ``.npz`` with ``train``/``test`` (or Keras-style
  ``x_train``/``x_test``, labels ``y_*``/``*_labels``), a single array, or one array and its
  labels (a second array of one integer per image, any key);
- a folder of images (PNG/JPEG/BMP/GIF/WebP/TIFF/Netpbm, one size; subfolders name the labels), in colour
  (3 channels) when any image has colour, unless ``grayscale``;
- a dataset written by ``fastvae prepare`` (a folder or URL): returned as a
  ``fastvae.shards.ShardDataset`` whose splits are streamed, never loaded whole.
Where a source has no split of its own (all but digits, photos, an IDX folder, an .npz with
train and test arrays and a prepared dataset), ``split_indices`` holds out a seeded random ``test_fraction`` of
the rows, stratified by label where there are labels; ``fastvae prepare`` uses the same rule,
so both paths hold out the same examples. Every problem raises ``FastVAEError`` naming the
file and what is wrong.
"""

from __future__ import annotations

import gzip
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fastvae.bundled import bundled_file
from fastvae.config import SPLIT_RULE, SPLIT_RULES
from fastvae.errors import FastVAEError, one_line
from fastvae.image_decoding import IMAGE_SUFFIXES, WIDE_GRAY_MODES, _image_errors, _quiet_pillow, decode_image, probe_image
from fastvae.photos import is_photos, load_photos

# subfolder names that hold a dataset's own held-out split beside train/ (the first present is used)
HELD_OUT_NAMES = ("test", "val", "valid", "validation")
# what split rules 1 and 2 read (a run made with them resumes on the same images and split)
RULE2_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
RULE2_HELD_OUT_NAMES = ("test",)
# raster formats Pillow may open that the note names when a folder holds them (not documents,
# videos or science formats that share a folder with images: .h5, .mpg, .eps, .fits, ...)
OTHER_IMAGE_SUFFIXES = frozenset({".avif", ".heic", ".heif", ".ico", ".icns", ".psd", ".tga", ".pcx", ".dds",
                                  ".jp2", ".j2k", ".jpx", ".sgi", ".rgb", ".xbm", ".xpm", ".qoi", ".dib", ".jxl"})


class FolderRule(NamedTuple):
    """What an image folder holds under a split rule: the files read, the held-out folder names."""

    suffixes: frozenset
    held_out_names: tuple
    others_beside_split: bool = False  # train/ + test/ beside other folders: still the split


def folder_rule(rule: int = SPLIT_RULE) -> FolderRule:
    if rule >= 3:
        return FolderRule(IMAGE_SUFFIXES, HELD_OUT_NAMES, others_beside_split=rule >= 4)
    return FolderRule(RULE2_IMAGE_SUFFIXES, RULE2_HELD_OUT_NAMES)
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


@dataclass
class Splits:
    """Train and test images (float32, (N, C, H, W), in [0, 1]) and optional int64 labels."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    held_out: bool = False  # the test split was cut by --test-fraction / --split-seed (not the source's own)
    from_path: bool = False  # read from a file or folder by ``load_dataset`` (not bundled, not a program's)
    content_id: str | None = None  # ``content_id``, once a run has computed it (on its own copy)
    # the pixels' grid k / L as the source stores them (255: 8-bit, 16: the digits; None: none;
    # "unknown": made by a program, looked for in the values when needed, see ``data_grid``)
    pixel_grid: int | None | str = "unknown"

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])


# why --test-fraction 0 (or 1) is refused, and what to do instead
TEST_SPLIT_NEEDED = ("every run evaluates on held-out examples; to train on all of your data, give it "
                     "its own test split (a folder holding just train/ and test/, an .npz with train and "
                     "test arrays) or use a small fraction")


def load_dataset(source: str | Path = "digits", *, test_fraction: float = 0.1, split_seed: int = 0,
                 grayscale: bool = False, split_rule: int = SPLIT_RULE):
    """Load ``digits`` or a path (IDX file/folder, .npy, .npz, image folder), validated; a
    prepared dataset (``fastvae prepare``) is opened for streaming instead. ``test_fraction``,
    ``split_seed`` and ``split_rule`` (``split_indices``) make the held-out split of sources
    without one; ``grayscale`` converts colour images to one channel (a prepared dataset is
    read as it was written: refused)."""
    from fastvae.config import TrainConfig, keyword_spelling

    # the rules of the same settings of a run ("0.1" failed inside a comparison), named as the
    # keywords a program gave (the command line checked its flags before)
    try:
        TrainConfig(data=source, test_fraction=test_fraction, split_seed=split_seed, grayscale=grayscale,
                    split_rule=split_rule).validate()
    except FastVAEError as exc:
        raise FastVAEError(keyword_spelling(str(exc))) from None
    source = os.fspath(source)
    data = _load(source, (test_fraction, split_seed, split_rule), grayscale)
    if grayscale and data.data_shape[0] == 3:
        if not isinstance(data, Splits):
            raise FastVAEError(f"--grayscale: {source} was prepared in colour, and a prepared dataset "
                               "is read as it was written: prepare it again with 'fastvae prepare SRC "
                               "--out SHARDS --grayscale', or train without --grayscale")
        data = _luma(data)
    if isinstance(data, Splits) and not is_bundled(source):  # bundled data is the package's own
        data.from_path = True  # a run records its digest (shards.dataset_id)
    return data


def content_id(splits: Splits) -> str:
    """A digest of the splits as read (images, labels, which rows are held out): a run records
    it, so a resume (or evaluate) on a folder or file that changed since (images added, removed
    or edited) is refused instead of silently mixing its new test split with trained images."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for t in (splits.train, splits.test, splits.train_labels, splits.test_labels):
        t = None if t is None else torch.as_tensor(t).detach().cpu().contiguous()
        digest.update(repr(None if t is None else (str(t.dtype), tuple(t.shape))).encode())
        if t is not None and t.numel():  # its bytes, whatever the dtype (bf16 has no numpy type)
            digest.update(memoryview(t.flatten().view(torch.uint8).numpy()))
    return "content:" + digest.hexdigest()


def test_fraction_error(value) -> FastVAEError:
    """The one refusal of a --test-fraction outside (0, 1), with what to do instead."""
    return FastVAEError(f"--test-fraction must be above 0 and below 1, got {value!r}: {TEST_SPLIT_NEEDED}")


def absolute_source(source: str) -> str:
    """A local path as an absolute one (config.json, --json output and picture stamps name the
    same data the same way from any folder); bundled names and URLs as they are."""
    if is_bundled(source) or "://" in str(source) or not Path(source).exists():
        return str(source)
    return str(Path(source).resolve())


def is_bundled(source) -> bool:
    """Whether ``source`` names bundled data (``digits``, ``photos``, ``photos:N``): those names
    mean the bundled data everywhere, even where a folder of that name exists."""
    return str(source) == "digits" or is_photos(source)


def note_shadowed_folder(source) -> None:
    """One note when a bundled name (``digits``, ``photos``) is also a path here."""
    if is_bundled(source) and Path(str(source)).exists():
        print(f"note: '{source}' means the bundled data; give ./{source} for the path of that name",
              file=sys.stderr)


def _load(source, split: tuple[float, int, int], grayscale: bool):
    if str(source) == "digits":
        return _digits()
    if is_photos(source):  # bundled colour photo crops (fastvae.photos)
        return load_photos(str(source))
    from fastvae.shards import looks_prepared, open_dataset

    if looks_prepared(str(source)):
        return open_dataset(str(source))
    path = Path(source)
    if not path.exists():
        raise FastVAEError(
            f"data {path} does not exist: give 'digits', 'photos' or a path to an MNIST IDX file or "
            "folder, .npy/.npz, a folder of images or a prepared dataset"
        )
    if path.is_dir():
        if _find_idx(path, "train") is not None:
            return _idx_folder(path)
        return _image_folder(path, split, grayscale)
    if path.stat().st_size == 0:
        raise FastVAEError(f"data file {path} is empty")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _split(path.name, _load_array(path), None, path, split)
    if suffix == ".npz":
        return _npz(path, split)
    if suffix in IMAGE_SUFFIXES:
        raise FastVAEError(f"data {path} is a single image: give the folder that holds the images")
    return _split(path.name, read_idx(path), None, path, split)


def _luma(splits: Splits) -> Splits:
    """Colour splits as one channel, L = 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2, what
    Pillow's ``convert("L")`` computes for image folders)."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def gray(images):
        return (images * weights).sum(1, keepdim=True)

    # the source's grid stays the bins' width (its luma values lie between its levels)
    return Splits(splits.name, gray(splits.train), gray(splits.test), splits.train_labels,
                  splits.test_labels, splits.held_out, pixel_grid=splits.pixel_grid)


def _digits() -> Splits:
    """scikit-learn's ``digits.csv.gz`` (64 pixels 0..16, then the label, per row: what
    ``load_digits`` reads), read as a file: importing scikit-learn would cost ~1.5 s."""
    path = bundled_file("sklearn", "datasets", "data", "digits.csv.gz")
    if path is not None:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:  # a scikit-learn that keeps it elsewhere (or none: then its ImportError)
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels, target = digits.images, digits.target
    images = torch.from_numpy(pixels.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(target.astype(np.int64))
    return Splits("digits", images[:1500], images[1500:], labels[:1500], labels[1500:], pixel_grid=16)


def read_idx(path: Path, mmap: bool = False) -> np.ndarray:
    """Read an IDX file (raw or gzip): magic 0x00 0x00 dtype ndim, big-endian sizes, data.
    ``mmap``: a raw file is memory-mapped (read when its rows are), not read whole."""
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rb") as f:
            if mmap and opener is open:
                raw, total = f.read(4 + 4 * 255), os.fstat(f.fileno()).st_size  # the header at most
            else:
                raw = f.read()
                total = len(raw)
    except (OSError, EOFError) as exc:
        raise FastVAEError(f"data file {path} could not be read: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise FastVAEError(
            f"data file {path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'}): "
            "give MNIST-format IDX files, .npy/.npz, or a folder of images"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise FastVAEError(f"data file {path} has a truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if total - header != expected:
        raise FastVAEError(
            f"data file {path} is truncated or has the wrong sizes: header says {shape} "
            f"({expected} bytes of data), file holds {total - header}"
        )
    if mmap and opener is open:
        if expected == 0:  # numpy cannot map no bytes
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=header, shape=shape)
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _find_idx(folder: Path, key: str) -> Path | None:
    for name in IDX_NAMES[key]:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _idx_folder(folder: Path) -> Splits:
    from fastvae.array_prepare import idx_folder_rows

    return _rows_splits(folder.name, *idx_folder_rows(folder), own=True)


def _npz(path: Path, split: tuple[float, int, int]) -> Splits:
    from fastvae.array_prepare import npz_rows

    return _rows_splits(path.name, *npz_rows(path, *split))


def _rows_splits(name: str, train, test, own: bool) -> Splits:
    """In memory: the rows of ``fastvae.array_prepare.ArrayRows`` (what prepare reads a slice
    at a time) read and converted; ``own``: the split is the source's (else held out)."""
    def images(part):
        return _as_images(part.array[part.rows], part.path, part.key)

    def labels(part):
        return None if part.labels is None else torch.from_numpy(part.labels[part.rows].astype(np.int64))

    grid = source_grid(train.array, test.array) if own else source_grid(train.array)
    return Splits(name, images(train), images(test), labels(train), labels(test), held_out=not own,
                  pixel_grid=grid)


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        # numpy says "pickled data ... allow_pickle" for any file without a .npy header too
        reason = ("it holds Python objects or is no .npy file at all" if "pickle" in str(exc)
                  else one_line(exc))
        raise FastVAEError(f"data file {path} is not a readable .npy array ({reason}): save a numeric "
                           "array with numpy.save") from None


def image_files(folder: Path) -> tuple[list[Path], np.ndarray | None]:
    """The image files below ``folder`` (sorted) and their labels, as torchvision's ImageFolder
    reads them: the index of each file's top-level subfolder among the sorted subfolders
    (deeper folders belong to their top-level one; linked folders are followed), or ``None``
    when there is one. Files directly in ``folder`` beside label subfolders are not used (a
    note says so). Hidden files and folders (``.thumbs``, macOS ``._*`` files) are not data."""
    files, tops = _files_and_tops(folder)
    return files, _label_indices(tops)[0]


class FolderFiles(NamedTuple):
    """What an image folder holds: its image files, their labels (None: unlabelled), which are
    its own test split (None: the folder has none) and the label names (the sorted subfolders)."""

    files: list[Path]
    labels: np.ndarray | None
    is_test: np.ndarray | None
    label_names: list[str] | None


def image_folder_files(folder: Path, rule: int = SPLIT_RULE) -> FolderFiles:
    """``image_files`` with the label names, or for a folder whose subfolders are ``train`` and
    ``test`` (or ``val``/``valid``/``validation``: the published split of many datasets) the
    files of both, labelled by the subfolders inside them (one set of label names), and
    ``is_test`` marking the held-out files. ``rule``: the split rule (``folder_rule``)."""
    reading = folder_rule(rule)
    parts = _own_split_parts(folder, reading.held_out_names, reading.others_beside_split)
    if parts is None:
        files, tops = _files_and_tops(folder, reading.suffixes)
        labels, names = _label_indices(tops)
        return FolderFiles(files, labels, None, names)
    train, train_tops = _files_and_tops(parts["train"], reading.suffixes)
    test, test_tops = _files_and_tops(parts["test"], reading.suffixes)
    flat = {name: set(tops) == {""} for name, tops in (("train", train_tops), ("test", test_tops))}
    if flat["train"] != flat["test"]:  # "" would become label 0 beside the other part's labels
        labelled = "train" if flat["test"] else "test"
        raise FastVAEError(f"{parts[labelled]} has label subfolders but {parts['test' if labelled == 'train' else 'train']} "
                           "has none: give both the same label subfolders, or neither")
    loose = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()
             and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        print(f"note: {len(loose)} image(s) directly in {folder} (e.g. {loose[0].name}) are not used: "
              f"its {parts['train'].name}/ and {parts['test'].name}/ folders hold the data", file=sys.stderr)
    is_test = np.repeat([False, True], [len(train), len(test)])
    labels, names = _label_indices(train_tops + test_tops)
    return FolderFiles(train + test, labels, is_test, names)


def _own_split_parts(folder: Path, held_out_names: tuple = HELD_OUT_NAMES,
                     others_beside_split: bool = True) -> dict | None:
    """{"train": train/, "test": the held-out folder} where the subfolders are train/ and one or
    more of ``held_out_names`` (test/ first: a val/ beside it is left out, with a note), and
    with ``others_beside_split`` any others too (left out, with a note: STL-10's unlabeled/),
    else None (the subfolders are labels)."""
    subfolders = {p.name.lower(): p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.is_dir()}
    held = [name for name in held_out_names if name in subfolders]
    others = sorted(set(subfolders) - {"train", *held})
    if "train" not in subfolders or not held or (others and not others_beside_split):
        return None
    for other in held[1:]:
        print(f"note: {subfolders[other]} is not used: fastvae holds out one split, {subfolders[held[0]].name}/ "
              f"(move its images into {subfolders['train'].name}/ to train on them)", file=sys.stderr)
    if others:
        named = ", ".join(f"{subfolders[name].name}/" for name in others)
        print(f"note: {named} in {folder} {'is' if len(others) == 1 else 'are'} not used: its "
              f"{subfolders['train'].name}/ and {subfolders[held[0]].name}/ are the dataset's split "
              f"(move images into {subfolders['train'].name}/ to train on them)", file=sys.stderr)
    return {"train": subfolders["train"], "test": subfolders[held[0]]}


def _files_and_tops(folder: Path, suffixes=IMAGE_SUFFIXES) -> tuple[list[Path], list[str]]:
    """The image files below ``folder`` and each one's top-level subfolder ("" for none)."""
    files = sorted(_walk_images(folder, suffixes))
    if not files:
        raise FastVAEError(
            f"data folder {folder} holds no images ({', '.join(sorted(suffixes))}) and no "
            "MNIST IDX files"
        )
    tops = [f.relative_to(folder).parts[0] if f.parent != folder else "" for f in files]
    if "" in tops and len(set(tops)) > 1:  # a stray preview.png would be label 0, shifting the rest
        stray = [f for f, top in zip(files, tops) if top == ""]
        print(f"note: {len(stray)} image(s) directly in {folder} (e.g. {stray[0].name}) are not used: "
              "its subfolders name the labels", file=sys.stderr)
        files = [f for f, top in zip(files, tops) if top != ""]
        tops = [top for top in tops if top != ""]
    return files, tops


def _label_indices(tops: list[str]) -> tuple[np.ndarray | None, list[str] | None]:
    """(each file's label: its top folder's index among the sorted names, the names); (None,
    None) for a single top folder (unlabelled)."""
    classes = sorted(set(tops))
    if len(classes) == 1:
        return None, None
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[top] for top in tops], dtype=np.int64), classes


def _walk_images(folder: Path, suffixes=IMAGE_SUFFIXES) -> list[Path]:
    """Image files below ``folder``, linked folders followed (a link back to a folder on its own
    path is not: no endless loop); hidden files and folders left out. One note names what looks
    like an image but is not read: files of other formats Pillow knows, broken links."""
    chains = {str(folder): frozenset()}
    found, other_formats, broken = [], [], []
    for root, dirs, names in os.walk(folder, followlinks=True):
        chain = chains.pop(root, frozenset()) | {os.path.realpath(root)}
        kept = []
        for d in dirs:
            if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in chain:
                chains[os.path.join(root, d)] = chain
                kept.append(d)
        dirs[:] = kept
        for name in names:
            path = Path(root, name)
            suffix = path.suffix.lower()
            if name.startswith("."):
                continue
            if suffix in suffixes:
                if path.is_file():
                    found.append(path)
                elif path.is_symlink():
                    broken.append(path)
            elif suffix in OTHER_IMAGE_SUFFIXES:
                other_formats.append(path)
    if other_formats or broken:
        parts = [f"{len(other_formats)} file(s) of image formats fastvae does not read (e.g. {other_formats[0].name}: "
                 f"it reads {', '.join(sorted(suffixes))}; convert them to PNG)"] if other_formats else []
        parts += [f"{len(broken)} broken link(s) (e.g. {broken[0]})"] if broken else []
        print(f"note: {folder}: left out {' and '.join(parts)}", file=sys.stderr)
    return found


DARK_PEAK = 16  # no pixel of a folder above 15 of 255: what 16-bit files of 8- or 12-bit values become


def note_dark_images(folder: Path, peak: int, files) -> None:
    """One note when the brightest pixel of a whole image folder of ``files``, some of them
    16-bit, is under ``DARK_PEAK``: 16-bit images are read as value / 256 (their full range), so
    files holding 8- or 12-bit values in 16 bits came out black or nearly, with nothing else to
    say so (a folder of dark 8-bit images, class masks say, gets no note)."""
    if peak < DARK_PEAK and any(_is_wide(file) for file in files):
        print(f"note: the brightest pixel of the images in {folder} is {peak} of 255: 16-bit images are "
              "read as value / 256, so files holding 8- or 12-bit values come out black or nearly; "
              "scale them to the 16-bit range or save them as 8-bit images", file=sys.stderr)


def _is_wide(file: Path) -> bool:
    """Whether an image file is 16-bit (or 32-bit integer) grayscale, by its header."""
    from PIL import Image

    try:
        with _quiet_pillow(), Image.open(file) as img:
            return img.mode in WIDE_GRAY_MODES
    except _image_errors():
        return False


def different_sizes_error(file: Path, size: tuple, first: Path, first_size: tuple) -> FastVAEError:
    return FastVAEError(
        f"image {file} is {size[0]}x{size[1]} but {first} is {first_size[0]}x{first_size[1]}: "
        "all images must have one size (fastvae prepare --size N resizes and crops them)")


def _image_folder(folder: Path, split: tuple[float, int, int], grayscale: bool) -> Splits:
    files, labels, is_test, _ = image_folder_files(folder, rule=split[2])
    probes = [probe_image(f) for f in files]
    for file, probe in zip(files, probes):
        if isinstance(probe, str):
            raise FastVAEError(f"image {file} could not be read: {probe}")
        if probe[1] != probes[0][1]:
            raise different_sizes_error(file, probe[1], files[0], probes[0][1])
    channels = 1 if grayscale or not any(colour for colour, _ in probes) else 3
    arrays = []
    for file in files:
        arrays.append(decode_image(file, channels))
        if isinstance(arrays[-1], str):
            raise FastVAEError(f"image {file} could not be read: {arrays[-1]}")
    note_dark_images(folder, max(int(a.max(initial=0)) for a in arrays), files)
    if is_test is None:
        return _split(folder.name, np.stack(arrays), labels, folder, split)
    test = torch.from_numpy(is_test)
    return replace(_take_rows(folder.name, _as_images(np.stack(arrays), folder), labels, ~test, test), pixel_grid=255)


def split_indices(n: int, labels: np.ndarray | None, test_fraction: float, seed: int,
                  rule: int = SPLIT_RULE) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows), each sorted: a seeded random round(fraction x n) of the rows
    (at least one, at most n - 1) held out, stratified by label: label c gives floor(fraction x
    n_c) rows, or one more where its remainder is among the largest (ties broken by the seed),
    so the test set has the labels' proportions whatever their sizes. ``rule`` 1: the rule of
    runs made before this one (each label's share rounded on its own, which held out nothing
    when every label has under 1 / (2 fraction) rows); a run keeps the rule it was made with."""
    if n < 2:
        raise FastVAEError(f"need at least 2 examples (train and test), got {n}")
    if not 0.0 < test_fraction < 1.0:
        raise test_fraction_error(test_fraction)
    if rule not in SPLIT_RULES:
        raise FastVAEError(f"split_rule must be one of {', '.join(map(str, SPLIT_RULES))}, got {rule!r}")
    rng = np.random.default_rng(seed)
    groups = None if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    if rule == 1:
        test = np.concatenate([rng.permutation(g)[: round(test_fraction * len(g))]
                               for g in (groups or [np.arange(n)])])
        if len(test) == 0:  # tiny data: one row anyway
            test = np.array([rng.integers(n)])
        elif len(test) == n:
            test = np.sort(test)[1:]
    else:
        test = _largest_remainder_test_rows(n, groups, test_fraction, seed, rng)
    test = np.sort(test).astype(np.int64)
    return np.setdiff1d(np.arange(n), test), test


def _largest_remainder_test_rows(n: int, groups, test_fraction: float, seed: int, rng) -> np.ndarray:
    total = min(max(round(test_fraction * n), 1), n - 1)
    if groups is None:
        return rng.permutation(n)[:total]
    sizes = np.array([len(g) for g in groups])
    quota = test_fraction * sizes.astype(np.float64)
    take = np.floor(quota).astype(np.int64)
    # largest remainders first; ties in a seeded order (a generator of its own: the rows each
    # label holds out are the same draws as under rule 1)
    ties = np.random.default_rng([seed, 1]).permutation(len(groups))
    order = ties[np.argsort(-(quota - take)[ties], kind="stable")]
    order = order[take[order] < sizes[order]]
    take[order[: max(total - int(take.sum()), 0)]] += 1
    return np.concatenate([rng.permutation(g)[:k] for g, k in zip(groups, take)])


def _split(name: str, array: np.ndarray, labels, path: Path, split: tuple[float, int, int],
           key: str | None = None) -> Splits:
    """Hold out a seeded, stratified random part of the rows (``split_indices``)."""
    images = _as_images(array, path, key)
    n = len(images)
    if n < 2:
        raise FastVAEError(f"data {path} has {n} example(s): need at least 2 (train and test)")
    train, test = (torch.from_numpy(rows) for rows in split_indices(n, labels, *split))
    return replace(_take_rows(name, images, labels, train, test), held_out=True, pixel_grid=source_grid(array))


def _take_rows(name: str, images: torch.Tensor, labels, train, test) -> Splits:
    """Splits of ``images`` (and numpy ``labels``) by row indices or boolean masks."""
    label_t = None if labels is None else torch.from_numpy(labels)
    return Splits(
        name, images[train], images[test],
        None if label_t is None else label_t[train], None if label_t is None else label_t[test],
    )


# the grids k / L looked for in float data: the powers of two and those minus one up to 256
# (8-bit pixels / 255, the digits' / 16, binary images); finer grids cannot be told from float32
PIXEL_GRIDS = sorted({2**b for b in range(9)} | {2**b - 1 for b in range(2, 9)})


def source_grid(*arrays) -> int | None:
    """The grid k / L the pixels of ``arrays`` (as a source stores them, before ``unit_pixels``)
    lie on: 255 for uint8, 1 for bool, for floats in [0, 1] the smallest L in PIXEL_GRIDS that
    every value is on; None where they lie on none (or the arrays disagree)."""
    grids = {_grid_of(np.asarray(a) if not isinstance(a, torch.Tensor) else a) for a in arrays}
    return grids.pop() if len(grids) == 1 else None


def _grid_of(array) -> int | None:
    dtype = str(array.dtype).removeprefix("torch.")
    if dtype == "uint8":
        return 255
    if dtype == "bool":
        return 1
    if isinstance(array, torch.Tensor):
        values = array.detach().flatten()
        if not values.is_floating_point():
            return None
    else:  # any float numpy array (big-endian, long double): converted a chunk at a time
        values = array.reshape(-1)
        if not np.issubdtype(values.dtype, np.floating):
            return None
    if not len(values):
        return None
    for grid in PIXEL_GRIDS:  # a cheap look at the first values rules most grids out
        if _on_grid(values[:4096], grid) and all(
                _on_grid(values[start:start + (1 << 20)], grid) for start in range(0, len(values), 1 << 20)):
            return grid
    return None


def _on_grid(values, grid: int) -> bool:
    if not isinstance(values, torch.Tensor):
        values = torch.from_numpy(values.astype(np.float32))
    scaled = values.float() * grid  # float32 k / 255 * 255 is within ~2e-5 of k
    return bool(((scaled - scaled.round()).abs() <= 1e-3).all())


def data_grid(data) -> int | None:
    """The pixel grid of ``data``: a ``Splits``' own (looked for in its test values if a program
    made it); a prepared dataset's or split's source's, as ``fastvae prepare`` recorded it (the
    digits' 16 levels, stored as the nearest k / 255; 255 for datasets written before it did);
    else ``source_grid``."""
    if isinstance(data, Splits):
        return source_grid(data.test) if data.pixel_grid == "unknown" else data.pixel_grid
    meta = getattr(data, "meta", None)
    if isinstance(meta, dict):
        return meta.get("pixel_grid", 255)
    if hasattr(data, "read_block"):
        return getattr(data, "pixel_grid", 255)
    return source_grid(data)


def unit_pixels(data: np.ndarray | torch.Tensor, where: str) -> torch.Tensor:
    """``data`` as float32 in [0, 1], the form every model trains on, or one FastVAEError
    naming ``where``: bool as 0/1, uint8 pixels / 255, finite floats in [0, 1] as they are;
    other dtypes, NaN, Inf and floats outside [0, 1] are refused (the Bernoulli likelihood and
    the 8-bit bins of bits per dim are defined on [0, 1] only). A tensor keeps its device."""
    if isinstance(data, np.ndarray):
        if np.issubdtype(data.dtype, np.floating):  # native order; float64 at most (torch has no float128)
            with np.errstate(over="ignore"):  # a long double beyond float64 becomes inf: refused below
                data = data.astype(np.float64 if data.dtype.itemsize > 4 else np.float32)
        elif data.dtype not in (np.bool_, np.uint8):
            raise _dtype_error(where, data.dtype)
        # contiguous and writeable: from_numpy refuses negative strides and warns about read-only
        # arrays (np.frombuffer's, IDX files), a second stderr line beside an error's one
        data = torch.from_numpy(np.require(data, requirements=["C", "W"]))
    if data.dtype == torch.uint8:
        return data.float() / 255.0
    if data.dtype == torch.bool:
        return data.float()
    if not data.is_floating_point():
        raise _dtype_error(where, str(data.dtype).removeprefix("torch."))
    if data.numel():  # checked in the data's own precision: 1e300 is out of range, not "Inf"
        if not bool(torch.isfinite(data).all()):
            raise FastVAEError(f"{where} contains NaN or Inf values: clean or drop those rows")
        lo, hi = (float(v) for v in torch.aminmax(data.detach()))
        if lo < 0.0 or hi > 1.0:
            raise FastVAEError(f"{where} has values in [{lo:g}, {hi:g}]: float data must lie in [0, 1] "
                               "(divide 0-255 pixels by 255, or give them as uint8)")
    return data.float()


def program_splits(splits) -> "Splits":
    """A program's own ``train(..., splits=...)`` checked, its images in the form the loaders
    read (``unit_pixels``: uint8 / 255, bool, floats in [0, 1]; numpy arrays become tensors), or
    one FastVAEError naming ``splits``: they failed deep inside training (uint8 and float64 in
    F.linear, numpy in flatten, a test split of another size after a whole epoch, an empty one
    as a ZeroDivisionError). A prepared dataset that ``load_dataset`` opened passes as it is."""
    if not isinstance(splits, Splits):
        if hasattr(splits, "data_shape") and hasattr(splits, "train") and hasattr(splits, "test"):
            return splits  # a prepared dataset, opened by load_dataset
        raise FastVAEError(f"splits must be fastvae.data.Splits(name, train, test) with images (N, C, H, W) or "
                           f"what fastvae.load_dataset returns, got {type(splits).__name__}")
    parts = {}
    for part in ("train", "test"):
        images = getattr(splits, part)
        where = f"splits.{part}"
        if not isinstance(images, (np.ndarray, torch.Tensor)):
            raise FastVAEError(f"{where} must be a tensor or numpy array of images (N, C, H, W), got "
                               f"{type(images).__name__}")
        if images.ndim != 4 or 0 in images.shape:
            raise FastVAEError(f"{where} has shape {tuple(images.shape)}: give images (N, C, H, W), at least one")
        parts[part] = unit_pixels(images, where).contiguous()
    if parts["train"].shape[1:] != parts["test"].shape[1:]:
        raise FastVAEError(f"splits.train holds images of {tuple(parts['train'].shape[1:])}, splits.test of "
                           f"{tuple(parts['test'].shape[1:])}: give both splits the same image size")
    unchanged = all(parts[part] is getattr(splits, part) for part in parts)
    return splits if unchanged else replace(splits, **parts)


def _dtype_error(where: str, dtype) -> FastVAEError:
    return FastVAEError(f"{where} has dtype {dtype}: use uint8 pixels (0-255) or floats in [0, 1]")


def _as_images(array: np.ndarray, path: Path, key: str | None = None) -> torch.Tensor:
    """Validate and convert to float32 (N, C, H, W) in [0, 1]."""
    where = data_where(path, key)
    images = unit_pixels(channels_first(np.asarray(array)), where)
    shape = image_shape(images.shape, where)  # before len(): a 0-d array has none
    return images.reshape(images.shape[0], *shape).contiguous()


def channels_last(shape: tuple) -> bool:
    """Whether an array of ``shape`` holds (N, H, W, C) images, C 1 or 3 (Keras, TensorFlow and
    PIL order): 4-D, C last, and dimension 1 not 1 or 3 (else it is read as (N, C, H, W))."""
    return len(shape) == 4 and shape[1] not in (1, 3) and shape[3] in (1, 3)


def channels_first(array: np.ndarray) -> np.ndarray:
    """(N, C, H, W) view of an array of images stored channels last, else ``array``."""
    return array.transpose(0, 3, 1, 2) if channels_last(array.shape) else array


def data_where(path: Path, key: str | None = None) -> str:
    """How errors name an array: its file, and its key in an .npz."""
    return f"data {path}" + (f" ['{key}']" if key else "")


def image_shape(shape: tuple, where: str) -> tuple[int, int, int]:
    """(C, H, W) of the images of an array of ``shape``: (N, D) rows are 1 x 1 x D, (N, H, W)
    one channel, (N, C, H, W) with C 1 or 3, or (N, H, W, C) (``channels_last``); others and
    empty arrays are refused."""
    shape = tuple(shape)
    if len(shape) == 2:
        image = (1, 1, shape[1])
    elif len(shape) == 3:
        image = (1, *shape[1:])
    elif len(shape) == 4 and shape[1] in (1, 3):
        image = shape[1:]
    elif channels_last(shape):
        image = (shape[3], shape[1], shape[2])
    else:
        raise FastVAEError(f"{where} has shape {shape}: use (N, H, W), (N, C, H, W) or (N, H, W, C) with "
                           "C 1 or 3, or (N, D)")
    if shape[0] == 0 or math.prod(image) == 0:
        raise FastVAEError(f"{where} is empty (shape {shape})")
    return image


def _labels(array: np.ndarray, n: int, path: Path, key: str | None = None) -> torch.Tensor:
    where = f"{path}" + (f" ['{key}']" if key else "")
    array = np.asarray(array)
    if array.ndim == 2 and array.shape[1] == 1:  # a column (Keras' CIFAR y_train)
        array = array[:, 0]
    if array.ndim != 1 or len(array) != n or not np.issubdtype(array.dtype, np.integer):
        raise FastVAEError(
            f"labels {where} must be {n} integers (one per image), got shape {array.shape} "
            f"and dtype {array.dtype}"
        )
    return torch.from_numpy(array.astype(np.int64))


class EpochBatches:
    """Shuffled mini-batches of a tensor for one epoch, sharded across ranks.

    The permutation depends only on (seed, epoch), so every rank draws the same one; rank r takes
    positions r, r + W, r + 2W, ... (padded by wrap-around to equal length, as
    ``DistributedSampler`` does), so W ranks with batch B/W see exactly the rows of one process
    with batch B. Slicing a tensor beats a DataLoader's per-item collate on small images.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, *, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        n = len(data)
        if shuffle:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        per_rank = math.ceil(n / world_size)
        if per_rank * world_size > n:
            order = torch.cat([order, order[: per_rank * world_size - n]])
        # on the data's device: indexing a GPU tensor with CPU indices copies them over with a
        # stream sync per batch; one copy per epoch keeps the steps free of host syncs
        self.indices = order[rank::world_size].to(data.device)
        self.data = data
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            yield self.data[self.indices[start : start + self.batch_size]]
