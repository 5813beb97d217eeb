"""train / tune-bridge --plot: loss curves from the run's history (training.json / tune_bridge.json).

The training loss is the mean over each --log-every window (History.train_loss); the evaluation
curve is the loss (and exact-match accuracy, when the data has completions) on --eval at each
evaluation, starting at step 0 with the measurement taken before training.
"""

from __future__ import annotations

from ..errors import SurgeryError
from . import figure, integer_x, save


def loss_series(history: dict, before: dict | None = None, evaluated_on: str = "eval") -> dict:
    """{"train": (steps, losses), "eval": (steps, losses), "accuracy": (steps, accuracies) or None}
    from a history dict; `before` (measured on --eval when evaluated_on == "eval") is step 0 of the
    evaluation curves. Without --eval there are no evaluations, only the training curve."""
    train = ([s for s, _ in history["train_loss"]], [float(v) for _, v in history["train_loss"]])
    evals = list(history.get("evals", []))
    if before is not None and evaluated_on == "eval" and evals:
        evals = [{"step": 0, **before}] + evals
    ev = ([e["step"] for e in evals], [float(e["loss"]) for e in evals])
    acc = [(e["step"], e["accuracy"]) for e in evals if e.get("accuracy") is not None]
    return {"train": train, "eval": ev, "accuracy": ([s for s, _ in acc], [float(a) for _, a in acc]) if acc else None}


def loss_curves(path: str, history: dict, before: dict | None, evaluated_on: str, title: str) -> str:
    """Left: training loss per logging step and eval loss at each evaluation; right (when there is one):
    eval accuracy."""
    s = loss_series(history, before, evaluated_on)
    if not s["train"][0]:
        raise SurgeryError(f"--plot {path}: the run recorded no training loss")
    fig, axes = figure(1, 2 if s["accuracy"] else 1, width=4.2, height=3.0)
    ax = axes[0][0]
    ax.plot(*s["train"], lw=1.0, marker="." if len(s["train"][0]) < 40 else None, label=f"train (mean per {history.get('log_every') or '?'} steps)")
    if s["eval"][0]:
        ax.plot(*s["eval"], lw=1.0, marker="o", ms=3, label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    integer_x(ax)
    ax.legend(fontsize=7)
    if s["accuracy"]:
        a = axes[0][1]
        a.plot(*s["accuracy"], lw=1.0, marker="o", ms=3, color="tab:green")
        a.set_ylim(-0.02, 1.02)
        a.set_xlabel("step")
        a.set_ylabel("eval accuracy")
        integer_x(a)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)
