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


def sampler_seed(text: str) -> int:
    """A seed of ``OnnxSampler.sample`` (and of the service's /sample): 0 to 2**128 - 1, so that
    every seeded request's samples can be drawn again on the command line."""
    from fastvae.export.sampler import SEED_BOUND

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEED_BOUND:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**128 - 1, got {text!r}")
    return value


def at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (the flag's name in the error, not the
    library parameter's that would refuse it later)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def onnx_threads(text: str) -> int:
    """onnxruntime intra-op threads: an integer from 1 to this machine's CPUs (the sampler's rule)."""
    from fastvae.config import usable_cpus

    cpus = usable_cpus()
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= cpus:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {cpus} (the CPUs this process may use), "
                                         f"got {text!r}")
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
