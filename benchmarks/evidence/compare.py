"""Two evidence runs side by side, seed by seed (e.g. one shared --epochs value against another):

    python -m benchmarks.evidence.compare A/results.json B/results.json [--names E=3,E=10]

Prints, per task, each row's dev accuracy (and the gap closed, and dev loss) per seed for A and B, their
means, and the mean of B - A; then the fairness check of docs/method-experiments.md: B's baselines
(SLM + LoRA, LLM + LoRA), by mean dev accuracy over the tasks, must be at least A's.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.evidence.report import ROWS, acc, gap_share, loss, per_seed

LABELS = dict(ROWS)
ACC_ROWS = ("slm_lora", "llm_lora", "transfer", "zero_init", "bridge", "method", "zero_refined")
GAP_ROWS = ("slm_lora", "transfer", "method", "zero_refined")
LOSS_ROWS = ("slm_lora", "llm_lora", "bridge", "method", "zero_refined")
BASELINES = ("slm_lora", "llm_lora")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _fmt(xs: list[float], scale: float, digits: int) -> str:
    return " / ".join(f"{x * scale:.{digits}f}" for x in xs) + f" (mean {_mean(xs) * scale:.{digits}f})"


def compare(a: dict, b: dict, names: tuple[str, str]) -> tuple[str, dict]:
    lines, means = [], {}
    for task in a["tasks"]:
        if task not in b["tasks"]:
            continue
        ta, tb = a["tasks"][task], b["tasks"][task]
        lines += [f"## {task}", "", f"| {task} | {names[0]} per seed | {names[1]} per seed | {names[1]} - {names[0]} |",
                  "|---|---|---|---:|"]
        blocks = [("acc", ACC_ROWS, lambda t, k: per_seed(t, k), 100, 1),
                  ("gap closed", GAP_ROWS, lambda t, k: gap_share(t, k) or [], 100, 1),
                  ("dev loss", LOSS_ROWS, lambda t, k: per_seed(t, k, loss), 1, 3)]
        for what, keys, get, scale, digits in blocks:
            for k in keys:
                xa, xb = get(ta, k), get(tb, k)
                if not xa or not xb:
                    continue
                if what == "acc":
                    means.setdefault(k, {}).setdefault(task, (_mean(xa), _mean(xb)))
                label = LABELS[k] + ("" if what == "acc" else f", {what}")
                lines.append(f"| {label} | {_fmt(xa, scale, digits)} | {_fmt(xb, scale, digits)} | "
                             f"{(_mean(xb) - _mean(xa)) * scale:+.{digits}f} |")
        z = acc(ta["zero_shot"]), acc(tb["zero_shot"])
        lines += ["", f"LLM zero-shot: {z[0] * 100:.1f} / {z[1] * 100:.1f}"]
        for t, n in ((ta, names[0]), (tb, names[1])):
            d = [m - s for m, s in zip(per_seed(t, "method"), per_seed(t, "slm_lora"))]
            if d:
                lines.append(f"method - SLM + LoRA at {n}: " + " / ".join(f"{x * 100:+.1f}" for x in d)
                             + f" (mean {_mean(d) * 100:+.1f})")
        lines.append("")
    verdict = {}
    for k in BASELINES:
        if k in means:
            ma = _mean([v[0] for v in means[k].values()])
            mb = _mean([v[1] for v in means[k].values()])
            verdict[k] = {"a": ma, "b": mb, "holds": mb >= ma}
            lines.append(f"{LABELS[k]}: mean dev accuracy over the tasks {names[0]} {ma * 100:.1f}, "
                         f"{names[1]} {mb * 100:.1f}: {'not weaker' if mb >= ma else 'WEAKER'} at {names[1]}")
    fair = bool(verdict) and all(v["holds"] for v in verdict.values())
    lines.append(f"baselines at least as good at {names[1]}: {'yes' if fair else 'no'}")
    return "\n".join(lines), {"baselines": verdict, "fair": fair}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--names", default="A,B", help="two comma-separated column names")
    x = ap.parse_args()
    with open(x.a) as f, open(x.b) as g:
        text, _ = compare(json.load(f), json.load(g), tuple(x.names.split(",", 1)))
    print(text)


if __name__ == "__main__":
    main()
