"""Pretrain a same-family pair (small and large llama LMs, one tokenizer) from scratch, offline.

    python -m benchmarks.evidence.pretrain [--quick] [--print-dir]

The corpus is real text shipped with this machine: the docstrings of Debian's Python 3.11 standard
library (benchmarks/evidence/corpus.py), one index entry per function/class/method. 5 % of the entries
are held out for perplexity; the tasks ask about entries the pretraining saw. Both models see the same
token stream in the same order (same seed); only their size differs. The recipe (settings + the
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
# ~12 passes over the entries: each fact (which module, what it does) is seen ~12 times, which
# the larger model memorises much more of; that is the knowledge the tasks ask for.
SETTINGS = dict(version=3, corpus="python3.11-stdlib-docstrings", slm=SLM, llm=LLM, heldout_share=0.05,
                seq_len=128, batch=32, slm_steps=400, llm_steps=400, lr=3e-3, warmup=40, weight_decay=0.1, seed=0)
QUICK = dict(SETTINGS, slm_steps=20, llm_steps=20, quick_entries=400)


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


def _train(cfg_dict: dict, train, held, steps: int, s: dict, out_dir: str, tok_dir: str, log) -> dict:
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
        if step % 50 == 0 or step == steps - 1:
            curve.append((step, loss.item(), _lm_loss(model, held, s["batch"]) if step % 100 == 0 else None))
            model.train()
            log(f"  step {step:5d}  loss {loss.item():.4f}  held-out {curve[-1][2]}  ({time.time() - t0:.0f}s)")
    held_loss = _lm_loss(model, held, s["batch"])
    model.save_pretrained(out_dir)
    for f in os.listdir(tok_dir):  # each checkpoint dir is self-contained (tokenizer alongside)
        shutil.copy(os.path.join(tok_dir, f), out_dir)
    return dict(parameters=n_params, non_embedding=n_params - n_embed, layers=config.num_hidden_layers,
                hidden=config.hidden_size, steps=steps, curve=curve, tokens_seen=steps * s["batch"] * s["seq_len"], heldout_loss=held_loss, heldout_ppl=math.exp(held_loss), seconds=time.time() - t0)


def recipe(quick: bool = False) -> dict:
    from benchmarks.evidence.corpus import corpus_hash

    return dict(QUICK if quick else SETTINGS, corpus_sha=corpus_hash())


def pretrain(quick: bool = False, force: bool = False, log=print) -> str:
    """Build (or reuse) the cached pair; returns the cache directory."""
    import torch

    from benchmarks.evidence.corpus import render, split
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
    if "quick_entries" in s:
        seen, unseen = seen[: s["quick_entries"]], unseen[:40]
    docs, held_docs = [render(e) for e in seen], [render(e) for e in unseen]
    tok = build_tokenizer(os.path.join(tmp, "tokenizer"), texts=docs, vocab_size=SLM["vocab_size"])
    train, held = _blocks(tok, docs, s["seq_len"]), _blocks(tok, held_docs, s["seq_len"])
    log(f"corpus: {len(docs)} entries, {train.numel()} training tokens, {held.numel()} held-out tokens")
    out = dict(settings=s, tokens=train.numel(), heldout_tokens=held.numel(), torch=torch.__version__)
    # the two models train at once, one process and one thread each (deterministic either way)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        futs = {name: pool.submit(_train, cfg, train, held, steps, s, os.path.join(tmp, name),
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
