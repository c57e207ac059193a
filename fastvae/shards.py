"""Prepared (sharded) datasets on litdata: writing them (``fastvae prepare``), opening and
checking them, and reading their blocks.

A prepared dataset is a folder (local, or a URL litdata reads: ``s3://``, ``gs://``, ...):

    SHARDS/train/   litdata chunks (chunk-*.bin) + index.json: the training split
    SHARDS/test/    the same for the held-out split
    SHARDS/fastvae.json   shape, counts, bytes, chunk counts, how the split was made
    SHARDS/*/fastvae-split.json   the dataset_id of the prepare that wrote the split

Each litdata item is a *block* of up to ``block`` consecutive examples: ``{"images": uint8
(n, C, H, W), "labels": int64 (n,)}`` (labels -1 where the source has none). Reading a block
costs one item's overhead for many images, which is what makes a streamed epoch as fast as
an in-memory one on small images. Train examples are written in a seeded random order, so
every block and chunk is a random sample of the data (the per-epoch shuffle in
``fastvae.loaders`` only has to mix blocks).

A prepared dataset is staged in a temporary folder beside SHARDS and renamed into place only
when complete, ``fastvae.json`` last: a killed ``prepare`` leaves no SHARDS at all, and a
folder without ``fastvae.json`` is refused by ``open_dataset``. Opening checks that every
chunk listed in the index is there with its full size and item count, that the counts agree
and that both splits come from the same prepare.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
import uuid
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastvae.errors import FastVAEError, one_line

META = "fastvae.json"
FORMAT = "fastvae-shards"
VERSION = 1  # of the layout fastvae.json describes
MAX_SIZE = 8192  # --size: 200 MB per colour image in memory, beyond any VAE this package trains
SPLIT_NAMES = ("train", "test")
INDEX = "index.json"  # litdata's index of a split's chunks
# in each split folder: the dataset_id of the prepare that wrote it, so a split folder from
# another prepare (a half-finished copy or sync of a dataset prepared again) is refused
SPLIT_ID = "fastvae-split.json"
CHUNK_BYTES = 64 * 2**20  # litdata chunk size: few files, yet small enough to stream
BLOCK_BYTES = 256 * 2**10  # bytes of images per litdata item (a block)
DECODE_TASK_BYTES = 32 * 2**20  # decoded images per prepare worker task, at most (one image at least)
MAX_BLOCK = 1024
MAX_NAMED_SKIPS = 20  # unreadable files fastvae.json names (the summary shows 3)

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # no PyPI request at run time


def block_size(shape) -> int:
    """Examples per block for images of ``shape``: a power of two near BLOCK_BYTES."""
    per_image = max(1, math.prod(shape))
    return max(1, min(MAX_BLOCK, 2 ** int(math.log2(max(1, BLOCK_BYTES // per_image)))))


def is_remote(source: str) -> bool:
    """Whether ``source`` is a URL (``s3://...``) rather than a local path."""
    return "://" in str(source) and not str(source).startswith("file://")


def looks_prepared(source: str) -> bool:
    """Whether ``source`` names a prepared dataset (a URL, or a folder with fastvae.json or the
    train/test split folders), as opposed to a source for the in-memory loader."""
    if is_remote(source):
        return True
    path = Path(source)
    return path.is_dir() and ((path / META).exists() or (path / "train" / INDEX).exists())


def _litdata():
    try:
        import litdata  # noqa: F401
    except ImportError:
        raise FastVAEError("prepared datasets need litdata, which is not installed: run "
                           "'pip install --no-deps litdata' (see the README's Development section)") from None
    return litdata


# ------------------------------------------------------------------------------ reading


@dataclass
class ShardSplit:
    """One split of a prepared dataset: ``len()`` examples of ``shape`` in ``blocks`` blocks
    of ``block`` examples (the last may be shorter). Picklable (DataLoader workers, spawned
    ranks): each process opens its own litdata reader on first use."""

    url: str
    name: str
    examples: int
    block: int
    shape: tuple
    chunk_blocks: tuple = ()  # blocks per litdata chunk, in order (for a chunk-aware shuffle)
    pixel_grid: int = 255  # the grid k / L the source's pixels lie on (``fastvae.data.data_grid``)

    def __post_init__(self):
        self._reader = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_reader"}

    def __setstate__(self, state):
        self.__dict__.update(state, _reader=None)

    def __len__(self) -> int:
        return self.examples

    @property
    def blocks(self) -> int:
        return math.ceil(self.examples / self.block)

    def block_rows(self, index: int) -> int:
        """Examples in block ``index``."""
        return min(self.block, self.examples - index * self.block)

    def read_block(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Block ``index`` as (uint8 images (n, C, H, W), int64 labels (n,))."""
        if self._reader is None:
            from litdata import StreamingDataset

            # batch_decode=0: decode the requested item only (blocks are read in random order)
            self._reader = StreamingDataset(_join(self.url, self.name), batch_decode=0)
        try:
            item = self._reader[int(index)]
        except Exception as exc:  # a chunk that vanished or cannot be downloaded
            raise FastVAEError(f"cannot read block {index} of {_join(self.url, self.name)}: "
                               f"{one_line(exc)}") from None
        images, labels = item["images"], item["labels"]
        expected = (self.block_rows(index), *self.shape)
        if getattr(images, "shape", None) != expected or getattr(labels, "shape", None) != expected[:1]:
            raise FastVAEError(f"prepared dataset {self.url} is damaged: block {index} of {self.name} holds "
                               f"images {tuple(getattr(images, 'shape', ()))} where {META} says "
                               f"{expected}: prepare it again")
        return images, labels


@dataclass
class ShardDataset:
    """A prepared dataset: its metadata (``fastvae.json``) and its two splits."""

    url: str
    meta: dict
    train: ShardSplit
    test: ShardSplit

    @property
    def data_shape(self) -> tuple:
        return tuple(self.meta["shape"])

    @property
    def name(self) -> str:
        return Path(self.url.rstrip("/")).name


def dataset_id(data) -> "str | None":
    """The ``dataset_id`` of a prepared dataset (``ShardDataset``), the ``content_id`` of data
    read from a path into memory (``fastvae.data.content_id``); None for other data (bundled,
    given by a program) and for datasets prepared before it was written."""
    meta = getattr(data, "meta", None)
    if isinstance(meta, dict):
        return meta.get("dataset_id")
    if getattr(data, "content_id", None) is not None:
        return data.content_id
    if getattr(data, "from_path", False):
        from fastvae.data import content_id

        return content_id(data)
    return None


SPLIT_SETTINGS = ("test_fraction", "split_seed", "split_rule")


def prepared_split(data) -> "dict | None":
    """How ``fastvae prepare`` split a prepared dataset (its ``fastvae.json``'s test_fraction,
    split_seed and split_rule; for a split of the source's own, the rule that read the source),
    or None for other data."""
    meta = getattr(data, "meta", None)
    if not isinstance(meta, dict) or any(k not in meta for k in SPLIT_SETTINGS):
        return None
    return {key: meta[key] for key in (SPLIT_SETTINGS if meta.get("split") == "seeded" else ("split_rule",))}


def run_split(config: dict, state: dict) -> dict:
    """The settings that split data as a run's was: those of the prepared dataset it trained on
    (its checkpoint's ``data_split``), else its config's. So ``evaluate``/``report --data SRC``
    on the source of that dataset hold out the same examples (with the config's, which a
    prepared dataset ignores, they held out others, some of them trained on)."""
    split = {"test_fraction": config.get("test_fraction", 0.1), "split_seed": config.get("split_seed", 0),
             "split_rule": config["split_rule"]}
    return {**split, **(state.get("data_split") or {})}


def changed_data(saved_id: str, source: str, run: str = "the run", same_path: bool = True) -> str:
    """What it means that ``source`` is not the data of ``run``'s ``saved_id`` (with a guess at
    why where ``source`` is the path the run read)."""
    if saved_id.startswith("content:"):
        why = " (images or rows added, removed or changed since, or the run trained on a program's selection?)" if same_path else ""
        return f"{source} is not the data {run} trained on{why}"
    why = " (prepared again under the same path?)" if same_path else ""
    return f"{source} is not the prepared dataset {run} trained on{why}"


def check_run_dataset(run, saved_id: "str | None", data, source: str) -> None:
    """Refuse ``data`` (loaded from the run's own ``source``) when the run's checkpoint names
    other data (``saved_id``): a dataset prepared again under the same path, or a folder that
    changed, has another held-out split, which may hold the run's training images."""
    if saved_id is not None and saved_id != dataset_id(data):
        raise FastVAEError(f"{changed_data(saved_id, source, str(run))}: its test split may hold the run's "
                           f"training images; pass --data {source} to evaluate on it all the same")


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def open_dataset(source: str) -> ShardDataset:
    """Open and check a prepared dataset; one clear ``FastVAEError`` for each problem: not a
    prepared dataset, an unreadable or foreign ``fastvae.json``, a missing or truncated chunk,
    an index that disagrees with ``fastvae.json``, an unreachable URL or missing credentials."""
    source = str(source)
    if is_remote(source):
        _litdata()
        with tempfile.TemporaryDirectory(prefix="fastvae-shards-") as tmp:
            meta = _parse_meta(_download(source, META, Path(tmp)), source)
            indexes = {s: _read_index(_download(_join(source, s), INDEX, Path(tmp) / s), source, s)
                       for s in SPLIT_NAMES}
            if meta.get("split_ids"):
                for split in SPLIT_NAMES:
                    try:  # (fastvae.json and the indexes came: a missing file is a half-finished sync)
                        found = _download(_join(source, split), SPLIT_ID, Path(tmp) / split)
                    except FastVAEError:
                        found = Path(tmp) / split / "missing"
                    _check_split_id(found, meta, source, split)
    else:
        root = Path(source)
        if not root.exists():
            raise FastVAEError(f"data {root} does not exist")
        if not (root / META).is_file():
            raise FastVAEError(
                f"{root} is not a prepared dataset (no {META}; an interrupted 'fastvae prepare' "
                f"leaves none): run 'fastvae prepare SRC --out {root}'")
        meta = _parse_meta(root / META, source)
        indexes = {}
        for split in SPLIT_NAMES:
            index_file = root / split / INDEX
            if not index_file.is_file():
                raise FastVAEError(f"prepared dataset {root} has no {split}/{INDEX}: prepare it again")
            indexes[split] = _read_index(index_file, source, split)
            if meta.get("split_ids"):
                _check_split_id(root / split / SPLIT_ID, meta, source, split)
            for chunk in indexes[split]["chunks"]:
                _check_chunk(root / split / chunk["filename"], chunk, root, split)
    splits = {}
    for split in SPLIT_NAMES:
        info = meta["splits"][split]
        chunk_blocks = tuple(int(c["chunk_size"]) for c in indexes[split]["chunks"])
        blocks = math.ceil(info["examples"] / meta["block"])
        # the byte count tells apart indexes of equally many blocks of another image size
        chunk_bytes = sum(int(c.get("chunk_bytes", -1)) for c in indexes[split]["chunks"])
        if sum(chunk_blocks) != blocks or chunk_bytes != info.get("bytes", chunk_bytes):
            raise FastVAEError(
                f"prepared dataset {source}: {split}/{INDEX} lists {sum(chunk_blocks)} blocks of "
                f"{chunk_bytes:,} bytes but {META} says {info['examples']} examples in {blocks} "
                f"blocks of {info.get('bytes', chunk_bytes):,} bytes: the files come from "
                "different runs of 'fastvae prepare'; prepare it again")
        splits[split] = ShardSplit(source, split, int(info["examples"]), int(meta["block"]),
                                   tuple(meta["shape"]), chunk_blocks, meta.get("pixel_grid", 255))
    if not is_remote(source):  # an edited shape: one line now, not a failure in the first step
        splits["train"].read_block(0)
        splits["train"]._reader = None  # not inherited by forked workers (a shared file offset)
    return ShardDataset(source, meta, splits["train"], splits["test"])


def _check_chunk(path: Path, chunk: dict, root: Path, split: str) -> None:
    """A local chunk has the index's size and, in its header (litdata's first uint32), the
    index's item count: damage anywhere in either split is one line at start-up, not a failure
    in the first evaluation after an epoch of training."""
    size = path.stat().st_size if path.is_file() else None
    state = None
    if size != chunk["chunk_bytes"]:
        state = "is missing" if size is None else f"has {size} bytes, the index says {chunk['chunk_bytes']}"
    else:
        try:
            with open(path, "rb") as f:
                items = int(np.frombuffer(f.read(4), np.uint32)[0]) if size >= 4 else None
        except OSError as exc:
            raise FastVAEError(f"cannot read {path}: {one_line(exc)}") from None
        if items != int(chunk["chunk_size"]):
            state = f"says it holds {items} blocks, the index {chunk['chunk_size']}"
    if state:
        raise FastVAEError(f"prepared dataset {root} is damaged: {split}/{chunk['filename']} "
                           f"{state} (truncated or damaged copy?): copy or prepare it again")


def _check_split_id(path: Path, meta: dict, source: str, split: str) -> None:
    """The split folder was written by the prepare that wrote ``fastvae.json``."""
    try:
        found = json.loads(Path(path).read_text()).get("dataset_id")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        found = None
    if found != meta["dataset_id"]:
        what = "has no" if found is None else "has another"
        raise FastVAEError(f"prepared dataset {source}: {split}/ {what} {SPLIT_ID} of this dataset (its "
                           f"folders come from different runs of 'fastvae prepare': a half-finished copy "
                           "or sync?): copy it again, or prepare it again")


def _parse_meta(path: Path, source: str) -> dict:
    try:
        meta = json.loads(Path(path).read_text())
        ok = (isinstance(meta, dict) and meta.get("format") == FORMAT and len(meta["shape"]) == 3
              and all(isinstance(d, int) and d >= 1 for d in meta["shape"]) and int(meta["block"]) >= 1
              and all(int(meta["splits"][s]["examples"]) >= 0 for s in SPLIT_NAMES)
              # older datasets: 255 (written before the source's grid was recorded)
              and type(meta.get("pixel_grid", 255)) is int and 1 <= meta.get("pixel_grid", 255) <= 256)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise FastVAEError(f"{source}/{META} is not the metadata of a dataset written by "
                           "'fastvae prepare': prepare it again")
    if meta.get("version") != VERSION:
        raise FastVAEError(f"{source}/{META} has format version {meta.get('version')!r}; this fastvae reads "
                           f"version {VERSION}: prepare it again with this version (or upgrade fastvae)")
    if meta["splits"]["train"]["examples"] < 1 or meta["splits"]["test"]["examples"] < 1:
        raise FastVAEError(f"prepared dataset {source} has an empty split: prepare it again")
    return meta


def _read_index(path: Path, source: str, split: str) -> dict:
    try:
        index = json.loads(Path(path).read_text())
        assert all("chunk_size" in c and "filename" in c for c in index["chunks"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AssertionError):
        raise FastVAEError(f"{source}/{split}/{INDEX} is not a litdata index: prepare it again") from None
    return index


def _download(url: str, name: str, folder: Path) -> Path:
    """Fetch ``url/name`` into ``folder`` through litdata's downloader (its credentials)."""
    from litdata.streaming.downloader import get_downloader

    folder.mkdir(parents=True, exist_ok=True)
    local = folder / name
    try:
        if url.startswith("s3://"):
            _s3_fetch(_join(url, name), local)
        else:
            get_downloader(url, str(folder), []).download_file(_join(url, name), str(local))
    except Exception as exc:  # botocore/obstore/gcs errors: no credentials, unreachable, 404
        raise FastVAEError(f"cannot read {_join(url, name)}: {one_line(exc)} (check the URL, your "
                           "network and your credentials, e.g. AWS_* variables for s3://)") from None
    if not local.is_file():
        raise FastVAEError(f"cannot read {_join(url, name)}: not found")
    return local


def _s3_fetch(url: str, local: Path) -> None:
    """One small object from S3, two attempts with short timeouts. litdata's own client retries
    a thousand times (right for chunks mid-training), which would turn a wrong endpoint, a dead
    network or missing credentials at start-up into a hang instead of an error."""
    import boto3
    from botocore.config import Config

    bucket, _, key = url[len("s3://"):].partition("/")
    config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=10, read_timeout=30)
    boto3.client("s3", config=config).download_file(bucket, key, str(local))


# ------------------------------------------------------------------------------ writing


class SplitWriter:
    """Append examples to one split; cuts them into blocks and litdata chunks."""

    def __init__(self, folder: Path, block: int):
        from litdata.streaming.writer import BinaryWriter

        folder.mkdir(parents=True)
        self.folder, self.block = folder, block
        self.writer = BinaryWriter(str(folder), chunk_bytes=CHUNK_BYTES)
        self.pending: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self.buffered = self.blocks = self.examples = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images):
            self.pending.append((images, labels))
            self.buffered += len(images)
        while self.buffered >= self.block:
            self._flush(self.block)

    def _flush(self, n: int) -> None:
        """Write the next ``n`` pending rows as one block. Only those rows are copied: a piece
        of k blocks costs O(k) (concatenating all that is pending for each block was O(k^2))."""
        images, labels, need = [], [], n
        while need:
            piece_images, piece_labels = self.pending[0]
            if len(piece_images) <= need:
                self.pending.popleft()
            else:  # the rest of the piece stays pending (a view, not a copy)
                self.pending[0] = (piece_images[need:], piece_labels[need:])
                piece_images, piece_labels = piece_images[:need], piece_labels[:need]
            images.append(piece_images)
            labels.append(piece_labels)
            need -= len(piece_images)
        with _oversized_chunks_quiet():
            self.writer[self.blocks] = {"images": np.ascontiguousarray(np.concatenate(images)),
                                        "labels": np.concatenate(labels).astype(np.int64)}
        self.blocks += 1
        self.examples += n
        self.buffered -= n

    def finish(self) -> dict:
        """Write the last block and the index; the split's counts for fastvae.json."""
        if self.buffered:
            self._flush(self.buffered)
        if not self.blocks:  # litdata writes no index for no chunks, and merge waits for one forever
            return {"examples": 0, "blocks": 0, "chunks": 0, "bytes": 0}
        with _oversized_chunks_quiet():
            self.writer.done()
        self.writer.merge(1)
        chunks = json.loads((self.folder / INDEX).read_text())["chunks"]
        return {"examples": self.examples, "blocks": self.blocks, "chunks": len(chunks),
                "bytes": sum(int(c["chunk_bytes"]) for c in chunks)}


@contextlib.contextmanager
def _oversized_chunks_quiet():
    """litdata's warning that a block outgrew its chunk size (a block of huge images is one
    chunk of its own: nothing for a user to act on), off."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="An item was larger than the target chunk size")
        yield


def write_dataset(out: Path, sources: dict, meta: dict, *, overwrite: bool = False) -> dict:
    """Write a prepared dataset into ``out`` and return its metadata.

    ``sources`` maps each split name to an iterable of ``(uint8 images, int64 labels)`` pieces
    in the order to write. Staged beside ``out`` (``fastvae.run_folder.temporary_folder``,
    removed on an error or Ctrl-C) and renamed into place when complete, ``fastvae.json``
    written last; ``overwrite`` replaces a prepared dataset already in ``out``.
    """
    from fastvae import run_folder

    _litdata()
    check_out(out, overwrite)
    with run_folder.temporary_folder(out) as staging:
        counts = {}
        for split in SPLIT_NAMES:
            writer = SplitWriter(staging / split, meta["block"])
            try:
                for images, labels in sources[split]:
                    writer.add(images, labels)
            except BaseException:  # a write error: the sources' progress bar ends before its line
                getattr(sources, "close", lambda: None)()
                raise
            counts[split] = writer.finish()
            if meta.get("dataset_id"):
                run_folder.write_text(staging / split / SPLIT_ID, json.dumps({"dataset_id": meta["dataset_id"]}) + "\n")
            if counts[split]["examples"] == 0:
                skipped = getattr(sources, "info", {}).get("skipped", 0)
                cause = (f"all of its images were unreadable and skipped (--skip-bad; {skipped} skipped "
                         "so far)" if skipped else "give more images or another --test-fraction")
                raise FastVAEError(f"the {split} split of {meta['source']} came out empty: {cause}")
        meta = {**meta, **getattr(sources, "info", {}), "splits": counts, "split_ids": bool(meta.get("dataset_id"))}
        run_folder.write_text(staging / META, json.dumps(meta, indent=2) + "\n")
        try:  # again: another prepare, or a user, may have written there while this one ran
            check_out(out, overwrite)
        except FastVAEError as exc:
            raise FastVAEError(f"{exc} (it changed while this prepare ran: nothing was replaced)") from None
        run_folder.move_folder_into_place(staging, out)
    return meta


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that would lose work: a file, a non-empty folder that is not a
    prepared dataset, or a prepared dataset without ``overwrite``."""
    if not out.exists():
        return
    from fastvae.run_folder import check_replaceable

    check_replaceable(out)  # before the work, not after it
    if not out.is_dir():
        raise FastVAEError(f"--out {out} is a file: give a folder for the prepared dataset")
    if (out / META).exists() and not overwrite:
        raise FastVAEError(f"--out {out} already holds a prepared dataset: pass --overwrite to "
                           "replace it, or choose another folder")
    if not (out / META).exists() and any(out.iterdir()):
        raise FastVAEError(f"--out {out} is a folder with other files in it: give a new or "
                           "empty folder")


def summary_line(source: str, out: Path, meta: dict, seconds: float) -> str:
    s = meta["splits"]
    images = s["train"]["examples"] + s["test"]["examples"]
    skipped = ""
    if meta.get("skipped"):
        named = meta.get("skipped_files") or []
        more = ", ..." if meta["skipped"] > 3 else ""
        skipped = f", skipped {meta['skipped']} unreadable image(s): {', '.join(named[:3])}{more}"
    return (f"prepared {source} -> {out}: {images:,} images ({s['train']['examples']:,} train, "
            f"{s['test']['examples']:,} test) of {'x'.join(map(str, meta['shape']))} uint8, "
            f"{s['train']['bytes'] + s['test']['bytes']:,} bytes in "
            f"{s['train']['chunks'] + s['test']['chunks']} shards, {seconds:.1f} s{skipped}")


# ------------------------------------------------------------------------------ prepare


def prepare(source: str, out: str | Path, *, size: int | None = None, grayscale: bool = False,
            test_fraction: float = 0.1, split_seed: int = 0, workers: int = 2,
            skip_bad: bool = False, overwrite: bool = False, progress: bool = True) -> tuple[dict, float]:
    """Convert ``source`` (an image folder, MNIST IDX, .npy/.npz or ``digits``) into a prepared
    dataset in ``out``; return its metadata and the seconds it took.

    Images become uint8 (C, H, W) - resized and centre-cropped to ``size`` x ``size`` when
    given, converted to one channel with ``grayscale``, else in colour when any image has
    colour. A source without a split of its own gets ``data.split_indices``'s seeded,
    stratified one (the in-memory loader's rule). Train examples are written in a seeded random
    order. Image folders are decoded by ``workers`` processes; an undecodable image stops it
    (naming the file) unless ``skip_bad``, which skips and counts it.
    """
    from fastvae.data import SPLIT_RULE, image_folder_files, is_bundled

    started = time.perf_counter()
    if is_remote(str(out)):
        raise FastVAEError(f"--out {out}: prepare writes a local folder; prepare into one, copy it "
                           f"there (e.g. 'aws s3 sync SHARDS {out}') and train with --data {out}")
    # a link to a folder (on a larger disk, say): write into its target, not over the link
    # ('.' is the folder it names: it has no name to stage beside)
    out = Path(os.path.realpath(out) if Path(out).is_symlink() else os.path.abspath(out))
    if size is not None and (not isinstance(size, int) or not 1 <= size <= MAX_SIZE):
        raise FastVAEError(f"--size must be an integer from 1 to {MAX_SIZE} (pixels per side), got {size!r}")
    from fastvae.config import MAX_WORKERS, unused_split_flags

    if not isinstance(workers, int) or not 0 <= workers <= MAX_WORKERS:
        raise FastVAEError(f"--workers must be an integer from 0 (decode in this process) to "
                           f"{MAX_WORKERS}, got {workers!r}")
    if str(source) != "digits" and looks_prepared(str(source)):
        raise FastVAEError(f"{source} is already a prepared dataset: train on it with --data {source}")
    check_out(out, overwrite)
    path = Path(source)
    # dataset_id: a run's checkpoint records it, so a resume on a dataset prepared again under
    # the same path (other images, same shape and counts) is refused, not silently mixed
    meta = {"format": FORMAT, "version": VERSION, "dataset_id": uuid.uuid4().hex, "source": str(source), "size": size,
            "grayscale": grayscale, "test_fraction": test_fraction, "split_seed": split_seed,
            "split_rule": SPLIT_RULE}
    if not is_bundled(source) and path.is_dir() and not _has_idx(path):
        files, labels, is_test, names = image_folder_files(path)
        folder = _ImageFolder(files, labels, size, grayscale, workers, skip_bad, progress, is_test)
        pieces, info = folder.pieces(test_fraction, split_seed)
        if names is not None:  # label k is names[k]: the sorted label subfolders
            info["label_names"] = names
    else:
        folder = None
        from fastvae.array_prepare import array_pieces

        # a large compressed .npz member is inflated beside the output (its disk, not memory)
        pieces, info = array_pieces(str(source), size, grayscale, test_fraction, split_seed,
                                    spill_dir=_existing_parent(out), progress=progress)
    meta.update(info)
    meta["block"] = block_size(meta["shape"])
    ignored = unused_split_flags(test_fraction, split_seed)
    if info["split"] == "own" and ignored:
        print(f"note: {source} has a test split of its own, which is kept: {ignored}", file=sys.stderr)
    meta = write_dataset(out, pieces, meta, overwrite=overwrite)
    if folder is not None:
        from fastvae.data import note_dark_images

        note_dark_images(path, folder.peak, folder.files)
    return meta, time.perf_counter() - started


def _existing_parent(out) -> Path:
    """The nearest existing folder above ``out`` (none is made before the staging folder)."""
    parent = Path(os.path.abspath(out)).parent
    return next(p for p in [parent, *parent.parents] if p.is_dir())


def _has_idx(folder: Path) -> bool:
    from fastvae.data import _find_idx

    return _find_idx(folder, "train") is not None


class _ImageFolder:
    """Decode an image folder in worker processes, one block of files per task."""

    def __init__(self, files, labels, size, grayscale, workers, skip_bad, progress, is_test=None):
        self.files, self.labels, self.size, self.is_test = files, labels, size, is_test
        self.grayscale, self.workers, self.skip_bad, self.progress = grayscale, workers, skip_bad, progress
        self.skipped = 0
        self.skipped_files: list[str] = []
        self.peak = 0  # the brightest pixel decoded (data.note_dark_images)

    def _map(self, fn, tasks, desc: str, total: int, weight=lambda result: 1):
        from fastvae.progress_bars import progress_bar

        bar = progress_bar(total=total, desc=desc, unit="img", leave=False, mininterval=0.5,
                           disable=None if self.progress else True)  # None: only on a terminal
        if self.workers == 0:
            results = map(fn, tasks)
            pool = None
        else:
            import multiprocessing

            from fastvae.interrupts import in_worker_process

            pool = multiprocessing.get_context("fork").Pool(self.workers, initializer=in_worker_process)
            results = pool.imap(fn, tasks)
        finished = False
        try:
            for result in results:
                bar.update(weight(result))
                yield result
            finished = True
        finally:
            bar.close()
            if pool is not None and finished:  # the workers exit by themselves, no signal
                pool.close()
                pool.join()
            elif pool is not None:
                pool.terminate()

    def _bad(self, file, reason):
        if not self.skip_bad:
            raise FastVAEError(f"image {file} could not be read: {reason} (pass --skip-bad to skip "
                               "unreadable images)")
        self.skipped += 1
        if len(self.skipped_files) < MAX_NAMED_SKIPS:
            self.skipped_files.append(str(file))

    def pieces(self, test_fraction, split_seed):
        from fastvae.data import different_sizes_error, probe_image, split_indices

        kept, probes = [], []
        for i, probe in enumerate(self._map(probe_image, self.files, "reading headers", len(self.files))):
            if isinstance(probe, str):
                self._bad(self.files[i], probe)
                continue
            if self.size is None and probes and probe[1] != probes[0][1]:
                raise different_sizes_error(self.files[i], probe[1], self.files[kept[0]], probes[0][1])
            kept.append(i)
            probes.append(probe)
        if not kept:
            raise FastVAEError("no readable images: every image was skipped")
        channels = 1 if self.grayscale or not any(c for c, _ in probes) else 3
        side = (self.size, self.size) if self.size else probes[0][1][::-1]
        kept = np.array(kept)
        labels = None if self.labels is None else self.labels[kept]
        if self.is_test is None:
            train, test = split_indices(len(kept), labels, test_fraction, split_seed)
        else:  # the folder's own train/ and test/
            train, test = np.flatnonzero(~self.is_test[kept]), np.flatnonzero(self.is_test[kept])
            if not len(train) or not len(test):
                raise FastVAEError(f"no readable images in the {'train' if not len(train) else 'test'} "
                                   "folder: every image there was skipped")
        train = train[np.random.default_rng(split_seed).permutation(len(train))]
        info = {"shape": [channels, *side], "labels": labels is not None,
                "split": "seeded" if self.is_test is None else "own", "pixel_grid": 255}
        self.channels, self.side = channels, side
        pieces = {"train": self._decode(kept[train]), "test": self._decode(kept[test])}
        # the counts of skipped files are known once the pieces have been consumed
        return _Pieces(pieces, info, self), info

    def _decode(self, rows):
        from functools import partial

        # files per task: up to 256, fewer for large images (a task's images travel back in one
        # array: 256 full-size 12 MP photos would be 9 GB)
        per = max(1, min(256, DECODE_TASK_BYTES // (self.channels * self.side[0] * self.side[1])))
        tasks = [[(self.files[i], -1 if self.labels is None else int(self.labels[i])) for i in rows[j:j + per]]
                 for j in range(0, len(rows), per)]
        decode = partial(_decode_files, channels=self.channels, size=self.size)
        for images, labels, bad in self._map(decode, tasks, "decoding", len(rows),
                                             weight=lambda r: len(r[0]) + len(r[2])):
            for file, reason in bad:
                self._bad(file, reason)
            self.peak = max(self.peak, int(images.max(initial=0)))
            yield images, labels


class _Pieces(dict):
    """The split pieces of an image folder; ``info["skipped"]`` is final once consumed."""

    def __init__(self, pieces, info, folder):
        super().__init__(pieces)
        self.info, self.folder = info, folder

    def __getitem__(self, split):
        for piece in dict.__getitem__(self, split):
            yield piece
        self.info["skipped"] = self.folder.skipped
        self.info["skipped_files"] = self.folder.skipped_files


def _decode_files(files, channels, size):
    """Decode (file, label) pairs: (uint8 images, labels, [(file, reason) of failures])."""
    from fastvae.data import decode_image, different_sizes_error

    images, labels, bad = [], [], []
    for file, label in files:
        array = decode_image(file, channels, size)
        if isinstance(array, str):
            bad.append((file, array))
            continue
        if images and array.shape != images[0].shape:  # a header that lied about the size
            raise different_sizes_error(file, array.shape[:0:-1], files[0][0], images[0].shape[:0:-1])
        images.append(array)
        labels.append(label)
    if not images:
        return np.zeros((0, channels, 1, 1), np.uint8), np.zeros(0, np.int64), bad
    return np.stack(images), np.array(labels, np.int64), bad
