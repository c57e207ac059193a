"""One exception type for every problem a user can fix.

The CLI prints its message on one line and exits non-zero, without a traceback.
Messages say what was wrong and what to do about it.
"""


class FastVAEError(Exception):
    """A problem with the user's input, files or settings (not a bug in fastvae)."""


def one_line(exc: BaseException | str, limit: int = 200) -> str:
    """An exception's message on one line, at most ``limit`` characters, for user messages."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
