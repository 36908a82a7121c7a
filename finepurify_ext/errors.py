"""The one error type for input a user can fix.

Its message is what the user reads: it names the file (with its line where there is one), the
parameter or the option, says what is wrong and what to do, in one or two lines. The command line
prints it as it is and exits with 2; anything else that goes wrong while running exits with 1.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: a file, an option or an argument the user can fix (the message says how)."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none; two lines joined when
    the first only announces the second): what a one-line report of someone else's exception carries."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
