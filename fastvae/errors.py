"""One exception type for every problem a user can fix.

The CLI prints its message on one line and exits non-zero, without a traceback.
Messages say what was wrong and what to do about it.
"""


class FastVAEError(Exception):
    """A problem with the user's input, files or settings (not a bug in fastvae)."""
