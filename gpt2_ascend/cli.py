"""What the command-line scripts (train.py, evaluate.py, generate.py, demo.py, convert/*.py) share."""
from __future__ import annotations

import sys


def error_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): errors are one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def print_error(e: BaseException, prefix: str = ""):
    print(f"{prefix}error: {error_line(e)}", file=sys.stderr)
