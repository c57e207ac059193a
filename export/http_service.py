"""``fastvae serve``: an exported decoder behind HTTP (FastAPI on uvicorn), with dynamic batching.

Endpoints (bodies and formats: :mod:`fastvae.export.service_io`):

* ``POST /sample`` ``{"n", "seed", "mode", "format"}`` -> n samples (``npy``, ``png`` or
  ``json``). With a ``seed`` the samples are those of ``OnnxSampler.sample(n, seed=seed)``;
  without one they come from the server's own generator (not reproducible, and cheaper: the
  batcher draws the latents of a whole batch in one call, and no generator is set up).
* ``POST /decode`` latents (JSON or ``.npy``) -> the decoder's means.
* ``GET /healthz`` -> ``{"status": "ok", "pending": requests in flight, "batches": decoder calls
  so far, "rows": latent rows decoded so far}``.
* ``GET /metadata`` -> the decoder's metadata, provider, limits and batching settings.

A bad request gets a 4xx status and ``{"error": "<one line>"}``. Concurrent requests' latents are
decoded together (:class:`~fastvae.export.dynamic_batching.DynamicBatcher`); a seeded request
draws its latents (and observation noise) from its own generator, as ``OnnxSampler.sample``
does, so the same seed gives the same samples whether a request was batched or not.

SIGTERM or Ctrl-C: the server stops accepting connections, the batcher decodes what is queued
without waiting for more, requests in flight get their responses, and the process exits 0.
Once listening it prints ``fastvae serve: listening on http://HOST:PORT`` on stdout (port 0
picks a free port; the line names the real one).

Torch-free: numpy, onnxruntime, fastapi, uvicorn (and pillow for PNG).
"""

# no "from __future__ import annotations": FastAPI reads the handlers' annotations at runtime
import contextlib
import json
import sys
from dataclasses import asdict, dataclass

import numpy as np

from fastvae.errors import FastVAEError
from fastvae.export.dynamic_batching import DynamicBatcher, ShuttingDown
from fastvae.export.service_io import (
    BadRequest,
    Limits,
    encode,
    error_body,
    parse_decode,
    parse_sample,
    png_possible,
)

READY_PREFIX = "fastvae serve: listening on "
MAX_WAIT_MS = 60_000.0  # a request waits at most this long for others to batch with


@dataclass(frozen=True)
class Batching:
    """``max_batch``: latent rows per decoder call (1: batching off); ``max_wait_ms``: how long
    the first queued request waits for others."""

    max_batch: int = 64
    max_wait_ms: float = 2.0


def build_app(sampler, limits: Limits, batching: Batching):
    """The FastAPI application serving ``sampler`` (an ``OnnxSampler``) through a
    ``DynamicBatcher`` it makes with ``batching``, kept as ``app.state.batcher`` (started and
    closed by the app's lifespan). Requests without a seed share one generator: the batcher
    draws their latents from it, a batch at a time, and their observation noise comes from it."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from fastvae.export.providers import short_name

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.close()

    unseeded = np.random.default_rng()
    batcher = DynamicBatcher(sampler.decode, batching.max_batch, batching.max_wait_ms / 1000,
                             draw_fn=lambda rows: sampler.draw_latents(rows, unseeded))
    app = FastAPI(title="fastvae decoder", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  **_no_telemetry(FastAPI))
    app.state.batcher = batcher
    can_png = png_possible(sampler.output_shape)
    metadata = json.dumps({
        "model": sampler.path.name,
        "latent_dim": sampler.latent_dim,
        "latent_shape": list(sampler.latent_shape),
        "output_shape": list(sampler.output_shape),
        "likelihood": sampler.likelihood,
        "precision": sampler.precision,
        "provider": short_name(sampler.provider),
        "formats": ["npy", "json", *(["png"] if can_png else [])],
        "limits": asdict(limits),
        "batching": asdict(batching),
        "decoder_metadata": sampler.metadata,
    }).encode()

    def error(status: int, reason: str) -> Response:
        return Response(error_body(reason), status_code=status, media_type="application/json")

    def gone() -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; uvicorn sends nothing

    async def read_body(request: Request) -> bytes:
        """The request body, refused (413) beyond ``limits.max_body``; read from the ASGI
        messages directly (a small body is one message: no stream generator per request)."""
        for name, value in request.scope["headers"]:  # lower-case names (ASGI); no Headers object
            if name == b"content-length":
                if value.isdigit() and int(value) > limits.max_body:
                    raise BadRequest(413, f"the body has {int(value)} bytes, more than the server's --max-body {limits.max_body}")
                break
        chunks, size = [], 0
        while True:
            message = await request.receive()
            if message["type"] != "http.request":  # http.disconnect: the client went away
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_body:
                raise BadRequest(413, f"the body is larger than the server's --max-body {limits.max_body} bytes")
            if not message.get("more_body", False):
                return b"".join((*chunks, chunk)) if chunks else chunk
            chunks.append(chunk)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok","pending":%d,"batches":%d,"rows":%d}'
                        % (batcher.pending, batcher.batches, batcher.rows), media_type="application/json")

    async def get_metadata(request: Request) -> Response:
        return Response(metadata, media_type="application/json")

    async def sample(request: Request) -> Response:
        try:
            req = parse_sample(await read_body(request), limits)
            if req.format == "png" and not can_png:
                raise BadRequest(400, f"outputs of shape {list(sampler.output_shape)} are not images: use format npy or json")
        except BadRequest as exc:
            return error(exc.status, exc.reason)
        except ClientDisconnect:  # gone before its body arrived: nobody to answer, nothing to log
            return gone()
        if not sampler.has_prior:
            return error(400, f"{sampler.path.name} is an autoencoder's decoder: it has no prior to sample "
                              "from; POST your own codes to /decode")
        # an unseeded request's latents are drawn by the batcher, for the whole batch in one call,
        # from the server's generator; a seeded one sets up its own (~30 us: numpy's SeedSequence)
        if req.seed is None:
            rng = unseeded
            x = await batcher.sample(req.n)
        else:
            rng = np.random.default_rng(req.seed)
            x = await batcher.decode(sampler.draw_latents(req.n, rng))
        if req.mode == "sample":
            x = sampler.observe(x, rng)
        body, content_type = encode(x, req.format)
        return Response(body, media_type=content_type)

    async def decode(request: Request) -> Response:
        try:
            z, fmt = parse_decode(await read_body(request), request.headers.get("content-type"),
                                  request.query_params.get("format"), sampler.latent_shape, limits)
            if fmt == "png" and not can_png:
                raise BadRequest(400, f"outputs of shape {list(sampler.output_shape)} are not images: use format npy or json")
        except BadRequest as exc:
            return error(exc.status, exc.reason)
        except ClientDisconnect:
            return gone()
        body, content_type = encode(await batcher.decode(z), fmt)
        return Response(body, media_type=content_type)

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
                                      "POST /sample, POST /decode, GET /healthz, GET /metadata)")

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, exc: ShuttingDown) -> Response:
        return error(503, "the server is shutting down: retry on another replica or after its restart")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error(400, f"invalid request: {exc.errors()[:1]}")

    return app


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
        """uvicorn's server, printing a readiness line, draining the batcher on SIGTERM/SIGINT,
        and leaving with exit status 0 (uvicorn re-raises the signal after a graceful stop)."""

        batcher: DynamicBatcher

        @contextlib.contextmanager
        def capture_signals(self):
            import signal

            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self.batcher.drain()

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host  # an IPv6 address goes in brackets in a URL
                print(f"{READY_PREFIX}http://{shown}:{port}", flush=True)

    return Server


def serve(model_path, *, host: str = "127.0.0.1", port: int = 8000, batching: Batching = Batching(),
          limits: Limits = Limits(), threads: int | None = None, provider: str = "cpu",
          log_level: str = "warning") -> int:
    """Load the decoder and serve it until SIGTERM/SIGINT; returns the exit status (0)."""
    import uvicorn

    from fastvae.export.sampler import OnnxSampler
    from fastvae.export.providers import short_name

    if batching.max_batch < 1 or not 0 <= batching.max_wait_ms <= MAX_WAIT_MS:  # inf: never answered
        raise FastVAEError(f"--max-batch must be >= 1 and --max-wait-ms from 0 to {MAX_WAIT_MS:g}, got "
                           f"{batching.max_batch}, {batching.max_wait_ms}")
    if limits.max_n < 1 or limits.max_body < 64:
        raise FastVAEError(f"--max-n must be >= 1 and --max-body >= 64 bytes, got {limits.max_n}, {limits.max_body}")
    if not 0 <= port <= 65535:
        raise FastVAEError(f"--port must be from 0 to 65535, got {port}")
    sampler = OnnxSampler(model_path, threads=threads, providers=[provider])
    app = build_app(sampler, limits, batching)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
        loop="auto", http="auto", timeout_graceful_shutdown=60,
    )
    server = _server_class()(config)
    server.batcher = app.state.batcher
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
