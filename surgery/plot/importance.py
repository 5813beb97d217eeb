"""prune-bridge --plot: per-layer importance of every prunable unit, kept and dropped.

The input is what the pipeline selected from (surgery.pipelines.bridge_plan.unit_maps): per stack and
kind of unit (heads or kv groups, MLP neurons, residual channels when pruned) one row per LLM layer
with each unit's score and whether the bridge keeps it (a layer left out by --drop-layers keeps none). Scores are normalised per row (score / the
row's largest) because selection is top-k within a layer and Fisher scores differ by orders of
magnitude between layers; kept units are drawn in blue and dropped units in red, darker = more
important, so a dark red cell is important mass the bridge gives up.
"""

from __future__ import annotations

from ..errors import SurgeryError
from . import figure, integer_x, save


def normalised(row: list[float]) -> list[float]:
    """A row's scores over its largest (all zero: all zero), so each layer spans [0, 1]."""
    top = max(row) if row else 0.0
    return [v / top if top > 0 else 0.0 for v in row]


def kept_share(scores: list[float], kept: list[bool]) -> float:
    """The share of a row's importance the kept units hold (bridge.json's `retained` for that row)."""
    total = sum(scores)
    return sum(s for s, k in zip(scores, kept) if k) / total if total > 0 else 1.0


def cells(panel: dict) -> list[list[tuple]]:
    """RGBA per (layer, unit): Blues for kept, Reds for dropped, shade by normalised importance
    (0.25-1, so the least important unit is still visibly blue or red)."""
    import matplotlib

    blues, reds = matplotlib.colormaps["Blues"], matplotlib.colormaps["Reds"]
    return [[(blues if k else reds)(0.25 + 0.75 * v) for v, k in zip(normalised(scores), kept)]
            for scores, kept in zip(panel["scores"], panel["kept"])]


def importance(path: str, panels: list[dict], title: str) -> str:
    """One heatmap per panel: rows = LLM layers (label "(dropped)" for a layer left out), columns =
    units; the kept share of each layer's importance is printed at the row's end."""
    panels = [p for p in panels if p["layers"] and p["scores"][0]]
    if not panels:
        raise SurgeryError(f"--plot {path}: the model has no prunable heads or neurons to draw")
    heights = [0.8 + 0.2 * len(p["layers"]) for p in panels]  # inches: title and axis, plus a band per layer
    fig, axes = figure(len(panels), 1, width=7.5, height=sum(heights) / len(panels) + 0.3,
                       gridspec_kw={"height_ratios": heights})
    for ax, p in zip((row[0] for row in axes), panels):
        n = len(p["layers"])
        ax.imshow(cells(p), aspect="auto", interpolation="nearest")
        ax.set_yticks(range(n))
        ax.set_yticklabels([f"{i}" + (" (dropped)" if d else "") for i, d in zip(p["layers"], p["dropped"])], fontsize=7)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xlabel(f"unit index (of {len(p['scores'][0])})", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        integer_x(ax)
        ax.set_title(f"{p['stack']}: {p['units']}", fontsize=9, loc="left")
        for y, (scores, kept) in enumerate(zip(p["scores"], p["kept"])):
            ax.annotate(f"{kept_share(scores, kept):.0%} kept", (1.01, 1 - (y + 0.5) / n), xycoords="axes fraction",
                        fontsize=6, va="center")
    fig.suptitle(title + "\nblue: kept, red: dropped; darker = more important within the layer", fontsize=9)
    return save(fig, path)
