"""Progress of long loops, one mechanism for every command: a rich bar with an ETA on a terminal, a
log line on stderr every N steps or S seconds otherwise (CI logs, `nohup`, a notebook's captured
stderr), nothing when quiet.

    with progress(len(modules), "extract-lora: SVD", unit="modules") as advance:
        for m in modules:
            ...
            advance(1, m.name)            # or advance(nbytes) with unit="bytes"

`enabled`: None (the default) picks the bar on a terminal and log lines elsewhere, and follows -q
(surgery.log's QUIET level: nothing); True forces the bar; False is quiet. Log lines come at most every SURGERY_PROGRESS_SECONDS (default 30) seconds or every
`log_every` steps, so short jobs stay silent; the ETA is the elapsed time scaled by the share of work
left (weights: pass each step's cost, e.g. bytes or parameters, so uneven steps still give a fair ETA).
The library writes only to stderr; stdout stays for results (tables, --json).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

LOG_SECONDS = 30.0
_active = []  # a pass inside another (an eval inside training) stays silent: one bar at a time


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _amount(x: float, unit: str) -> str:
    if unit == "bytes":
        for u in ("B", "KB", "MB", "GB", "TB"):
            if abs(x) < 1000 or u == "TB":
                return f"{x:.0f} {u}" if u == "B" else f"{x:.2f} {u}"
            x /= 1000
    return f"{x:g}"


class _Lines:
    """advance() for a non-terminal: a line when `log_every` steps or `seconds` have passed since the last."""

    def __init__(self, total: float, description: str, unit: str, seconds: float, log_every: int | None, stream):
        self.total, self.description, self.unit, self.stream = total, description, unit, stream
        self.seconds, self.log_every = seconds, log_every
        self.done, self.steps, self.logged, self.last_logged = 0.0, 0, 0, 0
        self.t0 = self.last = time.monotonic()

    def line(self, info: str) -> str:
        elapsed = time.monotonic() - self.t0
        frac = self.done / self.total if self.total else 1.0
        eta = f", ETA {_clock(elapsed * (1 - frac) / frac)}" if 0 < frac < 1 else ""
        of = f"{_amount(self.done, self.unit)}/{_amount(self.total, self.unit)} {'' if self.unit == 'bytes' else self.unit}".rstrip()
        return f"surgery: {self.description}: {of} ({frac:.0%}), {_clock(elapsed)} elapsed{eta}" + (f" — {info}" if info else "")

    def __call__(self, n: float = 1, info: str = "") -> None:
        self.done += n
        self.steps += 1
        now = time.monotonic()
        if (self.log_every and self.steps % self.log_every == 0) or now - self.last >= self.seconds:
            self.last, self.last_logged = now, self.steps
            self.logged += 1
            print(self.line(info), file=self.stream, flush=True)

    def finish(self) -> None:
        if self.logged and self.last_logged != self.steps:  # a job long enough to have logged says it finished
            print(self.line("done"), file=self.stream, flush=True)


@contextmanager
def progress(total: float, description: str, *, unit: str = "steps", enabled: bool | None = None,
             log_every: int | None = None, min_total: float = 0):
    """Yield advance(n=1, info="") for a loop of `total` units (see the module docstring).

    unit: "bytes" shows sizes and speed; any other word (steps, modules, batches) is a count.
    min_total: below it (e.g. 50 MB for byte counts) nothing is shown unless enabled=True.
    """
    from .. import log

    if enabled is False or _active or (enabled is None and (total < min_total or log.level <= log.QUIET)):
        yield lambda n=1, info="": None
        return
    if enabled is None and not sys.stderr.isatty():
        seconds = float(os.environ.get("SURGERY_PROGRESS_SECONDS", LOG_SECONDS))
        lines = _Lines(total, description, unit, seconds, log_every, sys.stderr)
        _active.append(lines)
        try:
            yield lines
        finally:
            _active.pop()
        lines.finish()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

    if unit == "bytes":
        middle = (DownloadColumn(), TransferSpeedColumn())
    else:
        middle = (MofNCompleteColumn(), TextColumn(unit)) if float(total).is_integer() else (TaskProgressColumn(),)
    cols = (TextColumn("{task.description}"), BarColumn(), *middle, TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*cols, console=Console(stderr=True), transient=False) as p:
        task = p.add_task(description, total=total, info="")

        def advance(n: float = 1, info: str = "") -> None:
            p.update(task, advance=n, info=info)

        _active.append(p)
        try:
            yield advance
        finally:
            _active.pop()


def byte_progress(total: int, description: str, enabled: bool | None = None):
    """progress() counting bytes, for jobs over 50 MB (merge/prune writers)."""
    return progress(total, description, unit="bytes", enabled=enabled, min_total=50_000_000)
