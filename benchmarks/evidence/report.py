"""Summarise results.json (from run.py) into docs/results.md, summary.json and the PNG plots.

    python -m benchmarks.evidence.report benchmarks/.work/evidence-<key>/results.json

Statistics: mean over seeds ± the half-width of a 95 % Student-t interval (n = seeds). The share of
the gap closed is computed per seed, (method_s - zero_shot) / (llm_lora_s - zero_shot), then averaged.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
ROWS = [("zero-shot", "LLM zero-shot"), ("slm_lora", "SLM + LoRA"), ("llm_lora", "LLM + LoRA (upper bound)"),
        ("transfer", "transfer only (W_plug + depth map, no tuning)"),
        ("method", "transfer + bridge tuning (**the method**)"), ("bridge_only", "LoRA trained on the bridge alone")]


def ci(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T975.get(n, 1.96) * sd / math.sqrt(n)


def acc(rec: dict) -> float:
    """Accuracy of an eval record, a train record (its final dev evaluation) or a {"eval": ...} pair."""
    if "eval" in rec:
        rec = rec["eval"]
    out = rec["out"]
    return (out["after"] if "after" in out else out)["accuracy"]


def loss(rec: dict) -> float:
    """Dev loss (mean over completion tokens), like acc()."""
    if "eval" in rec:
        rec = rec["eval"]
    out = rec["out"]
    return (out["after"] if "after" in out else out)["loss"]


def per_seed(task: dict, key: str, metric=acc) -> list[float]:
    if key == "zero-shot":
        return [metric(task["zero_shot"])] * len(task["seeds"])
    return [metric(s[key]) for s in task["seeds"] if key in s]


def gap_share(task: dict, key: str, metric=acc) -> list[float] | None:
    z = metric(task["zero_shot"])
    ups = per_seed(task, "llm_lora", metric)
    if min(abs(u - z) for u in ups) < 0.05:  # no gap to close: a share would be noise over noise
        return None
    return [(m - z) / (u - z) for m, u in zip(per_seed(task, key, metric), ups)]


def rss(results: dict, pick) -> tuple[float, float]:
    xs = [r["rss_mb"] for t in results["tasks"].values() for s in t["seeds"] for r in pick(s, t)]
    return ci(xs)


def summarise(results: dict) -> dict:
    from fixtures.tasks import labels

    sm = {"tasks": {}}
    for name, t in results["tasks"].items():
        rows = {k: ci(per_seed(t, k)) for k, _ in ROWS}
        rows["zero-shot-slm"] = (acc(t["zero_shot_slm"]), float("nan"))
        losses = {k: ci(per_seed(t, k, loss)) for k, _ in ROWS}
        losses["zero-shot-slm"] = (loss(t["zero_shot_slm"]), float("nan"))
        loss_gaps = {k: (ci(g) if (g := gap_share(t, k, loss)) else None) for k in ("transfer", "method", "bridge_only",
                                                                                   "slm_lora")}
        gaps = {k: (ci(g) if (g := gap_share(t, k)) else None) for k in ("transfer", "method", "bridge_only",
                                                                          "slm_lora")}
        abl = {}
        for key in t["seeds"][0]:
            if key.startswith("method-") or key == "transfer-embeddings":
                abl[key] = {"acc": ci(per_seed(t, key)), "gap": ci(g) if (g := gap_share(t, key)) else None,
                            "loss": ci(per_seed(t, key, loss)),
                            "loss_gap": ci(g) if (g := gap_share(t, key, loss)) else None}
        bridges = {k: b["out"]["parameters"]["bridge"] for k, b in t["bridges"].items()}
        chance = 1 / len(labels(name))
        # a task where even LoRA on the LLM stays at chance has no learnable gap to close
        learnable = rows["llm_lora"][0] > chance + 0.05
        sm["tasks"][name] = {"chance": chance, "learnable": learnable, "rows": rows, "gap": gaps, "ablations": abl, "bridges": bridges, "loss": losses,
                             "loss_gap": loss_gaps}
    stages = {
        "train SLM + LoRA": lambda s, t: [s["slm_lora"]],
        "train LLM + LoRA": lambda s, t: [s["llm_lora"]],
        "transfer (activations)": lambda s, t: [s["transfer"]["transfer"]],
        "prune-bridge (r=16)": lambda s, t: [t["bridges"]["fisher-mask-r16"]],
        "tune-bridge (r=16)": lambda s, t: [s["method"]["train"]],
        "eval on the LLM": lambda s, t: [s["method"]["eval"]],
    }
    sm["memory"] = {k: rss(results, f) for k, f in stages.items()}
    method_peak = max(sm["memory"][k][0] for k in ("train SLM + LoRA", "transfer (activations)",
                                                   "prune-bridge (r=16)", "tune-bridge (r=16)"))
    llm = sm["memory"]["train LLM + LoRA"][0]
    sm["memory_ratio"] = {"rss": llm / method_peak}
    tm = results["train_memory"]
    method_tm = max(tm["slm"]["total"], tm["bridge fisher-mask-r16"]["total"])
    sm["memory_ratio"]["tensors"] = tm["llm"]["total"] / method_tm
    sm["train_memory"] = tm
    pre = results["pretrain"]
    any_task = next(iter(results["tasks"].values()))
    tb = any_task["seeds"][0]["method"]["train"]["out"]
    sm["params"] = {"slm": pre["slm"]["parameters"], "llm": pre["llm"]["parameters"],
                    "bridge_r16": tb.get("bridge_parameters"), "lora_llm": any_task["seeds"][0]["llm_lora"]["out"]["trainable"],
                    "lora_slm": any_task["seeds"][0]["slm_lora"]["out"]["trainable"], "lora_bridge": tb.get("trainable")}
    return sm


def fmt(mc, pct=True, digits=None) -> str:
    if mc is None:
        return "n/a"
    m, h = mc
    if digits is not None:
        return f"{m:.{digits}f}" + ("" if math.isnan(h) else f" ± {h:.{digits}f}")
    if pct:
        return f"{100 * m:.1f}" + ("" if math.isnan(h) else f" ± {100 * h:.1f}")
    return f"{m:.0f}" + ("" if math.isnan(h) else f" ± {h:.0f}")


def write_docs(results_path: str, docs: str) -> None:
    with open(results_path) as f:
        results = json.load(f)
    sm = summarise(results)
    work = os.path.dirname(results_path)
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(sm, f, indent=1)
    plots = _plots(os.path.join(work, "summary.json"), docs)
    from benchmarks.evidence.markdown import render

    with open(os.path.join(docs, "results.md"), "w") as f:
        f.write(render(results, sm, plots))


def _plots(summary: str, docs: str) -> list[str]:
    """Draw with the benchmark's own matplotlib venv (not a project dependency); skip if absent."""
    here = os.path.dirname(os.path.abspath(__file__))
    py = os.path.join(here, "..", ".work", "plotenv", "bin", "python")
    if not os.path.exists(py):  # first run: make the venv (matplotlib only, no torch)
        env = os.path.dirname(os.path.dirname(py))
        ok = subprocess.run([sys.executable, "-m", "venv", env]).returncode == 0 and subprocess.run(
            [os.path.join(env, "bin", "pip"), "install", "-q", "matplotlib"]).returncode == 0
        if not ok:
            print(f"could not build {env} with matplotlib: plots skipped")
            return []
    out = subprocess.run([py, os.path.join(here, "plots.py"), summary, docs], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-2000:])
        return []
    return out.stdout.split()


if __name__ == "__main__":
    write_docs(sys.argv[1], os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs"))
