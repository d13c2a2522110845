"""Errors whose message is the whole story, and the one-line form of any error.

The CLI prints a OneLineError as `error: <message>` and nothing else; the run record stores the
same line. Like mvrec/config.py, this imports nothing from the project.
"""

from __future__ import annotations

import re


class OneLineError(RuntimeError):
    """The message says what failed and why, on one line; no traceback helps the user."""


class ModelLoadError(OneLineError):
    """A replica's model did not load: the cause and the model path or id."""


class NoReplica(OneLineError):
    """No model replica could be placed within its bound."""


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b[^:\n]*: ")


def one_line(error: BaseException) -> str:
    """"Type: message" on one line without terminal colour codes. A Ray error carries the remote
    traceback as text: its cause is the last "SomethingError: ..." line and what follows it."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines()]
    start = max((i for i, line in enumerate(lines) if _ERROR_LINE.match(line)), default=0)
    if start:
        return " ".join(line for line in lines[start:] if line)
    return f"{type(error).__name__}: " + " ".join(line for line in lines if line)
