"""Side by side: bridges measured by benchmarks/method_experiments against the committed evidence run.

    python -m benchmarks.candidate_table --evidence $E benchmarks/.work/depth/results.jsonl \
        [--bridges r10-k23-h2-i34,r1-k23] [--tag=-e10-prefix] [--refined] [--gap]

For each bridge (and tag) in the JSON lines files, one row per task (verb, arg, sub, whichever were run):
per seed the dev accuracy after the lift (or after refine, --refined) beside the committed method's
(results.json of the evidence work directory: its `bridge` stage lifted = refine's `before`, its
`method` stage = refine's `after`), the mean over the task's seeds, and at the end the mean over every
task-seed the bridge has, beside the committed method's mean over the same task-seeds. A later record
of the same task, seed, bridge (and --rank), init and tag replaces an earlier one. Markdown on stdout; the
last column is the mean of tune-bridge's last training-loss records (how well the bridge fits its data).
"""

from __future__ import annotations

import argparse
import json

TASKS = ("verb", "arg", "sub")


def committed(results: str) -> dict:
    """{(task, seed): (lifted, refined)} in %, from the evidence's results.json."""
    with open(results) as f:
        r = json.load(f)
    out = {}
    for task, t in r["tasks"].items():
        for seed, s in enumerate(t["seeds"]):
            m = s["method"]["train"]["out"]
            out[(task, seed)] = (round(100 * m["before"]["accuracy"], 1), round(100 * m["after"]["accuracy"], 1))
    return out


def baselines(results: str) -> dict:
    """{task: {"zero-shot": z, "slm_lora": [per seed], "llm_lora": [per seed]}} as fractions (report.py's records)."""
    from benchmarks.evidence.report import acc, per_seed

    with open(results) as f:
        r = json.load(f)
    return {task: {"zero-shot": acc(t["zero_shot"]), "slm_lora": per_seed(t, "slm_lora"), "llm_lora": per_seed(t, "llm_lora")}
            for task, t in r["tasks"].items()}


def gap_rows(label: str, per_task: dict, base: dict) -> list[str]:
    """Per task and overall: the share of the (LLM + LoRA - zero-shot) gap closed, per seed (m - z)/(u - z) and
    averaged as benchmarks/evidence/report.gap_share and _goal do, and the mean against SLM + LoRA."""
    out, shares = [], []
    for task, xs in per_task.items():
        b = base[task]
        z, ups, slm = b["zero-shot"], [b["llm_lora"][s] for s, _ in xs], [b["slm_lora"][s] for s, _ in xs]
        share = sum((v / 100 - z) / (u - z) for (_, v), u in zip(xs, ups)) / len(xs)
        shares.append(share)
        mv, ms = sum(v for _, v in xs) / len(xs), 100 * sum(slm) / len(slm)
        out.append(f"| {label} | {task} | gap closed {100 * share:.1f} % | SLM + LoRA {ms:.1f}: {mv - ms:+.1f} |")
    out.append(f"| {label} | all | gap closed {100 * sum(shares) / len(shares):.1f} % (mean of the tasks) | |")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="method_experiments results.jsonl files")
    ap.add_argument("--evidence", required=True, help="the evidence work directory (its results.json)")
    ap.add_argument("--bridges", default=None, help="comma list (default: every bridge in the files)")
    ap.add_argument("--tag", default=None, help="only records with this tag")
    ap.add_argument("--refined", action="store_true", help="compare after refine instead of after the lift")
    ap.add_argument("--gap", action="store_true",
                    help="also the share of the gap closed per task and overall (report.py's formula) and the mean against SLM + LoRA")
    a = ap.parse_args(argv)

    base = committed(f"{a.evidence}/results.json")
    gap_base = baselines(f"{a.evidence}/results.json") if a.gap else None
    recs = {}
    for path in a.files:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if a.tag is not None and r.get("tag") != a.tag:
                    continue
                if r.get("refine_only"):  # --refine-only (section 11): a start refined, no bridge
                    layers = r["refine"].get("layers", "all")
                    label = f"refine {r['init']} layers {layers if layers == 'all' else ','.join(map(str, *layers.values()))}"
                else:
                    label = r["bridge"] + (f" rank {r['rank']}" if r.get("rank") else "")  # tune-bridge --rank (section 10)
                label += r.get("tag", "") if a.tag is None and r.get("refine_only") else ""
                recs[(label, r["init"], r.get("tag", ""), r["task"], r["seed"])] = r
    wanted = a.bridges.split(",") if a.bridges else sorted({k[0] for k in recs})
    col = 1 if a.refined else 0
    what = "refined" if a.refined else "lifted"
    print(f"| bridge | task | {what} per seed | committed method ({what}) | mean - committed | tune-bridge's last train loss |")
    print("|---|---|---|---|---:|---:|")
    for b in wanted:
        mine, theirs, losses, per_task = [], [], [], {}
        for task in TASKS:
            rows = sorted((k[4], r) for k, r in recs.items() if k[0] == b and k[3] == task)
            if not rows:
                continue
            v = [r[what] for _, r in rows]
            per_task[task] = [(s, x) for (s, _), x in zip(rows, v)]
            c = [base[(task, s)][col] for s, _ in rows]
            mine += v
            theirs += c
            loss = [r["bridge_train_loss"] for _, r in rows if "bridge_train_loss" in r]  # (harness runs since section 10)
            losses += loss
            mv, mc = sum(v) / len(v), sum(c) / len(c)
            print(f"| {b} | {task} | {' / '.join(f'{x:.1f}' for x in v)} (mean {mv:.1f}) "
                  f"| {' / '.join(f'{x:.1f}' for x in c)} (mean {mc:.1f}) | {mv - mc:+.1f} | {mean_or_dash(loss)} |")
        if mine:
            mm, mc = sum(mine) / len(mine), sum(theirs) / len(theirs)
            print(f"| {b} | all {len(mine)} | mean {mm:.2f} | mean {mc:.2f} | {mm - mc:+.2f} | {mean_or_dash(losses)} |")
            if a.gap:
                print("\n".join(gap_rows(b, per_task, gap_base)))


def mean_or_dash(xs: list) -> str:
    return f"{sum(xs) / len(xs):.3f}" if xs else "-"


if __name__ == "__main__":
    main()
