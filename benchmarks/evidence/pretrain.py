"""Pretrain a same-family pair (small and large llama LMs, one tokenizer) from scratch, offline.

    python -m benchmarks.evidence.pretrain [--quick] [--print-dir]

The corpus is fixtures/world.py: templated English plus a fixed world of named people whose facts
must be memorised (so the larger model has something to be better at). Both models see the same
token stream in the same order (same seed); only their size differs. Settings are hashed into the
cache key, so a changed setting never reuses a stale pair:
    ~/.cache/surgery-evidence/<hash>/{slm,llm,tokenizer,pretrain.json}
Deterministic: seeded, one thread (torch.set_num_threads(1)), fixed step counts (never time-based).
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

CACHE = os.path.expanduser(os.environ.get("SURGERY_EVIDENCE_CACHE", "~/.cache/surgery-evidence"))

COMMON = dict(model_type="llama", vocab_size=512, max_position_embeddings=128, tie_word_embeddings=False,
              bos_token_id=3, eos_token_id=1, pad_token_id=0, rms_norm_eps=1e-6)
# SLM: 2 layers x 48 wide. LLM: 4 layers x 128 wide (2x the depth, ~8x the parameters).
SLM = dict(COMMON, hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=12)
LLM = dict(COMMON, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, head_dim=32)
# 1500 people with fixed facts, 70 % of sentences about them: too many facts for the SLM to hold,
# which is what makes the LLM better (with 96 people both models memorised everything, same loss).
SETTINGS = dict(version=2, slm=SLM, llm=LLM, docs=12000, heldout=400, seq_len=64, batch=32,
                slm_steps=1000, llm_steps=1000, lr=3e-3, warmup=60, seed=0, people=1500, fact_share=0.7)
QUICK = dict(SETTINGS, docs=800, heldout=50, slm_steps=30, llm_steps=30)


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
    log = _tagged(log, out_dir)
    cfg = dict(cfg_dict)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(s["seed"])
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    # Linear warm-up then cosine decay to 10 %: the usual recipe, and it converges in few steps.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / s["warmup"]) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(t, steps) / steps))))
    g = torch.Generator().manual_seed(s["seed"])
    order = torch.randperm(len(train), generator=g)
    t0, pos = time.time(), 0
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
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)")
    held_loss = _lm_loss(model, held, s["batch"])
    model.save_pretrained(out_dir)
    for f in os.listdir(tok_dir):  # each checkpoint dir is self-contained (tokenizer alongside)
        shutil.copy(os.path.join(tok_dir, f), out_dir)
    return dict(parameters=n_params, layers=config.num_hidden_layers, hidden=config.hidden_size,
                steps=steps, heldout_loss=held_loss, heldout_ppl=math.exp(held_loss), seconds=time.time() - t0)


def pretrain(quick: bool = False, force: bool = False, log=print) -> str:
    """Build (or reuse) the cached pair; returns the cache directory."""
    import torch

    from fixtures.build import build_tokenizer
    from fixtures.world import documents, world

    s = QUICK if quick else SETTINGS
    d = os.path.join(CACHE, ("quick-" if quick else "") + key(s))
    if os.path.exists(os.path.join(d, "pretrain.json")) and not force:
        return d
    torch.set_num_threads(1)
    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    people = world(s["people"])
    docs = documents(s["docs"], seed=s["seed"], fact_share=s["fact_share"], people=people)
    held_docs = documents(s["heldout"], seed=s["seed"] + 1, fact_share=s["fact_share"], people=people)
    tok = build_tokenizer(os.path.join(tmp, "tokenizer"), texts=docs[:4000], vocab_size=SLM["vocab_size"])
    train, held = _blocks(tok, docs, s["seq_len"]), _blocks(tok, held_docs, s["seq_len"])
    log(f"corpus: {len(docs)} documents, {train.numel()} training tokens, {held.numel()} held-out tokens")
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
            log(f"{name}: {out[name]['parameters']} parameters, held-out loss {out[name]['heldout_loss']:.4f}")
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
