"""Lines surgery writes on stderr besides errors and progress bars: notes (on by default, -q
silences them) and details (-v). The library never prints otherwise, so this is the one switch."""

from __future__ import annotations

import sys

QUIET, NORMAL, VERBOSE = 0, 1, 2
level = NORMAL


def set_level(value: int) -> None:
    global level
    level = value


def note(msg: str) -> None:
    """Something the user should know about the result (a fallback taken, a tie undone)."""
    if level >= NORMAL:
        print(f"surgery: note: {msg}", file=sys.stderr)


def detail(msg: str) -> None:
    """Progress and decisions worth seeing only with -v."""
    if level >= VERBOSE:
        print(f"surgery: {msg}", file=sys.stderr)
