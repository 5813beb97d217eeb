"""The small training loop shared by `surgery train` (SLM stage) and `surgery tune-bridge` (bridge stage).

AdamW on the trainable parameters only, gradient-norm clipping, seeded shuffling, periodic evaluation
and a rich progress bar. The loader (surgery/io/model.py) decides dtype and device and place() puts
the model there; accelerate.Accelerator adds bf16 autocast on a GPU and data parallelism under
`accelerate launch`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..errors import DataError, check_ranges
from .data import collate, pad_id_of
from .score import batch_nll, evaluate_examples


@dataclass
class TrainConfig:
    epochs: float = 3.0
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch
    # steps per training-loss record in History.train_loss (the mean over them): 10 draws a curve from
    # the short CPU runs this tool is used for (100 steps: 10 points) and costs nothing on long ones
    log_every: int = 10
    max_steps: int | None = None  # stop early (benchmarks)
    progress: bool | None = None  # None = only on a terminal

    def check(self) -> None:
        """Refuse nonsense settings before any model is loaded."""
        check_ranges((("--log-every", self.log_every, self.log_every >= 1),
                      ("--eval-every", self.eval_every, self.eval_every >= 0)),
                     {"--log-every": "pass a positive number of steps",
                      "--eval-every": "pass a positive number of steps (0: once per epoch)"})


@dataclass
class History:
    """What training.json / tune_bridge.json keep under "history" (docs/formats.md)."""

    steps: int = 0
    train_loss: list = field(default_factory=list)  # (step, mean loss since the last record), every log_every steps and at the end
    evals: list = field(default_factory=list)  # (step, metrics dict)
    device: str = "cpu"
    mixed_precision: str = "no"
    log_every: int = 0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "device": self.device, "mixed_precision": self.mixed_precision,
                "log_every": self.log_every, "train_loss": self.train_loss,
                "evals": [{"step": s, **m} for s, m in self.evals]}


def make_accelerator(model=None):
    """bf16 autocast on GPU, plain float32 on CPU (bf16 matmuls on CPU are slow and inexact).

    The model is already where place() put it, so the accelerator moves neither it nor the batches
    (the loop sends each batch to the model's input device).
    """
    import torch
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available() or (model is not None and input_device(model).type == "cpu")
    return Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16", device_placement=False)


def input_device(model):
    """Where a batch goes: the device of the model's first parameter (a dispatched model's hooks do the rest)."""
    return next(model.parameters()).device


def place(model, placement=None):
    """Put the model where it runs: left alone when accelerate dispatched it (--device-map) or the
    loader put it on --device; else this process's device (its GPU under `accelerate launch`, the CPU)."""
    from accelerate import PartialState

    if getattr(model, "hf_device_map", None) or (placement is not None and (placement.device or placement.device_map)):
        return model
    return model.to(PartialState().device)


def is_main_process() -> bool:
    """Only one process writes outputs under `accelerate launch`."""
    from accelerate import PartialState

    return PartialState().is_main_process


def train_loop(model, train_examples, cfg: TrainConfig, *, pad_id: int, seq2seq: bool, eval_examples=None,
               accelerator=None) -> History:
    """Train `model` in place (only parameters with requires_grad) and return its history."""
    import math

    import torch
    from accelerate.utils import set_seed

    if not train_examples:
        raise DataError("no training examples", "pass a non-empty JSONL file")
    set_seed(cfg.seed)
    acc = accelerator or make_accelerator(model)
    device = input_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DataError("the model has no trainable parameters", "wrap it with a parameter-efficient method first")
    g = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(train_examples, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                         collate_fn=lambda b: collate(b, pad_id, seq2seq))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, opt, loader = acc.prepare(model, opt, loader)
    steps_per_epoch = len(loader)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    eval_every = cfg.eval_every or steps_per_epoch
    hist = History(device=str(device), mixed_precision=str(acc.mixed_precision), log_every=cfg.log_every)

    def run_eval(step):
        if eval_examples:
            m = evaluate_examples(acc.unwrap_model(model), eval_examples, batch_size=cfg.batch_size,
                                  pad_id=pad_id, seq2seq=seq2seq)
            hist.evals.append((step, m))
            return m
        return None

    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    show = show and acc.is_main_process
    with _progress(show, total) as bar:
        model.train()
        step, running, count = 0, 0.0, 0
        while step < total:
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                # a causal LM's loss goes through its head a chunk of tokens at a time (ops/loss.py):
                # the backward never holds the [tokens, vocabulary] logits
                with acc.autocast():  # the head runs after the model's forward: keep it under the same autocast
                    nll, n = batch_nll(model, batch, seq2seq, unwrapped=acc.unwrap_model(model))
                loss = nll / max(n, 1)
                acc.backward(loss)
                if cfg.max_grad_norm:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                value = float(loss.detach())
                running += value
                count += 1
                if step % cfg.log_every == 0 or step == total:
                    hist.train_loss.append((step, running / count))
                    running, count = 0.0, 0
                    value = hist.train_loss[-1][1]  # the bar shows the smoothed loss when there is one
                m = run_eval(step) if step % eval_every == 0 or step == total else None
                bar(step, value, m)
                if step >= total:
                    break
    hist.steps = step
    acc.wait_for_everyone()
    return hist


def fit(model, tokenizer, train_examples, eval_examples, cfg: TrainConfig, *, seq2seq: bool):
    """Measure, train, measure: (before, history, after), measured on the eval set (else the training set)."""
    pad = pad_id_of(tokenizer, model.config)
    measure_on = eval_examples or train_examples

    def measure():
        return evaluate_examples(model, measure_on, batch_size=cfg.batch_size, pad_id=pad, seq2seq=seq2seq)

    before = measure()
    hist = train_loop(model, train_examples, cfg, pad_id=pad, seq2seq=seq2seq, eval_examples=eval_examples)
    return before, hist, measure()


class _progress:
    """A rich bar with the latest loss (and eval loss/accuracy); silent when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda *a: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[info]}"), console=Console(stderr=True))
        self.p.__enter__()
        self.task = self.p.add_task("train", total=self.total, info="")
        self.last_eval = ""

        def update(step, loss, metrics):
            if metrics:
                a = metrics.get("accuracy")
                self.last_eval = f" eval {metrics['loss']:.3f}" + (f" acc {a:.1%}" if a is not None else "")
            self.p.update(self.task, completed=step, info=f"loss {loss:.3f}{self.last_eval}")

        return update

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False
