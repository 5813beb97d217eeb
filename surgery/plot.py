"""PNG figures behind `--plot FILE.png`, shared by the commands that draw one.

matplotlib is an optional extra (`pip install 'surgery[plot]'`): `check()` runs before a command does
any work, so a missing matplotlib or an existing FILE costs one line, not a finished run. Figures are
drawn off-screen (Agg) and written like every output: to a temporary file, renamed at the end, never
over an existing file without --force.
"""

from __future__ import annotations

import os

from .errors import SurgeryError

HINT = "pip install 'surgery[plot]' (matplotlib), or drop --plot"


def check(path: str, force: bool = False) -> None:
    """Fail fast: matplotlib importable, FILE ends in .png, its directory exists, no FILE unless force."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SurgeryError("--plot needs matplotlib, which is not installed", HINT) from None
    if not path.lower().endswith(".png"):
        raise SurgeryError(f"--plot {path}: the file name must end in .png", "e.g. --plot spectrum.png")
    if os.path.exists(path) and not force:
        raise SurgeryError(f"--plot {path} already exists", "pass --force to replace it, or choose another file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise SurgeryError(f"--plot {path}: directory {parent} does not exist", "create it first")


def figure(rows: int, cols: int, width: float = 3.2, height: float = 2.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes


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


def spectra(path: str, curves: dict[str, list[float]], ranks: dict[str, int], title: str) -> str:
    """Singular values per module, grouped by the module's last name (q_proj, up_proj, …): top row σ_i
    on a log scale, bottom row the share of ‖Δ‖² kept by the first r (what --rank / --energy choose),
    one line per module coloured by its position (layer), the chosen rank as a dotted line."""
    groups: dict[str, list[str]] = {}
    for name in [n for n, s in curves.items() if s and max(s) > 0]:  # an unchanged module has no spectrum to draw
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    if not groups:
        raise SurgeryError(f"--plot {path}: every targeted module is unchanged, there is no spectrum to draw")
    fig, axes = figure(2, len(groups))
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    for col, (kind, names) in enumerate(groups.items()):
        top, bottom = axes[0][col], axes[1][col]
        for i, name in enumerate(names):
            s = curves[name]
            c = cmap(i / max(len(names) - 1, 1))
            x = range(1, len(s) + 1)
            top.plot(x, [max(v, 1e-30) for v in s], color=c, lw=0.8)
            total, run, energy = sum(v * v for v in s) or 1.0, 0.0, []
            for v in s:
                run += v * v
                energy.append(run / total)
            bottom.plot(x, energy, color=c, lw=0.8)
        r = max(ranks[n] for n in names)
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.axvline(r, color="k", ls=":", lw=0.8)
        top.set_yscale("log")
        top.set_title(f"{kind} ({len(names)})", fontsize=9)
        top.set_ylabel("singular value" if col == 0 else "")
        bottom.set_ylabel("energy kept" if col == 0 else "")
        bottom.set_xlabel("rank")
        bottom.set_ylim(0, 1.02)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)
