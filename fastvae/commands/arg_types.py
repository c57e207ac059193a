"""argparse value types shared by the commands (a bad value is argparse's one-line error, exit 2)."""

from __future__ import annotations

import argparse

from fastvae.config import MAX_SEED, check_seed, url_problem
from fastvae.errors import FastVAEError


def seed(text: str) -> int:
    """A seed: an integer from 0 to 2**32 - 1 (``fastvae.config.check_seed``'s rule)."""
    try:
        return check_seed(int(text))
    except (ValueError, FastVAEError):  # argparse names the flag; the text as typed
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_SEED}, got {text!r}") from None


def path(text: str) -> str:
    """A local file or folder name, not empty (an empty --out would mean the current folder)
    and not a URL (``s3://b/run`` would be written to a local folder ``s3:/b/run``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty: give a file or folder name")
    problem = url_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text
