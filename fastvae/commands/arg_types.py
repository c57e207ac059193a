"""argparse value types shared by the commands (a bad value is argparse's one-line error, exit 2)."""

from __future__ import annotations

import argparse

from fastvae.config import MAX_SEED, url_problem


def seed(text: str) -> int:
    """A seed: an integer from 0 to 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_SEED}, got {text!r}")
    return value


def path(text: str) -> str:
    """A local file or folder name, not empty (an empty --out would mean the current folder)
    and not a URL (``s3://b/run`` would be written to a local folder ``s3:/b/run``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty: give a file or folder name")
    problem = url_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text
