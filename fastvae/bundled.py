"""Data files that ship inside installed wheels, found without importing their package.

Importing scikit-learn costs ~1.5 s (scipy.stats) in every process that trains on ``digits``,
DDP/FSDP ranks included; its data files are plain files beside its code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def bundled_file(top: str, *parts: str) -> "Path | None":
    """``<installed package top>/<parts...>`` if that file exists, else None (the package
    missing too). ``importlib.util.find_spec`` of a top-level name does not import it."""
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    return path if path.is_file() else None
