"""``fastvae serve``: every endpoint, every bad request, batching, SIGTERM drain, bounded load.

Servers run in subprocesses on 127.0.0.1 with port 0, torch blocked in them; readiness is the
line the server prints once listening, and "a request is in flight" (or "is waiting for its
body") is read from /healthz (a poll loop with a deadline): nothing waits on a timer. Decoder
failures, a dead batcher and slow encodings are staged in-process, on the ASGI app itself.
"""

from __future__ import annotations

import http.client
import importlib.util
import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fastvae.export import OnnxSampler
from fastvae.export.onnx_export import _update_metadata
from testkit import asgi_part as _part, exported_mlp_decoder, in_process_service

LATENT = 4
SHAPE = (1, 8, 8)
EXPORTED_FROM = "/home/alice/experiments/mnist-run7"
MAX_N, MAX_BODY, MAX_VALUES = 500, 20_000, 5_000  # 5,000 values: 78 samples of 1x8x8
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

# the CLI with torch blocked: the service must not need it
_SERVE = "import sys; sys.modules['torch'] = None; from fastvae.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """(decoder.onnx, numpy weights (W1, b1, W2, b2) of the same MLP decoder)."""
    import torch

    model, path = exported_mlp_decoder(tmp_path_factory.mktemp("serve"), hidden_dim=32, latent_dim=LATENT)
    # as `fastvae export RUN` writes it: the run folder's absolute path on the exporting machine
    _update_metadata(path, {"source": EXPORTED_FROM})
    layers = [m for m in model.decoder.net if isinstance(m, torch.nn.Linear)]
    weights = [t.detach().numpy().astype(np.float64) for layer in layers for t in (layer.weight, layer.bias)]
    return path, weights


def numpy_decoder(weights, z):
    """The MLP decoder's means in float64 numpy: sigmoid(W2 relu(W1 z + b1) + b2)."""
    w1, b1, w2, b2 = weights
    h = np.maximum(z.astype(np.float64) @ w1.T + b1, 0.0)
    return (1.0 / (1.0 + np.exp(-(h @ w2.T + b2)))).reshape(len(z), *SHAPE)


def _bench_module(name):
    spec = importlib.util.spec_from_file_location(f"fastvae_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


service_process = _bench_module("service_process")


class Server(service_process.ServiceProcess):
    """A ``fastvae serve`` subprocess on 127.0.0.1, port 0; ``port`` from its readiness line."""

    def __init__(self, model, *flags):
        super().__init__([sys.executable, "-c", _SERVE, "serve", str(model), "--port", "0", *map(str, flags)],
                         ready_prefix="fastvae serve: listening on http://127.0.0.1:",
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def request(self, method, path, body=b"", headers=None, timeout=60):
        """(status, headers, body bytes) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def sample(self, **fields):
        status, headers, body = self.request("POST", "/sample", fields)
        assert status == 200, body
        return np.load(io.BytesIO(body)) if fields.get("format", "npy") == "npy" else body

    def health(self):
        status, _, body = self.request("GET", "/healthz")
        assert status == 200
        return json.loads(body)


@pytest.fixture(scope="module")
def server(decoder):
    """A batching server (16 rows at most, 50 ms wait) with small limits."""
    srv = Server(decoder[0], "--max-batch", 16, "--max-wait-ms", 50, "--max-n", MAX_N, "--max-body", MAX_BODY,
                 "--max-values", MAX_VALUES)
    yield srv
    rc, _, err = srv.stop()
    assert rc == 0 and "Traceback" not in err, err[-2000:]


# -- endpoints -------------------------------------------------------------------------------------
def test_healthz_and_metadata(server, decoder):
    assert server.health()["status"] == "ok"
    status, headers, body = server.request("GET", "/metadata")
    meta = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json"
    assert meta["latent_dim"] == LATENT and meta["output_shape"] == list(SHAPE) and meta["provider"] == "cpu"
    assert meta["limits"] == {"max_n": MAX_N, "max_body": MAX_BODY, "max_values": MAX_VALUES, "body_timeout": 30.0,
                              "max_pending": 1024, "max_connections": 2048}
    assert meta["batching"] == {"max_batch": 16, "max_wait_ms": 50.0}
    in_file = OnnxSampler(decoder[0]).metadata
    assert in_file["source"] == EXPORTED_FROM
    # the exporting machine's folders are not the client's business: the run folder's name only
    assert meta["decoder_metadata"] == {**in_file, "source": "mnist-run7"}


def test_metadata_shows_a_checkpoints_path_from_its_run_folder_on():
    from fastvae.export.metadata import client_metadata

    for source, shown in (("/home/alice/runs/r7/checkpoints/last.ckpt", "r7/checkpoints/last.ckpt"),
                          ("/home/alice/runs/r7/epoch3.ckpt", "r7/epoch3.ckpt"), ("/srv/r7/", "r7"),
                          ("<in-memory module>", "<in-memory module>")):
        assert client_metadata({"source": source, "k": "v"}) == {"source": shown, "k": "v"}


def test_sample_npy_is_the_seeded_decoder_output(server, decoder):
    path, weights = decoder
    x = server.sample(n=7, seed=11)
    z = np.random.default_rng(11).standard_normal((7, LATENT), dtype=np.float32)
    assert x.shape == (7, *SHAPE) and x.dtype == np.float32
    np.testing.assert_allclose(x, numpy_decoder(weights, z), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x, OnnxSampler(path, threads=1).sample(7, seed=11, batch_size=1))
    assert not np.allclose(server.sample(n=7, seed=12), x)
    assert server.sample(n=3).shape == (3, *SHAPE)  # unseeded


def test_sample_json_png_and_mode(server, decoder):
    path, _ = decoder
    reference = OnnxSampler(path)
    data = json.loads(server.sample(n=3, seed=2, format="json"))
    assert data["shape"] == [3, *SHAPE]
    np.testing.assert_allclose(np.asarray(data["data"], np.float32), reference.sample(3, seed=2), rtol=0, atol=1e-7)

    from PIL import Image

    png = Image.open(io.BytesIO(server.sample(n=16, seed=2, format="png")))
    scale, nrow = 64 // 8, math.ceil(math.sqrt(16))
    side = (nrow * (8 + 1) + 1) * scale  # viz.image_grid's layout
    assert png.format == "PNG" and png.size == (side, side)

    drawn = server.sample(n=50, seed=4, mode="sample")
    assert set(np.unique(drawn)) <= {0.0, 1.0}
    np.testing.assert_array_equal(drawn, reference.sample(50, seed=4, mode="sample"))


def test_decode_json_and_npy_bodies(server, decoder):
    _, weights = decoder
    z = np.random.default_rng(5).standard_normal((9, LATENT)).astype(np.float32)
    status, headers, body = server.request("POST", "/decode", {"z": z.tolist()})
    assert status == 200 and headers["content-type"] == "application/x-npy"
    np.testing.assert_allclose(np.load(io.BytesIO(body)), numpy_decoder(weights, z), rtol=1e-5, atol=1e-6)
    buffer = io.BytesIO()
    np.save(buffer, z.astype(np.float64))
    status, _, body = server.request("POST", "/decode?format=json", buffer.getvalue(),
                                     headers={"Content-Type": "application/x-npy"})
    assert status == 200
    np.testing.assert_allclose(np.asarray(json.loads(body)["data"]), numpy_decoder(weights, z), rtol=1e-5, atol=1e-6)


def _in_process(sampler, scenario, limits=None, batching=None):
    """``testkit.in_process_service`` with this module's limits by default."""
    from fastvae.export.service_io import Limits

    return in_process_service(sampler, scenario, limits or Limits(max_n=MAX_N, max_body=MAX_BODY), batching)


def _asgi_post(decoder_path, path, messages, max_body=MAX_BODY):
    """(status, body bytes) of one POST to an in-process app whose body arrives as the given
    ASGI messages (dicts, in order)."""
    from fastvae.export.service_io import Limits

    async def scenario(call, app):
        status, _, body = await call("POST", path, messages)
        return status, body

    return _in_process(OnnxSampler(decoder_path, threads=1), scenario, Limits(max_n=MAX_N, max_body=max_body))


def test_a_body_in_several_messages_is_assembled(decoder):
    path, _ = decoder
    status, body = _asgi_post(path, "/sample", [_part(b'{"n'), _part(b'": 2, "se'), _part(b'ed": 5}', more=False)])
    assert status == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), OnnxSampler(path, threads=1).sample(2, seed=5))


def test_a_body_over_the_limit_in_small_messages_is_refused(decoder):
    """No single message is over --max-body, their sum is: 413 before the rest is read."""
    path, _ = decoder
    chunk = b" " * 300
    status, body = _asgi_post(path, "/sample", [_part(b'{"n": 1}')] + [_part(chunk)] * 4 + [_part(b"", more=False)],
                              max_body=1000)
    assert status == 413 and "--max-body 1000" in json.loads(body)["error"]
    status, _ = _asgi_post(path, "/sample", [_part(b'{"n": 1}' + chunk * 3, more=False)], max_body=1000)
    assert status == 200  # 908 bytes: under the limit


def test_a_client_gone_mid_body_gets_no_error_response(decoder):
    path, _ = decoder
    for endpoint in ("/sample", "/decode"):
        status, body = _asgi_post(path, endpoint, [_part(b'{"n'), {"type": "http.disconnect"}])
        assert status == 499 and body == b""  # nothing to answer: no 500, no traceback


def _held(sampler):
    """``sampler`` whose decoder calls wait for ``sampler.release`` (a threading.Event);
    ``sampler.calls`` logs the rows of each call as it begins."""
    real, sampler.calls, sampler.release = sampler.decode, [], threading.Event()

    def decode(z, batch_size=None):
        sampler.calls.append(len(z))
        assert sampler.release.wait(30)
        return real(z, batch_size)

    sampler.decode = decode
    return sampler


def test_a_client_gone_while_its_request_is_decoded_stops_its_decoding(decoder):
    """uvicorn does not cancel a handler whose client disconnected: a 40-row request (three
    decoder calls of 16 rows at most) was decoded to its end for nobody, holding every request
    behind it. The disconnect now cancels it: the call already running is its last."""
    import asyncio

    from fastvae.export.http_service import Batching
    from fastvae.export.service_io import Limits

    sampler = _held(OnnxSampler(decoder[0], threads=1))

    async def scenario(call, app):
        loop = asyncio.get_running_loop()
        leaves = loop.create_future()  # the client's disconnect, once its first call runs
        request = loop.create_task(call("POST", "/sample", [_part(b'{"n": 40, "seed": 1}', more=False), leaves]))
        while not sampler.calls:
            await asyncio.sleep(0.001)  # not synchronisation: polling for the decoder's first call
        leaves.set_result({"type": "http.disconnect"})
        status, _, body = await request
        sampler.release.set()
        after = await call("POST", "/sample", [_part(b'{"n": 2, "seed": 1}', more=False)])
        return status, body, after[0], app.state.batcher.pending

    status, body, after, pending = _in_process(sampler, scenario, Limits(max_n=MAX_N, max_body=MAX_BODY),
                                               Batching(16, 0.0))
    assert status == 499 and body == b"" and after == 200 and pending == 0
    assert sampler.calls == [16, 2]  # not 16, 16, 8 for nobody


def test_requests_beyond_max_pending_get_503_with_retry_after(decoder):
    """The queue had no bound: clients that time out and retry piled up requests for ever."""
    import asyncio

    from fastvae.export.http_service import Batching
    from fastvae.export.service_io import Limits

    sampler = _held(OnnxSampler(decoder[0], threads=1))

    async def scenario(call, app):
        first = asyncio.get_running_loop().create_task(call("POST", "/sample", [_part(b'{"n": 1}', more=False)]))
        while not sampler.calls:
            await asyncio.sleep(0.001)  # not synchronisation: polling for the decoder's first call
        refused = await call("POST", "/decode", [_part(b'{"z": [[0, 0, 0, 0]]}', more=False)])
        sampler.release.set()
        return refused, (await first)[0]

    (status, headers, body), first = _in_process(sampler, scenario, Limits(max_n=MAX_N, max_body=MAX_BODY,
                                                                           max_pending=1), Batching(16, 0.0))
    assert status == 503 and headers["retry-after"] == "1" and "--max-pending" in json.loads(body)["error"]
    assert "connection" not in headers  # the body was read whole: the connection serves the retry
    assert first == 200


def test_a_body_that_stops_arriving_gets_408_after_body_timeout(decoder):
    """A client that sends part of its body and then nothing: 408 with the JSON error body and
    Connection: close once --body-timeout passes (not a handler held open for ever)."""
    import asyncio

    from fastvae.export.service_io import Limits

    async def scenario(call, app):
        never = asyncio.get_running_loop().create_future()  # the rest of the body never comes
        status, headers, body = await call("POST", "/sample", [_part(b'{"n": '), never])
        _, _, health = await call("GET", "/healthz")
        return status, headers, body, json.loads(health)

    status, headers, body, health = _in_process(OnnxSampler(decoder[0], threads=1), scenario,
                                                Limits(max_n=MAX_N, max_body=MAX_BODY, body_timeout=0.2))
    reason = json.loads(body)["error"]
    assert status == 408 and "--body-timeout" in reason and "\n" not in reason
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert health["reading"] == 0 and health["pending"] == 0


class Fatal(BaseException):
    """Not an Exception: ends the batching task (as SystemExit or a library's own would)."""


def _flaky(sampler, when):
    """``sampler`` whose decode fails (RuntimeError, or ``Fatal`` when asked) on latents where
    ``when(z)``; ``sampler.calls`` logs the rows of each call."""
    real, sampler.calls = sampler.decode, []

    def decode(z, batch_size=None):
        sampler.calls.append(len(z))
        failure = when(z)
        if failure:
            raise failure("onnxruntime: simulated failure (e.g. out of memory)\non two lines")
        return real(z, batch_size)

    sampler.decode = decode
    return sampler


def test_a_failing_decoder_call_fails_only_the_request_that_fails_alone_with_json_500(decoder, caplog):
    """Six one-row requests make one full batch; the call fails because of request 3. Each
    request is then decoded alone: request 3 gets a 500 with the JSON error body (one line, one
    log line, no traceback), the other five their samples."""
    import asyncio

    from fastvae.export.http_service import Batching

    caplog.set_level(logging.ERROR, logger="uvicorn.error")  # whatever earlier tests left it at
    sampler = _flaky(OnnxSampler(decoder[0], threads=1), lambda z: RuntimeError if (z == 7.0).any() else None)

    async def scenario(call, app):
        bodies = [json.dumps({"z": [[7.0 if i == 3 else float(i)] * LATENT]}).encode() for i in range(6)]
        return await asyncio.gather(*(call("POST", "/decode", [_part(b, more=False)]) for b in bodies))

    with caplog.at_level("ERROR"):
        results = _in_process(sampler, scenario, batching=Batching(6, 60_000.0))  # 6 rows: no waiting
    assert sampler.calls == [6, 1, 1, 1, 1, 1, 1]
    for i, (status, headers, body) in enumerate(results):
        if i == 3:
            reason = json.loads(body)["error"]
            assert status == 500 and headers["content-type"] == "application/json"
            assert reason.startswith("the decoder failed: RuntimeError: onnxruntime: simulated") and "\n" not in reason
        else:
            z = np.full((1, LATENT), float(i), np.float32)
            assert status == 200
            np.testing.assert_array_equal(np.load(io.BytesIO(body)), OnnxSampler(decoder[0], threads=1).decode(z))
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and "decoder failed" in errors[0].getMessage()


def test_a_dead_batcher_answers_503_and_healthz_says_failed(decoder):
    """A BaseException out of the decoder kills the batching task: the request gets 503 (not a
    hang), later ones too, and /healthz answers 503 so a liveness probe restarts the service."""
    sampler = _flaky(OnnxSampler(decoder[0], threads=1), lambda z: Fatal)

    async def scenario(call, app):
        first = await call("POST", "/sample", [_part(b'{"n": 2, "seed": 1}', more=False)])
        health = await call("GET", "/healthz")
        later = await call("POST", "/decode", [_part(json.dumps({"z": [[0.0] * LATENT]}).encode(), more=False)])
        return first, health, later

    first, health, later = _in_process(sampler, scenario)
    for status, _, body in (first, later):
        assert status == 503 and "batching task died (Fatal: onnxruntime: simulated" in json.loads(body)["error"]
    assert health[0] == 503 and json.loads(health[2])["status"] == "failed"
    assert sampler.calls == [2]  # the later request never reached the decoder


def test_json_and_png_never_carry_nan_a_422_says_to_ask_for_npy(decoder):
    """A decoder output with NaN (huge latents can overflow inside the network) is no JSON
    (RFC 8259): format json gets a 422 naming npy, format npy still gets the values; format png
    drew NaN as black pixels (200): a 422 too."""
    sampler = OnnxSampler(decoder[0], threads=1)
    real = sampler.decode
    sampler.decode = lambda z, batch_size=None: np.where(z[:, :1, None, None] > 1e30, np.nan, real(z, batch_size))

    async def scenario(call, app):
        huge = {"z": [[3e38, 0.0, 0.0, 0.0]]}
        as_json = await call("POST", "/decode", [_part(json.dumps({**huge, "format": "json"}).encode(), more=False)])
        as_npy = await call("POST", "/decode", [_part(json.dumps(huge).encode(), more=False)])
        as_png = await call("POST", "/decode", [_part(json.dumps({**huge, "format": "png"}).encode(), more=False)])
        return as_json, as_npy, as_png

    (status, headers, body), (npy_status, _, npy_body), (png_status, _, png_body) = _in_process(sampler, scenario)
    reason = json.loads(body)["error"]  # the body itself is strict JSON
    assert status == 422 and "NaN" in reason and "format npy" in reason
    assert png_status == 422 and "format npy" in json.loads(png_body)["error"]
    assert npy_status == 200 and np.isnan(np.load(io.BytesIO(npy_body))).all()


def test_a_large_response_is_encoded_off_the_event_loop(decoder, monkeypatch):
    """While a JSON response is being encoded, /healthz (any other request) is still answered:
    the encoding here waits until /healthz has been answered, which cannot happen if it runs
    on the event loop (then it gives up after 10 s and the test fails)."""
    import asyncio

    from fastvae.export import http_service

    entered, release, released = threading.Event(), threading.Event(), []
    real = http_service.encode

    def encode(x, fmt):
        entered.set()
        released.append(release.wait(10))
        return real(x, fmt)

    monkeypatch.setattr(http_service, "encode", encode)

    async def scenario(call, app):
        loop = asyncio.get_running_loop()
        post = asyncio.ensure_future(call("POST", "/sample", [_part(b'{"n": 16, "seed": 3, "format": "json"}', more=False)]))
        assert await loop.run_in_executor(None, entered.wait, 20)  # the encoding has begun
        health = await call("GET", "/healthz")
        release.set()
        return health, await post

    (health_status, _, _), (status, _, body) = _in_process(OnnxSampler(decoder[0], threads=1), scenario)
    assert released == [True] and health_status == 200 and status == 200
    np.testing.assert_array_equal(np.asarray(json.loads(body)["data"], np.float32),
                                  OnnxSampler(decoder[0]).sample(16, seed=3))


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz(array) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, z=array)
    return buffer.getvalue()


NPY = {"Content-Type": "application/x-npy"}
BAD = {
    "malformed_json": ("/sample", b'{"n": 2', None, 400, "not valid JSON"),
    "not_an_object": ("/sample", b"[1, 2]", None, 400, "got a JSON array"),
    "null_body": ("/sample", b"null", None, 400, "got a JSON null"),
    "seed_beyond_the_sampler": ("/sample", {"n": 1, "seed": 2**128}, None, 400, "from 0 to 2**128 - 1"),
    "npy_sent_as_json": ("/decode", _npy(np.zeros((2, LATENT), np.float32)), None, 400,
                         "send it with Content-Type: application/x-npy"),
    "empty_body": ("/sample", b"", None, 400, "not valid JSON"),
    "missing_n": ("/sample", {"seed": 1}, None, 400, "missing 'n'"),
    "n_not_integer": ("/sample", {"n": "ten"}, None, 400, "'n' must be an integer"),
    "n_zero": ("/sample", {"n": 0}, None, 400, "'n' must be from 1"),
    "n_too_large": ("/sample", {"n": MAX_N + 1}, None, 400, "--max-n"),  # not 413: the body is small
    "negative_seed": ("/sample", {"n": 1, "seed": -3}, None, 400, "'seed'"),
    "unknown_format": ("/sample", {"n": 1, "format": "jpeg"}, None, 400, "'format' must be one of npy, png, json"),
    "unknown_mode": ("/sample", {"n": 1, "mode": "median"}, None, 400, "'mode'"),
    "unknown_field": ("/sample", {"n": 1, "temperature": 2}, None, 400, "unknown field"),
    "body_too_large": ("/sample", b'{"n": 1, "seed": 1}' + b" " * MAX_BODY, None, 413, "--max-body"),
    "wrong_shape": ("/decode", {"z": [[0.0] * (LATENT + 1)]}, None, 400, f"shape (n, {LATENT})"),
    "one_dim": ("/decode", {"z": [0.0] * LATENT}, None, 400, f"shape (n, {LATENT})"),
    "ragged": ("/decode", {"z": [[0.0] * LATENT, [0.0]]}, None, 400, "ragged"),
    "strings": ("/decode", {"z": [["a"] * LATENT]}, None, 400, "numbers"),
    "numeric_strings": ("/decode", {"z": [["1"] * LATENT]}, None, 400, "must hold numbers"),
    "booleans": ("/decode", {"z": [[True] * LATENT]}, None, 400, "must hold numbers"),
    # numpy makes [0, true] integers and [0.5, false] floats: they were decoded as 1 and 0
    "booleans_among_integers": ("/decode", {"z": [[0, 0, 0, True]]}, None, 400, "booleans among them"),
    "booleans_among_floats": ("/decode", {"z": [[0.5, 0.0, 0.0, False]]}, None, 400, "booleans among them"),
    "integer_beyond_64_bits": ("/decode", b'{"z": [[' + b"9" * 400 + b', 0, 0, 0]]}', None, 400, "must hold numbers"),
    "npz_archive": ("/decode", _npz(np.zeros((2, LATENT), np.float32)), NPY, 400, ".npz archive"),
    "nan": ("/decode", b'{"z": [[NaN, 0, 0, 0]]}', None, 400, "NaN or infinite"),
    "inf": ("/decode", b'{"z": [[Infinity, 0, 0, 0]]}', None, 400, "NaN or infinite"),
    "beyond_float32": ("/decode", {"z": [[1e39, 0, 0, 0]]}, None, 400, "NaN or infinite"),
    "too_many_rows": ("/decode", _npy(np.zeros((MAX_N + 1, LATENT), np.float32)), NPY, 413, "--max-n"),
    "npy_garbage": ("/decode", b"\x93NUMPY garbage", NPY, 400, "not a readable .npy"),
    "npy_nan": ("/decode", _npy(np.full((2, LATENT), np.nan, np.float32)), NPY, 400, "NaN"),
    "missing_z": ("/decode", {"latents": []}, None, 400, "unknown field"),
    "decode_bad_format": ("/decode", {"z": [[0.0] * LATENT], "format": "bmp"}, None, 400, "'format'"),
    "z_object": ("/decode", {"z": {"a": 1}}, None, 400, "'z' must be a list of rows of 4 numbers, got a JSON object"),
    "z_in_objects": ("/decode", {"z": [{"a": 1}]}, None, 400, "objects"),
    "n_5000_digits": ("/sample", b'{"n": ' + b"9" * 5000 + b"}", None, 400, "an integer of more than 4300 digits"),
    "n_400_digits": ("/sample", b'{"n": ' + b"9" * 400 + b"}", None, 400, "got 999999999999... (400 digits)"),
    "json_over_max_values": ("/sample", {"n": MAX_VALUES // 64 + 1, "format": "json"}, None, 400,
                             f"more than the server's --max-values {MAX_VALUES}: ask for format npy, or n <= 78"),
    "png_over_max_values": ("/decode", {"z": [[0.0] * LATENT] * 79, "format": "png"}, None, 400, "format npy"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_a_4xx_with_one_line(server, case):
    path, body, headers, status, message = BAD[case]
    got, response_headers, text = server.request("POST", path, body, headers)
    reason = json.loads(text)["error"]
    assert got == status and message in reason and "\n" not in reason and len(reason) < 300, (got, reason)
    assert response_headers["content-type"] == "application/json"


def test_the_largest_json_and_png_responses_within_max_values_are_served(server):
    data = json.loads(server.sample(n=78, seed=1, format="json"))  # 78 x 64 = 4,992 values
    assert data["shape"] == [78, *SHAPE]
    assert server.sample(n=78, seed=1, format="png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert server.sample(n=MAX_N, seed=1).shape == (MAX_N, *SHAPE)  # npy: --max-n only


def test_latents_beyond_float32_are_refused_without_a_numpy_warning():
    """1e39 overflows the float32 cast: a 400, and no RuntimeWarning on the server's stderr."""
    from fastvae.export.service_io import BadRequest, Limits, parse_decode

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning would raise here instead of BadRequest
        with pytest.raises(BadRequest, match="NaN or infinite"):
            parse_decode(b'{"z": [[1e39, 0, 0, 0]]}', "application/json", None, (LATENT,), Limits())


def test_wrong_method_and_path_are_4xx(server):
    for method, path, status in (("GET", "/sample", 405), ("POST", "/healthz", 405), ("GET", "/nothing", 404)):
        got, response_headers, text = server.request(method, path)
        reason = json.loads(text)["error"]
        assert got == status and "POST /sample" in reason and "\n" not in reason
        if status == 405:  # RFC 9110: a 405 names the methods the path takes
            allowed = {m.strip() for m in response_headers["allow"].split(",")}
            assert allowed == ({"POST"} if path == "/sample" else {"GET", "HEAD"}), allowed
    assert server.health()["status"] == "ok"  # still serving


def test_a_path_with_a_trailing_slash_is_a_json_404_not_a_redirect(server):
    """POST /sample/ was Starlette's 307 with an empty body (and an http:// Location behind a
    TLS proxy)."""
    status, _, text = server.request("POST", "/sample/", {"n": 1})
    assert status == 404 and "POST /sample" in json.loads(text)["error"]


def _raw_request(port, head: bytes) -> bytes:
    """What the server answers to ``head`` sent on a fresh connection, read to its close."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_request_head_over_the_bound_gets_a_json_431_and_the_service_goes_on(server):
    """uvicorn's httptools parser held any header whole: one 200 MB header pinned ~285 MB of
    the service and got a 200. A head over MAX_HEAD_BYTES is refused before it is complete;
    one under it is served."""
    from fastvae.export.http_protocol import MAX_HEAD_BYTES

    start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    # never finished: refused on the bytes alone
    answer = _raw_request(server.port, start + b"X-Big: " + b"a" * (4 * MAX_HEAD_BYTES))
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:300]
    assert "headers over 64 KiB" in json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    answer = _raw_request(server.port, start + b"X-Big: " + b"a" * (MAX_HEAD_BYTES // 2) + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK") and b'"status":"ok"' in answer, answer[:300]
    # a chunked body's trailer section is held as headers too: the same bound (the connection
    # is closed, a request being in progress on it)
    chunked = (b"POST /decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n0\r\nX-Trailer: ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(chunked)
        try:
            for _ in range(64):  # 4 MiB at most: far past the bound
                sock.sendall(b"a" * MAX_HEAD_BYTES)
        except OSError:  # closed: refused
            pass
        else:
            sock.settimeout(60)
            assert sock.recv(65536) == b"", "a trailer section over the bound was taken"
    assert server.health()["status"] == "ok"


def test_requests_over_max_connections_get_a_json_503_with_retry_after(decoder):
    """uvicorn's own answer at limit_concurrency was a plain-text "Service Unavailable"; now it
    is JSON like the service's other refusals, with Retry-After, and the service goes on."""
    srv = Server(decoder[0], "--max-connections", 2)
    try:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=60) for _ in range(2)]
        deadline = time.monotonic() + 60
        while True:  # the event: the server has taken the idle connections (at once, in practice)
            answer = _raw_request(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            if not answer.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
                break
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        assert lines[0] == "HTTP/1.1 503 Service Unavailable", answer[:300]
        assert headers["content-type"] == "application/json" and headers["retry-after"] == "1", headers
        assert "--max-connections" in json.loads(body)["error"]
        for sock in idle:
            sock.close()
        while (status := srv.request("GET", "/healthz")[0]) == 503:  # until the server sees the closes
            assert time.monotonic() < deadline + 60, "the service stayed at its limit"
        assert status == 200
        rc, _, err = srv.stop()
        assert rc == 0 and "Traceback" not in err, err[-2000:]
    finally:
        srv.stop(signal.SIGKILL)


def test_without_httptools_h11_takes_the_same_head_bound(monkeypatch):
    from fastvae.export import http_protocol

    monkeypatch.setitem(sys.modules, "uvicorn.protocols.http.httptools_impl", None)  # import fails
    assert http_protocol.protocol_settings() == {"http": "h11", "h11_max_incomplete_event_size":
                                                   http_protocol.MAX_HEAD_BYTES}


def test_same_seed_same_samples_batched_or_not(server, decoder):
    """Concurrent requests are decoded together, and each still gets its own seeded samples;
    unseeded requests (latents drawn by the batcher) mixed in get their own fresh samples."""
    path, _ = decoder
    reference = OnnxSampler(path, threads=1)
    sizes = [1, 3, 5, 2, 7, 1, 4, 6] * 2
    seeded = [i % 4 != 3 for i in range(len(sizes))]

    def ask(i):
        mode = "sample" if i % 2 else "mean"
        return server.sample(n=sizes[i], seed=100 + i, mode=mode) if seeded[i] else server.sample(n=sizes[i])

    before = server.health()
    with ThreadPoolExecutor(len(sizes)) as pool:
        results = list(pool.map(ask, range(len(sizes))))
    after = server.health()
    for i, x in enumerate(results):  # alone, one by one: the same numbers
        if seeded[i]:
            expected = reference.sample(sizes[i], seed=100 + i, batch_size=1, mode="sample" if i % 2 else "mean")
            np.testing.assert_array_equal(x, expected)
    fresh = np.concatenate([x for x, s in zip(results, seeded) if not s])
    assert fresh.shape == (sum(n for n, s in zip(sizes, seeded) if not s), *SHAPE)
    assert len({row.tobytes() for row in fresh}) == len(fresh), "an unseeded row was handed out twice"
    # decoder outputs of some latents: sigmoid means strictly inside (0, 1), not all alike
    assert ((fresh > 0) & (fresh < 1)).all() and fresh.std(axis=0).min() > 0
    assert after["rows"] - before["rows"] == sum(sizes)
    assert after["batches"] - before["batches"] < len(sizes), "no request was batched with another"


def test_max_batch_caps_the_rows_of_every_decoder_call(server, decoder):
    """--max-batch 16: one request for 100 samples is decoded in 7 calls (16 rows at most each),
    and its samples are those of one OnnxSampler.sample call."""
    before = server.health()
    x = server.sample(n=100, seed=21)
    after = server.health()
    assert (after["batches"] - before["batches"], after["rows"] - before["rows"]) == (7, 100)
    np.testing.assert_array_equal(x, OnnxSampler(decoder[0]).sample(100, seed=21))


def test_bounded_load_has_no_errors(server):
    load = _bench_module("http_load")
    result = load.run_load(f"http://127.0.0.1:{server.port}/sample", concurrency=16, duration=2.0,
                           max_requests=400, body=b'{"n": 1, "seed": 1}')
    assert result["errors"] == 0 and 16 <= result["requests"] <= 400, result
    assert server.health()["pending"] == 0
    with pytest.raises(ValueError, match="loopback"):
        load.run_load("http://10.1.2.3:80/", duration=0.1)


# -- shutdown --------------------------------------------------------------------------------------
def test_sigterm_drains_a_request_in_flight_and_exits_0(decoder):
    """A request waiting in the batcher (for others, up to 60 s) when SIGTERM arrives is decoded
    at once and answered; then the process exits 0 and the port is closed."""
    path, _ = decoder
    srv = Server(path, "--max-batch", 64, "--max-wait-ms", 60_000)
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(srv.request, "POST", "/sample", {"n": 2, "seed": 9})
            deadline = time.monotonic() + 60
            while srv.health()["pending"] != 1:  # the event: the request is queued in the server
                assert time.monotonic() < deadline and not pending.done(), "the request never arrived"
            started = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            status, _, body = pending.result(timeout=50)
        assert time.monotonic() - started < 50  # drained, not left to its 60 s wait
        assert status == 200
        np.testing.assert_array_equal(np.load(io.BytesIO(body)), OnnxSampler(path).sample(2, seed=9))
        rc, out, err = srv.stop()
        assert rc == 0 and "Traceback" not in err, err[-2000:]
        with pytest.raises(OSError):
            srv.request("GET", "/healthz", timeout=5)
    finally:
        srv.stop(signal.SIGKILL)


def test_sigterm_answers_a_stalled_upload_503_at_once_and_exits_within_the_shutdown_timeout(decoder):
    """A client sent its headers and part of its body, then stalled. SIGTERM: it gets 503 (JSON)
    at once instead of holding the shutdown (it used to take uvicorn's 60 s graceful timeout,
    then a traceback and a text/plain 500); the process exits 0 well within --shutdown-timeout."""
    srv = Server(decoder[0], "--body-timeout", 600, "--shutdown-timeout", 25)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
            sock.sendall(b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 20\r\n\r\n{\"n\": ")
            deadline = time.monotonic() + 60
            while srv.health()["reading"] != 1:  # the event: the handler waits for the rest of the body
                assert time.monotonic() < deadline, "the request never reached its handler"
            started = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            response = b""
            while chunk := sock.recv(65536):  # the server closes the connection after its answer
                response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"application/json" in head, response
        assert "shutting down" in json.loads(body)["error"]
        srv.proc.wait(timeout=60)
        assert time.monotonic() - started < 20  # not the 25 s --shutdown-timeout, let alone 60 s
        rc, _, err = srv.stop()
        assert rc == 0 and "Traceback" not in err and "ERROR" not in err, err[-2000:]
    finally:
        srv.stop(signal.SIGKILL)


def test_a_response_cut_by_the_shutdown_timeout_is_a_json_503(decoder):
    """A decode still running when --shutdown-timeout passes: the client gets the service's
    JSON 503 (uvicorn alone sent a text/plain 500 after logging a missing response)."""
    import uvicorn

    from fastvae.export.http_service import Batching, _listen, _quiet_when_cancelled, build_app
    from fastvae.export.service_io import Limits

    sampler = OnnxSampler(decoder[0], threads=1)
    entered, release = threading.Event(), threading.Event()
    real = sampler.decode

    def blocked_decode(z, *args, **kwargs):
        entered.set()
        release.wait(120)
        return real(z, *args, **kwargs)

    sampler.decode = blocked_decode
    app = build_app(sampler, Limits(), Batching(16, 2.0))
    # log_config and log_level None: uvicorn would configure logging for the whole test process
    # (disabling or raising the level of loggers other tests read with caplog)
    config = uvicorn.Config(_quiet_when_cancelled(app, app.state.bodies, 0.2), log_config=None, log_level=None,
                            lifespan="on", timeout_graceful_shutdown=0.2)
    server = uvicorn.Server(config)
    sock = _listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:  # waits for the server's own started flag
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)  # not synchronisation: the poll interval of that wait
        conn = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=60)
        conn.request("POST", "/sample", body=b'{"n": 2, "seed": 1}', headers={"Content-Type": "application/json"})
        assert entered.wait(60), "the request never reached the decoder"
        server.should_exit = True  # what SIGTERM does, and the app's own stop
        app.state.stop()
        response = conn.getresponse()
        assert response.status == 503 and response.getheader("content-type") == "application/json"
        assert "--shutdown-timeout" in json.loads(response.read())["error"]
    finally:
        release.set()
        server.should_exit = True
        thread.join(60)
        sock.close()
    assert not thread.is_alive()


def test_a_second_signal_during_the_graceful_stop_goes_to_the_replaced_handler():
    """A second Ctrl-C while responses drain: uvicorn's forced exit cancelled the app's lifespan
    (a CancelledError traceback in the log); the signal now goes to the handler serve replaced
    (``fastvae.interrupts.exit_now`` on the command line: one line, status 130)."""
    import uvicorn

    from fastvae.export.http_service import _server_class

    calls, stops = [], []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: calls.append(sig))
    try:
        server = _server_class()(uvicorn.Config(app=None, log_config=None))
        server.on_exit = lambda: stops.append(True)
        with server.capture_signals():
            server.handle_exit(signal.SIGINT, None)  # the first: a graceful stop
            assert server.should_exit and not server.force_exit and not calls and stops == [True]
            server.handle_exit(signal.SIGINT, None)
            assert calls == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is not server.handle_exit  # put back
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_exits_0_and_warning_level_logs_no_request(decoder):
    srv = Server(decoder[0])
    assert srv.health()["status"] == "ok"
    srv.sample(n=1)
    rc, out, err = srv.stop(signal.SIGINT)
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    assert "/sample" not in out + err and "/healthz" not in out + err, out + err


def test_log_level_info_logs_one_line_per_request(decoder):
    """uvicorn's access log (on stdout): one line per request, its status included."""
    srv = Server(decoder[0], "--log-level", "info")
    try:
        srv.sample(n=1)
        srv.sample(n=2, format="json")
        srv.request("POST", "/sample", {"n": 0})
        srv.health()
    finally:
        rc, out, err = srv.stop()
    lines = out.splitlines()
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    assert sum('"POST /sample HTTP/1.1" 200' in line for line in lines) == 2, out
    assert sum('"POST /sample HTTP/1.1" 400' in line for line in lines) == 1, out
    assert sum('"GET /healthz HTTP/1.1" 200' in line for line in lines) == 1, out


# -- the command line --------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--max-batch", "0"], "--max-batch"),
    (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--max-wait-ms", "inf"], "--max-wait-ms"),  # a lone request would never be answered
    (["--max-n", "0"], "--max-n"),
    (["--port", "70000"], "--port"),
    (["--max-values", "0"], "--max-values"),
    (["--body-timeout", "0"], "--body-timeout"),
    (["--body-timeout", "nan"], "--body-timeout"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["--max-pending", "0"], "--max-pending"),
    (["--max-connections", "1"], "--max-connections"),
    (["--provider", "tensorrt-x"], "unknown execution provider"),
])
def test_cli_bad_flags_are_one_line_exit_2(decoder, capsys, flags, message):
    from fastvae.cli import main

    assert main(["serve", str(decoder[0]), "--port", "0", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastvae serve: error:") and message in err[0], err


def test_cli_missing_model_and_taken_port(decoder, tmp_path, server):
    for argv, message in ((["serve", str(tmp_path / "none.onnx")], "does not exist"),
                          (["serve", str(decoder[0]), "--port", str(server.port)], "cannot listen")):
        proc = subprocess.run([sys.executable, "-m", "fastvae", *argv], capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_an_autoencoder_decoder_refuses_sample_and_decodes(tmp_path):
    """No prior to draw z from: /sample is a 400 naming /decode, which works."""
    model, path = exported_mlp_decoder(tmp_path, hidden_dim=16, latent_dim=LATENT, kind="ae")
    status, body = _asgi_post(path, "/sample", [_part(b'{"n": 2, "seed": 1}', more=False)])
    assert status == 400 and "/decode" in json.loads(body)["error"]
    z = np.random.default_rng(1).standard_normal((2, LATENT)).astype(np.float32)
    status, body = _asgi_post(path, "/decode", [_part(json.dumps({"z": z.tolist()}).encode(), more=False)])
    import torch

    assert status == 200
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(np.load(io.BytesIO(body)), expected, rtol=1e-5, atol=1e-6)
