"""Evaluation through the chunked LM head against the full-logits path it replaced, at TinyLlama-1.1B widths.

    flock /tmp/surgery-heavy.lock .venv/bin/python -m benchmarks.eval_memory [--batch 8 --seq 512 --layers 2]

One random Llama with TinyLlama-1.1B's widths (hidden 2048, MLP 5632, 32 heads / 4 kv heads, vocabulary
32000), --layers layers (the head is what differs; the trunk costs the same per layer on both paths),
bf16 weights (std 0.02, seeded), run on the CPU in bf16. One batch of --batch x --seq random tokens,
every token labelled, as a text record is (the chunked path's worst case: no prompt token skips the
head). Three paths, each in its own subprocess so that each peak is its own:

  full     the evaluation before: score.aligned_logits (the model's forward with labels, [b, L, V]
           logits out) + score.token_loss + the argmax of those logits (score.exact_matches)
  chunked  the evaluation now: score.batch_scores' body, the model up to its head (score._at_head)
           + ops/loss.chunked_scores (2^22 logits at a time, labelled positions only)
  exact    the same weights upcast to float64, full float64 logits: the exact loss and argmax

Per path: the largest tensor any op produced (a torch dispatch mode, in a second pass, so it does not
slow the timed one); the working memory, peak RSS during the evaluation minus the RSS before it (the
kernel's high-water mark reset with /proc/self/clear_refs after the model is built); the seconds of
the timed pass; the loss and its relative error against the exact one; and how many of the tokens'
argmaxes equal the float64 model's and the full path's (random weights give near-uniform logits, so
bf16 ties are frequent: the test of "same matmul on fewer rows, same argmax").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("full", "chunked", "exact")


def build(layers: int, dtype):
    """The random bf16 model (identical in every subprocess: same seed, same ops), cast to dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.refine_memory import TINYLLAMA
    from fixtures.build import _config

    torch.manual_seed(0)
    cfg = _config("llama", **TINYLLAMA, num_hidden_layers=layers)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.to(dtype).eval()


def make_batch(batch: int, seq: int, vocab: int) -> dict:
    import torch

    ids = torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def run(path: str, model, batch: dict):
    """(sum NLL, labelled tokens, argmax per labelled position [b, L-1]) of one evaluation batch."""
    import torch

    from surgery.ops.loss import IGNORE, chunked_scores
    from surgery.train import score

    with torch.no_grad():
        if path == "chunked":  # score.batch_scores, less its per-row reduction of pred == labels
            h, labels, head, vocab = score._at_head(model, batch, use_cache=False)
            return chunked_scores(h, labels, head, vocab, post=score.post_head_ops(model))
        logits, labels = score.aligned_logits(model, batch, False)  # what evaluate_examples ran before
        nll, n = score.token_loss(logits, labels)
        score.exact_matches(logits, labels)
        return nll, n, logits.argmax(-1).masked_fill(labels == IGNORE, IGNORE)


def largest_tensor(fn) -> int:
    """Bytes of the largest tensor any op allocates while fn runs (views and in-place results, which
    share an input's storage, allocate nothing: the transposed LM head weight is not counted)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    most = [0]

    def storages(tree):
        return [t.untyped_storage() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {s.data_ptr() for s in storages((args, kwargs))}
            for s in storages(out):
                if s.data_ptr() not in inputs:
                    most[0] = max(most[0], s.nbytes())
            return out

    with Mode():
        fn()
    return most[0]


def child(path: str, a, out: str) -> dict:
    import gc

    import torch
    import transformers

    from benchmarks.refine_memory import rss_mb

    transformers.utils.logging.set_verbosity_error()
    model = build(a.layers, torch.float64 if path == "exact" else torch.bfloat16)
    batch = make_batch(a.batch, a.seq, model.config.vocab_size)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0): building the model is not the evaluation
    before = rss_mb()
    t = time.time()
    nll, n, pred = run(path, model, batch)
    seconds = time.time() - t
    working = rss_mb("VmHWM") - before
    torch.save(pred, out)
    del pred
    gc.collect()
    largest = None if path == "exact" else largest_tensor(lambda: run(path, model, batch))
    return {"path": path, "loss": float(nll) / n, "tokens": n, "seconds": seconds, "working_mb": working,
            "largest_mb": largest / 2**20 if largest is not None else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(ROOT, "benchmarks", ".work", "eval_memory"))
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    if a.child:
        sys.path.insert(0, ROOT)
        print(json.dumps(child(a.child, a, os.path.join(a.work, f"{a.child}.pt"))))
        return
    import torch

    rows = {}
    for path in PATHS:
        cmd = [sys.executable, "-m", "benchmarks.eval_memory", "--child", path, "--batch", str(a.batch),
               "--seq", str(a.seq), "--layers", str(a.layers), "--work", a.work]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"{path} failed:\n{res.stderr[-3000:]}")
        rows[path] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{path}: {rows[path]}", file=sys.stderr)
    pred = {p: torch.load(os.path.join(a.work, f"{p}.pt")) for p in PATHS}
    keep = pred["exact"] != -100
    exact = rows["exact"]["loss"]
    print(f"TinyLlama widths (hidden 2048, MLP 5632, vocab 32000), {a.layers} layers, random bf16 weights, "
          f"batch {a.batch} x {a.seq}, every token labelled ({rows['exact']['tokens']} tokens); "
          f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; exact loss {exact:.6f}\n")
    print("| path | largest tensor MB | working memory MB | seconds | loss | rel. error vs float64 "
          "| rel. difference vs full | argmax = float64's | argmax = full path's |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    total = int(keep.sum())
    for path in ("full", "chunked"):
        r = rows[path]
        same64 = int((pred[path] == pred["exact"])[keep].sum())
        same_full = int((pred[path] == pred["full"])[keep].sum())
        print(f"| {path} | {r['largest_mb']:.1f} | {r['working_mb']:.0f} | {r['seconds']:.1f} | {r['loss']:.6f} "
              f"| {abs(r['loss'] - exact) / exact:.2e} | {abs(r['loss'] - rows['full']['loss']) / rows['full']['loss']:.1e} "
              f"| {same64}/{total} | {same_full}/{total} |")
    f, c = rows["full"], rows["chunked"]
    print(f"\nchunked / full: largest tensor {c['largest_mb'] / f['largest_mb']:.3f}x, working memory "
          f"{c['working_mb'] / f['working_mb']:.2f}x, time {c['seconds'] / f['seconds']:.2f}x")


if __name__ == "__main__":
    main()
