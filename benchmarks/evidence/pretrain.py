"""Pretrain a same-family pair (small and large llama LMs, one tokenizer) from scratch, offline.

    python -m benchmarks.evidence.pretrain [--quick] [--print-dir]

The corpus is real text shipped with this machine: the docstrings of Debian's Python 3.11 standard
library (benchmarks/evidence/corpus.py), one index entry per function/class/method, repeated (the facts
the tasks ask about), plus, once each, the rest of those docstrings and the index entries of Debian's
other Python packages (more text of the same kind, so the larger model does not just overfit the index).
5 % of the stdlib entries are held out for perplexity, another 5 % (validation) choose the checkpoint
each model keeps (the best validation loss, checked every `eval_every` steps); the tasks ask about
entries the pretraining saw. Both models see the same token stream in the same order (same seed);
only their size differs. The recipe (settings + the
corpus's hash) is hashed into the cache key, so a changed recipe never reuses a stale pair:
    benchmarks/.work/pairs/<hash>/{slm,llm,tokenizer,pretrain.json}
Deterministic: seeded, one thread (torch.set_num_threads(1)), fixed step counts (never time-based).
Pretraining runs at `nice 10` (it shares the machine; the result does not depend on it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CACHE = os.environ.get("SURGERY_EVIDENCE_CACHE", os.path.join(ROOT, "benchmarks", ".work", "pairs"))

COMMON = dict(model_type="llama", vocab_size=2048, max_position_embeddings=256, tie_word_embeddings=False,
              bos_token_id=3, eos_token_id=1, pad_token_id=0, rms_norm_eps=1e-6)
# SLM: 2 layers x 64 wide (98k non-embedding parameters). LLM: 4 layers x 128 wide (786k, 8x),
# 4 query heads in 2 kv groups, so a bridge has heads and groups to drop. Sized so that both
# pretrain in well under an hour on one shared CPU thread each.
SLM = dict(COMMON, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16)
LLM = dict(COMMON, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, head_dim=32)
# The stdlib index `index_repeats` times per pass (each fact -- which module, what it does -- seen
# over the run: the knowledge the tasks ask for, which the larger model memorises more of) plus ~450k
# tokens of other docstring text (~1.6 passes of the whole stream in 560 steps: each fact ~13 times).
SETTINGS = dict(version=4, corpus="python3.11-stdlib-docstrings+rest+debian-dist-packages", slm=SLM, llm=LLM,
                heldout_share=0.05, valid_share=0.05, index_repeats=8, seq_len=128, batch=32, slm_steps=560,
                llm_steps=560, eval_every=20, lr=3e-3, warmup=40, weight_decay=0.1, seed=0)
QUICK = dict(SETTINGS, slm_steps=20, llm_steps=20, eval_every=10, quick_entries=400, index_repeats=2)


def key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _blocks(tok, docs: list[str], seq_len: int):
    """Concatenate documents (each ended by </s>) and cut the stream into seq_len-token blocks."""
    import torch

    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d)["input_ids"] + [tok.eos_token_id])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def _lm_loss(model, blocks, batch: int) -> float:
    import torch

    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            x = blocks[i:i + batch]
            tot += model(input_ids=x, labels=x).loss.item() * len(x)
            n += len(x)
    return tot / n


def _tagged(log, out_dir):
    name = os.path.basename(out_dir)
    return lambda msg: log(f"[{name}] {msg}", flush=True)


def _train(cfg_dict: dict, train, held, valid, steps: int, s: dict, out_dir: str, tok_dir: str, log) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(1)
    if os.nice(0) < 10:  # a long job on a shared machine yields to interactive work
        os.nice(10 - os.nice(0))
    log = _tagged(log, out_dir)
    cfg = dict(cfg_dict)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(s["seed"])
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"], betas=(0.9, 0.95))
    # Linear warm-up then cosine decay to 10 %: the usual recipe, and it converges in few steps.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / s["warmup"]) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(t, steps) / steps))))
    g = torch.Generator().manual_seed(s["seed"])
    order = torch.randperm(len(train), generator=g)
    t0, pos, curve = time.time(), 0, []
    best = (float("inf"), -1, None)  # (validation loss, step, state dict): the checkpoint kept
    model.train()
    for step in range(steps):
        if pos + s["batch"] > len(order):  # next epoch: a fresh (seeded) permutation
            order, pos = torch.randperm(len(train), generator=g), 0
        x = train[order[pos:pos + s["batch"]]]
        pos += s["batch"]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % s["eval_every"] == 0 or step == steps - 1:
            v = _lm_loss(model, valid, s["batch"])
            if v < best[0]:
                best = (v, step + 1, {k: t.detach().clone() for k, t in model.state_dict().items()})
            h = _lm_loss(model, held, s["batch"]) if (step + 1) % 100 == 0 else None
            curve.append((step + 1, loss.item(), v, h))
            model.train()
            log(f"  step {step + 1:5d}  loss {loss.item():.4f}  validation {v:.4f}  held-out {h}  "
                f"({time.time() - t0:.0f}s)")
    final_held = _lm_loss(model, held, s["batch"])
    model.load_state_dict(best[2])
    held_loss = _lm_loss(model, held, s["batch"])
    model.save_pretrained(out_dir)
    for f in os.listdir(tok_dir):  # each checkpoint dir is self-contained (tokenizer alongside)
        shutil.copy(os.path.join(tok_dir, f), out_dir)
    return dict(parameters=n_params, non_embedding=n_params - n_embed, layers=config.num_hidden_layers,
                hidden=config.hidden_size, steps=steps, kept_step=best[1], valid_loss=best[0], curve=curve,
                tokens_seen=steps * s["batch"] * s["seq_len"], heldout_loss=held_loss, heldout_ppl=math.exp(held_loss),
                final_heldout_loss=final_held, seconds=time.time() - t0)


def recipe(quick: bool = False) -> dict:
    from benchmarks.evidence.corpus import corpus_hash

    return dict(QUICK if quick else SETTINGS, corpus_sha=corpus_hash())


def pretrain(quick: bool = False, force: bool = False, log=print) -> str:
    """Build (or reuse) the cached pair; returns the cache directory."""
    import torch

    import random

    from benchmarks.evidence.corpus import extra_texts, render, split, validation
    from fixtures.build import build_tokenizer

    s = recipe(quick)
    d = os.path.join(CACHE, ("quick-" if quick else "") + key(s))
    if os.path.exists(os.path.join(d, "pretrain.json")) and not force:
        return d
    torch.set_num_threads(1)
    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    seen, unseen = split(s["heldout_share"], s["seed"])
    valid, extra = validation(s["heldout_share"], s["seed"]), list(extra_texts())
    if "quick_entries" in s:
        seen, unseen, valid, extra = seen[: s["quick_entries"]], unseen[:40], valid[:40], extra[:400]
    index = [render(e) for e in seen]
    rng = random.Random(s["seed"])
    docs = list(extra)
    for _ in range(s["index_repeats"]):  # each copy in its own order, so blocks cut the repeats differently
        docs += rng.sample(index, len(index))
    rng.shuffle(docs)
    tok = build_tokenizer(os.path.join(tmp, "tokenizer"), texts=index + extra, vocab_size=SLM["vocab_size"])
    train = _blocks(tok, docs, s["seq_len"])
    held, valid = (_blocks(tok, [render(e) for e in x], s["seq_len"]) for x in (unseen, valid))
    index_tokens = _blocks(tok, index, 1).numel()
    log(f"corpus: {len(index)} index entries ({index_tokens} tokens) x {s['index_repeats']} + {len(extra)} other "
        f"texts: {train.numel()} training tokens; {held.numel()} held-out, {valid.numel()} validation tokens")
    out = dict(settings=s, tokens=train.numel(), index_tokens=index_tokens, extra_texts=len(extra),
               heldout_tokens=held.numel(), valid_tokens=valid.numel(), torch=torch.__version__)
    # the two models train at once, one process and one thread each (deterministic either way)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        futs = {name: pool.submit(_train, cfg, train, held, valid, steps, s, os.path.join(tmp, name),
                                  os.path.join(tmp, "tokenizer"), print)
                for name, cfg, steps in (("slm", SLM, s["slm_steps"]), ("llm", LLM, s["llm_steps"]))}
        for name, f in futs.items():
            out[name] = f.result()
            log(f"{name}: {out[name]['parameters']} parameters ({out[name]['non_embedding']} non-embedding), "
                f"held-out loss {out[name]['heldout_loss']:.4f} (ppl {out[name]['heldout_ppl']:.2f})")
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(out, f, indent=1)
    shutil.rmtree(d, ignore_errors=True)
    os.rename(tmp, d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny pair in seconds (smoke runs)")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--print-dir", action="store_true", help="print only the cache directory")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = pretrain(quick=a.quick, force=a.force, log=(lambda *_: None) if a.print_dir else print)
    print(d)


if __name__ == "__main__":
    main()
