"""One exception type for every mistake a user can make.

The CLI prints its message (which names the problem and the fix) without a traceback,
so a bad class name reads like an answer, not like a crash.
"""


class TransferkitError(Exception):
    """A problem with the user's input: data, config or checkpoint."""


class NotPlainData(TransferkitError):
    """A file that would run code when loaded (a foreign or tampered pickle): refused, never repaired."""
