"""extract-lora --plot: singular-value spectrum and kept energy per module, to choose --rank / --energy."""

from __future__ import annotations

from ..errors import SurgeryError
from . import figure, save


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
