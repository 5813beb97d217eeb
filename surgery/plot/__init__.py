"""PNG figures behind `--plot FILE.png`, shared by the commands that draw one.

matplotlib is an optional extra (`pip install 'surgery[plot]'`): `check()` runs before a command does
any work, so a missing matplotlib or an existing FILE costs one line, not a finished run. Figures are
drawn off-screen (Agg) and written like every output: to a temporary file, renamed at the end, never
over an existing file without --force and never over an input.

One module per figure, each a pure function of plain data (lists and dicts a command already has:
nothing is recomputed to draw), with its data preparation separate from the drawing so tests can
check what is drawn:
  spectra.py     extract-lora: singular values and kept energy per module
  importance.py  prune-bridge: per-layer importance of heads and neurons, kept and dropped
  residuals.py   transfer: relative fit residual per LLM layer and space
  loss.py        train, tune-bridge: training loss per logging step, eval loss/accuracy
matplotlib is imported inside the functions only, so importing this package costs nothing.
"""

from __future__ import annotations

import os

from ..errors import SurgeryError

HINT = "pip install 'surgery[plot]' (matplotlib), or drop --plot"


def check(path: str, force: bool = False, inputs=(), output: str | None = None) -> None:
    """Fail fast: matplotlib importable, FILE ends in .png, its directory exists, FILE is none of the
    inputs (nor inside one) nor the command's output, and no FILE exists unless force."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SurgeryError("--plot needs matplotlib, which is not installed", HINT) from None
    if not path.lower().endswith(".png"):
        raise SurgeryError(f"--plot {path}: the file name must end in .png", "e.g. --plot spectrum.png")
    real = os.path.realpath(path)
    for src in [i for i in inputs if i]:
        s = os.path.realpath(src)
        if real == s or real.startswith(s.rstrip(os.sep) + os.sep):
            raise SurgeryError(f"--plot {path} would overwrite the input {src}", "choose a file outside every input")
    if output and real == os.path.realpath(output):
        raise SurgeryError(f"--plot {path} is the output path", "choose another file for the plot")
    if os.path.exists(path) and not force:
        raise SurgeryError(f"--plot {path} already exists", "pass --force to replace it, or choose another file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise SurgeryError(f"--plot {path}: directory {parent} does not exist", "create it first")


def figure(rows: int, cols: int, width: float = 3.2, height: float = 2.6, **kw):
    """A rows x cols grid of axes (always 2-D), each about width x height inches; kw go to plt.subplots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kw)
    return fig, axes


def integer_x(ax) -> None:
    """Steps, layers and unit indices are whole numbers: no 2.5 on their axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save(fig, path: str) -> str:
    """Write the PNG next to its final name, then rename (no partial file under FILE)."""
    import matplotlib.pyplot as plt

    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


from .importance import importance  # noqa: E402  (the drawing functions the pipelines call)
from .loss import loss_curves  # noqa: E402
from .residuals import residuals  # noqa: E402
from .spectra import spectra  # noqa: E402
