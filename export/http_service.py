"""``fastvae serve``: an exported decoder behind HTTP (FastAPI on uvicorn), with dynamic batching.

Endpoints (bodies and formats: :mod:`fastvae.export.service_io`):

* ``POST /sample`` ``{"n", "seed", "mode", "format"}`` -> n samples (``npy``, ``png`` or
  ``json``). With a ``seed`` the samples are those of ``OnnxSampler.sample(n, seed=seed)``;
  without one they come from the server's own generator (not reproducible, and cheaper: the
  batcher draws the latents of a whole batch in one call, and no generator is set up).
* ``POST /decode`` latents (JSON or ``.npy``) -> the decoder's means.
* ``GET /healthz`` -> ``{"status": "ok", "pending": requests in the batcher, "reading": requests
  waiting for the rest of their body, "batches": decoder calls so far, "rows": latent rows decoded
  so far}``; 503 and ``{"status": "failed", "error": ...}`` once the batcher is dead.
* ``GET /metadata`` -> the decoder's metadata, provider, limits and batching settings.

A bad request gets a 4xx status and ``{"error": "<one line>"}``: 408 for a body that stops
arriving for ``Limits.body_timeout`` seconds, 413 for a body (or its latents) too large, 400
for an ``n`` over ``Limits.max_n`` or a ``json``/``png`` response of more than
``Limits.max_values`` numbers, 422 for decoder outputs JSON or PNG cannot hold (NaN). A
decoder call that fails answers 500 with the same one-line body (and one log line), only for
the requests that fail when decoded alone; more than ``Limits.max_pending`` requests waiting
for the decoder get 503 with ``Retry-After``. A request whose client disconnects while it waits
is dropped before its rows are decoded. Concurrent requests' latents are decoded
together (:class:`~fastvae.export.dynamic_batching.DynamicBatcher`); a seeded request draws its
latents (and observation noise) from its own generator, as ``OnnxSampler.sample`` does, so the
same seed gives the same samples whether a request was batched or not. Responses beyond a few
hundred microseconds of encoding (large ``json``/``png``/``npy``) are encoded on a worker
thread, so the event loop keeps answering other requests (``/healthz`` included).

SIGTERM or Ctrl-C: the server stops accepting connections, the batcher decodes what is queued
without waiting for more, requests in flight get their responses, requests still waiting for
their body get 503 at once, and the process exits 0; whatever still runs after
``shutdown_timeout`` seconds (default 10, well under Kubernetes' 30 s grace period) is cancelled.
Once listening it prints ``fastvae serve: listening on http://HOST:PORT`` on stdout (port 0
picks a free port; the line names the real one).

Torch-free: numpy, onnxruntime, fastapi, uvicorn (and pillow for PNG).
"""

# no "from __future__ import annotations": FastAPI reads the handlers' annotations at runtime
import asyncio
import contextlib
import json
import logging
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from fastvae.errors import FastVAEError, one_line
from fastvae.export import metadata as md
from fastvae.export.dynamic_batching import BatcherFailed, DynamicBatcher, ShuttingDown
from fastvae.export.service_io import (
    BadRequest,
    Limits,
    check_output_size,
    encode,
    error_body,
    parse_decode,
    parse_sample,
    png_possible,
)

READY_PREFIX = "fastvae serve: listening on "
MAX_WAIT_MS = 60_000.0  # a request waits at most this long for others to batch with
# seconds uvicorn waits, after SIGTERM/Ctrl-C, for responses in flight before cancelling them:
# well under Kubernetes' default terminationGracePeriodSeconds (30 s), which ends in SIGKILL
SHUTDOWN_TIMEOUT_S = 10.0
# outputs up to this many values are encoded on the event loop's thread (under ~250 us on the
# dev CPU, less than a hand-over to a worker thread and back); larger ones on the encoding
# thread. Measured per value: npy ~1-10 ns (a copy; plus ~5-10 ns to draw mode "sample"
# noise), json ~1.2-2 us (tolist + dumps), png ~0.1-1.6 us (a grid, scaled, then zlib)
INLINE_ENCODE_VALUES = {"npy": 1 << 14, "json": 128, "png": 0}
# a request still waiting for the decoder after this long (checked this often) gets a watcher
# for its client's disconnect (then it is dropped, its rows not decoded): DisconnectWatch
WATCH_AFTER_S = 0.02
_STOP_TICK_S = 0.05  # once stopping, the body watch answers newly stalled readers this often
_CLOSE = {"connection": "close"}  # the client may still be sending: end the connection
_log = logging.getLogger("uvicorn.error")  # uvicorn's own logger: its format and --log-level


@dataclass(frozen=True)
class Batching:
    """``max_batch``: latent rows per decoder call (1: batching off); ``max_wait_ms``: how long
    the first queued request waits for others."""

    max_batch: int = 64
    max_wait_ms: float = 2.0


class Refused(Exception):
    """A request the service cannot answer for its own reasons (5xx): ``status``, one-line
    ``reason``, extra response ``headers``."""

    def __init__(self, status: int, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


async def _cancelled(task) -> None:
    """Cancel a watchdog task (None: none) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class BodyWatch:
    """The requests waiting for body bytes, and since when. A watchdog task answers those that
    waited more than ``timeout`` seconds for their next bytes (408) and, once ``stop()`` is
    called (thread-safe: from the signal handler), every one at once (503): a stalled upload
    would otherwise hold the graceful shutdown until its timeout. One task for all requests: a
    timer per request (``asyncio.timeout``) costs ~5-10 us of CPU each on the dev CPU, and most
    bodies have arrived whole before their handler reads them."""

    def __init__(self, timeout: float):
        self.timeout = float(timeout)
        self.waiting: dict = {}  # task -> loop time it began waiting for its next body message
        self._expired: dict = {}  # task -> the BadRequest that ends its wait
        self.stopping = False
        self._loop = None
        self._task = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._watch(), name="fastvae-body-watch")

    def stop(self) -> None:
        """From now on, requests waiting for body bytes get 503 (callable from any thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop)

    def _stop(self) -> None:
        self.stopping = True
        self._sweep()

    async def close(self) -> None:
        await _cancelled(self._task)
        self._task = None

    async def receive(self, receive):
        """``await receive()``, raising BadRequest (408) or Refused (503) when the watch ends the wait."""
        if self._loop is None:  # not started (an app run without its lifespan): no deadline
            return await receive()
        task = asyncio.current_task()
        self.waiting[task] = self._loop.time()
        try:
            return await receive()
        except asyncio.CancelledError:
            answer = self._expired.pop(task, None)
            if answer is None:  # cancelled by someone else (uvicorn): not ours to turn into a response
                raise
            task.uncancel()
            raise answer from None
        finally:
            del self.waiting[task]

    async def _watch(self) -> None:
        tick = min(1.0, self.timeout / 8)  # a stalled request is answered within timeout + tick
        while True:
            await asyncio.sleep(_STOP_TICK_S if self.stopping else tick)
            self._sweep()

    def _sweep(self) -> None:
        # runs on the loop: every task in `waiting` is suspended in receive() right now
        now = self._loop.time()
        for task, since in list(self.waiting.items()):
            if task in self._expired:
                continue
            if self.stopping:
                self._expired[task] = Refused(503, "the server is shutting down and the body had not arrived: "
                                                   "retry on another replica or after its restart")
            elif now - since >= self.timeout:
                self._expired[task] = BadRequest(408, f"no body bytes for {self.timeout:g} s (the server's "
                                                      "--body-timeout): send the whole body without pausing")
            else:
                continue
            task.cancel()


class DisconnectWatch:
    """The requests waiting for the decoder; one task, every ``after`` seconds, starts a
    watcher for each that has waited longer: it reads the client's next ASGI message (the body
    is read, so it is the disconnect) and then cancels the request's task, whose place in the
    batcher goes with it (uvicorn does not cancel a handler whose client left). A watcher (or a
    timer) per request cost ~30 us each (13k -> 9-11k one-sample requests/s on a dev core);
    a dict entry costs well under 1 us."""

    def __init__(self, after: float):
        self.after = float(after)
        # task -> [receive, loop time it began waiting, watcher task or None, client gone]
        self.waiting: dict = {}
        self._loop = None
        self._task = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._sweep(), name="fastvae-disconnect-watch")

    async def close(self) -> None:
        await _cancelled(self._task)
        self._task = None

    def enter(self, task, receive) -> None:
        if self._loop is not None:  # not started (an app run without its lifespan): no watch
            self.waiting[task] = [receive, self._loop.time(), None, False]

    def leave(self, task) -> bool:
        """End the watch of ``task``; whether its client disconnected meanwhile."""
        entry = self.waiting.pop(task, None)
        if entry is None:
            return False
        if entry[2] is not None:
            entry[2].cancel()
        return entry[3]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.after)
            now = self._loop.time()
            for task, entry in self.waiting.items():
                if entry[2] is None and now - entry[1] >= self.after:
                    entry[2] = self._loop.create_task(self._watch(task, entry[0]))

    async def _watch(self, task, receive) -> None:
        with contextlib.suppress(Exception):
            if (await receive())["type"] == "http.disconnect" and task in self.waiting:
                self.waiting[task][3] = True
                task.cancel()


def build_app(sampler, limits: Limits, batching: Batching):
    """The FastAPI application serving ``sampler`` (an ``OnnxSampler``) through a
    ``DynamicBatcher`` it makes with ``batching``, kept as ``app.state.batcher`` (started and
    closed by the app's lifespan, like the body watch and the encoding thread);
    ``app.state.stop()`` (thread-safe) begins a shutdown: queued requests are decoded at once,
    requests waiting for their body get 503. Requests without a seed share one generator: the
    batcher draws their latents from it, a batch at a time, and their observation noise comes
    from it."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from fastvae.export.providers import short_name

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        bodies.start()
        clients.start()
        yield
        await batcher.close()
        await bodies.close()
        await clients.close()
        encoder.shutdown(wait=True)

    unseeded = np.random.default_rng()
    batcher = DynamicBatcher(sampler.decode, batching.max_batch, batching.max_wait_ms / 1000,
                             draw_fn=lambda rows: sampler.draw_latents(rows, unseeded),
                             latent_shape=sampler.latent_shape)
    bodies = BodyWatch(limits.body_timeout)
    clients = DisconnectWatch(WATCH_AFTER_S)
    # one thread: large responses are encoded one after the other, beside the decoder's thread
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastvae-encode")
    # redirect_slashes off: "/sample/" was Starlette's 307 with an empty body (an http:// Location
    # behind a TLS proxy), not the JSON 404 of every other wrong path
    app = FastAPI(title="fastvae decoder", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False, **_no_telemetry(FastAPI))
    app.state.batcher = batcher
    app.state.bodies = bodies

    def stop() -> None:
        batcher.drain()
        bodies.stop()

    app.state.stop = stop
    can_png = png_possible(sampler.output_shape)
    # what /decode takes per row: a spatial decoder any latent height and width (None)
    accepted = (sampler.latent_shape[0], None, None) if sampler.any_latent_size else sampler.latent_shape
    metadata = json.dumps({
        "model": sampler.path.name,
        "latent_dim": sampler.latent_dim,
        "latent_shape": list(sampler.latent_shape),
        "any_latent_size": sampler.any_latent_size,  # /decode takes any latent height and width
        "output_shape": list(sampler.output_shape),
        "likelihood": sampler.likelihood,
        "precision": sampler.precision,
        "provider": short_name(sampler.provider),
        "formats": ["npy", "json", *(["png"] if can_png else [])],
        "limits": asdict(limits),
        "batching": asdict(batching),
        "decoder_metadata": md.client_metadata(sampler.metadata),
    }).encode()

    def error(status: int, reason: str, headers: dict | None = None) -> Response:
        # a stalled body, a shutdown: end the connection; an overload's 503 (Retry-After, the
        # body read whole) keeps it for the retry
        close = status == 408 or (status == 503 and "retry-after" not in (headers or {}))
        headers = {**(_CLOSE if close else {}), **(headers or {})}
        return Response(error_body(reason), status_code=status, media_type="application/json",
                        headers=headers or None)

    def gone() -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; uvicorn sends nothing

    async def read_body(request: Request) -> bytes:
        """The request body, refused (413) beyond ``limits.max_body``, 408 when it stops
        arriving (``bodies``); read from the ASGI messages directly (a small body is one message:
        no stream generator per request)."""
        for name, value in request.scope["headers"]:  # lower-case names (ASGI); no Headers object
            if name == b"content-length":
                if value.isdigit() and int(value) > limits.max_body:
                    raise BadRequest(413, f"the body has {int(value)} bytes, more than the server's --max-body {limits.max_body}")
                break
        chunks, size, receive = [], 0, request.receive
        while True:
            message = await bodies.receive(receive)
            if message["type"] != "http.request":  # http.disconnect: the client went away
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_body:
                raise BadRequest(413, f"the body is larger than the server's --max-body {limits.max_body} bytes")
            if not message.get("more_body", False):
                return b"".join((*chunks, chunk)) if chunks else chunk
            chunks.append(chunk)

    def check_output(n: int, fmt: str, latent_shape: tuple | None = None) -> None:
        if fmt == "png" and not can_png:
            raise BadRequest(400, f"outputs of shape {list(sampler.output_shape)} are not images: use format npy or json")
        check_output_size(n, sampler.output_shape_for(latent_shape or sampler.latent_shape), fmt, limits)

    base = math.prod(sampler.latent_shape)

    def check_latent_size(z: np.ndarray) -> None:
        """Latents of another size than the training one (a spatial decoder) keep the service's
        bounds in values: one row at most one decoder call's worth (--max-batch latents of the
        training size), a request at most --max-n of them."""
        values = math.prod(z.shape[1:])
        if values <= base:
            return
        per_call = max(batching.max_batch, Batching().max_batch)  # --max-batch 1 (no batching) too
        if values > per_call * base:
            raise BadRequest(413, f"a latent of shape {list(z.shape[1:])} is larger than one decoder call takes "
                                  f"({per_call} latents of {list(sampler.latent_shape)}: --max-batch, at least "
                                  f"{Batching().max_batch}): decode it in tiles with 'fastvae decode --tile'")
        if len(z) * values > limits.max_n * base:
            raise BadRequest(413, f"'z' holds {len(z) * values} latent values, more than the server's --max-n "
                                  f"{limits.max_n} latents of {list(sampler.latent_shape)}")

    def check_room() -> None:
        if batcher.pending >= limits.max_pending:
            raise Refused(503, f"the server has {batcher.pending} requests waiting for the decoder (its "
                               "--max-pending): retry in a moment, or on another replica", {"retry-after": "1"})

    async def decoded(awaitable, request: Request) -> np.ndarray:
        """The batcher's answer; Refused (one line) when the decoder or the batcher failed;
        ClientDisconnect when the client went away meanwhile: the request's task is cancelled,
        and with it its place in the batcher (uvicorn does not cancel a handler whose client
        left, and the decoder would work for nobody, holding everyone queued behind)."""
        task = asyncio.current_task()
        clients.enter(task, request.receive)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if not clients.leave(task):  # uvicorn's shutdown timeout: not ours
                raise
            task.uncancel()
            raise ClientDisconnect() from None  # (the finally's leave() is then a no-op)
        except ShuttingDown:
            raise Refused(503, "the server is shutting down: retry on another replica or after its restart") from None
        except BatcherFailed as exc:
            raise Refused(503, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - onnxruntime errors (e.g. out of memory): one line, no traceback
            reason = f"the decoder failed: {type(exc).__name__}: {one_line(exc)}"
            _log.error("fastvae serve: %s", reason)
            raise Refused(500, reason) from None
        finally:
            clients.leave(task)

    def finish(x: np.ndarray, fmt: str, rng) -> tuple:
        """(body, content type) of the decoder's output ``x``, with observation noise from ``rng``
        (mode "sample") or without it (``rng`` None)."""
        return encode(x if rng is None else sampler.observe(x, rng), fmt)

    async def respond(x: np.ndarray, fmt: str, rng=None) -> Response:
        # a large response on the encoding thread: the event loop keeps answering other requests
        if x.size <= INLINE_ENCODE_VALUES[fmt]:
            body, content_type = finish(x, fmt, rng)
        else:
            body, content_type = await asyncio.get_running_loop().run_in_executor(encoder, finish, x, fmt, rng)
        return Response(body, media_type=content_type)

    async def healthz(request: Request) -> Response:
        if batcher.failure is not None:  # nothing can be decoded any more: a probe should restart us
            return Response(json.dumps({"status": "failed", "error": batcher.failure}).encode(), status_code=503,
                            media_type="application/json")
        return Response(b'{"status":"ok","pending":%d,"reading":%d,"batches":%d,"rows":%d}'
                        % (batcher.pending, len(bodies.waiting), batcher.batches, batcher.rows),
                        media_type="application/json")

    async def get_metadata(request: Request) -> Response:
        return Response(metadata, media_type="application/json")

    async def sample(request: Request) -> Response:
        try:
            req = parse_sample(await read_body(request), limits)
            check_output(req.n, req.format)
            if not sampler.has_prior:
                raise BadRequest(400, f"{sampler.path.name} is an autoencoder's decoder: it has no prior to sample "
                                      "from; POST your own codes to /decode")
            # an unseeded request's latents are drawn by the batcher, for the whole batch in one
            # call, from the server's generator; a seeded one sets up its own (~30 us: numpy's SeedSequence)
            check_room()
            if req.seed is None:
                rng = unseeded
                x = await decoded(batcher.sample(req.n), request)
            else:
                rng = np.random.default_rng(req.seed)
                x = await decoded(batcher.decode(sampler.draw_latents(req.n, rng)), request)
            return await respond(x, req.format, rng if req.mode == "sample" else None)
        except (BadRequest, Refused) as exc:
            return error(exc.status, exc.reason, getattr(exc, "headers", None))
        except ClientDisconnect:  # gone before its answer: nobody to answer, nothing to log
            return gone()

    async def decode(request: Request) -> Response:
        try:
            z, fmt = parse_decode(await read_body(request), request.headers.get("content-type"),
                                  request.query_params.get("format"), accepted, limits)
            check_latent_size(z)
            check_output(len(z), fmt, z.shape[1:])
            check_room()
            return await respond(await decoded(batcher.decode(z), request), fmt)
        except (BadRequest, Refused) as exc:
            return error(exc.status, exc.reason, getattr(exc, "headers", None))
        except ClientDisconnect:
            return gone()

    # Starlette routes: the handlers read the request themselves, so FastAPI's per-request
    # dependency solving (~50-90 us on the dev CPU) would buy nothing. The service's work first:
    # the router tries routes in order (a regular expression each)
    for path, endpoint, method in (("/sample", sample, "POST"), ("/decode", decode, "POST"),
                                   ("/healthz", healthz, "GET"), ("/metadata", get_metadata, "GET")):
        app.router.add_route(path, endpoint, methods=[method], include_in_schema=False)

    # FastAPI's own errors (unknown path, wrong method, ...) as one line too
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path} (endpoints: "
                                      "POST /sample, POST /decode, GET /healthz, GET /metadata)",
                     headers=exc.headers)  # a 405's Allow: the method the path takes (RFC 9110)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error(400, f"invalid request: {exc.errors()[:1]}")

    return app


def _quiet_when_cancelled(app, bodies: BodyWatch, shutdown_timeout: float):
    """``app`` as uvicorn runs it, except that a request cancelled by uvicorn's graceful-shutdown
    timeout ends without a traceback (uvicorn logs the cancellation in one line) and, when its
    response had not started, with the service's JSON 503 (uvicorn would send a text/plain 500).
    No wrapper around ``send`` to learn whether it had: uvicorn refuses a second response start
    (RuntimeError) before writing anything, which is what the suppress below swallows."""

    async def asgi(scope, receive, send):
        try:
            await app(scope, receive, send)
        except asyncio.CancelledError:
            if not bodies.stopping:
                raise
            if scope.get("type") == "http":
                reason = (f"the server is shutting down and this response did not finish within its "
                          f"--shutdown-timeout of {shutdown_timeout:g} s: retry on another replica or after its restart")
                with contextlib.suppress(Exception):  # a response already started, or the client gone
                    await send({"type": "http.response.start", "status": 503,
                                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": error_body(reason)})

    return asgi


def _no_telemetry(fastapi_class) -> dict:
    """FastAPI >= 0.16x checks for OpenTelemetry providers on every request (environment reads,
    ~10 us on the dev CPU) unless told there is nothing to report; the service reports nothing
    through OpenTelemetry. Older FastAPI has no ``telemetry`` argument."""
    import inspect

    if "telemetry" not in inspect.signature(fastapi_class.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, printing a readiness line, calling ``on_exit`` (the app's
        ``state.stop``: drain the batcher, answer stalled uploads) on SIGTERM/SIGINT, and leaving
        with exit status 0 (uvicorn re-raises the signal after a graceful stop). A second Ctrl-C
        during the graceful stop goes to the handler it replaced (on the command line
        ``fastvae.interrupts.exit_now``: one line, status 130; in a program Python's own, a
        KeyboardInterrupt), as in training: uvicorn's own forced exit cancelled the app's
        lifespan and logged a CancelledError traceback."""

        on_exit = staticmethod(lambda: None)
        _previous: dict = {}

        @contextlib.contextmanager
        def capture_signals(self):
            import signal

            try:
                self._previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            except ValueError:  # not the main thread (serve() from a program's thread): signals are not ours
                self._previous = {}
            try:
                yield
            finally:
                for sig, handler in self._previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            import signal

            previous = self._previous.get(sig)
            # a second Ctrl-C: stop now (a repeated SIGTERM, as process managers send, is not
            # an escalation: uvicorn's rule too)
            if sig == signal.SIGINT and self.should_exit and callable(previous):
                previous(sig, frame)
            super().handle_exit(sig, frame)
            self.on_exit()

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host  # an IPv6 address goes in brackets in a URL
                print(f"{READY_PREFIX}http://{shown}:{port}", flush=True)

    return Server


def serve(model_path, *, host: str = "127.0.0.1", port: int = 8000, batching: Batching = Batching(),
          limits: Limits = Limits(), threads: int | None = None, provider: str = "cpu",
          log_level: str = "warning", shutdown_timeout: float = SHUTDOWN_TIMEOUT_S) -> int:
    """Load the decoder and serve it until SIGTERM/SIGINT; returns the exit status (0).
    ``shutdown_timeout``: seconds the responses in flight get after the signal."""
    import uvicorn

    from fastvae.export.http_protocol import protocol_settings
    from fastvae.export.providers import short_name
    from fastvae.export.sampler import OnnxSampler

    if batching.max_batch < 1 or not 0 <= batching.max_wait_ms <= MAX_WAIT_MS:  # inf: never answered
        raise FastVAEError(f"--max-batch must be >= 1 and --max-wait-ms from 0 to {MAX_WAIT_MS:g}, got "
                           f"{batching.max_batch}, {batching.max_wait_ms}")
    if limits.max_n < 1 or limits.max_body < 64:
        raise FastVAEError(f"--max-n must be >= 1 and --max-body >= 64 bytes, got {limits.max_n}, {limits.max_body}")
    if limits.max_values < 1 or not 0 < limits.body_timeout <= 3600:  # nan and inf fail too
        raise FastVAEError(f"--max-values must be >= 1 and --body-timeout from 0 (excluded) to 3600 s, got "
                           f"{limits.max_values}, {limits.body_timeout}")
    if limits.max_pending < 1 or limits.max_connections < 2:
        raise FastVAEError(f"--max-pending must be >= 1 and --max-connections >= 2, got {limits.max_pending}, "
                           f"{limits.max_connections}")
    if not 0 <= shutdown_timeout <= 3600:
        raise FastVAEError(f"--shutdown-timeout must be from 0 to 3600 s, got {shutdown_timeout}")
    if not 0 <= port <= 65535:
        raise FastVAEError(f"--port must be from 0 to 65535, got {port}")
    sampler = OnnxSampler(model_path, threads=threads, providers=[provider])
    app = build_app(sampler, limits, batching)
    config = uvicorn.Config(
        _quiet_when_cancelled(app, app.state.bodies, shutdown_timeout), host=host, port=port, log_level=log_level,
        # uvicorn's access log: one line per request at info (and debug); none below, where
        # formatting its arguments would cost every request a few microseconds for nothing
        access_log=log_level in ("info", "debug"), lifespan="on", loop="auto", **protocol_settings(),
        timeout_graceful_shutdown=shutdown_timeout,
        # connections (a stalled client's too: uvicorn has no timeout for headers) and requests
        # in progress at most; more get uvicorn's 503
        limit_concurrency=limits.max_connections,
    )
    server = _server_class()(config)
    server.on_exit = app.state.stop
    sock = _listen(host, port)
    print(f"fastvae serve: {sampler!r}, {short_name(sampler.provider)} provider, max batch "
          f"{batching.max_batch}, max wait {batching.max_wait_ms:g} ms", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("fastvae serve: stopped", file=sys.stderr, flush=True)
    return 0


def _listen(host: str, port: int):
    """A listening TCP socket on (host, port), or one FastVAEError line saying why not."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:  # taken port, unknown host, address not on this machine, ...
        raise FastVAEError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another "
                           "--port or --host") from None
    return sock
