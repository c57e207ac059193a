"""Dynamic batching for an asyncio service: concurrent requests' latent rows decoded in one call.

``await batcher.decode(z)`` queues ``z`` (rows, latent_dim); ``await batcher.sample(n)`` queues a
request for ``n`` fresh latent rows, drawn for the whole batch at once by ``draw_fn(rows)`` when
it is decoded (one generator call per batch, not one per request). One background task, once requests
are queued, waits up to ``max_wait`` seconds for more unless ``max_batch`` rows are queued
already (a full batch ends the wait early), then decodes up to ``max_batch`` rows, in arrival
order, with one call of ``decode_fn``: on a worker thread (onnxruntime releases the GIL, so the
event loop keeps reading requests while the decoder runs), or on the loop's own thread when the
call is expected to take less than ``inline_below`` seconds; and hands every request its own
rows. ``max_wait`` counts from the arrival of the oldest queued request, so it bounds what
batching adds to a request's latency beyond decoding. ``max_batch=1`` turns batching off: one
decoder call per request, no waiting. A request larger than ``max_batch`` rows is decoded
alone, a decoder call of ``max_batch`` rows at a time (``decode_fn`` never gets more rows;
latents larger than ``latent_shape`` get proportionally fewer, so a call's work stays bounded),
and goes back to the end of the queue after each call: requests that arrived meanwhile are not
held behind the whole of it. A request whose caller stopped waiting (its future cancelled: a
client that went away, a shutdown's timeout) is dropped before its next decoder call.
Requests made after ``close()`` began raise ``ShuttingDown``.

A failing decoder call fails only the requests that fail on their own: the batch's requests are
then decoded one by one, so one bad request (or an out-of-memory error on a large combined
batch) does not take the others with it. If the batching task itself dies (a ``BaseException``
such as ``SystemExit`` out of ``decode_fn``), every pending and later request raises
``BatcherFailed`` and ``failure`` says why (a service reports itself unhealthy).

Each request's rows are the same whether it was batched or not (the decoder maps rows
independently), so a seeded request gives the same samples under any load.

Torch-free.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastvae.errors import one_line

# A batch expected to decode faster than this runs on the event loop's own thread: handing it to
# the worker thread and back (a submit, two thread wake-ups, a callback) costs ~30-40 us of CPU
# per batch. On the 2-core dev CPU, the digits MLP decoder behind 64 clients asking for one
# sample each: ~300 us of server CPU per request with 100 us here (most batches went to the
# thread), ~290 us with 250 us. Heavier batches still go to the thread, so the loop reads new
# requests while the decoder runs.
INLINE_BELOW = 250e-6


class ShuttingDown(RuntimeError):
    """A request made after ``close()`` began."""


class BatcherFailed(RuntimeError):
    """The batching task died: no request can be decoded any more."""


class _Request:
    """A queued request: latents ``z`` (None: ``rows`` to draw), its future and arrival time;
    a request larger than one decoder call also its output so far (``out``, ``done`` rows)."""

    __slots__ = ("z", "rows", "future", "arrival", "done", "out")

    def __init__(self, z, rows: int, future, arrival: float):
        self.z, self.rows, self.future, self.arrival = z, rows, future, arrival
        self.done, self.out = 0, None


class DynamicBatcher:
    """Combines concurrent ``decode`` calls; see the module docstring.

    ``decode_fn(z) -> x``: the decoder (e.g. ``OnnxSampler.decode``); ``draw_fn(rows) -> z``: fresh
    latents for ``sample`` (e.g. ``OnnxSampler.draw_latents`` on the server's generator). ``start()`` inside the
    running loop, ``await close()`` at shutdown; ``drain()`` (thread-safe, e.g. from a signal
    handler) stops waiting for more requests: queued ones are decoded at once. ``latent_shape``:
    that of the rows ``draw_fn`` makes; latents of another shape per row (a spatial decoder
    takes any height and width) are never combined with them or with each other.
    """

    def __init__(self, decode_fn, max_batch: int = 64, max_wait: float = 0.002, inline_below: float = INLINE_BELOW,
                 draw_fn=None, latent_shape: tuple | None = None):
        if max_batch < 1 or max_wait < 0:
            raise ValueError("max_batch must be >= 1 and max_wait >= 0")
        self._decode_fn = decode_fn
        self.draw_fn = draw_fn
        self.latent_shape = None if latent_shape is None else tuple(latent_shape)
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait)
        self.inline_below = float(inline_below)
        self._seconds_per_value: float | None = None  # running estimate per latent value, from the calls made
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastvae-decode")
        self._items: deque = deque()  # _Request objects in order
        self._current: list = []  # the batch being decoded (items taken from _items)
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None  # set when a request is queued (or on drain)
        self._idle: asyncio.Event | None = None  # set while no request is pending
        self.draining = False
        self.failure: str | None = None  # why the batching task died (one line); None while alive
        self._closing = False
        self._waiting_for_first = False
        self._queued_rows = 0  # rows in self._items still to decode
        self.pending = 0  # requests queued or being decoded
        self.batches = 0  # decoder calls made
        self.rows = 0  # rows decoded

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._task = self._loop.create_task(self._run(), name="fastvae-batcher")

    def drain(self) -> None:
        """From now on decode queued requests without waiting for more (callable from any thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._start_draining)

    def _start_draining(self) -> None:
        self.draining = True
        self._wakeup.set()

    async def close(self) -> None:
        """Finish every pending request, then stop the task and the worker thread."""
        self._closing = True  # no request from now on: idle below means nothing is left
        if self._task is not None:
            self._start_draining()
            await self._idle.wait()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    def decode(self, z: np.ndarray):
        """Awaitable: the decoder's output for ``z`` (C-contiguous float32 rows), batched with others."""
        return self._queue(z, len(z))

    def sample(self, n: int):
        """Awaitable: the decoder's output for ``n`` latent rows drawn by ``draw_fn``, batched with others."""
        if self.draw_fn is None:
            raise RuntimeError("DynamicBatcher.sample needs a draw_fn")
        return self._queue(None, n)

    async def _queue(self, z, rows: int) -> np.ndarray:
        if self._closing:
            raise ShuttingDown("the batcher is closing: no new requests")
        if self.failure is not None:
            raise BatcherFailed(self.failure)
        future = self._loop.create_future()
        self.pending += 1
        self._idle.clear()
        try:
            self._items.append(_Request(z, rows, future, self._loop.time()))
            self._queued_rows += rows
            # wake the batching task only when it has something to do: a first request, or a
            # full batch (a wake-up per request would cost a task switch each)
            head = self._row_shape(self._items[0])  # another shape closes the waiting batch
            odd = head is not None and self._row_shape(self._items[-1]) not in (None, head)
            if self._waiting_for_first or self._queued_rows >= self._cap(head) or odd:
                self._wakeup.set()
            return await future
        finally:
            self.pending -= 1
            if not self.pending:
                self._idle.set()

    # -- the batching task ------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._batches()
        except asyncio.CancelledError:  # close()
            raise
        except BaseException as exc:  # noqa: BLE001 - the task ends here; its requests must hear why
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """The task is dead: fail every queued request, and (``failure`` set) every later one,
        instead of leaving them waiting for ever."""
        what = type(exc).__name__ + (f": {one_line(exc, 160)}" if str(exc).strip() else "")
        self.failure = f"the decoder's batching task died ({what}): restart the service"
        _fail([*self._current, *self._items], BatcherFailed(self.failure))
        self._items.clear()
        self._current, self._queued_rows = [], 0

    async def _batches(self) -> None:
        items, loop = self._items, self._loop
        while True:
            while items and items[0].future.done():  # its caller stopped waiting: nothing to decode
                self._queued_rows -= self._left(items.popleft())
            if not items:
                self._wakeup.clear()
                self._waiting_for_first = True
                await self._wakeup.wait()
                self._waiting_for_first = False
                continue
            # max_wait counts from the oldest request's arrival: time it spent queued behind
            # the previous batch's decode is not waited again
            left = items[0].arrival + self.max_wait - loop.time()
            full = self._queued_rows >= self._cap(self._row_shape(items[0]))
            if not full and left > 0 and not self.draining and not self._head_closed():
                self._wakeup.clear()  # set by a full batch, drain() or the timer
                timer = loop.call_later(left, self._wakeup.set)
                await self._wakeup.wait()
                timer.cancel()
            head = items.popleft()
            self._queued_rows -= self._left(head)
            if head.future.done():
                continue
            if head.rows > self._cap(self._row_shape(head)):  # one decoder call of it, then the others
                self._current = [head]
                await self._decode_part(head)
                self._current = []
                continue
            batch, rows, shape = [head], head.rows, self._row_shape(head)
            while items:  # a request too large for the batch starts the next one
                item = items[0]
                if item.future.done():
                    self._queued_rows -= self._left(items.popleft())
                    continue
                item_shape = self._row_shape(item)
                if ((item_shape is not None and shape is not None and item_shape != shape)
                        or rows + item.rows > self._cap(shape or item_shape)):
                    break  # latents of another shape (a spatial decoder's other h x w): next batch
                batch.append(items.popleft())
                self._queued_rows -= item.rows
                rows += item.rows
                shape = shape or item_shape
            self._current = batch  # for _fail_all, should the task die while decoding it
            await self._decode_batch(batch, rows)
            self._current = []

    @staticmethod
    def _left(item: _Request) -> int:
        return item.rows - item.done

    async def _decode_part(self, item: _Request) -> None:
        """One decoder call's worth of a request larger than one call; the request goes back to
        the end of the queue until all of it is decoded (its fresh latents drawn at once)."""
        try:
            if item.z is None:
                item.z = self.draw_fn(item.rows)
            stop = min(item.rows, item.done + self._cap(self._row_shape(item)))
            x = await self._decoded(item.z[item.done:stop])
        except Exception as exc:  # noqa: BLE001 - this request's own failure
            _fail([item], exc)
            return
        if item.future.done():  # gone while its rows were decoded
            return
        if item.out is None:
            item.out = np.empty((item.rows, *x.shape[1:]), x.dtype)
        item.out[item.done:stop] = x
        item.done = stop
        if item.done == item.rows:
            item.future.set_result(item.out)
        else:
            self._items.append(item)
            self._queued_rows += self._left(item)
            await asyncio.sleep(0)  # a decoder call inline, on this thread: let new requests in

    def _row_shape(self, item: _Request) -> tuple | None:
        """A queued request's latent shape per row (rows to draw: ``latent_shape``, None if unknown)."""
        return self.latent_shape if item.z is None else tuple(item.z.shape[1:])

    def _cap(self, shape) -> int:
        """Rows per decoder call: ``max_batch`` rows, proportionally fewer of latents larger
        than ``latent_shape`` (a call's work and memory stay those of ``max_batch`` rows)."""
        if self.latent_shape is None or shape is None or tuple(shape) == self.latent_shape:
            return self.max_batch
        return max(1, min(self.max_batch, self.max_batch * math.prod(self.latent_shape) // math.prod(shape)))

    def _head_closed(self) -> bool:
        """Whether a queued request of another shape than the oldest closes the oldest's batch
        (waiting longer would add nothing to it)."""
        head = self._row_shape(self._items[0])
        return head is not None and any(self._row_shape(item) not in (None, head) for item in self._items)

    def _timed_decode(self, z: np.ndarray) -> np.ndarray:
        """One decoder call (``z`` has at most ``_cap`` rows: the batches are made so)."""
        start = time.perf_counter()
        x = self._decode_fn(z)
        per_value = (time.perf_counter() - start) / max(z.size, 1)
        self._seconds_per_value = (per_value if self._seconds_per_value is None
                                   else 0.8 * self._seconds_per_value + 0.2 * per_value)
        return x

    async def _decoded(self, z: np.ndarray) -> np.ndarray:
        """The decoder's output for ``z``: inline or on the worker thread; checked and counted."""
        estimate = self._seconds_per_value
        if estimate is not None and estimate * z.size < self.inline_below:
            x = self._timed_decode(z)  # shorter than a hand-over to the worker thread and back
        else:
            x = await self._loop.run_in_executor(self._executor, self._timed_decode, z)
        if len(x) != len(z):
            raise RuntimeError(f"the decoder returned {len(x)} rows for {len(z)} latent rows")
        self.batches += 1
        self.rows += len(z)
        return x

    def _latents(self, batch, rows: int) -> np.ndarray:
        """The batch's latent rows in request order, fresh ones drawn in one call."""
        fresh = sum(item.rows for item in batch if item.z is None)
        if fresh and fresh == rows:
            return self.draw_fn(rows)
        if len(batch) == 1:
            return batch[0].z
        drawn, used, parts = self.draw_fn(fresh) if fresh else None, 0, []
        for item in batch:
            z = item.z
            if z is None:
                z, used = drawn[used:used + item.rows], used + item.rows
            parts.append(z)
        return np.concatenate(parts)

    async def _decode_batch(self, batch, rows: int) -> None:
        try:
            z = self._latents(batch, rows)
        except Exception as exc:  # noqa: BLE001 - no latents, nothing to retry: the batch's requests hear why
            _fail(batch, exc)
            return
        try:
            x = await self._decoded(z)
        except Exception as exc:  # noqa: BLE001 - retried below, or handed to the request that asked
            if len(batch) == 1:
                _fail(batch, exc)
            else:
                await self._decode_one_by_one(batch, z)
            return
        start = 0
        for item in batch:
            stop = start + item.rows
            if not item.future.done():  # cancelled while decoded: a client that went away
                item.future.set_result(x[start:stop])
            start = stop

    async def _decode_one_by_one(self, batch, z: np.ndarray) -> None:
        """After a failed batch: each request's rows (the same latents) decoded alone, so only
        the requests that fail on their own fail."""
        start = 0
        for item in batch:
            stop = start + item.rows
            future = item.future
            if not future.done():
                try:
                    x = await self._decoded(z[start:stop])
                except Exception as exc:  # noqa: BLE001 - this request's own failure
                    future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(x)
            start = stop


def _fail(batch, exc: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc)

