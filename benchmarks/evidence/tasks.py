"""Tasks that need what the pair memorised in pretraining (benchmarks/evidence/corpus.py).

Both ask about standard-library entries the pretraining saw, in a question format it never saw (so
zero-shot is near 0 and LoRA has a format to learn), and their dev split asks about entries the
task's train split never names: the answer must come from pretraining, not from the tuning data.
  module  "Q: which module defines ensure_future? A:"  -> " asyncio"   (8 top-level packages)
  verb    "Q: what does Element.get do? A:"            -> " Get"       (first word of its docstring)
Labels are capped per class (near balance, so chance is about 1/8), and split about half/half per
label with a fixed seed, by owner: all methods of a class fall on one side, so a dev question's
class never appears in the train split.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict

MODULES = ["asyncio", "email", "importlib", "xml", "logging", "multiprocessing", "unittest", "turtle"]
VERBS = ["Return", "Set", "Get", "Read", "Create", "Parse", "Add", "Send"]
CAP = {"module": 110, "verb": 60}
TASKS = ("module", "verb")


def _label(name: str, e: dict) -> str | None:
    if name == "module":
        top = e["module"].split(".")[0]
        return top if top in MODULES else None
    first = e["summary"].split()[0]
    return first if first in VERBS else None


def _prompt(name: str, qual: str) -> str:
    return f"Q: which module defines {qual}? A:" if name == "module" else f"Q: what does {qual} do? A:"


def labels(name: str) -> list[str]:
    return [f" {w}" for w in (MODULES if name == "module" else VERBS)]


def make(name: str, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, dev) records over the pretraining entries; a name asked about twice with two answers is dropped."""
    from benchmarks.evidence.corpus import split

    seen, _ = split()
    by_qual = defaultdict(set)
    for e in seen:
        by_qual[e["qual"]].add(_label(name, e))
    per_label = defaultdict(list)
    for q in sorted(by_qual):
        (lab,) = by_qual[q] if len(by_qual[q]) == 1 else (None,)
        if lab is not None:
            per_label[lab].append(q)
    rng = random.Random(f"{name}:{seed}")
    train, dev = [], []
    for lab in sorted(per_label):
        qs = per_label[lab]
        rng.shuffle(qs)
        qs = qs[: CAP[name]]
        # split by owner (the class of a method, else the name itself): a dev question never shares its
        # class with a train question, so the answer cannot be read off the tuning data's names
        owners = sorted({q.split(".")[0] for q in qs})
        rng.shuffle(owners)
        to_dev, n_dev = set(), 0
        for o in owners:
            if n_dev < len(qs) // 2:
                to_dev.add(o)
                n_dev += sum(q.split(".")[0] == o for q in qs)
        for q in qs:
            (dev if q.split(".")[0] in to_dev else train).append({"prompt": _prompt(name, q), "completion": f" {lab}"})
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev


def write(name: str, out_dir: str, n_train: int | None = None, n_dev: int | None = None) -> tuple[str, str]:
    """<out_dir>/<name>-train.jsonl and -dev.jsonl (written once; the first N of each if given); returns their paths."""
    paths = []
    for split_name, records, n in zip(("train", "dev"), make(name), (n_train, n_dev)):
        records = records[:n]
        path = os.path.join(out_dir, f"{name}-{split_name}.jsonl")
        if not os.path.exists(path):
            os.makedirs(out_dir, exist_ok=True)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            os.rename(path + ".tmp", path)
        paths.append(path)
    return paths[0], paths[1]
