"""One exception type for every problem a user can fix.

The CLI prints its message on one line and exits non-zero, without a traceback.
Messages say what was wrong and what to do about it.
"""

import errno

# what to do about a failed write, by errno (others: check the path and its permissions)
_WRITE_REMEDIES = {
    errno.ENOSPC: "the disk is full: free space or choose a folder on another disk, then run again",
    errno.EDQUOT: "the disk quota is used up: free space or choose a folder on another disk, then run again",
    errno.EFBIG: ("the file outgrew what this file system or the shell's `ulimit -f` allows: raise the limit "
                  "or choose a folder on another file system, then run again"),
    errno.EIO: "the disk reported an input/output error: check the device, then run again",
    errno.EROFS: "the file system is read-only: choose another folder",
}


class FastVAEError(Exception):
    """A problem with the user's input, files or settings (not a bug in fastvae)."""


def one_line(exc: BaseException | str, limit: int = 200) -> str:
    """An exception's message on one line, at most ``limit`` characters, for user messages."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_remedy(exc: OSError) -> str | None:
    """What to do about a write that failed with ``exc`` (a full disk, ...), or None when its
    errno is not one of those."""
    return _WRITE_REMEDIES.get(exc.errno)


def write_failure(exc: OSError) -> str:
    """``exc``'s reason, with what to do where its errno says (for "could not write X (...)")."""
    why = exc.strerror or one_line(exc)
    remedy = write_remedy(exc)
    return f"{why}: {remedy}" if remedy else why
