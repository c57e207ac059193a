"""Fabric's checkpoint IO for fastvae's runs: ``torch.save`` straight to the path given
(``Trainer.save``'s temporary file beside last.ckpt, renamed over it once complete).

Fabric's own ``TorchCheckpointIO`` writes the checkpoint to a file in $TMPDIR first and copies
it over: a second disk that can be full, named in no error. Here the checkpoint is serialized
in memory (as Fabric's is), then written with Python's file write, so a full disk raises an
OSError with its errno (torch.save's file writer says "unexpected pos N vs M", nothing more).
Module level, so that DDP's spawned processes can unpickle it with the strategy.
"""

from __future__ import annotations

import io

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class DirectCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(path, "wb") as f:
            f.write(buffer.getbuffer())
