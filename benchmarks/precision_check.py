"""bf16 vs fp32 training quality: the digits protocol in both precisions, -ELBO compared.

    python benchmarks/precision_check.py OUT.json [--accelerator auto] [--epochs 50]
               [--precisions 32-true bf16-mixed]

Writes one JSON object: device info, per precision the test -ELBO (nats), train time and epoch
time, and each precision's relative -ELBO difference from 32-true (the goal: within 1%), and
``smoke``: true for fewer epochs than the protocol's 50 or with FASTVAE_BENCH_SMOKE set (a
pipeline check, e.g. gpu/run.sh without CUDA: report.py store refuses it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
import time

from common import device_info, smoke_mode  # this folder is sys.path[0] when run as a script

PROTOCOL_EPOCHS = 50


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--epochs", type=int, default=PROTOCOL_EPOCHS)
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    args = parser.parse_args(argv)

    from fastvae.config import TrainConfig
    from fastvae.trainer import train

    runs = {}
    for precision in args.precisions:
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(epochs=args.epochs, precision=precision, out=out, progress=False,
                                 pictures=False, accelerator=args.accelerator, seed=0)
            start = time.perf_counter()
            result = train(config)
            seconds = time.perf_counter() - start
        last = result.metrics[-1]
        runs[precision] = {
            "test_neg_elbo": last["test_neg_elbo"], "train_loss": last["train_loss"],
            "train_seconds": seconds,
            "median_epoch_s": sorted(r["epoch_time_s"] for r in result.metrics)[len(result.metrics) // 2],
        }
        print(f"{precision}: test -ELBO {last['test_neg_elbo']:.4f} nats, {seconds:.1f} s", flush=True)
    base = runs.get("32-true", {}).get("test_neg_elbo")
    for run in runs.values():
        if base:
            run["rel_diff_vs_fp32"] = (run["test_neg_elbo"] - base) / base
    report = {"suite": "precision", "protocol": "digits, MLP 64-512-8, Bernoulli, batch 64, Adam 1e-3, seed 0",
              "epochs": args.epochs, "accelerator": args.accelerator,
              "smoke": bool(smoke_mode() or args.epochs < PROTOCOL_EPOCHS), "machine": device_info(), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({p: round(r.get("rel_diff_vs_fp32", 0.0), 5) for p, r in runs.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
