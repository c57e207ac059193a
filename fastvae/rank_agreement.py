"""Every rank of a run trains the same model on the same data: checked once, at start-up.

Each node of a multi-node run is started by a command of its own (torchrun or srun per node).
A node started with another ``--seed`` trained on silently: its ranks' shares of each epoch
overlapped the others' (378 of 750 examples per rank were never seen); another
``--batch-size`` or other data ended in gloo's "collective mismatch", which the other node
reported as a killed rank, with no checkpoint to resume from. Now every rank gathers every
rank's settings before the first collective of training and all stop with the same line.

Settings a rank may hold for itself (where and how it reads, writes and reports) are not
compared; the data is compared by what was read (``shards.dataset_id``, its name, shape and
sizes), since the path may differ from node to node.
"""

from __future__ import annotations

import dataclasses

from fastvae.config import flag_of
from fastvae.errors import FastVAEError

# a rank's own: paths (mounts differ by node), its reading and reporting, rank 0's clock; the
# split settings shape the data, which is compared as read
RANK_OWN = ("data", "out", "workers", "threads", "progress", "pictures", "loggers", "tensorboard",
            "checkpoint_minutes", "iwae_k", "test_fraction", "split_seed", "split_rule", "grayscale")


def what_this_rank_trains(config, splits, data_id: str | None) -> dict:
    """The settings and data every rank must share, as plain values (sent to the other ranks);
    ``data_id``: ``shards.dataset_id(splits)``, which the trainer holds already."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in RANK_OWN}
    sizes = tuple(len(part) if hasattr(part, "__len__") else None for part in (splits.train, splits.test))
    values["data"] = (data_id or getattr(splits, "name", None), tuple(splits.data_shape), sizes)
    return values


def check_ranks_agree(fabric, mine: dict) -> None:
    """FastVAEError on every rank (the same line) if any rank trains other settings or data than
    rank 0; nothing with one rank. A collective: every rank calls it."""
    if fabric.world_size == 1:
        return
    import torch.distributed as dist

    gathered: list = [None] * fabric.world_size
    dist.all_gather_object(gathered, mine)
    first = gathered[0]
    for rank, theirs in enumerate(gathered[1:], start=1):
        differ = [key for key in first if theirs.get(key) != first[key]]
        if differ:
            said = ", ".join(_difference(key, first[key], theirs.get(key), rank) for key in differ)
            raise FastVAEError(f"rank {rank} was started with other settings than rank 0: {said}; start "
                               "every node's command with the same settings")


def _difference(key: str, ours, theirs, rank: int) -> str:
    if key == "data":
        return f"--data reads other data ({_data(ours)} on rank 0, {_data(theirs)} on rank {rank})"
    return f"--{flag_of(key)} {ours!r} on rank 0, {theirs!r} on rank {rank}"


def _data(identity) -> str:
    name, shape, (train, test) = identity
    return f"{name or 'data given by a program'}: {train} + {test} images of {'x'.join(map(str, shape))}"
