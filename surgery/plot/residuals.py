"""transfer --plot: how well each fitted projection explains its target, per LLM layer and space.

transfer fits one ridge map per (LLM layer, space, direction) and records its relative residual
‖Y − XP‖/‖Y‖ (transfer.json `fits`). A residual near 1 means the map explains almost nothing of that
space, so the adapter's component there is mostly lost; the plot shows where along the depth that
happens. Silent targets (no signal to fit) have no residual and are left out.
"""

from __future__ import annotations

from ..errors import SurgeryError
from . import figure, integer_x, save

# fits are recorded rounded to 6 decimals, so an exact fit reads 0; it is drawn at this floor on the log axis
FLOOR = 1e-7


def residual_series(fits: list[dict], used: list[list[int]] | None = None) -> dict:
    """{direction: {space: {"layers", "values", "used"}}} from transfer.json's fits, layers ascending;
    `used` (layers_used of the stack) marks which LLM layers took the SLM's modules (all, with depth block).
    Fits not tied to a layer (llm_layer null) are left out: they have no place on the depth axis."""
    taken = None if used is None else {j for block in used for j in block}
    out: dict = {}
    for r in sorted((r for r in fits if not r["silent"] and r["llm_layer"] is not None), key=lambda r: r["llm_layer"]):
        s = out.setdefault(r["direction"], {}).setdefault(r["space"], {"layers": [], "values": [], "used": []})
        s["layers"].append(r["llm_layer"])
        s["values"].append(float(r["rel_residual"]))
        s["used"].append(taken is None or r["llm_layer"] in taken)
    return {d: dict(sorted(spaces.items())) for d, spaces in sorted(out.items())}


def residuals(path: str, fits: list[dict], used: list[list[int]] | None, title: str) -> str:
    """One panel per direction (to_llm: SLM → LLM maps, to_slm: back), one line per space, x = LLM
    layer, y = relative residual on a log axis; hollow markers for layers that took no modules."""
    series = residual_series(fits, used)
    if not series:
        raise SurgeryError(f"--plot {path}: transfer fitted no layer's projection (every target was silent)")
    fig, axes = figure(1, len(series), width=4.2, height=3.2)
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    for ax, (direction, spaces) in zip(axes[0], series.items()):
        for k, (space, s) in enumerate(spaces.items()):
            c = cmap(k % 10)
            ys = [max(v, FLOOR) for v in s["values"]]
            ax.plot(s["layers"], ys, color=c, lw=0.9, label=space)
            ax.scatter(s["layers"], ys, s=14, zorder=3, edgecolors=[c] * len(ys),
                       facecolors=[c if u else "none" for u in s["used"]])
        ax.set_yscale("log")
        ax.set_ylim(FLOOR / 2, 2.0)
        ax.axhline(1.0, color="k", ls=":", lw=0.7)
        ax.set_title(direction, fontsize=9)
        ax.set_xlabel("LLM layer")
        integer_x(ax)
        ax.set_ylabel("relative residual" if ax is axes[0][0] else "")
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{title}\n(exact fits at {FLOOR:g}; hollow: layer not used)", fontsize=9)
    return save(fig, path)
