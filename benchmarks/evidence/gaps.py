"""Do the tasks need the larger model? LLM + LoRA minus SLM + LoRA, per task, over seeds.

    python -m benchmarks.evidence.gaps [--tasks verb,arg] [--seeds 3] [--jobs 2]

Runs only the two LoRA baselines of benchmarks/evidence/run.py (same stages, same cache: a later
`make evidence` reuses them) and prints the gap in accuracy points with its 95 % interval. Issue 16
wants >= 10 points on every task, so a task is checked here before a full run is spent on it.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.evidence.report import acc, ci  # noqa: E402
from benchmarks.evidence.run import FULL, QUICK, Bench, pretrain, work_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="verb,arg")
    ap.add_argument("--seeds", type=int, default=FULL["seeds"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the tiny pair and settings of `run --quick` (smoke run)")
    a = ap.parse_args()
    pair = pretrain(quick=a.quick)
    b = Bench(pair, work_dir(pair), QUICK if a.quick else FULL)
    tasks = a.tasks.split(",")
    for t in tasks:
        b.data(t)

    def lora(t, sd, who):
        train, dev, _ = b.data(t)
        return b.stage(f"{t}/s{sd}/{who}", ["train", b.slm if who == "slm_lora" else b.llm, "--data", train, "--eval",
                                            dev, "-o", b.p(t, f"s{sd}", who)] + b.train_args(sd))

    with ThreadPoolExecutor(a.jobs) as pool:
        futs = {(t, sd, who): pool.submit(lora, t, sd, who)
                for sd in range(a.seeds) for t in tasks for who in ("slm_lora", "llm_lora")}
        res = {k: 100 * acc(f.result()) for k, f in futs.items()}
    for t in tasks:
        slm = [res[(t, sd, "slm_lora")] for sd in range(a.seeds)]
        llm = [res[(t, sd, "llm_lora")] for sd in range(a.seeds)]
        m, h = ci([x - y for x, y in zip(llm, slm)])
        print(f"{t}: SLM + LoRA {ci(slm)[0]:.1f}, LLM + LoRA {ci(llm)[0]:.1f}, gap {m:+.1f} ± {h:.1f} points "
              f"(per seed {', '.join(f'{x - y:+.1f}' for x, y in zip(llm, slm))})")


if __name__ == "__main__":
    main()
