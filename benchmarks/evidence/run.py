"""The paper's table in miniature, through the real CLI:  python -m benchmarks.evidence.run [--quick]

For each task and seed (Jin, Zhang & Zong, EMNLP 2023, Algorithm 1 and Tables 1, 5, 8):
  zero-shot      surgery eval LLM dev
  slm+lora       surgery train SLM            (step 1)
  llm+lora       surgery train LLM            (the upper bound: LoRA trained on the LLM itself)
  transfer       surgery transfer --slm ... --llm LLM, then eval on the LLM     (step 2, no tuning)
  method         prune-bridge (step 3) + tune-bridge (steps 4-7), then eval on the LLM (step 8)
  bridge-only    a fresh LLM LoRA (train --epochs 0) tuned through the same bridge (Table 8)
Ablations on the method: bridge reduction 4/16/64; importance fisher-mask / fisher-param /
magnitude / random; --map activations vs embeddings. Every stage's peak RSS is measured in its
own subprocess. Results go to <work>/results.json; docs/results.md and the plots are rendered from it
(benchmarks/evidence/report.py, plots.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.evidence.pretrain import pretrain  # noqa: E402
from benchmarks.evidence.stage import run_stage  # noqa: E402

TASKS = ["colour", "count", "place", "home"]
MAIN = dict(reduction=16, importance="fisher-mask")
REDUCTIONS = [4, 16, 64]
IMPORTANCES = ["fisher-mask", "fisher-param", "magnitude", "random"]
FULL = dict(n_train=512, n_dev=200, epochs=3, lr=3e-3, batch=16, seeds=3, calib=128)
QUICK = dict(n_train=64, n_dev=32, epochs=1, lr=3e-3, batch=16, seeds=2, calib=16)


class Bench:
    def __init__(self, pair: str, work: str, s: dict, log=print):
        self.slm, self.llm = os.path.join(pair, "slm"), os.path.join(pair, "llm")
        self.work, self.s, self.log = work, s, log
        self._guard, self._locks = threading.Lock(), {}

    def p(self, *parts):
        return os.path.join(self.work, *parts)

    def stage(self, rec: str, args: list[str]) -> dict:
        # two chains may ask for the same stage (the shared transfer, a bridge): one runs, the other waits
        with self._guard:
            lock = self._locks.setdefault(rec, threading.Lock())
        with lock:
            return run_stage(self.p("stages", rec + ".json"), args, log=self.log)

    def data(self, task: str) -> tuple[str, str, str]:
        """Train/dev JSONL and a calibration text file (the train examples as plain text)."""
        from fixtures.tasks import write_task

        train, dev = write_task(task, self.p("data"), n_train=self.s["n_train"], n_dev=self.s["n_dev"])
        calib = self.p("data", f"{task}-calib.jsonl")
        if not os.path.exists(calib):
            with open(train) as f, open(calib, "w") as g:
                for i, line in enumerate(f):
                    if i >= self.s["calib"]:
                        break
                    r = json.loads(line)
                    g.write(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n")
        return train, dev, calib

    def train_args(self, seed: int, epochs=None) -> list[str]:
        s = self.s
        return ["--epochs", str(s["epochs"] if epochs is None else epochs), "--lr", str(s["lr"]),
                "--batch-size", str(s["batch"]), "--seed", str(seed), "--max-length", "64", "--force"]

    def bridge(self, task: str, reduction: int, importance: str) -> dict:
        _, _, calib = self.data(task)
        out = self.p(task, f"bridge-{importance}-r{reduction}")
        return self.stage(f"{task}/prune-{importance}-r{reduction}",
                          ["prune-bridge", self.llm, "-o", out, "--data", calib, "--reduction", str(reduction),
                           "--importance", importance, "--samples", "32", "--seq-len", "32", "--force"]) | {"dir": out}

    def evaluate(self, rec: str, task: str, model: str, adapter: str | None) -> dict:
        _, dev, _ = self.data(task)
        return self.stage(rec, ["eval", model, "--data", dev, "--max-length", "64"]
                          + (["--adapter", adapter] if adapter else []))

    def tuned(self, task: str, seed: int, adapter: str, bridge: dict, name: str) -> dict:
        """tune-bridge ADAPTER through BRIDGE, then evaluate the lifted adapter on the LLM."""
        train, dev, _ = self.data(task)
        out = self.p(task, f"s{seed}", name)
        t = self.stage(f"{task}/s{seed}/{name}", ["tune-bridge", "--adapter", adapter, "--bridge", bridge["dir"],
                                                 "--data", train, "--eval", dev, "-o", out]
                       + self.train_args(seed))
        return {"train": t, "eval": self.evaluate(f"{task}/s{seed}/{name}-eval", task, self.llm, out)}

    def transfer(self, task: str, seed: int, slm_adapter: str, kind: str) -> dict:
        _, _, calib = self.data(task)
        out = self.p(task, f"s{seed}", f"transfer-{kind}")
        args = ["transfer", "--slm", slm_adapter, "--llm", self.llm, "-o", out, "--map", kind, "--force"]
        if kind == "activations":
            args += ["--data", calib, "--samples", "64", "--seq-len", "32"]
        t = self.stage(f"{task}/s{seed}/transfer-{kind}", args)
        return {"dir": out, "transfer": t, "eval": self.evaluate(f"{task}/s{seed}/transfer-{kind}-eval", task,
                                                                 self.llm, out)}

    def seed_chain(self, task: str, seed: int) -> dict:
        train, dev, _ = self.data(task)
        d = lambda n: self.p(task, f"s{seed}", n)  # noqa: E731
        r = {}
        for who, base in (("slm_lora", self.slm), ("llm_lora", self.llm)):
            r[who] = self.stage(f"{task}/s{seed}/{who}", ["train", base, "--data", train, "--eval", dev, "-o", d(who)]
                                + self.train_args(seed))
        tr = self.transfer(task, seed, d("slm_lora"), "activations")
        r["transfer"] = tr
        main = self.bridge(task, MAIN["reduction"], MAIN["importance"])
        r["method"] = self.tuned(task, seed, tr["dir"], main, "method")
        # Table 8: the same LoRA shapes, but fresh (B = 0) instead of transferred, tuned on the bridge alone.
        r["fresh"] = self.stage(f"{task}/s{seed}/fresh", ["train", self.llm, "--data", train, "-o", d("fresh")]
                                + self.train_args(seed, epochs=0))
        r["bridge_only"] = self.tuned(task, seed, d("fresh"), main, "bridge-only")
        return r

    def ablation_chain(self, task: str, seed: int) -> dict:
        """Same SLM adapter and transfer as seed_chain (cached stages); only the bridge or the map changes."""
        d = lambda n: self.p(task, f"s{seed}", n)  # noqa: E731
        tr = self.transfer(task, seed, d("slm_lora"), "activations")
        main = self.bridge(task, MAIN["reduction"], MAIN["importance"])
        r = {}
        for red, imp in variants(True)[1:]:
            r[f"method-{imp}-r{red}"] = self.tuned(task, seed, tr["dir"], self.bridge(task, red, imp),
                                                   f"method-{imp}-r{red}")
        emb = self.transfer(task, seed, d("slm_lora"), "embeddings")
        r["transfer-embeddings"] = emb
        r["method-embeddings"] = self.tuned(task, seed, emb["dir"], main, "method-embeddings")
        return r


def variants(ablate: bool) -> list[tuple[int, str]]:
    v = [(MAIN["reduction"], MAIN["importance"])]
    if ablate:
        v += [(r, MAIN["importance"]) for r in REDUCTIONS if r != MAIN["reduction"]]
        v += [(MAIN["reduction"], i) for i in IMPORTANCES if i != MAIN["importance"]]
    return v


def run(quick: bool, jobs: int, tasks: list[str], ablate_tasks: list[str], log=print) -> str:
    s = QUICK if quick else FULL
    pair = pretrain(quick=quick, log=log)
    work = os.path.join(ROOT, "benchmarks", ".work", "evidence-" + ("quick-" if quick else "") + os.path.basename(pair))
    b = Bench(pair, work, s, log)
    t0 = time.time()
    seeds = range(s["seeds"])
    for t in tasks:  # write the data files once, before threads could race on them
        b.data(t)
    # Queue order = priority: the main table for every task first, ablations after (FIFO pool).
    with ThreadPoolExecutor(jobs) as pool:
        zs = {t: pool.submit(b.evaluate, f"{t}/zero-shot", t, b.llm, None) for t in tasks}
        zs_slm = {t: pool.submit(b.evaluate, f"{t}/zero-shot-slm", t, b.slm, None) for t in tasks}
        chains = {(t, sd): pool.submit(b.seed_chain, t, sd) for sd in seeds for t in tasks}
        abl = {(t, sd): pool.submit(b.ablation_chain, t, sd) for sd in seeds for t in ablate_tasks}
        results = {"tasks": {t: {"zero_shot": zs[t].result(), "zero_shot_slm": zs_slm[t].result(),
                                 "bridges": {f"{imp}-r{red}": b.bridge(t, red, imp)
                                             for red, imp in variants(t in ablate_tasks)},
                                 "seeds": [chains[(t, sd)].result() | (abl[(t, sd)].result() if (t, sd) in abl else {})
                                           for sd in seeds]} for t in tasks}}
    with open(os.path.join(pair, "pretrain.json")) as f:
        results["pretrain"] = json.load(f)
    # training memory tensor by tensor, at the training batch shape (memory.py says why not RSS)
    from benchmarks.evidence.memory import training_bytes

    shape = dict(batch=s["batch"], seq=64)
    t0_bridges = results["tasks"][tasks[0]]["bridges"] if not ablate_tasks else results["tasks"][ablate_tasks[0]]["bridges"]
    results["train_memory"] = {"slm": training_bytes(b.slm, **shape), "llm": training_bytes(b.llm, **shape),
                               **{f"bridge {k}": training_bytes(v["dir"], **shape) for k, v in t0_bridges.items()}}
    from benchmarks.evidence.knowledge import home_cloze

    results["home_cloze"] = {m: {"train_people": home_cloze(d, 0, 200), "dev_people": home_cloze(d, 1000, None)}
                             for m, d in (("slm", b.slm), ("llm", b.llm))}
    results.update(settings=s, quick=quick, jobs=jobs, work=work, pair=pair, seconds=time.time() - t0,
                   machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), ablate_tasks=ablate_tasks,
                   command="python -m benchmarks.evidence.run" + (" --quick" if quick else ""))
    out = os.path.join(work, "results.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny pair, few examples, 2 seeds: a smoke run")
    ap.add_argument("--jobs", type=int, default=2, help="stages run in parallel (one thread each)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--ablate", default="home", help="tasks that get the ablations")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/results.md and the plots")
    a = ap.parse_args()
    tasks = [t for t in a.tasks.split(",") if t]
    out = run(a.quick, a.jobs, tasks, [t for t in a.ablate.split(",") if t in tasks])
    print(f"results: {out}")
    if not a.no_docs:
        from benchmarks.evidence.report import write_docs

        write_docs(out, os.path.join(ROOT, "docs"))


if __name__ == "__main__":
    main()
