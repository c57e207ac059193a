"""``python tests/train_worker.py CONFIG_JSON [--resume]``: train on a slice of the digits.

For multi-process tests whose strategy (FSDP) launches ranks by re-running the command line,
which cannot be pytest itself. CONFIG_JSON holds TrainConfig fields plus ``train_rows`` and
``test_rows``, the sizes of the slices of the bundled digits to use.
"""

import json
import sys

import torch

from fastvae.config import TrainConfig
from fastvae.data import Splits, load_dataset
from fastvae.train import train

if __name__ == "__main__":
    torch.set_num_threads(1)
    values = json.loads(sys.argv[1])
    train_rows, test_rows = values.pop("train_rows"), values.pop("test_rows")
    digits = load_dataset("digits")
    splits = Splits("digits", digits.train[:train_rows], digits.test[:test_rows])
    train(TrainConfig(**values), resume="--resume" in sys.argv[2:], splits=splits)
