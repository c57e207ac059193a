"""``fastvae serve`` under load on loopback: 64 concurrent clients asking for 1 sample each.

Goals, each measured by one benchmark:

* ``test_sustained_load``: 20 s of 64 clients on ``/sample`` (digits MLP decoder, batching on):
  zero errors; p50/p99 latency and requests/s recorded.
* ``test_interleaved[mlp-sample-vs-healthz]``: ``/sample`` reaches >= 70% of the requests/s the
  same server gives for ``GET /healthz`` (the stack's own ceiling); seeded requests too.
* ``test_interleaved[mlp-batching-on-vs-off]``: batching never lowers requests/s.
* ``test_interleaved[heavy-batching-on-vs-off]``: with a decoder of >= 2 ms per sample (a conv
  decoder to 3x64x64), dynamic batching gives >= 2x the requests/s of batching off.
* ``test_interleaved[stack-fastapi-vs-litserve]``: the same decoder and request on litserve
  (``litserve_decoder.py``), JSON responses on both, with each stack's own health endpoint.

"Interleaved": the arms (endpoints or servers, all started before) take turns, one load round
each, so the machine's other work hits them alike; ``extra_info`` holds each arm's median
requests/s, p50/p99 and errors over the rounds, and the ratio (``speedup``). The load
generator (``http_load.py``) runs in this pytest process, each server in its own.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="fastvae serve needs fastapi and uvicorn (the GPU image has neither)")
pytest.importorskip("uvicorn", reason="fastvae serve needs fastapi and uvicorn (the GPU image has neither)")

from common import annotate, smoke_mode  # noqa: E402
from http_load import run_load  # noqa: E402
from service_process import ServiceProcess, free_port  # noqa: E402

BENCH = Path(__file__).resolve().parent
CLIENTS = 4 if smoke_mode() else 64
SUSTAINED_S = 1.0 if smoke_mode() else 20.0
ROUND_S = 0.3 if smoke_mode() else 2.0
PAIRS = 1 if smoke_mode() else 5
MLP = {"model": "mlp", "data_shape": [1, 8, 8], "latent_dim": 8, "hidden_dim": 512}
# >= 2 ms per sample in onnxruntime on the 2-core dev CPU (7 ms alone, 2.4 ms in batches of 16+);
# the smoke run (nothing timed) serves the MLP decoder in its place
HEAVY = MLP if smoke_mode() else {"model": "conv", "data_shape": [3, 64, 64], "latent_dim": 8, "hidden_dim": 512}
ONE = json.dumps({"n": 1}).encode()
ONE_SEEDED = json.dumps({"n": 1, "seed": 1}).encode()
ONE_JSON = json.dumps({"n": 1, "seed": 1, "format": "json"}).encode()

# the smoke run takes the fast exporter (0.2 s against 3-10 s); measured runs what users ship
EXPORTER = "torchscript" if smoke_mode() else "auto"


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    import torch

    from fastvae.export import export_decoder
    from fastvae.models import build_model

    folder = tmp_path_factory.mktemp("serving")
    out = {}
    for name, spec in (("mlp", MLP), ("heavy", HEAVY)):
        if spec is MLP and "mlp" in out:
            out[name] = out["mlp"]
            continue
        torch.manual_seed(0)
        model = build_model(spec).eval()
        out[name] = export_decoder(model, folder / f"{name}.onnx", check_batches=(3,), exporter=EXPORTER).path
    return out


def fastvae_server(model, *flags):
    python = [sys.executable, "-P"] if sys.flags.safe_path else [sys.executable]
    cmd = [*python, "-m", "fastvae", "serve", str(model), "--port", "0", *map(str, flags)]
    return ServiceProcess(cmd, ready_prefix="fastvae serve: listening on ", env={**os.environ, "PYTHONUNBUFFERED": "1"})


def litserve_server(model, max_batch=64, max_wait_ms=2):
    port = free_port()
    cmd = [sys.executable, str(BENCH / "litserve_decoder.py"), str(model), str(port), str(max_batch), str(max_wait_ms)]
    return ServiceProcess(cmd, ready_url=(port, "/health"))


def _load(server, method, path, body=b"", duration=ROUND_S):
    return run_load(f"http://127.0.0.1:{server.port}{path}", concurrency=CLIENTS, duration=duration,
                    method=method, body=body)


def _stopped_cleanly(*servers):
    for server in servers:
        rc, _, err = server.stop()
        assert rc == 0 and "Traceback" not in err, err[-2000:]


def test_sustained_load(benchmark, decoders):
    server = fastvae_server(decoders["mlp"])
    try:
        _load(server, "POST", "/sample", ONE, duration=min(ROUND_S, 1.0))  # warm-up
        result = {}
        benchmark.group = "serving-sustained"
        benchmark.pedantic(lambda: result.update(_load(server, "POST", "/sample", ONE, SUSTAINED_S)),
                           rounds=1, iterations=1)
    finally:
        _stopped_cleanly(server)
    assert result["errors"] == 0, result["first_errors"]
    annotate(benchmark, impl="fastvae-serve", items=result["requests"], case="mlp-64-clients",
             loadavg_1m=os.getloadavg()[0], device="cpu",
             clients=CLIENTS, seconds=result["seconds"], requests=result["requests"], errors=result["errors"],
             requests_per_s=result["requests_per_s"], p50_ms=result["p50_ms"], p99_ms=result["p99_ms"])


# arms: (label, server key, method, path, body); the ratio is first arm over second
CASES = {
    "mlp-sample-vs-healthz": [("sample", "batching", "POST", "/sample", ONE),
                              ("healthz", "batching", "GET", "/healthz", b""),
                              ("sample-seeded", "batching", "POST", "/sample", ONE_SEEDED)],
    "mlp-batching-on-vs-off": [("batching-on", "batching", "POST", "/sample", ONE_SEEDED),
                               ("batching-off", "no-batching", "POST", "/sample", ONE_SEEDED)],
    "heavy-batching-on-vs-off": [("batching-on", "heavy-batching", "POST", "/sample", ONE_SEEDED),
                                 ("batching-off", "heavy-no-batching", "POST", "/sample", ONE_SEEDED)],
    "stack-fastapi-vs-litserve": [("fastapi-sample-json", "batching", "POST", "/sample", ONE_JSON),
                                  ("litserve-predict-json", "litserve", "POST", "/predict", ONE_JSON),
                                  ("fastapi-healthz", "batching", "GET", "/healthz", b""),
                                  ("litserve-health", "litserve", "GET", "/health", b"")],
}


def _servers(case, decoders):
    keys = {arm[1] for arm in CASES[case]}
    starters = {
        "batching": lambda: fastvae_server(decoders["mlp"], "--max-batch", 64, "--max-wait-ms", 2),
        "no-batching": lambda: fastvae_server(decoders["mlp"], "--max-batch", 1),
        "heavy-batching": lambda: fastvae_server(decoders["heavy"], "--max-batch", 64, "--max-wait-ms", 2),
        "heavy-no-batching": lambda: fastvae_server(decoders["heavy"], "--max-batch", 1),
        "litserve": lambda: litserve_server(decoders["mlp"]),
    }
    servers = {}
    try:
        for key in sorted(keys):
            servers[key] = starters[key]()
    except Exception:
        for server in servers.values():
            server.stop()
        raise
    return servers


@pytest.mark.parametrize("case", sorted(CASES))
def test_interleaved(benchmark, decoders, case):
    if case.startswith("stack"):
        pytest.importorskip("litserve")
        if smoke_mode():
            pytest.skip("litserve takes ~5 s to start: measured runs only")
    servers = _servers(case, decoders)
    arms = CASES[case]
    results = {arm[0]: [] for arm in arms}
    rotation = [0]

    def one_rotation():  # each arm once; the first arm goes first in even rotations, last in odd ones
        order = arms if rotation[0] % 2 == 0 else arms[::-1]
        rotation[0] += 1
        for label, key, method, path, body in order:
            results[label].append(_load(servers[key], method, path, body))

    try:
        for _, key, method, path, body in arms:  # warm-up: sessions, connections, code paths
            _load(servers[key], method, path, body, duration=min(ROUND_S, 0.5))
        benchmark.group = "serving-interleaved"
        benchmark.pedantic(one_rotation, rounds=PAIRS, iterations=1)
    finally:
        for server in servers.values():
            server.stop()
    extra = {"clients": CLIENTS, "round_s": ROUND_S}
    requests = 0
    for label, rounds in results.items():
        requests += sum(r["requests"] for r in rounds)
        extra[label] = {
            "requests_per_s": statistics.median(r["requests_per_s"] for r in rounds),
            "p50_ms": statistics.median(r["p50_ms"] for r in rounds if r["p50_ms"] is not None),
            "p99_ms": statistics.median(r["p99_ms"] for r in rounds if r["p99_ms"] is not None),
            "errors": sum(r["errors"] for r in rounds),
        }
        assert extra[label]["errors"] == 0, (label, [r["first_errors"] for r in rounds])
    first, second = arms[0][0], arms[1][0]
    extra["speedup"] = extra[first]["requests_per_s"] / extra[second]["requests_per_s"]
    # the same ratio per rotation (both arms loaded within seconds of each other), median
    extra["speedup_per_rotation_median"] = statistics.median(
        a["requests_per_s"] / b["requests_per_s"] for a, b in zip(results[first], results[second]))
    if len(arms) > 2 and case.startswith("mlp"):
        extra["seeded_speedup"] = extra[arms[2][0]]["requests_per_s"] / extra[second]["requests_per_s"]
    if case.startswith("stack"):
        extra["litserve_health_vs_fastapi_healthz"] = (extra["litserve-health"]["requests_per_s"]
                                                      / extra["fastapi-healthz"]["requests_per_s"])
    annotate(benchmark, impl=f"{first} / {second}", items=requests, case=case, loadavg_1m=os.getloadavg()[0],
             device="cpu", **extra)
