"""Refine variants side by side at equal forward passes (docs/method-experiments.md, "refine on pair 4394e841445a").

    python -m benchmarks.refine_experiments --evidence benchmarks/.work/evidence-<key> --task verb --seeds 0 \
        --starts zero-init,bridge --forwards 4000 --eval-forwards 1000 \
        --variants "lr=1e-4 lr=3e-4,backoff=0.5 k=4,lr=4e-4 only=lora_B,lr=2e-4"

`surgery refine` (MeZO on the LLM's adapter, library call surgery.train.zeroth.mezo_fit) from the
adapters `make evidence` already tuned on the bridge (<task>/s<seed>/<start>: `zero-init` = a
zero-initialised LoRA after tune-bridge, `bridge` = the transferred start after tune-bridge), so
no stage is re-run: the LLM and each start are loaded once and every variant starts from the same
tensors. Each variant spends --forwards forward passes (a step with k directions costs 2k) and is
evaluated on dev every --eval-forwards, giving the accuracy-vs-forward-passes curve.

Variant keys (comma-separated, one variant per space-separated word):
  lr, eps, batch   RefineConfig's; k = directions per step (RefineConfig.directions)
  forwards         this variant's forward passes (default --forwards); a run's directions and batches do
                   not depend on its length, so a longer run passes through the shorter one's states
  backoff          < 1: keep the best dev state, and a worse evaluation restores it and scales lr
                   (refine's --keep-best --backoff); default 1 = the raw curve (--keep-last)
  only=REGEX       tune only the adapter tensors whose name matches (re.search), e.g. lora_B,
                   'layers\\.[123]\\.' (the layers the one-layer bridge dropped), mlp
  loss             the scalar MeZO descends (default all = refine's: mean NLL over every completion token);
                   first = NLL of the first completion token only (the one that decides exact match on
                   single-token labels); labels = cross-entropy over the candidate first tokens only (the
                   distinct first tokens of the training completions: MeZO's and LM-BFF's prompt-based
                   classification loss over the label words); labels+all = the sum of the two
One process, one thread; results are appended as JSON lines to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


LOSSES = ("all", "first", "labels", "labels+all")


def objective(name: str, candidates: list[int]):
    """batch_loss(model, batch, seq2seq) -> float for refine's loop: `name` as in the docstring (causal models)."""
    import torch
    import torch.nn.functional as F

    from surgery.train.data import IGNORE
    from surgery.train.zeroth import batch_loss as all_tokens

    cand = torch.tensor(candidates)

    def loss(model, batch, seq2seq):
        if name == "all":
            return all_tokens(model, batch, seq2seq)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        first = (labels != IGNORE).int().argmax(-1)  # the first labelled position of each row
        rows = torch.arange(labels.shape[0])
        at, gold = logits[rows, first], labels[rows, first]
        if name == "first":
            return float(F.cross_entropy(at, gold))
        target = (cand[None, :] == gold[:, None]).int().argmax(-1)  # gold's index among the candidates
        out = float(F.cross_entropy(at[:, cand], target))
        return out + all_tokens(model, batch, seq2seq) if name == "labels+all" else out

    return loss


def parse_variant(word: str) -> dict:
    v = {}
    for kv in word.split(","):
        k, _, x = kv.partition("=")
        if k not in ("lr", "eps", "batch", "k", "backoff", "only", "forwards", "loss") or not x:
            raise SystemExit(f"bad variant key {kv!r} in {word!r}: use lr=, eps=, batch=, k=, backoff=, only=, forwards=, loss=")
        if k == "loss" and x not in LOSSES:
            raise SystemExit(f"bad loss {x!r}: use one of {', '.join(LOSSES)}")
        v[k] = x if k in ("only", "loss") else (int(x) if k in ("k", "batch", "forwards") else float(x))
    return v


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--evidence", default=os.environ.get("SURGERY_EVIDENCE_WORK"), required=False)
    ap.add_argument("--pair", default=None, help="the pretrained pair (default: the evidence's)")
    ap.add_argument("--task", default="verb")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--starts", default="zero-init",
                    help="comma list of <task>/s<seed>/ adapters: zero-init, bridge-scaled, ... (or absolute paths, the same for every seed)")
    ap.add_argument("--forwards", type=int, default=2000, help="forward passes per variant")
    ap.add_argument("--eval-forwards", type=int, default=500, help="forward passes between dev evaluations")
    ap.add_argument("--variants", default="lr=1e-4")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", ".work", "refine", "results.jsonl"))
    a = ap.parse_args(argv)
    variants = [parse_variant(w) for w in a.variants.split()]

    import torch

    torch.set_num_threads(1)
    from surgery.kinds import kind_of
    from surgery.train.data import load_examples
    from surgery.train.loop import place
    from surgery.train.methods import load_base
    from surgery.train import zeroth
    from surgery.train.zeroth import RefineConfig, mezo_fit

    all_tokens = zeroth.batch_loss

    ev = a.evidence
    key = re.sub(r"-t[0-9a-f]{6}$", "", os.path.basename(ev.rstrip("/")).removeprefix("evidence-"))
    llm = os.path.join(a.pair or os.path.join(ROOT, "benchmarks", ".work", "pairs", key), "llm")
    train, dev = (os.path.join(ev, "data", f"{a.task}-{x}.jsonl") for x in ("train", "dev"))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)

    for seed in map(int, a.seeds.split(",")):
        for start in a.starts.split(","):
            adapter = os.path.join(ev, a.task, f"s{seed}", start)
            kind = kind_of(adapter, "refine")
            model, tok, arch = load_base(llm, None)
            seq2seq = bool(model.config.is_encoder_decoder)
            train_ex = load_examples(train, tok, seq2seq=seq2seq, max_length=64)
            dev_ex = load_examples(dev, tok, seq2seq=seq2seq, max_length=64)
            candidates = sorted({next(t for t in e.labels if t != -100) for e in train_ex})
            model.requires_grad_(False)
            wrapped, params = kind.tunable(model, adapter, arch)
            wrapped = place(wrapped, None)
            names = {id(p): n for n, p in wrapped.named_parameters()}
            init = [p.detach().clone() for p in params]
            for v in variants:
                with torch.no_grad():
                    for p, s in zip(params, init):
                        p.copy_(s)
                sub = [p for p in params if re.search(v.get("only", ""), names[id(p)])]
                k = v.get("k", 1)
                backoff = v.get("backoff", 1.0)
                cfg = RefineConfig(steps=v.get("forwards", a.forwards) // (2 * k), eval_every=max(a.eval_forwards // (2 * k), 1),
                                   lr=v.get("lr", 1e-4), eps=v.get("eps", 1e-3), batch_size=v.get("batch", 16),
                                   directions=k, seed=seed, keep_best=backoff < 1, backoff=backoff, progress=False)
                t0 = time.time()
                zeroth.batch_loss = objective(v.get("loss", "all"), candidates)
                try:
                    before, hist, after, kept = mezo_fit(wrapped, sub, tok, train_ex, dev_ex, cfg, seq2seq=seq2seq)
                finally:
                    zeroth.batch_loss = all_tokens
                sec = time.time() - t0
                curve = [(0, round(100 * before["accuracy"], 1), round(before["loss"], 3))] + [
                    (st * 2 * k, round(100 * m["accuracy"], 1), round(m["loss"], 3)) for st, m in hist.evals]
                rec = {"task": a.task, "seed": seed, "start": start, "variant": v, "tuned": sum(p.numel() for p in sub),
                       "forwards": cfg.steps * 2 * k, "steps": cfg.steps, "kept_step": kept,
                       "lr_schedule": hist.lr, "final": round(100 * after["accuracy"], 1),
                       "curve_forwards_acc_loss": curve, "seconds": round(sec),
                       "ms_per_forward": round(1000 * sec / (cfg.steps * 2 * k), 1),  # evaluations included
                       "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
                print(json.dumps(rec), flush=True)
                with open(a.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            del model, wrapped, params


if __name__ == "__main__":
    main()
