"""The decoder behind litserve, for the serving benchmark's stack comparison (not shipped).

    python benchmarks/litserve_decoder.py decoder.onnx PORT MAX_BATCH MAX_WAIT_MS

``POST /predict`` takes the body of fastvae's ``POST /sample`` (``n``, ``seed``; JSON response,
the same draws and batching rule: each request's latents from its own seeded generator) and
``GET /health`` is litserve's own. Prints a line with ``listening`` once it answers /health.
"""

from __future__ import annotations

import sys

import litserve as ls
import numpy as np

from fastvae.export import OnnxSampler
from fastvae.export.service_io import Limits, encode, parse_sample


class DecoderAPI(ls.LitAPI):
    def __init__(self, path, max_batch, max_wait_ms):
        super().__init__(max_batch_size=max_batch, batch_timeout=max_wait_ms / 1000)
        self.path = path

    def setup(self, device):
        self.sampler = OnnxSampler(self.path)
        self.limits = Limits()

    def decode_request(self, request):
        import json

        req = parse_sample(json.dumps(request).encode(), self.limits)
        return self.sampler.draw_latents(req.n, np.random.default_rng(req.seed))

    def batch(self, inputs):
        return inputs

    def predict(self, zs):
        if isinstance(zs, np.ndarray):  # max_batch_size 1: one request
            return self.sampler.decode(zs)
        x = self.sampler.decode(np.concatenate(zs))
        out, start = [], 0
        for z in zs:
            out.append(x[start:start + len(z)])
            start += len(z)
        return out

    def unbatch(self, output):
        return output

    def encode_response(self, x):
        import json

        return json.loads(encode(x, "json")[0])


if __name__ == "__main__":
    path, port, max_batch, max_wait_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    server = ls.LitServer(DecoderAPI(path, max_batch, max_wait_ms), accelerator="cpu", workers_per_device=1,
                         fast_queue="--fast-queue" in sys.argv)
    print(f"litserve decoder: listening on http://127.0.0.1:{port}", flush=True)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")
