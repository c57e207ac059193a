"""The ``fastvae`` command line: one sub-command per module in ``fastvae.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; it imports torch and other heavy modules inside ``run`` only, so that
``fastvae --help`` and ``fastvae sample`` start fast (the latter without torch).
Every ``FastVAEError`` becomes one line on stderr and exit status 2, without a traceback; Ctrl-C
or SIGTERM, in any phase, one line and exit status 130 (``fastvae.interrupts``).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from pathlib import Path

from fastvae import __version__, interrupts
from fastvae.errors import FastVAEError

COMMANDS = {
    "prepare": "fastvae.commands.prepare_command",
    "train": "fastvae.commands.train_command",
    "evaluate": "fastvae.commands.evaluate_command",
    "export": "fastvae.commands.export_command",
    "sample": "fastvae.commands.sample_command",
    "report": "fastvae.commands.report_command",
    "bench-sampler": "fastvae.commands.bench_sampler_command",
    "serve": "fastvae.commands.serve_command",
    "decode": "fastvae.commands.decode_command",
    "encode": "fastvae.commands.encode_command",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but errors name the command and say where to look for help, and flags are
    never abbreviated (``--over`` was taken as ``--overwrite`` and replaced a run)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastvae",
        description="Train variational autoencoders, evaluate them, export the decoder to ONNX "
        "and sample from it on a CPU.",
    )
    parser.add_argument("--version", action="version", version=f"fastvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(
            name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=_HelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(_run=module.run, _parser=command)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help names its default already or there is none
    (None: the setting comes from a config file or TrainConfig; a flag without a value, whose
    help says what giving it does)."""

    def _get_help_string(self, action):
        text = action.help or ""
        flag = action.nargs == 0  # store_true/store_false/store_const/count/version
        if flag or "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    with interrupts.handled("fastvae"):  # before anything heavy is imported
        return _main(argv)


def run() -> None:
    """The ``fastvae`` command (console script, ``python -m fastvae``): ``main``, then exit with
    its status. Its signal handlers stay through the interpreter's teardown, so a Ctrl-C while
    exit hooks still run (loader workers, trackers) is one line and status 130 there too;
    stdout is line-buffered."""
    interrupts.install()
    # each line leaves at once, also into a pipe or a batch job's log file (Python buffers
    # those in blocks): a run killed later keeps the lines it printed
    if hasattr(sys.stdout, "reconfigure"):  # None when the caller closed it (fastvae ... >&-)
        sys.stdout.reconfigure(line_buffering=True)
    _exit_without_teardown(main())


def _exit_without_teardown(status: int) -> None:
    """End the process as the interpreter does, but for its teardown: other threads joined,
    exit hooks run (loader workers, trackers; a Ctrl-C meanwhile is still one line and status
    130), output flushed, then ``os._exit``. The teardown skipped frees torch's modules: ~0.4 s
    of every command, and Python resets the signal handlers before it, so a Ctrl-C there ended
    the process by the signal itself, without the line."""
    import atexit
    import os
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        # what the interpreter runs first: threading's own exit hooks, which wake the idle
        # workers of thread pools (concurrent.futures' are not daemons: torch inductor's compile
        # pool waited forever in a join here), then the join of every non-daemon thread
        shutdown()
    else:
        current = threading.current_thread()
        for thread in threading.enumerate():
            if thread is not current and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say there
            pass
    os._exit(status)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's parser: its help is the one that lists its flags
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}{_did_you_mean(args._parser, extra)}")
    interrupts.name(f"fastvae {args.command}")
    try:
        return int(args._run(args) or 0)
    except FastVAEError as exc:
        print(f"fastvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a library caller's handler, or a second Ctrl-C in training
        print(f"fastvae {args.command}: interrupted", file=sys.stderr)
        return interrupts.EXIT_STATUS
    except OSError as exc:  # an unwritable --out, a full disk, a folder where a file goes, ...
        print(f"fastvae {args.command}: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        print(f"fastvae {args.command}: error: {_memory_error(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a torch-free install (sampling, serving) asked to train
        missing = _missing_package(exc)
        if missing is None:
            raise
        print(f"fastvae {args.command}: error: {missing}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not _is_allocation_failure(exc):
            raise
        print(f"fastvae {args.command}: error: {_memory_error(exc)}", file=sys.stderr)
        return 2


# pip's name for each package fastvae's commands import (where the import name differs)
_PIP_NAMES = {"sklearn": "scikit-learn", "skimage": "scikit-image", "PIL": "pillow", "lightning_fabric": "lightning-fabric"}
_SERVING = ("fastapi", "uvicorn", "starlette")


def _missing_package(exc: ModuleNotFoundError) -> str | None:
    """What to install for a command whose package is absent (a torch-free install has only
    what sampling and serving need), or None where the missing module is no package fastvae
    imports (fastvae's own: a bug)."""
    import importlib.util

    top = (exc.name or "").split(".")[0]
    if not top or top == "fastvae" or importlib.util.find_spec(top) is not None:
        return None
    pip_name = _PIP_NAMES.get(top, top)
    if top in _SERVING:
        return (f"the HTTP service needs fastapi and uvicorn, and '{top}' is not installed here: "
                "pip install 'fastapi>=0.110' 'uvicorn[standard]>=0.29' (or fastvae's serve extra)")
    return (f"this command needs the package '{top}', which is not installed here (a torch-free install "
            f"runs sample, decode, encode, bench-sampler and serve only): pip install {pip_name}, or install fastvae "
            "with its dependencies")


def _did_you_mean(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """"; did you mean --latent-dim?" for a mistyped flag (its closest spellings), else ""."""
    import difflib

    flags = [option for action in parser._actions for option in action.option_strings]
    guesses = [match for word in extra if word.startswith("--")
               for match in difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.75)]
    return f"; did you mean {' or '.join(dict.fromkeys(guesses))}?" if guesses else ""


def _os_error(exc: OSError) -> str:
    """What could not be read or written, why, and what to do, in one line. A temporary file
    (written beside its destination, then moved into place) is named by its folder."""
    from fastvae.errors import write_failure, write_remedy

    name = exc.filename
    if name is None:
        return write_failure(exc)
    from fastvae.run_folder import is_temporary

    why = exc.strerror or str(exc) or type(exc).__name__
    remedy = write_remedy(exc)  # errnos of failed writes
    path = Path(str(name))
    # a file where the path needs a folder ("File exists" from mkdir), or a folder where a file
    # goes ("Is a directory" from a rename): name it, and what to give instead
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in path.parents if _probe(p.is_file)), None)
        if blocker is not None or (_probe(path.is_file) and not _probe(path.is_dir)):
            if blocker is None:
                return f"cannot use {path} as a folder: it is a file; give another path"
            return f"cannot use {path}: {blocker} is a file, not a folder; give a path in a folder"
    target = Path(str(exc.filename2)) if exc.filename2 is not None else path
    if exc.errno == errno.EISDIR and _probe(target.is_dir):
        return f"cannot write {target}: it is a folder; give a file name (or remove the folder)"
    staged = next((p for p in (path, *path.parents) if is_temporary(p)), None)
    writing = remedy is not None or staged is not None
    remedy = remedy or "check the path and its permissions"
    where = f"{'write' if writing else 'use'} {path}" if staged is None else f"write into {staged.parent}"
    if exc.filename2 is not None:
        where += f" (moving it to {exc.filename2})"
    return f"cannot {where}: {why}; {remedy}"


def _probe(check) -> bool:
    """``check()`` (a Path test), False where it cannot look (is_file re-raises EACCES)."""
    try:
        return check()
    except OSError:
        return False


def _is_allocation_failure(exc: RuntimeError) -> bool:
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _memory_error(exc: BaseException) -> str:
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return (f"not enough memory ({detail}): use smaller sizes (-n, --batch-size, --latent-dim, "
            "--hidden-dim, ...)")


if __name__ == "__main__":
    raise SystemExit(main())
