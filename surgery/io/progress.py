"""A byte-counting progress bar on stderr (rich), silent when not on a terminal or for tiny jobs."""

from __future__ import annotations

import sys
from contextlib import contextmanager


@contextmanager
def byte_progress(total: int, description: str, enabled: bool | None = None):
    """Yield advance(nbytes). Shows bytes/s; enabled by default only on a TTY for jobs over 50 MB."""
    if enabled is None:
        enabled = sys.stderr.isatty() and total > 50_000_000
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    cols = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    from rich.console import Console

    with Progress(*cols, console=Console(stderr=True), transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)
