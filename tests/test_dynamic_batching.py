"""DynamicBatcher: concurrent requests decoded together, each handed exactly its own rows.

The decoder here doubles its rows and logs each call's size, so a test can tell which rows were
decoded together and what each request got back; fresh latents come from a seeded generator
whose draws the test repeats.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from fastvae.export.dynamic_batching import BatcherFailed, DynamicBatcher, ShuttingDown


class Recorder:
    """decode_fn / draw_fn that log their calls."""

    def __init__(self, seed=0, fail_when=None, draw_fails_when=None):
        self.rng = np.random.default_rng(seed)
        self.decoded, self.drawn = [], []
        self.fail_when, self.draw_fails_when = fail_when, draw_fails_when

    def decode(self, z):
        self.decoded.append(len(z))
        if self.fail_when is not None and self.fail_when(z):
            raise ValueError("decoder failed")
        return z * 2.0

    def draw(self, rows):
        self.drawn.append(rows)
        if self.draw_fails_when is not None and self.draw_fails_when(rows):
            raise OSError("no entropy")
        return self.rng.standard_normal((rows, 3)).astype(np.float32)


def run(recorder, requests, max_batch, max_wait=60.0, latent_shape=None):
    """Queue every request in one loop turn, then await them all: [(kind, arg)] -> results
    (arrays or exceptions). ``("z", array)``: decode; ``("n", rows)``: fresh rows. A full batch
    must not wait: a batcher that waits out ``max_wait`` fails the 20 s deadline."""

    async def main():
        batcher = DynamicBatcher(recorder.decode, max_batch, max_wait, draw_fn=recorder.draw,
                                 latent_shape=latent_shape)
        batcher.start()
        calls = [batcher.decode(arg) if kind == "z" else batcher.sample(arg) for kind, arg in requests]
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 20)
        await asyncio.wait_for(batcher.close(), 20)
        return results, batcher

    return asyncio.run(main())


def z_rows(rows, start):
    return (np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + start)


def test_a_mixed_batch_hands_each_request_its_rows_and_draws_fresh_rows_once():
    given_a, given_b = z_rows(2, 100), z_rows(1, 200)
    requests = [("n", 2), ("z", given_a), ("n", 3), ("z", given_b), ("n", 1)]
    recorder = Recorder(seed=7)
    results, batcher = run(recorder, requests, max_batch=9)  # 9 rows: one full batch, no waiting

    assert recorder.decoded == [9] and recorder.drawn == [6]  # one decoder call, one draw for 6 rows
    fresh = np.random.default_rng(7).standard_normal((6, 3)).astype(np.float32)
    np.testing.assert_array_equal(results[0], 2 * fresh[0:2])  # fresh rows in arrival order
    np.testing.assert_array_equal(results[1], 2 * given_a)
    np.testing.assert_array_equal(results[2], 2 * fresh[2:5])
    np.testing.assert_array_equal(results[3], 2 * given_b)
    np.testing.assert_array_equal(results[4], 2 * fresh[5:6])
    assert (batcher.batches, batcher.rows, batcher.pending) == (1, 9, 0)


def test_latents_of_another_shape_per_row_are_never_combined():
    """A spatial decoder takes any latent height and width: rows of another shape than the
    drawn ones (or than the batch's) start a new batch, in arrival order, instead of failing
    a whole batch in np.concatenate."""
    wide = np.ones((1, 5), dtype=np.float32)
    requests = [("z", z_rows(2, 0)), ("n", 2), ("z", wide), ("z", z_rows(2, 100)), ("n", 1)]
    recorder = Recorder()
    results, _ = run(recorder, requests, max_batch=16, max_wait=0.05, latent_shape=(3,))  # batches not full
    assert recorder.decoded == [4, 1, 3]
    np.testing.assert_array_equal(results[0], z_rows(2, 0) * 2.0)
    np.testing.assert_array_equal(results[2], wide * 2.0)
    np.testing.assert_array_equal(results[3], z_rows(2, 100) * 2.0)
    assert [r.shape for r in results] == [(2, 3), (2, 3), (1, 5), (2, 3), (1, 3)]


def test_a_request_of_another_shape_closes_the_waiting_batch_and_large_latents_get_fewer_rows_per_call():
    """The oldest request's batch stops waiting once a request of another shape is queued (it
    could add nothing more: without this the first request waited out max_wait, 60 s here);
    latents 4x the drawn size get a quarter of max_batch rows per decoder call."""
    recorder = Recorder()

    async def main():
        batcher = DynamicBatcher(recorder.decode, 8, 60.0, draw_fn=recorder.draw, latent_shape=(3,))
        batcher.start()
        first = asyncio.ensure_future(batcher.decode(z_rows(2, 0)))
        big = asyncio.ensure_future(batcher.decode(np.ones((5, 12), dtype=np.float32)))
        got = await asyncio.wait_for(first, 20)
        batcher.drain()  # the last batch would wait for company: go
        large = await asyncio.wait_for(big, 20)
        await asyncio.wait_for(batcher.close(), 20)
        return got, large

    got, large = asyncio.run(main())
    np.testing.assert_array_equal(got, z_rows(2, 0) * 2.0)
    assert large.shape == (5, 12) and recorder.decoded == [2, 2, 2, 1]  # 8 x 3 / 12 = 2 rows a call


def test_a_sample_request_behind_latents_of_another_size_closes_their_batch_too():
    """Rows to draw have the drawn shape: queued behind latents of another size, they close
    that batch as a decode request would (it waited out max_wait, 60 s here)."""
    recorder = Recorder()

    async def main():
        batcher = DynamicBatcher(recorder.decode, 8, 60.0, draw_fn=recorder.draw, latent_shape=(3,))
        batcher.start()
        wide = asyncio.ensure_future(batcher.decode(np.ones((1, 5), dtype=np.float32)))
        drawn = asyncio.ensure_future(batcher.sample(2))
        got = await asyncio.wait_for(wide, 20)
        batcher.drain()
        await asyncio.wait_for(drawn, 20)
        await asyncio.wait_for(batcher.close(), 20)
        return got

    assert asyncio.run(main()).shape == (1, 5) and recorder.decoded == [1, 2]


def test_batches_never_exceed_max_batch_and_a_larger_request_goes_alone():
    requests = [("n", 3), ("n", 3), ("z", z_rows(10, 0)), ("n", 2)]
    recorder = Recorder()
    results, batcher = run(recorder, requests, max_batch=4, max_wait=0.0)
    # 3 + 3 > 4; the 10-row request alone, in <= 4-row calls, the 2-row request between them
    assert recorder.decoded == [3, 3, 4, 2, 4, 2]
    assert [len(r) for r in results] == [3, 3, 10, 2]
    np.testing.assert_array_equal(results[2], 2 * z_rows(10, 0))
    assert (batcher.rows, batcher.batches) == (18, 6)  # batches: decoder calls


def test_max_batch_caps_every_decoder_call_and_the_pieces_come_back_in_order():
    """--max-batch is the most rows per decoder call, also for one request of many rows."""
    recorder = Recorder(seed=3)
    given = z_rows(11, 0)
    results, batcher = run(recorder, [("z", given), ("n", 7)], max_batch=3, max_wait=0.0)
    assert max(recorder.decoded) <= 3 and recorder.decoded == [3, 3, 3, 3, 3, 1, 2]  # taking turns
    np.testing.assert_array_equal(results[0], 2 * given)
    fresh = np.random.default_rng(3).standard_normal((7, 3)).astype(np.float32)
    np.testing.assert_array_equal(results[1], 2 * fresh)  # drawn once, decoded in three calls
    assert recorder.drawn == [7] and (batcher.batches, batcher.rows) == (7, 18)


def test_only_given_rows_take_no_draw():
    recorder = Recorder()
    results, _ = run(recorder, [("z", z_rows(2, 0)), ("z", z_rows(2, 50))], max_batch=4)
    assert recorder.drawn == [] and recorder.decoded == [4]
    np.testing.assert_array_equal(np.concatenate(results), 2 * np.concatenate([z_rows(2, 0), z_rows(2, 50)]))


def test_a_failed_batch_is_decoded_request_by_request_so_only_the_failing_request_fails():
    """One bad request (or an error of the combined batch, e.g. out of memory) does not fail the
    others: after the batch's call fails, each request's rows (the same latents, not drawn
    again) are decoded alone."""
    bad = np.full((2, 3), 7.0, np.float32)
    recorder = Recorder(seed=5, fail_when=lambda z: (z == 7.0).any())
    requests = [("n", 2), ("z", bad), ("z", z_rows(1, 0)), ("n", 3)]
    results, batcher = run(recorder, requests, max_batch=8)  # 8 rows: one full batch
    assert recorder.decoded == [8, 2, 2, 1, 3] and recorder.drawn == [5]
    assert isinstance(results[1], ValueError)
    fresh = np.random.default_rng(5).standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_array_equal(results[0], 2 * fresh[:2])
    np.testing.assert_array_equal(results[2], 2 * z_rows(1, 0))
    np.testing.assert_array_equal(results[3], 2 * fresh[2:])
    assert (batcher.batches, batcher.rows, batcher.pending) == (3, 6, 0)  # the failed calls are not counted


def test_a_failed_batch_whose_requests_pass_alone_fails_nobody_and_the_next_batch_still_runs():
    recorder = Recorder(fail_when=lambda z: len(z) == 3)  # only the combined batch fails
    results, batcher = run(recorder, [("n", 1), ("n", 2), ("z", z_rows(4, 0))], max_batch=4)
    assert recorder.decoded == [3, 1, 2, 4]  # 1 + 2 rows together (failed), then alone; then 4 rows
    assert [r.shape for r in results[:2]] == [(1, 3), (2, 3)]
    np.testing.assert_array_equal(results[2], 2 * z_rows(4, 0))
    assert (batcher.batches, batcher.pending) == (3, 0)


def test_a_dead_batching_task_fails_pending_and_later_requests_instead_of_hanging():
    """A BaseException out of decode_fn (not an Exception: SystemExit, a library's own) ends the
    batching task; the request it was decoding, the queued ones and every later one raise
    BatcherFailed at once, ``failure`` says why, and close() still finishes."""

    class Fatal(BaseException):
        pass

    def decode(z):
        raise Fatal("decoder state lost")

    async def main():
        batcher = DynamicBatcher(decode, 2, 0.0, inline_below=0.0)
        batcher.start()
        first = [batcher.decode(z_rows(2, 0)), batcher.decode(z_rows(2, 1)), batcher.decode(z_rows(1, 2))]
        results = await asyncio.wait_for(asyncio.gather(*first, return_exceptions=True), 20)
        later = await asyncio.wait_for(asyncio.gather(batcher.decode(z_rows(1, 0)), return_exceptions=True), 20)
        await asyncio.wait_for(batcher.close(), 20)
        return results + later, batcher

    results, batcher = asyncio.run(main())
    assert all(isinstance(r, BatcherFailed) for r in results), results
    assert "Fatal: decoder state lost" in batcher.failure and "restart" in batcher.failure
    assert batcher.pending == 0


def test_sample_needs_a_draw_fn():
    batcher = DynamicBatcher(lambda z: z, 4, 0.0)
    with pytest.raises(RuntimeError, match="draw_fn"):
        batcher.sample(1)


def test_a_failing_draw_reaches_the_requests_of_its_batch_only():
    recorder = Recorder(draw_fails_when=lambda rows: rows == 3)
    results, batcher = run(recorder, [("n", 1), ("n", 2), ("n", 2)], max_batch=3, max_wait=0.0)
    assert recorder.drawn == [3, 2] and recorder.decoded == [2]  # the failed batch never decoded
    assert all(isinstance(r, OSError) for r in results[:2]) and results[2].shape == (2, 3)
    assert (batcher.batches, batcher.pending) == (1, 0)


def test_a_decoder_returning_the_wrong_number_of_rows_is_an_error_not_short_answers():
    async def main():
        batcher = DynamicBatcher(lambda z: z[:-1], 4, 0.0)
        batcher.start()
        out = await asyncio.wait_for(asyncio.gather(batcher.decode(z_rows(2, 0)), batcher.decode(z_rows(2, 9)),
                                                    return_exceptions=True), 20)
        await batcher.close()
        return out

    results = asyncio.run(main())
    # the combined call (3 rows for 4) fails, and so does each request alone
    assert all(isinstance(r, RuntimeError) and "1 rows for 2" in str(r) for r in results), results


def test_a_cancelled_request_does_not_disturb_the_others_or_the_count():
    """A client that goes away: its task is cancelled while queued; the batch still decodes the
    others, pending returns to 0 and close() finishes."""
    recorder = Recorder()

    async def main():
        batcher = DynamicBatcher(recorder.decode, 8, 60.0, draw_fn=recorder.draw)
        batcher.start()
        tasks = [asyncio.ensure_future(batcher.sample(2)) for _ in range(3)]
        await asyncio.sleep(0)  # not synchronisation by time: one loop turn, in which all three queue
        assert batcher.pending == 3
        tasks[1].cancel()
        batcher.drain()  # decode what is queued now instead of waiting 60 s for a full batch
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        await asyncio.wait_for(batcher.close(), 20)
        return results, batcher

    results, batcher = asyncio.run(main())
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[0].shape == results[2].shape == (2, 3) and batcher.pending == 0
    assert recorder.decoded == [4]  # the cancelled request's rows were not decoded (they were, for nobody)


def test_an_empty_request_is_decoded_as_given_with_or_without_a_draw_fn():
    recorder = Recorder()
    results, _ = run(recorder, [("z", np.zeros((0, 3), np.float32))], max_batch=4, max_wait=0.0)
    assert results[0].shape == (0, 3) and recorder.drawn == []

    async def main():  # no draw_fn at all
        batcher = DynamicBatcher(lambda z: z * 2.0, 4, 0.0)
        batcher.start()
        out = await asyncio.wait_for(batcher.decode(np.zeros((0, 3), np.float32)), 20)
        await batcher.close()
        return out

    assert asyncio.run(main()).shape == (0, 3)


def test_max_wait_counts_from_arrival_so_a_request_queued_behind_a_decode_is_not_held_again():
    """A partial batch waits max_wait from its arrival (the timer fires); a request that arrives
    while that batch decodes, and has been queued for max_wait when the decode ends, is decoded
    straight after it instead of waiting max_wait more."""
    max_wait = 1.0
    started, log = threading.Event(), []  # log: (rows, monotonic time the decoder got them)

    def decode(z):
        log.append((len(z), time.monotonic()))
        if len(log) == 1:  # the first batch: hold it until the second request is overdue
            started.set()
            while time.monotonic() < second_arrival[0] + max_wait + 0.2:
                time.sleep(0.01)  # not synchronisation: the time that must pass is the subject
        return z * 2.0

    second_arrival = [float("inf")]

    async def main():
        loop = asyncio.get_running_loop()
        batcher = DynamicBatcher(decode, 8, max_wait)
        batcher.start()
        first_arrival = time.monotonic()
        first = asyncio.ensure_future(batcher.decode(z_rows(1, 0)))
        await loop.run_in_executor(None, started.wait)  # the first batch is being decoded
        second_arrival[0] = time.monotonic()
        second = await asyncio.wait_for(batcher.decode(z_rows(1, 10)), 20)
        await asyncio.wait_for(first, 20)
        await batcher.close()
        return first_arrival, second

    first_arrival, second = asyncio.run(main())
    np.testing.assert_array_equal(second, 2 * z_rows(1, 10))
    (rows_a, t_a), (rows_b, t_b) = log
    assert rows_a == rows_b == 1
    assert t_a - first_arrival >= max_wait - 0.05  # the partial batch waited for company
    # the second batch: decoded right after the first one ended, not max_wait later
    first_end = second_arrival[0] + max_wait + 0.2
    assert t_b - first_end < max_wait / 2, (t_b - first_end)


def test_requests_after_close_are_refused():
    async def main():
        batcher = DynamicBatcher(lambda z: z, 4, 0.0)
        batcher.start()
        await batcher.close()
        with pytest.raises(ShuttingDown):
            await batcher.decode(z_rows(1, 0))

    asyncio.run(main())


class Held:
    """A decoder (doubling its rows) whose calls wait for ``release``; ``calls``: rows per call."""

    def __init__(self):
        self.calls, self.release = [], threading.Event()

    def __call__(self, z):
        self.calls.append(len(z))
        self.release.wait(20)
        return z * 2.0

    async def large_request(self, rows: int):
        """A batcher of 4-row calls, with a request of ``rows`` rows whose first call is running."""
        batcher = DynamicBatcher(self, 4, 0.0)
        batcher.start()
        large = asyncio.ensure_future(batcher.decode(z_rows(rows, 0)))
        while not self.calls:
            await asyncio.sleep(0)  # not synchronisation by time: one loop turn
        return batcher, large


def test_a_large_request_takes_turns_with_requests_that_arrive_while_it_is_decoded():
    """A request of many decoder calls held every request behind it for all of them (a 4096-row
    request on a spatial decoder: ~5.5 s): it goes back to the end of the queue after each call."""
    decode = Held()
    started = decode.calls

    async def main():
        batcher, large = await decode.large_request(16)  # its first call runs until the small one is queued
        small = asyncio.ensure_future(batcher.decode(z_rows(1, 100)))
        await asyncio.sleep(0)  # one loop turn: it is queued
        decode.release.set()
        small = await asyncio.wait_for(small, 20)
        result = await asyncio.wait_for(large, 20)
        await asyncio.wait_for(batcher.close(), 20)
        return small, result

    small, result = asyncio.run(main())
    assert started == [4, 1, 4, 4, 4]  # the small request right after the call it arrived during
    np.testing.assert_array_equal(small, 2 * z_rows(1, 100))
    np.testing.assert_array_equal(result, 2 * z_rows(16, 0))


def test_a_large_request_whose_caller_went_away_stops_after_the_current_call():
    """A cancelled request of many calls (a client gone, a shutdown's timeout) was decoded to its
    end, holding the queue and the process's exit: now one call at most."""
    decode = Held()
    calls = decode.calls

    async def main():
        batcher, large = await decode.large_request(40)  # its first call runs when it is cancelled
        large.cancel()
        decode.release.set()
        after = await asyncio.wait_for(batcher.decode(z_rows(2, 0)), 20)
        await asyncio.wait_for(batcher.close(), 20)
        return after, batcher

    after, batcher = asyncio.run(main())
    assert calls == [4, 2] and batcher.pending == 0 and after.shape == (2, 3)
