"""A bounded HTTP/1.1 load generator for loopback services (benchmarks and tests).

``run_load(url, concurrency=64, duration=20, ...)``: ``concurrency`` keep-alive connections,
each sending the same request again as soon as the previous response arrived (a closed loop),
until ``duration`` seconds have passed or ``max_requests`` were sent. Only the standard
library (asyncio streams; uvloop when installed), so it runs in its own process with little
overhead per request. Refuses any host outside the loopback range.

    python benchmarks/http_load.py URL [--concurrency 64] [--duration 20] [--body JSON]
    (prints one JSON object: requests, errors, p50/p99 ms, requests/s)
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import time
from urllib.parse import urlsplit


def _loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (OSError, ValueError):
        return False


async def _client(host, port, request: bytes, deadline: float, budget: list, latencies: list, errors: list):
    reader = writer = None
    clock = time.perf_counter
    try:
        reader, writer = await asyncio.open_connection(host, port)
        while budget[0] > 0 and clock() < deadline:
            budget[0] -= 1
            start = clock()
            writer.write(request)
            status_line = await reader.readline()
            length, status = 0, int(status_line.split(b" ", 2)[1])
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(clock() - start)
            if status != 200:
                errors.append(f"HTTP {status}")
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        if writer is not None:
            writer.close()


def build_request(method: str, host: str, port: int, path: str, body: bytes = b"",
                  content_type: str = "application/json") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if method != "POST":
        body = b""
    else:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def _run(url: str, concurrency: int, duration: float, max_requests: int, method: str, body: bytes):
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    request = build_request(method, host, port, parts.path or "/", body)
    latencies, errors, budget = [], [], [max_requests]
    start = time.perf_counter()
    await asyncio.gather(*(_client(host, port, request, start + duration, budget, latencies, errors)
                           for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else None

    return {"url": url, "method": method, "concurrency": concurrency, "requests": len(latencies),
            "errors": len(errors), "first_errors": sorted(set(errors))[:3], "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed if elapsed > 0 else 0.0,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def run_load(url: str, *, concurrency: int = 64, duration: float = 20.0, max_requests: int = 10_000_000,
             method: str = "POST", body: bytes = b"") -> dict:
    """Load ``url`` (loopback only) and return requests, errors, p50/p99 (ms) and requests/s."""
    host = urlsplit(url).hostname or ""
    if not _loopback(host):
        raise ValueError(f"http_load only targets loopback addresses, not {host!r}")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_run(url, concurrency, duration, max_requests, method, body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-requests", type=int, default=10_000_000)
    parser.add_argument("--method", default="POST", choices=("GET", "POST"))
    parser.add_argument("--body", default="")
    args = parser.parse_args()
    print(json.dumps(run_load(args.url, concurrency=args.concurrency, duration=args.duration,
                              max_requests=args.max_requests, method=args.method, body=args.body.encode())))


if __name__ == "__main__":
    main()
