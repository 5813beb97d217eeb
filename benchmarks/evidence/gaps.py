"""Do the tasks need the larger model? LLM + LoRA minus SLM + LoRA, per task, over seeds.

    python -m benchmarks.evidence.gaps [--tasks verb,arg,sub] [--seeds 3] [--jobs 2] [--cloze] [--docs]

Runs only the two LoRA baselines of benchmarks/evidence/run.py (same stages, same cache: a later
`make evidence` reuses them) and prints the gap in accuracy points with its 95 % interval. Issue 16
wants >= 10 points on every task, so a task is checked here before a full run is spent on it: each
task's line says whether the task rule holds (report.task_rule, as pre-registered in
docs/method-experiments.md section 6). --cloze adds knowledge.py's 8-way cloze for the SLM and the
LLM; --docs writes the per-seed table and the pre-registered selection (of the tasks not yet in the
evidence, CANDIDATES) into that section, between its `screen:begin` / `screen:end` markers.
Never runs a stage of the method: the choice of tasks cannot follow the method's results.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.evidence.report import ci, task_rule  # noqa: E402
from benchmarks.evidence.run import FULL, QUICK, TASKS_DEFAULT, Bench, pretrain, work_dir  # noqa: E402

CANDIDATES = ("module", "sub", "tail")  # screened for a place in the evidence (the others are references)
DOC = os.path.join(ROOT, "docs", "method-experiments.md")
BEGIN, END = "<!-- screen:begin -->", "<!-- screen:end -->"
TIE_POINTS = 1.0  # mean gaps this close are a tie, which the cloze gap decides


def select(rows: dict, candidates=CANDIDATES) -> str | None:
    """The pre-registered choice: of the candidates whose rule holds, the largest mean gap; within
    TIE_POINTS of it, the largest cloze gap (LLM - SLM); None when no candidate is eligible."""
    ok = [n for n in candidates if n in rows and rows[n]["rule"]["holds"]]
    if not ok:
        return None
    best = max(rows[n]["rule"]["mean"] for n in ok)
    tied = [n for n in ok if rows[n]["rule"]["mean"] >= best - TIE_POINTS]
    return max(tied, key=lambda n: (rows[n]["cloze"]["llm"] - rows[n]["cloze"]["slm"]) if rows[n].get("cloze")
               else 0.0)


def table(rows: dict, seeds: int) -> list[str]:
    """Markdown: per task, per seed SLM + LoRA / LLM + LoRA accuracy and gap, the mean, cloze, the rule."""
    head = ["task"] + [f"seed {s}: SLM / LLM (gap)" for s in range(seeds)] + [
        "mean SLM / LLM", "mean gap ± 95 %", "cloze SLM / LLM", "rule"]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for n, r in rows.items():
        cells = [f"{100 * a:.1f} / {100 * b:.1f} ({g:+.1f})" for a, b, g in zip(r["slm"], r["llm"], r["rule"]["gaps"])]
        m, h = ci(r["rule"]["gaps"])
        cz = r.get("cloze")
        cells += [f"{100 * ci(r['slm'])[0]:.1f} / {100 * ci(r['llm'])[0]:.1f}", f"{m:+.1f} ± {h:.1f}",
                  f"{100 * cz['slm']:.1f} / {100 * cz['llm']:.1f} %" if cz else "-",
                  "holds" if r["rule"]["holds"] else "does not hold"]
        out.append(f"| `{n}`{'' if n in CANDIDATES else ' (in the evidence)'} | " + " | ".join(cells) + " |")
    return out


def write_docs(lines: list[str], path: str = DOC) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {path} has no {BEGIN} ... {END} markers to write the screening into; "
                         "restore them in its section 'Choosing tasks by the rule'")
    head, rest = text.split(BEGIN, 1)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + rest.split(END, 1)[1])
    os.rename(path + ".tmp", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=TASKS_DEFAULT)
    ap.add_argument("--seeds", type=int, default=FULL["seeds"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the tiny pair and settings of `run --quick` (smoke run)")
    ap.add_argument("--cloze", action="store_true", help="also the 8-way cloze of knowledge.py, SLM and LLM")
    ap.add_argument("--docs", action="store_true", help="write the table and the selection into docs/method-experiments.md")
    a = ap.parse_args()
    t0 = time.time()
    pair = pretrain(quick=a.quick)
    b = Bench(pair, work_dir(pair), QUICK if a.quick else FULL)
    tasks = a.tasks.split(",")
    for t in tasks:
        b.data(t)

    from benchmarks.evidence.report import acc

    with ThreadPoolExecutor(a.jobs) as pool:
        futs = {(t, sd, who): pool.submit(b.lora, t, sd, who)
                for sd in range(a.seeds) for t in tasks for who in ("slm_lora", "llm_lora")}
        res = {k: acc(f.result()) for k, f in futs.items()}
    rows = {}
    for t in tasks:
        slm = [res[(t, sd, "slm_lora")] for sd in range(a.seeds)]
        llm = [res[(t, sd, "llm_lora")] for sd in range(a.seeds)]
        rows[t] = {"slm": slm, "llm": llm, "rule": task_rule(slm, llm)}
        if a.cloze:
            from benchmarks.evidence.knowledge import cloze

            rows[t]["cloze"] = {m: cloze(t, d, b.data(t)[1]) for m, d in (("slm", b.slm), ("llm", b.llm))}
        r = rows[t]["rule"]
        m, h = ci(r["gaps"])
        print(f"{t}: SLM + LoRA {100 * ci(slm)[0]:.1f}, LLM + LoRA {100 * ci(llm)[0]:.1f}, gap {m:+.1f} ± {h:.1f} "
              f"points (per seed {', '.join(f'{g:+.1f}' for g in r['gaps'])}): task rule "
              f"{'holds' if r['holds'] else 'does not hold'}"
              + (f"; cloze SLM {100 * rows[t]['cloze']['slm']:.1f} %, LLM {100 * rows[t]['cloze']['llm']:.1f} %"
                 if a.cloze else ""))
    chosen = select(rows)
    verdict = (f"selected by the pre-registered rule: `{chosen}`" if chosen else
               f"no candidate of {', '.join(c for c in CANDIDATES if c in rows)} is eligible: none is added")
    print(verdict)
    if a.docs:
        cmd = "python -m benchmarks.evidence.gaps " + " ".join(sys.argv[1:])
        write_docs([f"- command: `{cmd}` ({(time.time() - t0) / 60:.0f} min wall, stages cached in "
                    f"{os.path.relpath(b.work, ROOT)}); machine: {platform.machine()}, {os.cpu_count()} CPU "
                    f"cores shared with other jobs, Python {platform.python_version()}; date: "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                    "- cells: dev exact-match accuracy (%) of SLM + LoRA / LLM + LoRA, and the gap in points; "
                    "cloze: knowledge.py's 8-way cloze on the first 160 dev entries (chance 12.5 %)", ""]
                   + table(rows, a.seeds) + ["", f"**{verdict[0].upper() + verdict[1:]}.**"])


if __name__ == "__main__":
    main()
