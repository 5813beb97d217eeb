"""Where an adapter's exact-match errors come from, per dev record (docs/method-experiments.md §7).

    python -m benchmarks.label_diagnose --evidence benchmarks/.work/evidence-<key> --task arg --seeds 0,1,2 \
        --stages method-scaled,bridge-scaled,llm_lora,slm_lora

For each stage of the evidence's seed directories (LoRA adapters on the LLM; `slm_lora` on the SLM,
`zero-shot` / `slm-zero-shot` the bare models), one teacher-forced pass over the task's dev set, and per
record, at the first completion position (the one that decides exact match on every single-token label):
the argmax token, whether it is the first token of one of the task's 8 labels, the probability mass on
those 8 first tokens, the gold first token's probability and rank among the labels, and whether every
later completion token is right. Printed per stage: exact-match accuracy, how the errors split (a wrong
label / a token that starts no label / the later tokens), accuracy if the argmax were taken over the 8
labels only, the label distribution of the predictions against the gold one, and the dev loss on the
first position against the later positions. --confusion prints the gold x predicted table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def label_first_tokens(tok, task: str) -> dict[int, str]:
    from benchmarks.evidence.tasks import labels

    firsts = {}
    for lab in labels(task):
        ids = tok(lab, add_special_tokens=False)["input_ids"]
        if ids[0] in firsts:
            raise SystemExit(f"labels {firsts[ids[0]]!r} and {lab!r} share their first token: first-token analysis needs distinct ones")
        firsts[ids[0]] = lab.strip()
    return firsts


def records(model, examples, firsts: dict[int, str], batch_size: int = 32) -> list[dict]:
    """Per dev example: gold label, argmax token, predicted label (None = a token that starts no label),
    label-restricted prediction, mass on the labels, gold probability, first-position and later NLL, exact match."""
    import torch

    from surgery.train.data import IGNORE, collate
    from surgery.train.score import aligned_logits

    lab_ids = torch.tensor(sorted(firsts))
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            batch = collate(chunk, 0, False)
            logits, labels = aligned_logits(model, batch, False)
            logp = torch.log_softmax(logits.float(), -1)
            for r in range(len(chunk)):
                pos = (labels[r] != IGNORE).nonzero().flatten().tolist()
                p0, gold = pos[0], int(labels[r, pos[0]])
                lp = logp[r, p0]
                arg = int(lp.argmax())
                on_labels = lp[lab_ids]
                later_ok = all(int(logp[r, p].argmax()) == int(labels[r, p]) for p in pos[1:])
                out.append({"gold": firsts[gold], "argmax": arg, "pred": firsts.get(arg),
                            "pred_in_labels": firsts[int(lab_ids[int(on_labels.argmax())])],
                            "mass": float(on_labels.exp().sum()), "p_gold": float(lp[gold].exp()),
                            "nll_first": float(-lp[gold]),
                            "nll_later": [float(-logp[r, p, labels[r, p]]) for p in pos[1:]],
                            "exact": arg == gold and later_ok, "first_ok": arg == gold})
    return out


def summary(recs: list[dict], labels: list[str]) -> dict:
    n = len(recs)
    wrong_label = sum(1 for r in recs if not r["first_ok"] and r["pred"] is not None)
    non_label = sum(1 for r in recs if r["pred"] is None)
    later = sum(1 for r in recs if r["first_ok"] and not r["exact"])
    later_nll = [x for r in recs for x in r["nll_later"]]
    first_nll = [r["nll_first"] for r in recs]
    return {"n": n, "exact": 100 * sum(r["exact"] for r in recs) / n,
            "err_wrong_label": 100 * wrong_label / n, "err_non_label": 100 * non_label / n, "err_later": 100 * later / n,
            "restricted": 100 * sum(r["pred_in_labels"] == r["gold"] for r in recs) / n,
            "mass": sum(r["mass"] for r in recs) / n, "p_gold": sum(r["p_gold"] for r in recs) / n,
            "pred_dist": {lab: sum(r["pred"] == lab for r in recs) for lab in labels},
            "restricted_dist": {lab: sum(r["pred_in_labels"] == lab for r in recs) for lab in labels},
            "gold_dist": {lab: sum(r["gold"] == lab for r in recs) for lab in labels},
            "loss_first": sum(first_nll) / n, "loss_later": sum(later_nll) / max(len(later_nll), 1),
            "later_tokens": len(later_nll),
            "loss_all": (sum(first_nll) + sum(later_nll)) / (n + len(later_nll)),
            "non_label_tokens": Counter(r["argmax"] for r in recs if r["pred"] is None).most_common(5)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--evidence", default=os.environ.get("SURGERY_EVIDENCE_WORK"))
    ap.add_argument("--pair", default=None)
    ap.add_argument("--task", default="arg")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--stages", default="method-scaled,bridge-scaled,llm_lora,slm_lora",
                    help="stage directories of <task>/s<seed>/ (slm_lora runs on the SLM), paths, or zero-shot")
    ap.add_argument("--split", default="dev", help="dev or train (the task's data file)")
    ap.add_argument("--confusion", action="store_true", help="also print gold x predicted counts (summed over seeds)")
    ap.add_argument("--json", default=None, help="append one JSON line per stage and seed to this file")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from benchmarks.evidence.tasks import LABELS
    from surgery.kinds import kind_of
    from surgery.train.data import load_examples
    from surgery.train.methods import load_base

    ev = a.evidence.rstrip("/")
    key = re.sub(r"-t[0-9a-f]{6}$", "", os.path.basename(ev).removeprefix("evidence-"))
    pair = a.pair or os.path.join(ROOT, "benchmarks", ".work", "pairs", key)
    data = os.path.join(ev, "data", f"{a.task}-{a.split}.jsonl")
    labels = LABELS[a.task]
    for stage in a.stages.split(","):
        pooled, confusion = [], Counter()
        for seed in map(int, a.seeds.split(",")):
            on_slm = stage.startswith("slm")
            model, tok, arch = load_base(os.path.join(pair, "slm" if on_slm else "llm"), None)
            if "zero-shot" not in stage:
                path = stage if os.path.isdir(stage) else os.path.join(ev, a.task, f"s{seed}", stage)
                model.requires_grad_(False)
                model, _ = kind_of(path, "refine").tunable(model, path, arch)
            firsts = label_first_tokens(tok, a.task)
            recs = records(model, load_examples(data, tok, seq2seq=False, max_length=64), firsts)
            s = summary(recs, labels)
            pooled += recs
            confusion.update((r["gold"], r["pred"] or "(none)") for r in recs)
            s["non_label_tokens"] = [(tok.convert_ids_to_tokens(t), c) for t, c in s["non_label_tokens"]]
            print(json.dumps({"task": a.task, "stage": stage, "seed": seed,
                              **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}}), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({"task": a.task, "stage": stage, "seed": seed, "split": a.split, **s}) + "\n")
            if "zero-shot" in stage:
                break
        s = summary(pooled, labels)
        print(f"== {a.task} {stage} (pooled over seeds, n={s['n']}): exact {s['exact']:.1f}  restricted-to-labels "
              f"{s['restricted']:.1f}  errors: wrong label {s['err_wrong_label']:.1f} / non-label token "
              f"{s['err_non_label']:.1f} / later tokens {s['err_later']:.1f}  label mass {s['mass']:.3f}  "
              f"p(gold) {s['p_gold']:.3f}  loss first {s['loss_first']:.3f} later {s['loss_later']:.3f} "
              f"({s['later_tokens']} later tokens) all {s['loss_all']:.3f}")
        print("   predicted:", " ".join(f"{k}:{v}" for k, v in s["pred_dist"].items()), " gold:",
              " ".join(f"{k}:{v}" for k, v in s["gold_dist"].items()))
        if a.confusion:
            cols = labels + ["(none)"]
            print("   gold \\ pred " + " ".join(f"{c:>7}" for c in cols))
            for g in labels:
                print(f"   {g:>11} " + " ".join(f"{confusion[(g, c)]:>7}" for c in cols))


if __name__ == "__main__":
    main()
