"""Batch sources of the training loop and evaluation: in-memory tensors or streamed shards.

The trainer asks a source for one epoch's batches (``epoch_batches``) on its rank, from a
given batch on (a mid-epoch resume); both sources give float images on the device, so one
loop serves both.

``TensorSource`` (small data): the whole split sits on the device; ``EpochBatches`` slices it.

``StreamSource`` (``fastvae prepare`` datasets): the epoch is a plan that depends only on
(seed, epoch, dataset size), never on the number of ranks' workers or on timing:
1. the litdata chunks are put in a seeded random order, and the blocks inside each chunk too;
2. consecutive blocks form *windows* of up to ``WINDOW_ROWS`` examples (and ``WINDOW_BYTES``),
   whose rows are permuted (seeded by seed, epoch and window) - the stream S of all N examples;
3. rank r of W takes the contiguous part S[r*P : (r+1)*P], P = ceil(N / W), wrapping around
   to the start of S for the last ranks when W does not divide N (as ``DistributedSampler``
   pads): every rank runs the same number of steps and reads ~1/W of the data, and without
   padding the ranks' examples are disjoint and together are the epoch;
4. a rank's part is a list of segments (window, first row, end row); DataLoader worker j
   reads segments j, j + workers, ...: the DataLoader returns them in order, so the batches
   (batch_size consecutive rows of the part) do not depend on ``--workers``. The workers start
   once and serve every epoch (each is sent (seed, epoch, segment) and builds that epoch's
   plan itself); they read on into the next epoch's part while an epoch ends.
Resuming at batch k skips k x batch_size rows of the part without reading them: the
checkpoint's ``batch_in_epoch`` is the loader's whole position. Images travel as uint8 (pinned
on CUDA) and become float in [0, 1] on the device.

Evaluation reads a split in its stored order: rank r takes the contiguous rows
[r*Q, min((r+1)*Q, N)), Q = ceil(N / W), each test example once in total, in the same number
of batches on every rank (the last may be empty, as FSDP's collective calls need).
"""

from __future__ import annotations

import atexit
import math
import weakref
from collections import deque
from dataclasses import dataclass, replace

import numpy as np
import torch

from fastvae.data import EpochBatches
from fastvae.errors import FastVAEError
from fastvae.shards import ShardSplit

WINDOW_ROWS = 4096  # examples mixed together by the per-epoch shuffle of a stream, at most
WINDOW_BYTES = 8 * 2**20  # ... and at most this many bytes of images (a DataLoader item)


def is_streamed(data) -> bool:
    return isinstance(data, ShardSplit)


def to_float_images(x: torch.Tensor, device) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] on ``device`` (the copy moves 1 byte per pixel)."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0)


# ------------------------------------------------------------------------------ in memory


class _Batches:
    """An epoch's batches from ``start`` on; ``len()`` counts the whole epoch (progress bar)."""

    def __init__(self, total: int, iterator):
        self.total, self.iterator = total, iterator

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        return iter(self.iterator)


class TensorSource:
    """The in-memory split on the device, batched by ``EpochBatches``."""

    def __init__(self, data: torch.Tensor, fabric):
        self.data = fabric.to_device(data)

    def close(self) -> None:
        pass

    def epoch_batches(self, *, epoch: int, seed: int, rank: int, world: int, batch_size: int,
                      start: int = 0) -> _Batches:
        batches = EpochBatches(self.data, batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world)
        rows = batches.indices[start * batch_size:]
        return _Batches(len(batches), (self.data[rows[i:i + batch_size]]
                                       for i in range(0, len(rows), batch_size)))


# ------------------------------------------------------------------------------ streamed


@dataclass(frozen=True)
class Segment:
    window: int
    lo: int  # first row inside the (permuted) window
    hi: int


class EpochPlan:
    """The order of one epoch's examples in a split (see the module docstring)."""

    def __init__(self, split: ShardSplit, *, seed: int, epoch: int, shuffle: bool = True):
        self.split, self.seed, self.epoch, self.shuffle = split, seed, epoch, shuffle
        rng = np.random.default_rng([seed, epoch, 0x5EED])
        chunk_blocks = list(split.chunk_blocks) or [split.blocks]
        starts = np.concatenate([[0], np.cumsum(chunk_blocks)])
        chunks = rng.permutation(len(chunk_blocks)) if shuffle else range(len(chunk_blocks))
        order = [starts[c] + (rng.permutation(chunk_blocks[c]) if shuffle else np.arange(chunk_blocks[c]))
                 for c in chunks]
        blocks = np.concatenate(order).astype(np.int64)
        rows = min(WINDOW_ROWS, WINDOW_BYTES // max(1, math.prod(split.shape)))
        per_window = max(1, rows // split.block) if shuffle else 1
        starts = np.arange(0, len(blocks), per_window)
        self.windows = [blocks[i:i + per_window] for i in starts]
        block_rows = np.full(split.blocks, split.block, dtype=np.int64)
        block_rows[-1] = split.block_rows(split.blocks - 1)
        sizes = np.add.reduceat(block_rows[blocks], starts) if len(blocks) else []
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def segments(self, start: int, stop: int) -> list[Segment]:
        """Rows [start, stop) of the stream as segments; beyond N it wraps to the start."""
        n = int(self.offsets[-1])
        out = []
        while start < stop:
            position = start % n
            w = int(np.searchsorted(self.offsets, position, side="right") - 1)
            lo = position - int(self.offsets[w])
            take = min(stop - start, int(self.offsets[w + 1]) - position)
            out.append(Segment(w, lo, lo + take))
            start += take
        return out

    def read(self, segment: Segment) -> torch.Tensor:
        """The segment's uint8 images (rows of its window in the epoch's permuted order)."""
        blocks = [self.split.read_block(int(b))[0] for b in self.windows[segment.window]]
        images = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, segment.window])
            rows = rng.permutation(len(images))[segment.lo:segment.hi]
            return torch.from_numpy(images[rows])
        return torch.from_numpy(np.ascontiguousarray(images[segment.lo:segment.hi]))


@dataclass(frozen=True)
class _Read:
    """One DataLoader item: a segment of the plan of (seed, epoch, shuffle)."""
    seed: int
    epoch: int
    shuffle: bool
    segment: Segment


class _SegmentReader(torch.utils.data.Dataset):
    """Reads ``_Read`` items of a split, in a DataLoader worker (or in the process itself); it
    keeps the plan of the epoch it last read from, so a persistent worker builds it once."""

    def __init__(self, split: ShardSplit, plan: "EpochPlan | None" = None):
        self.split, self.plan = split, plan

    def __getitem__(self, read: _Read):
        plan = self.plan
        if plan is None or (plan.seed, plan.epoch, plan.shuffle) != (read.seed, read.epoch, read.shuffle):
            self.plan = plan = EpochPlan(self.split, seed=read.seed, epoch=read.epoch, shuffle=read.shuffle)
        try:
            return plan.read(read.segment)
        except FastVAEError as exc:
            # handed over as an item: a DataLoader would re-raise it with the worker's
            # traceback in its message, where the user should get one line
            return exc


@dataclass(frozen=True)
class _Part:
    """What a rank reads of an epoch: its part (rows [r*P, (r+1)*P) of the stream, P =
    ceil(N / W)) from batch ``start`` on."""
    seed: int
    epoch: int
    rank: int
    world: int
    batch_size: int
    start: int = 0

    def segments(self, plan: EpochPlan) -> list[Segment]:
        part = math.ceil(len(plan.split) / self.world)
        first = self.rank * part + min(self.start * self.batch_size, part)
        return plan.segments(first, (self.rank + 1) * part)

    def next_epoch(self) -> "_Part":
        return replace(self, epoch=self.epoch + 1, start=0)


class _StreamReads(torch.utils.data.Sampler):
    """The persistent DataLoader's sampler: the reads of ``part``, then those of the same rank's
    part of every later epoch, as one stream, so the workers read the next epoch's first items
    while an epoch ends. DataLoader hands them to its workers round-robin and returns the
    results in this order: the batches do not depend on ``--workers``."""

    def __init__(self, split: ShardSplit, epochs: int | None = None):
        self.split, self.epochs, self.part = split, epochs, None  # epochs: the stream ends there

    def __iter__(self):
        part = self.part
        while True:  # the requested part always; later epochs only up to ``epochs``
            segments = part.segments(EpochPlan(self.split, seed=part.seed, epoch=part.epoch))
            if not segments and part.start == 0:
                return
            for segment in segments:
                yield _Read(part.seed, part.epoch, True, segment)
            part = part.next_epoch()
            if self.epochs is not None and part.epoch >= self.epochs:
                return


class StreamSource:
    """A prepared split streamed from its shards (see the module docstring). Its DataLoader
    workers persist from epoch to epoch and read on into the next one: starting ``--workers``
    processes (fork, then the first read) and waiting for an epoch's first items cost more
    than a small dataset's whole epoch on a GPU."""

    def __init__(self, split: ShardSplit, device, workers: int = 2, epochs: int | None = None):
        """``epochs``: the training's epoch count, where the workers stop reading ahead."""
        self.split, self.device, self.workers = split, torch.device(device), workers
        self._reads, self._loader = _StreamReads(split, epochs), None  # the persistent DataLoader
        self._stream, self._next = None, None  # its iterator; the part it continues with
        self._owner = None  # the _items generator reading the stream now

    def close(self) -> None:
        """Stop the DataLoader workers (kept for the next epoch otherwise)."""
        iterator = getattr(self._loader, "_iterator", None)  # torch keeps a persistent loader's here
        if iterator is not None:
            iterator._shutdown_workers()
        self._loader = self._stream = self._next = self._owner = None

    def epoch_batches(self, *, epoch: int, seed: int, rank: int, world: int, batch_size: int,
                      start: int = 0) -> _Batches:
        part = _Part(seed, epoch, rank, world, batch_size, start)
        plan = EpochPlan(self.split, seed=seed, epoch=epoch)
        items = self._items(part, plan, part.segments(plan))
        return _Batches(batches_per_epoch(len(self.split), world, batch_size), self._batches(items, batch_size))

    def _batches(self, items, batch_size: int):
        """Batches of ``batch_size`` rows (the last may be short) from uint8 image items."""
        pending, rows = deque(), 0
        for images in items:
            if isinstance(images, FastVAEError):
                raise images
            if len(images):
                pending.append(images)
                rows += len(images)
            while rows >= batch_size:
                yield self._take(pending, batch_size)
                rows -= batch_size
        if rows:
            yield self._take(pending, rows)

    def _items(self, part: _Part, plan: EpochPlan, segments: list[Segment]):
        """The items of ``segments``: read here (``--workers 0``), or taken from the workers'
        stream where it stands at ``part`` (an epoch after one read to its end); anything else
        (a first epoch, a resume, an epoch left half-way) restarts the stream at ``part``."""
        if self.workers == 0 or not segments:
            yield from read_in_process(self.split, plan, segments)
            return
        if self._loader is None:
            whole = replace(part, start=0).segments(plan)  # not a resume's remainder: every epoch's
            _stop_at_exit(self)
            self._loader = torch.utils.data.DataLoader(
                _SegmentReader(self.split), sampler=self._reads, batch_size=None,
                num_workers=min(self.workers, len(whole)), persistent_workers=True,
                pin_memory=self.device.type == "cuda", prefetch_factor=2,
                multiprocessing_context=_worker_context(), worker_init_fn=_worker_init,
                # its own generator: a DataLoader draws its workers' base seed from the global
                # RNG otherwise, which would shift the training noise by where an epoch (re)starts
                generator=torch.Generator().manual_seed(0))
        if self._next != part:
            self._reads.part = part
            self._stream = iter(self._loader)  # a persistent loader's iterator, reset
        self._next, self._owner = None, (token := object())  # until this epoch is read to its end
        for _ in segments:
            if self._owner is not token:
                raise RuntimeError("another epoch_batches iteration (or close) took over this StreamSource's "
                                   "workers: read one epoch at a time")
            yield next(self._stream)
        if self._owner is token:
            self._next = part.next_epoch()

    def _take(self, pending: deque, n: int) -> torch.Tensor:
        """The first ``n`` pending rows as a float batch on the device. A batch inside one item
        is a view of it (pinned on CUDA); one that spans items is joined from its parts alone,
        on the device (joining whole items copied ~4 items' rows per batch: 3 ms of the main
        thread per 4096 28x28 rows)."""
        parts = []
        while n:
            head = pending[0]
            if len(head) <= n:
                parts.append(pending.popleft())
                n -= len(head)
            else:
                parts.append(head[:n])
                pending[0] = head[n:]
                n = 0
        if len(parts) == 1:
            return to_float_images(parts[0], self.device)
        return to_float_images(torch.cat([part.to(self.device, non_blocking=True) for part in parts]), self.device)


def read_in_process(split: ShardSplit, plan: EpochPlan, segments: list[Segment]):
    """The items of ``segments`` read in this process, in order."""
    reader = _SegmentReader(split, plan)
    for segment in segments:
        yield reader[_Read(plan.seed, plan.epoch, plan.shuffle, segment)]


_LIVE: "weakref.WeakSet[StreamSource]" = weakref.WeakSet()


def _stop_at_exit(source: StreamSource) -> None:
    """Stop ``source``'s workers at interpreter exit, before multiprocessing's exit hook would
    terminate them (torch's SIGCHLD handler then prints a DataLoader traceback). Registered on
    the first persistent loader, after torch imported multiprocessing: exit hooks run last
    registered first."""
    if not getattr(_stop_at_exit, "registered", False):
        atexit.register(lambda: [s.close() for s in list(_LIVE)])
        _stop_at_exit.registered = True
    _LIVE.add(source)


def _worker_init(worker_id: int) -> None:
    from fastvae.interrupts import in_worker_process

    in_worker_process(parent_stops=True)


def _worker_context():
    """fork where it is safe (the default on Linux); Python 3.14 defaults to forkserver."""
    import multiprocessing

    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def make_source(data, fabric, workers: int = 2, epochs: int | None = None):
    """The training batch source for a split: streamed for a prepared split, else in memory."""
    return StreamSource(data, fabric.device, workers, epochs) if is_streamed(data) else TensorSource(data, fabric)


def batches_per_epoch(n: int, world: int, batch_size: int) -> int:
    """Batches of each rank in an epoch of ``n`` examples: ceil(ceil(n / W) / batch_size)."""
    return math.ceil(math.ceil(n / world) / batch_size)


# ------------------------------------------------------------------------------ evaluation


def eval_batches(data, batch_size: int, device, rank: int = 0, world: int = 1):
    """(global row indices, float images on ``device``) of this rank's share of ``data`` in
    ``ceil(ceil(N / W) / batch_size)`` batches on every rank (the last may be empty).

    A tensor: rows rank, rank + W, ... (already on its device); a prepared split: the
    contiguous rows [r*Q, (r+1)*Q) in stored order."""
    n = len(data)
    count = batches_per_epoch(n, world, batch_size)
    if not is_streamed(data):
        rows = torch.arange(rank, n, world, device=data.device)
        for i in range(count):
            chunk = rows[i * batch_size:(i + 1) * batch_size]
            yield chunk, data[chunk]
        return
    part = math.ceil(n / world)
    lo, hi = min(rank * part, n), min((rank + 1) * part, n)
    source = StreamSource(data, device, workers=0)
    plan = EpochPlan(data, seed=0, epoch=0, shuffle=False)
    segments = plan.segments(lo, hi)
    batches = source._batches(read_in_process(data, plan, segments), batch_size) if hi > lo else iter(())
    for i in range(count):
        start = lo + i * batch_size
        x = next(batches, None)
        if x is None:
            x = torch.zeros((0, *data.shape), device=device)
        yield torch.arange(start, start + len(x), device=device), x


def image_batches(data, batch_size: int = 256):
    """Every image of a split once, in stored order, as float batches: a tensor's rows (on its
    device), or a prepared split's blocks read one at a time (CPU)."""
    if not is_streamed(data):
        yield from torch.as_tensor(data).float().split(batch_size)
        return
    for _, x in eval_batches(data, batch_size, torch.device("cpu")):
        if len(x):
            yield x


def head(data, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``n`` examples of a prepared split (float, CPU) and their labels (None if the
    source had none): what pictures and latent statistics of a streamed run are drawn from."""
    images, labels, rows = [], [], 0
    for b in range(data.blocks):
        x, y = data.read_block(b)
        images.append(x)
        labels.append(y)
        rows += len(x)
        if rows >= n:
            break
    x = torch.from_numpy(np.concatenate(images)[:n]).float().div_(255.0)
    y = np.concatenate(labels)[:n]
    return x, None if (y < 0).all() else torch.from_numpy(y)


PICTURE_EXAMPLES = 1024
# float32 bytes of the test images a streamed run's pictures are drawn from: 1024 3x1024x1024
# images were 13 GB for the few a picture shows
PICTURE_BYTES = 256 << 20
MIN_PICTURE_EXAMPLES = 16


def in_memory_sample(splits, n: int = PICTURE_EXAMPLES):
    """``splits`` itself when in memory; for a prepared dataset, ``Splits`` holding the first
    ``n`` test examples for pictures, fewer for large images (``PICTURE_BYTES`` as float32,
    at least ``MIN_PICTURE_EXAMPLES``)."""
    if not is_streamed(splits.test):
        return splits
    from fastvae.data import Splits

    per_image = 4 * math.prod(splits.test.shape)
    test, labels = head(splits.test, min(n, max(MIN_PICTURE_EXAMPLES, PICTURE_BYTES // per_image)))
    return Splits(splits.name, test[:0], test, None, labels)
