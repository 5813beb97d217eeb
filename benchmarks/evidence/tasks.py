"""Tasks that need what the pair memorised in pretraining (benchmarks/evidence/corpus.py).

Each asks about standard-library entries the pretraining saw, in a question format it never saw (so
zero-shot is near 0 and LoRA has a format to learn), and their dev split asks about entries the
task's train split never names: the answer must come from pretraining, not from the tuning data.
  module  "Q: which module defines ensure_future? A:"  -> " asyncio"   (8 top-level packages)
  verb    "Q: what does Element.get do? A:"            -> " Get"       (first word of its docstring)
  arg     "Q: what is the first argument of getLogger? A:" -> " name"  (first parameter, as the index lists it)
  sub     "Q: which submodule defines SAXParseException? A:" -> " sax"  (second component of the module)
  tail    "Q: what is the last word of the summary of BZ2File.readline? A:" -> " file"  (of its first paragraph)
Labels are capped per class (near balance, so chance is about 1/8), and split about half/half per
label with a fixed seed, by owner: all methods of a class fall on one side, whatever their labels, so
a dev question's class never appears in the train split.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict

MODULES = ["asyncio", "email", "importlib", "xml", "logging", "multiprocessing", "unittest", "turtle"]
VERBS = ["Return", "Set", "Get", "Read", "Create", "Parse", "Add", "Send"]
# the 8 first parameters with the most distinct owners (classes or functions) in the corpus, so the
# split by owner leaves every label on both sides
ARGS = ["name", "value", "a", "data", "object", "s", "path", "obj"]
# sub and tail: candidates screened with module for issue 16's task rule (docs/method-experiments.md,
# "Choosing tasks by the rule"), labels chosen by the same count as ARGS: the 8 with the most distinct owners.
# sub: second components of a module name, by (package, component), each with its package (the label
# stays one word; none of these eight names a component of another package)
SUBS = {"_header_value_parser": "email", "resources": "importlib", "metadata": "importlib", "dom": "xml",
        "errors": "email", "cookiejar": "http", "sax": "xml", "etree": "xml"}
TAILS = ["object", "file", "string", "b", "type", "name", "class", "data"]
LABELS = {"module": MODULES, "verb": VERBS, "arg": ARGS, "sub": list(SUBS), "tail": TAILS}
# module: 50 since the screening (was 110): every candidate about arg's size, so a third task adds about
# what arg costs to `make evidence`'s hour
CAP = {"module": 50, "verb": 60, "arg": 50, "sub": 50, "tail": 50}
TASKS = ("module", "verb", "arg", "sub", "tail")
PROMPTS = {"module": "Q: which module defines {}? A:", "verb": "Q: what does {} do? A:",
           "arg": "Q: what is the first argument of {}? A:",
           "sub": "Q: which submodule defines {}? A:", "tail": "Q: what is the last word of the summary of {}? A:"}


def _tail(e: dict) -> tuple[str, str] | None:
    """(the summary before its last word, that word), trailing full stops dropped; None for a summary
    corpus.py cut at MAX_SUMMARY characters (its last word is not the docstring's)."""
    from benchmarks.evidence.corpus import MAX_SUMMARY

    text = e["summary"].rstrip(".")
    if len(e["summary"]) >= MAX_SUMMARY or " " not in text:
        return None
    head, word = text.rsplit(" ", 1)
    return head, word


def _label(name: str, e: dict) -> str | None:
    if name == "module":
        v = e["module"].split(".")[0]
    elif name == "verb":
        v = e["summary"].split()[0]
    elif name == "arg":
        v = e["args"].split(",")[0].strip()
    elif name == "sub":
        parts = e["module"].split(".")
        v = parts[1] if len(parts) > 1 and SUBS.get(parts[1]) == parts[0] else None
    else:
        v = (_tail(e) or (None, None))[1]
    return v if v in LABELS[name] else None


def _prompt(name: str, qual: str) -> str:
    return PROMPTS[name].format(qual)


def question(name: str, prompt: str) -> str:
    """The name a task's prompt asks about (the inverse of _prompt)."""
    head, tail = PROMPTS[name].split("{}")
    return prompt[len(head):-len(tail)]


def cloze_text(name: str, e: dict, label: str) -> str:
    """ENTRY as the pretraining text writes it, up to and including LABEL in the place the task asks about."""
    if name == "arg":
        return f"{e['qual']}({label}"
    if name == "module":
        return f"{e['qual']}({e['args']}) in {label}"
    if name == "sub":
        return f"{e['qual']}({e['args']}) in {SUBS[label]}.{label}"
    if name == "tail":
        return f"{e['qual']}({e['args']}) in {e['module']}: {_tail(e)[0]} {label}"
    return f"{e['qual']}({e['args']}) in {e['module']}: {label}"


def labels(name: str) -> list[str]:
    return [f" {w}" for w in LABELS[name]]


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
    chosen = {}
    for lab in sorted(per_label):
        qs = per_label[lab]
        rng.shuffle(qs)
        chosen.update((q, lab) for q in qs[: CAP[name]])
    # split by owner (the class of a method, else the name itself), over all labels at once: a dev question
    # never shares its class with a train question, so the answer cannot be read off the tuning data's
    # names. An owner goes to dev while its most frequent label has fewer than half its questions there.
    by_owner = defaultdict(list)
    for q in sorted(chosen):
        by_owner[q.split(".")[0]].append(q)
    owners = sorted(by_owner)
    rng.shuffle(owners)
    total, in_dev, to_dev = Counter(chosen.values()), Counter(), set()
    for o in owners:
        labs = Counter(chosen[q] for q in by_owner[o])
        if in_dev[labs.most_common(1)[0][0]] < total[labs.most_common(1)[0][0]] // 2:
            to_dev.add(o)
            in_dev.update(labs)
    train, dev = [], []
    for q in sorted(chosen):
        (dev if q.split(".")[0] in to_dev else train).append({"prompt": _prompt(name, q), "completion": f" {chosen[q]}"})
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
