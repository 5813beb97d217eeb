"""The forward-only training loop of `surgery refine`: MeZO steps (surgery.ops.mezo) over seeded batches.

The counterpart of surgery.train.loop for a model whose gradients we refuse to compute: no
autograd anywhere (every forward runs under torch.inference_mode, no parameter requires grad), no
optimizer state, dropout off (L₊ and L₋ must see the same function), so the memory is that of
inference on the model plus one parameter-sized direction tensor.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from ..errors import DataError, NumericsError, check_ranges
from .data import collate, pad_id_of
from .loop import History, _progress
from .score import batch_nll, evaluate_examples


@dataclass
class RefineConfig:
    """Defaults (docs/refine.md says why): lr 1e-4 and ε 1e-3 (MeZO's LoRA setting; 1e-3 diverged in
    issue 16's runs), 1500 steps of batch 16 (3000 forward passes: on the evidence pair the dev
    loss still falls after 500 steps, and 1500 gain ~3 points of accuracy over 500); with an eval
    set, an evaluation every 50 steps, and a worse one than the best so far restores the best state and halves lr (the stable lr depends
    on the model and adapter, so the default only has to be right within a few halvings)."""

    steps: int = 1500
    lr: float = 1e-4
    eps: float = 1e-3
    batch_size: int = 16
    directions: int = 1  # SPSA estimates averaged per step (2 forward passes each)
    seed: int = 0
    log_every: int = 25  # steps per train_loss record (the mean of (L₊+L₋)/2 over them)
    eval_every: int = 50  # steps between evaluations on the eval set (0: only before and after)
    keep_best: bool = True  # write the evaluated state (input, every eval, last) with the lowest loss
    backoff: float = 0.5  # keep_best: an evaluation worse than the best restores it and multiplies lr by this (1: off)
    progress: bool | None = None  # None = only on a terminal

    def check(self) -> None:
        check_ranges((("--steps", self.steps, self.steps >= 1), ("--batch-size", self.batch_size, self.batch_size >= 1),
                      ("--directions", self.directions, self.directions >= 1),
                      ("--lr", self.lr, self.lr > 0), ("--eps", self.eps, self.eps > 0),
                      ("--log-every", self.log_every, self.log_every >= 1),
                      ("--eval-every", self.eval_every, self.eval_every >= 0),
                      ("--backoff", self.backoff, 0 < self.backoff <= 1)),
                     {"--eval-every": "pass 0 (before and after only) or a positive number of steps",
                      "--backoff": "pass a factor in (0, 1]: 0.5 halves lr, 1 never changes it"})


def batches(n: int, batch_size: int, seed: int):
    """Endless seeded shuffles of range(n), cut into batches (the last partial batch of a pass is kept)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, batch_size):
            yield order[i:i + batch_size]


def batch_loss(model, batch: dict, seq2seq: bool) -> float:
    """Token-weighted mean NLL of one batch, the loss `surgery eval` reports (surgery.train.score),
    through the trainer's batch_nll: the LM head runs a chunk of labelled tokens at a time, so a
    forward never holds [batch, seq, vocab] logits (at a 32k vocabulary and 4 x 256 tokens, 131 MB
    in float32 on top of inference), and without a key/value cache (nothing is generated)."""
    nll, n = batch_nll(model, batch, seq2seq, use_cache=False)
    return float(nll) / max(n, 1)


def mezo_loop(model, params, train_examples, cfg: RefineConfig, *, pad_id: int, seq2seq: bool,
              eval_examples=None, on_eval=None) -> History:
    """Run cfg.steps MeZO steps on `params` (tensors of `model`, updated in place); returns the history.

    Every parameter of `model` must already have requires_grad False; params are the adapter's.
    on_eval(step, metrics) is called after each periodic evaluation (cfg.eval_every); when it
    returns a number, that is the learning rate from then on (hist.lr records each change).
    """
    import torch

    from ..ops.mezo import spsa_multi_step, step_seeds  # lazy: ops.mezo needs torch at import

    if not train_examples:
        raise DataError("no training examples", "pass a non-empty JSONL file")
    if not params:
        raise DataError("the adapter has no parameters to tune", "pass an adapter with weights")
    if any(p.requires_grad for p in model.parameters()):
        raise RuntimeError("mezo_loop needs a model without trainable parameters (requires_grad_(False) first)")
    cfg.check()
    device = params[0].device
    model.eval()  # dropout off: L₊ and L₋ must be two evaluations of one deterministic function
    hist = History(device=str(device), mixed_precision="no")
    hist.lr = [(0, cfg.lr)]  # (step, lr from the next step on)
    lr = cfg.lr
    per_step = cfg.directions
    seeds = step_seeds(cfg.seed, cfg.steps * per_step)
    order = batches(len(train_examples), cfg.batch_size, cfg.seed)

    def run_eval(step):
        if eval_examples:
            m = evaluate_examples(model, eval_examples, batch_size=cfg.batch_size, pad_id=pad_id, seq2seq=seq2seq)
            hist.evals.append((step, m))
            new_lr = on_eval(step, m) if on_eval else None
            if new_lr is not None:
                nonlocal lr
                lr = new_lr
                hist.lr.append((step, lr))
            return m
        return None

    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    running, count = 0.0, 0
    with _progress(show, cfg.steps) as bar, torch.inference_mode():
        for step in range(1, cfg.steps + 1):
            idx = next(order)
            batch = {k: v.to(device) for k, v in collate([train_examples[i] for i in idx], pad_id, seq2seq).items()}
            lp, lm, g = spsa_multi_step(params, lambda: batch_loss(model, batch, seq2seq), seeds[(step - 1) * per_step:step * per_step],
                                         lr, cfg.eps)
            if not math.isfinite(g):
                raise NumericsError(f"the loss became non-finite at step {step} (L+ {lp}, L- {lm})",
                                    "lower --lr or --eps; nothing was written")
            running += (lp + lm) / 2
            count += 1
            metrics = None
            if step % cfg.log_every == 0 or step == cfg.steps:
                hist.train_loss.append((step, running / count))
                running, count = 0.0, 0
            if cfg.eval_every and step % cfg.eval_every == 0:
                metrics = run_eval(step)
            bar(step, (lp + lm) / 2, metrics)
    hist.steps = cfg.steps
    return hist


def mezo_fit(model, params, tokenizer, train_examples, eval_examples, cfg: RefineConfig, *, seq2seq: bool):
    """Measure, refine, measure: (before, history, after, kept) on the eval set (else the training set).

    MeZO's steps are noisy and a too-large lr drifts upward instead of failing loudly, so with
    cfg.keep_best the parameters end at the evaluated state with the lowest loss: the input (step
    0), a periodic evaluation, or the last step. `kept` is that step; `after` measures what is kept.
    A periodic evaluation worse than the best so far also restores the best state and multiplies
    lr by cfg.backoff. Keeping a state costs one copy of the adapter (on the CPU), never of the LLM.
    """
    import torch

    pad = pad_id_of(tokenizer, model.config)
    on = eval_examples or train_examples

    def measure():
        return evaluate_examples(model, on, batch_size=cfg.batch_size, pad_id=pad, seq2seq=seq2seq)

    def snapshot():
        return [p.detach().to("cpu", copy=True) for p in params]

    before = measure()
    best = {"loss": before["loss"], "step": 0, "state": snapshot() if cfg.keep_best else None, "metrics": before}

    def restore():
        with torch.no_grad():
            for p, s in zip(params, best["state"]):
                p.copy_(s)

    def consider(step, m):
        if not cfg.keep_best:
            return None
        if m["loss"] < best["loss"]:
            best.update(loss=m["loss"], step=step, state=snapshot(), metrics=m)
            return None
        if cfg.backoff < 1 and step < cfg.steps:  # back to the best state, on with a smaller step
            restore()
            lr[0] *= cfg.backoff
            return lr[0]
        return None

    lr = [cfg.lr]

    hist = mezo_loop(model, params, train_examples, cfg, pad_id=pad, seq2seq=seq2seq, eval_examples=eval_examples,
                     on_eval=consider)
    after = hist.evals[-1][1] if hist.evals and hist.evals[-1][0] == cfg.steps else measure()
    if not cfg.keep_best or after["loss"] < best["loss"]:
        return before, hist, after, cfg.steps
    restore()
    return before, hist, best["metrics"], best["step"]
