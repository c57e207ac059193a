"""``fastvae serve``: an exported decoder as an HTTP service with dynamic batching (torch-free)."""

from __future__ import annotations

import argparse

from fastvae.commands.onnx_runtime_flags import add_decoder_arguments

HELP = "serve an exported decoder over HTTP: /sample, /decode, /healthz, /metadata (dynamic batching)"
DESCRIPTION = (
    "Serve decoder.onnx with FastAPI on uvicorn. POST /sample {\"n\": 16, \"seed\": 0, \"mode\": "
    "\"mean\", \"format\": \"npy\"} draws samples (npy, png or json); POST /decode takes latents "
    "(JSON {\"z\": [[...]]} or an .npy body) and returns the decoder's means; GET /healthz and GET "
    "/metadata. Concurrent requests are decoded together (up to --max-batch rows, waiting at most "
    "--max-wait-ms for more); the same seed gives the same samples batched or not. Bad requests "
    "get a 4xx and a one-line reason. SIGTERM or Ctrl-C finishes the requests in flight (for at "
    "most --shutdown-timeout seconds; uploads still arriving get 503 at once) and exits 0; a second Ctrl-C "
    "exits at once (status 130)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_decoder_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed when ready)")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="latent rows per decoder call at most (a larger request: several calls; 1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a request waits for others to batch with")
    parser.add_argument("--max-n", type=int, default=4096, help="samples (or latent rows) per request at most")
    parser.add_argument("--max-body", type=int, default=1 << 20, help="request body size at most, in bytes")
    parser.add_argument("--max-values", type=int, default=1 << 20,
                        help="numbers per json or png response at most (n x values per sample; npy: --max-n only)")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a request may send no body bytes before it gets 408")
    parser.add_argument("--max-pending", type=int, default=1024,
                        help="requests waiting for the decoder at most (more get 503 with Retry-After)")
    parser.add_argument("--max-connections", type=int, default=2048,
                        help="open connections and requests in progress at most (more get 503); on an open "
                             "network put a reverse proxy in front (header timeouts, TLS)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="seconds the responses in flight get after SIGTERM/Ctrl-C before they are cancelled")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (info: one line per request)")


def run(args: argparse.Namespace) -> int:
    from fastvae.errors import FastVAEError

    try:
        from fastvae.export.http_service import Batching, serve
        from fastvae.export.service_io import Limits
    except ImportError as exc:
        raise FastVAEError(f"fastvae serve needs {exc.name}, which is not installed: pip install 'fastvae[serve]'") from None
    return serve(args.model, host=args.host, port=args.port, threads=args.threads, provider=args.provider,
                 batching=Batching(args.max_batch, args.max_wait_ms),
                 limits=Limits(args.max_n, args.max_body, args.max_values, args.body_timeout,
                               args.max_pending, args.max_connections),
                 log_level=args.log_level, shutdown_timeout=args.shutdown_timeout)
