"""How the streaming library was chosen: litdata vs webdataset on the same images.

    .venv/bin/pip install --no-deps webdataset braceexpand   # webdataset is not a dependency
    .venv/bin/python benchmarks/streaming_libraries.py [N] [--json OUT]

Writes N (default 60,000) random 28x28 uint8 images with each library - one example per item
(litdata ``optimize`` / webdataset ``ShardWriter``, 16 MB shards) - then reads them back
shuffled in batches of 64 with 0, 1 and 2 DataLoader workers: litdata's
``StreamingDataset`` + ``StreamingDataLoader``; webdataset's ``WebDataset`` pipeline (shard
shuffle, a 1,000-example shuffle buffer, split by node and worker) decoding the arrays with
``np.frombuffer`` (its fastest path, no ``np.load``). Last, fastvae's own use of litdata:
blocks of 256 images per item read in a random order (``fastvae.shards``). Prints images/s.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

N = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 60_000
IMAGES = np.random.default_rng(0).integers(0, 256, (N, 1, 28, 28), dtype=np.uint8)


def item(i: int) -> dict:
    return {"image": IMAGES[i], "label": int(i % 10)}


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


def main() -> dict:
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    import litdata as ld
    import torch
    import webdataset as wds

    root = tempfile.mkdtemp(prefix="streaming-libraries-")
    results = {"examples": N}
    try:
        seconds, _ = timed(lambda: ld.optimize(fn=item, inputs=list(range(N)), output_dir=f"{root}/ld",
                                               chunk_bytes="16MB", num_workers=1, mode="overwrite",
                                               start_method="fork") or N)
        results["litdata_write_s"] = seconds
        os.makedirs(f"{root}/wds")

        def write_tars():
            with wds.ShardWriter(f"{root}/wds/shard-%06d.tar", maxsize=16e6, verbose=0) as sink:
                for i in range(N):
                    sink.write({"__key__": f"{i:08d}", "u8": IMAGES[i].tobytes(), "cls": i % 10})
            return N

        results["webdataset_write_s"], _ = timed(write_tars)
        shards = sorted(os.listdir(f"{root}/wds"))
        urls = f"{root}/wds/shard-{{000000..{len(shards) - 1:06d}}}.tar"

        def decode(sample):
            return np.frombuffer(sample["u8"], np.uint8).reshape(1, 28, 28), int(sample["cls"])

        for workers in (0, 1, 2):
            loader = ld.StreamingDataLoader(ld.StreamingDataset(f"{root}/ld", shuffle=True, seed=0),
                                            batch_size=64, num_workers=workers)
            seconds, n = timed(lambda: sum(len(b["image"]) for b in loader))
            results[f"litdata_images_per_s_{workers}w"] = n / seconds
            pipeline = (wds.WebDataset(urls, shardshuffle=len(shards), seed=0, nodesplitter=wds.split_by_node,
                                       workersplitter=wds.split_by_worker, empty_check=False)
                        .shuffle(1000).map(decode).batched(64))
            loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers)
            seconds, n = timed(lambda: sum(len(x) for x, _ in loader))
            results[f"webdataset_images_per_s_{workers}w"] = n / seconds

        from fastvae.shards import SplitWriter

        writer = SplitWriter(__import__("pathlib").Path(root) / "blocks", 256)
        writer.add(IMAGES, np.zeros(N, np.int64))
        writer.finish()
        reader = ld.StreamingDataset(f"{root}/blocks", batch_decode=0)
        order = np.random.default_rng(0).permutation(len(reader))
        seconds, n = timed(lambda: sum(len(reader[int(i)]["images"]) for i in order))
        results["litdata_blocks_images_per_s_0w"] = n / seconds
        results["torch"] = torch.__version__
        results["litdata"] = ld.__version__
        results["webdataset"] = getattr(wds, "__version__", "?")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


if __name__ == "__main__":
    out = main()
    for key, value in out.items():
        print(f"{key:>36}: {value:,.1f}" if isinstance(value, float) else f"{key:>36}: {value}")
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(out, f, indent=2)
