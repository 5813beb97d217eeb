"""PNG plots of summary.json (report.py), drawn in the benchmark's own venv (matplotlib).

    benchmarks/.work/plotenv/bin/python benchmarks/evidence/plots.py SUMMARY DOCS_DIR
Prints the names of the files it wrote.
"""

import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROWS = [("zero-shot", "LLM zero-shot"), ("slm_lora", "SLM+LoRA"), ("llm_lora", "LLM+LoRA"),
        ("transfer", "transfer only"), ("method", "transfer+bridge (method)"), ("bridge_only", "bridge alone")]


def _err(h):
    return 0 if h is None or (isinstance(h, float) and math.isnan(h)) else 100 * h


def table(sm, docs):
    tasks = list(sm["tasks"])
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / len(ROWS)
    for i, (k, label) in enumerate(ROWS):
        ms = [100 * sm["tasks"][t]["rows"][k][0] for t in tasks]
        es = [_err(sm["tasks"][t]["rows"][k][1]) for t in tasks]
        ax.bar([j + (i - len(ROWS) / 2 + 0.5) * w for j in range(len(tasks))], ms, w, yerr=es, capsize=2, label=label)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("dev exact-match accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_title("Per task: mean over seeds, 95 % interval")
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "results-table.png"), dpi=110)
    return "results-table.png"


def ablations(sm, docs):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    tasks = [t for t in sm["tasks"] if sm["tasks"][t]["ablations"]]
    for t in tasks:
        a, rows = sm["tasks"][t]["ablations"], sm["tasks"][t]["rows"]
        pts = [(4, a.get("method-fisher-mask-r4")), (16, {"acc": rows["method"]}), (64, a.get("method-fisher-mask-r64"))]
        pts = [(r, p["acc"]) for r, p in pts if p]
        axes[0].errorbar([r for r, _ in pts], [100 * m for _, (m, h) in pts], yerr=[_err(h) for _, (m, h) in pts],
                         marker="o", capsize=3, label=t)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks([4, 16, 64], ["4", "16", "64"])
    axes[0].set_xlabel("bridge reduction r")
    axes[0].set_ylabel("method accuracy (%)")
    axes[0].legend(fontsize=8)
    kinds = [("method", "fisher-mask"), ("method-fisher-param-r16", "fisher-param"),
             ("method-magnitude-r16", "magnitude"), ("method-random-r16", "random")]
    w = 0.8 / max(1, len(tasks))
    for i, t in enumerate(tasks):
        a, rows = sm["tasks"][t]["ablations"], sm["tasks"][t]["rows"]
        vals = [rows["method"] if k == "method" else (a[k]["acc"] if k in a else (float("nan"), 0)) for k, _ in kinds]
        axes[1].bar([j + (i - len(tasks) / 2 + 0.5) * w for j in range(len(kinds))], [100 * m for m, _ in vals], w,
                    yerr=[_err(h) for _, h in vals], capsize=2, label=t)
    axes[1].set_xticks(range(len(kinds)), [n for _, n in kinds], fontsize=8)
    axes[1].set_ylabel("method accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Ablations of the bridge: size (left), importance score at r = 16 (right)")
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "results-ablations.png"), dpi=110)
    return "results-ablations.png"


def memory(sm, docs):
    names = list(sm["memory"])
    tm = sm["train_memory"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    ax = axes[0]
    ax.barh(names, [sm["memory"][n][0] for n in names], color="tab:blue")
    ax.set_xlabel("peak RSS of the stage's process (MB)")
    ax.invert_yaxis()
    ax = axes[1]
    keys = list(tm)
    left = [0.0] * len(keys)
    for part, colour in (("weights", "tab:gray"), ("activations", "tab:orange"), ("lora_state", "tab:green")):
        vals = [tm[k][part] / 2**20 for k in keys]
        ax.barh(keys, vals, left=left, color=colour, label=part)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("training memory of one step, counted tensor by tensor (MB)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "results-memory.png"), dpi=110)
    return "results-memory.png"


def main():
    with open(sys.argv[1]) as fh:
        sm = json.load(fh)
    docs = sys.argv[2]
    out = [table(sm, docs), memory(sm, docs)]
    if any(sm["tasks"][t]["ablations"] for t in sm["tasks"]):
        out.append(ablations(sm, docs))
    print(" ".join(out))


if __name__ == "__main__":
    main()
