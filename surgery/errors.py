"""Typed errors. Each message names the file or key, what was seen, and how to fix it.

The CLI prints `str(err)` as one line on stderr and exits with `err.exit_code`; the traceback
is shown only when SURGERY_DEBUG=1.
"""


class SurgeryError(Exception):
    exit_code = 2

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(f"{what}; {fix}" if fix else what)


class CheckpointError(SurgeryError):
    """A model directory is missing, unreadable, or inconsistent."""


class ArchitectureError(SurgeryError):
    """The model family is unknown or the config lacks a field the family map needs."""


class ShapeError(SurgeryError):
    """Tensors that must fit together do not."""


class AdapterError(SurgeryError):
    """An adapter directory is missing, malformed, or does not fit its base."""


class OutputError(SurgeryError):
    """The output path exists, or would overwrite an input."""


class NumericsError(SurgeryError):
    """A computed tensor holds NaN or inf and must not be written."""


class DataError(SurgeryError):
    """Calibration or training data is missing or malformed."""


class ResourceError(SurgeryError):
    """The job does not fit in the memory it was given (or the machine has)."""


def check_ranges(rules, fixes: dict | None = None) -> None:
    """Refuse the first setting out of range: rules are (flag, value, ok); fixes[flag] says how to mend
    it (default "pass a positive FLAG"). One home for the CLI's numeric range checks."""
    for flag, v, ok in rules:
        if not ok:
            raise SurgeryError(f"{flag} {v} is out of range", (fixes or {}).get(flag, f"pass a positive {flag}"))
