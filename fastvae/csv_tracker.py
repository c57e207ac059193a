"""``--logger csv``: Fabric's CSVLogger, appending to a resumed run's ``RUN/csv/metrics.csv``
(Fabric's writer deletes it). Module-level classes, so that ``--strategy ddp_spawn`` can hand
the logger to its spawned ranks (pickled by name)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning_fabric.loggers import CSVLogger
from lightning_fabric.loggers.csv_logs import _ExperimentWriter
from lightning_fabric.loggers.logger import rank_zero_experiment

from fastvae.run_folder import csv_rows


class AppendingWriter(_ExperimentWriter):
    """Fabric's writer, except that an earlier ``metrics.csv`` is kept and appended to."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            self.metrics_keys = csv_rows(Path(self.metrics_file_path))[0]


class AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            os.makedirs(self._root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def csv_logger(run_dir: Path) -> AppendingCSVLogger:
    """The logger of ``RUN/csv``; a damaged earlier file is one line now, not after an epoch."""
    logger = AppendingCSVLogger(root_dir=str(run_dir), name="csv", version="")
    earlier = Path(logger.log_dir) / _ExperimentWriter.NAME_METRICS_FILE
    if earlier.is_file():
        csv_rows(earlier)
    return logger
