"""Summarise results.json (from run.py) into results.md and summary.json.

    python -m benchmarks.evidence.report benchmarks/.work/evidence-<key>/results.json

Statistics: mean over seeds ± the half-width of a 95 % Student-t interval (n = seeds); accuracy
intervals are shown clipped to [0, 100]. The share of the gap closed is computed per seed,
(row_s - zero_shot) / (llm_lora_s - zero_shot), then averaged.
"""

from __future__ import annotations

import json
import math
import os
import sys

T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
ROWS = [("zero-shot", "LLM zero-shot"), ("slm_lora", "SLM + LoRA (on the SLM)"),
        ("llm_lora", "LLM + LoRA (upper bound)"), ("transfer", "transfer only (W_plug + depth map, no tuning)"),
        ("pre", "transfer + pre-refine (refine of the layers the bridge drops, before tune-bridge)"),
        ("zero_init", "zero-init LoRA + [pre-refine] + tune-bridge + lift (Table 8)"),
        ("bridge", "transfer + [pre-refine] + tune-bridge (residual-preserving bridge)"),
        ("narrow", "transfer + tune-bridge (narrow bridge)"),
        ("method", "transfer + [pre-refine] + tune-bridge + refine (**the method**)"),
        ("zero_refined", "zero-init LoRA + [pre-refine] + tune-bridge + refine (Table 8 with refine)")]
GAP_ROWS = ("slm_lora", "transfer", "pre", "zero_init", "bridge", "narrow", "method", "zero_refined")
# the stages Algorithm 1 runs on the LLM's side (with refine as its last stage), for the memory goal, by
# process RSS and in train_memory's tensor count; the SLM's own LoRA is the method's input, reported beside
METHOD_STAGES = ("transfer", "pre", "prune-keep", "bridge", "method")
METHOD_COUNTS = ("transfer", "prune-bridge (keep)", "bridge (keep)", "refine (LLM, forward only)",
                 "tune-bridge --prefix pass (LLM forward only)")
SLM_STAGE, SLM_COUNT = "slm_lora", "slm"


def ci(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T975.get(n, 1.96) * sd / math.sqrt(n)


def _out(rec: dict) -> dict:
    if "eval" in rec:
        rec = rec["eval"]
    out = rec["out"]
    return out["after"] if "after" in out else out


def acc(rec: dict) -> float:
    """Accuracy of an eval record, a train record (its final dev evaluation) or a {"eval": ...} pair."""
    return _out(rec)["accuracy"]


def loss(rec: dict) -> float:
    return _out(rec)["loss"]


def per_seed(task: dict, key: str, metric=acc) -> list[float]:
    if key == "zero-shot":
        return [metric(task["zero_shot"])] * len(task["seeds"])
    return [metric(s[key]) for s in task["seeds"] if key in s]


def gap_share(task: dict, key: str, metric=acc) -> list[float] | None:
    z = metric(task["zero_shot"])
    ups = per_seed(task, "llm_lora", metric)
    xs = per_seed(task, key, metric)
    if not xs or min(abs(u - z) for u in ups) < 0.05:  # no gap to close: a share would be noise over noise
        return None
    return [(m - z) / (u - z) for m, u in zip(xs, ups)]


# issue 16 point 4: "tasks where LLM + LoRA beats SLM + LoRA by >= 10 points", read as pre-registered in
# docs/method-experiments.md section 6: the mean gap over seeds >= 10 points and the gap > 0 on every seed
RULE_POINTS = 10.0


def task_rule(slm: list[float], llm: list[float]) -> dict:
    """The task rule on per-seed accuracies (fractions): per-seed gaps and their mean in points, and whether it holds."""
    gaps = [100 * (u - s) for s, u in zip(slm, llm)]
    mean = sum(gaps) / len(gaps) if gaps else float("nan")
    return {"gaps": gaps, "mean": mean, "seeds_at_10": sum(g >= RULE_POINTS for g in gaps),
            "holds": bool(gaps) and mean >= RULE_POINTS and all(g > 0 for g in gaps)}


def _goal(sm: dict, names: list[str]) -> dict:
    """Gap closed by the method (mean over NAMES where measurable) and method minus SLM + LoRA per task."""
    learn = [n for n in names if sm["tasks"][n]["gap"]["method"]]
    return {"tasks": learn,
            "gap": sum(sm["tasks"][n]["gap"]["method"][0] for n in learn) / len(learn) if learn else None,
            "beats_slm": {n: sm["tasks"][n]["method_minus_slm"] for n in names}}


def _stage_records(t: dict, s: dict, key: str) -> list[dict]:
    """The subprocess records of one stage (for RSS): train records, or the tuning half of tuned pairs."""
    if key.startswith("prune-"):
        return [t["bridges"][key[len("prune-"):]]]
    if key not in s:
        return []
    r = s[key]
    return [r["transfer"] if key == "transfer" else r["train"] if "train" in r else r]


def summarise(results: dict) -> dict:
    from benchmarks.evidence.tasks import labels

    sm = {"tasks": {}}
    for name, t in results["tasks"].items():
        rows = {k: ci(v) for k, _ in ROWS if (v := per_seed(t, k))}
        rows["zero-shot-slm"] = (acc(t["zero_shot_slm"]), float("nan"))
        losses = {k: ci(v) for k, _ in ROWS if (v := per_seed(t, k, loss))}
        losses["zero-shot-slm"] = (loss(t["zero_shot_slm"]), float("nan"))
        gaps = {k: (ci(g) if (g := gap_share(t, k)) else None) for k in GAP_ROWS}
        loss_gaps = {k: (ci(g) if (g := gap_share(t, k, loss)) else None) for k in GAP_ROWS}
        on_bridge = {k: ci([acc(s[k]["train"]) for s in t["seeds"] if k in s]) for k in ("zero_init", "bridge", "narrow")}
        beats = [m - s for m, s in zip(per_seed(t, "method"), per_seed(t, "slm_lora"))] if "method" in rows else []
        sm["tasks"][name] = {"chance": 1 / len(labels(name)), "rows": rows, "gap": gaps, "loss": losses,
                             "loss_gap": loss_gaps, "on_bridge": on_bridge,
                             "method_minus_slm": ci(beats) if beats else None,
                             "rule": task_rule(per_seed(t, "slm_lora"), per_seed(t, "llm_lora")),
                             "bridges": {k: b["out"]["parameters"] for k, b in t["bridges"].items()}}
    stages = {"slm_lora": "train SLM + LoRA", "llm_lora": "train LLM + LoRA", "transfer": "transfer (activations)",
              "prune-keep": "prune-bridge (residual kept)", "prune-narrow": "prune-bridge (narrow)",
              "zero_init": "tune-bridge, zero-init (residual kept)", "bridge": "tune-bridge (residual kept)",
              "narrow": "tune-bridge (narrow)", "method": "refine (MeZO on the LLM)",
              "zero_refined": "refine, zero-init start", "pre": "pre-refine (MeZO on the LLM, the layers the bridge drops)",
              "zero_pre": "pre-refine, zero-init start"}
    sm["rss"] = {}
    for k, label in stages.items():
        xs = [r["rss_mb"] for t in results["tasks"].values() for s in t["seeds"] for r in _stage_records(t, s, k)]
        if xs:
            sm["rss"][k] = {"label": label, "mb": ci(xs)}
    sm["rss"]["eval"] = {"label": "eval on the LLM (inference, for scale)",
                         "mb": ci([s["transfer"]["eval"]["rss_mb"] for t in results["tasks"].values() for s in t["seeds"]])}
    tm = results["train_memory"]
    sm["memory_ratio"] = {}
    for reading, stages, counts in (("method", METHOD_STAGES, METHOD_COUNTS),
                                    ("with_slm", METHOD_STAGES + (SLM_STAGE,), METHOD_COUNTS + (SLM_COUNT,))):
        rss_peak = max((sm["rss"][k]["mb"][0], sm["rss"][k]["label"]) for k in stages if k in sm["rss"])
        t_peak = max((v["total"], k) for k, v in tm.items() if k in counts)
        sm["memory_ratio"][reading] = {"tensors": tm["llm"]["total"] / t_peak[0], "stage": t_peak[1],
                                       "rss": sm["rss"]["llm_lora"]["mb"][0] / rss_peak[0], "rss_stage": rss_peak[1]}
    sm["train_memory"] = tm
    sm["goal"] = _goal(sm, list(sm["tasks"]))
    # the same verdict over only the tasks that meet the task rule (issue 16 asks for such tasks)
    sm["goal_rule"] = _goal(sm, [n for n, x in sm["tasks"].items() if x["rule"]["holds"]])
    return sm


def fmt(mc, pct=True, digits=None, clip=False) -> str:
    """mean ± half-width; with clip, an accuracy's interval is shown as [lo, hi] within [0, 100]."""
    if mc is None:
        return "n/a"
    m, h = mc
    if digits is not None:
        return f"{m:.{digits}f}" + ("" if math.isnan(h) else f" ± {h:.{digits}f}")
    if not pct:
        return f"{m:.0f}" + ("" if math.isnan(h) else f" ± {h:.0f}")
    if clip and not math.isnan(h):
        return f"{100 * m:.1f} [{max(0.0, 100 * (m - h)):.1f}, {min(100.0, 100 * (m + h)):.1f}]"
    return f"{100 * m:.1f}" + ("" if math.isnan(h) else f" ± {100 * h:.1f}")


def write_docs(results_path: str, docs: str) -> None:
    with open(results_path) as f:
        results = json.load(f)
    sm = summarise(results)
    with open(os.path.join(os.path.dirname(results_path), "summary.json"), "w") as f:
        json.dump(sm, f, indent=1)
    from benchmarks.evidence.markdown import render

    with open(os.path.join(docs, "results.md"), "w") as f:
        f.write(render(results, sm))


if __name__ == "__main__":
    write_docs(sys.argv[1], os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs"))
