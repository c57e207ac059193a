"""DynamicBatcher: concurrent requests decoded together, each handed exactly its own rows.

The decoder here doubles its rows and logs each call's size, so a test can tell which rows were
decoded together and what each request got back; fresh latents come from a seeded generator
whose draws the test repeats.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fastvae.export.dynamic_batching import DynamicBatcher


class Recorder:
    """decode_fn / draw_fn that log their calls."""

    def __init__(self, seed=0, fail_when=None):
        self.rng = np.random.default_rng(seed)
        self.decoded, self.drawn = [], []
        self.fail_when = fail_when

    def decode(self, z):
        self.decoded.append(len(z))
        if self.fail_when is not None and self.fail_when(z):
            raise ValueError("decoder failed")
        return z * 2.0

    def draw(self, rows):
        self.drawn.append(rows)
        return self.rng.standard_normal((rows, 3)).astype(np.float32)


def run(recorder, requests, max_batch, max_wait=60.0):
    """Queue every request in one loop turn, then await them all: [(kind, arg)] -> results
    (arrays or exceptions). ``("z", array)``: decode; ``("n", rows)``: fresh rows."""

    async def main():
        batcher = DynamicBatcher(recorder.decode, max_batch, max_wait, draw_fn=recorder.draw)
        batcher.start()
        calls = [batcher.decode(arg) if kind == "z" else batcher.sample(arg) for kind, arg in requests]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await batcher.close()
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


def test_batches_never_exceed_max_batch_and_a_larger_request_goes_alone():
    requests = [("n", 3), ("n", 3), ("z", z_rows(10, 0)), ("n", 2)]
    recorder = Recorder()
    results, batcher = run(recorder, requests, max_batch=4, max_wait=0.0)
    assert recorder.decoded == [3, 3, 10, 2]  # 3 + 3 > 4; the 10-row request alone
    assert [len(r) for r in results] == [3, 3, 10, 2]
    np.testing.assert_array_equal(results[2], 2 * z_rows(10, 0))
    assert batcher.rows == 18


def test_only_given_rows_take_no_draw():
    recorder = Recorder()
    results, _ = run(recorder, [("z", z_rows(2, 0)), ("z", z_rows(2, 50))], max_batch=4)
    assert recorder.drawn == [] and recorder.decoded == [4]
    np.testing.assert_array_equal(np.concatenate(results), 2 * np.concatenate([z_rows(2, 0), z_rows(2, 50)]))


def test_a_decoder_error_reaches_every_request_of_its_batch_and_the_next_batch_still_runs():
    recorder = Recorder(fail_when=lambda z: len(z) == 3)
    results, batcher = run(recorder, [("n", 1), ("n", 2), ("z", z_rows(4, 0))], max_batch=3)
    assert recorder.decoded == [3, 4]
    assert all(isinstance(r, ValueError) for r in results[:2])
    np.testing.assert_array_equal(results[2], 2 * z_rows(4, 0))
    assert (batcher.batches, batcher.pending) == (1, 0)


def test_sample_needs_a_draw_fn():
    batcher = DynamicBatcher(lambda z: z, 4, 0.0)
    with pytest.raises(RuntimeError, match="draw_fn"):
        batcher.sample(1)
