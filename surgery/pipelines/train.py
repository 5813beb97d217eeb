"""`surgery train`: parameter-efficient tuning of a (small) model — step 1 of Algorithm 1 (Jin et al., 2023).

Load the base, wrap it with the method (its kind in surgery.kinds: peft's layers, hooked bottleneck
adapters, or bias-only), train with the shared loop, save the adapter atomically. The base weights are frozen; only the method's parameters get gradients.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..io.writer import OutputDir
from ..kinds import get
from ..kinds.base import MethodOptions
from ..train.data import MAX_LENGTH, load_examples
from ..train.loop import TrainConfig, fit, is_main_process, place
from ..train.methods import load_base


def train_adapter(model_dir: str, data: str, out: str, *, method: str = "lora", eval_data: str | None = None,
                  max_length: int = MAX_LENGTH, force: bool = False, cfg: TrainConfig | None = None,
                  opts: MethodOptions | None = None, placement=None, plot: str | None = None, **options) -> dict:
    """Train an adapter for `model_dir` on `data` (JSONL) and write it to `out`; returns a summary.

    cfg: the loop's settings (TrainConfig); opts: the method's (MethodOptions: rank, alpha, targets, ...),
    single fields overridable as keywords (rank=4); placement: dtype and device of the base model
    (surgery.io.model.Placement; default auto); plot: also draw the loss curves to this PNG (surgery.plot.loss)."""
    import torch

    cfg = cfg or TrainConfig()
    cfg.check()
    kind = get(method, "train")  # an unknown or untrainable method is refused before any loading
    opts = replace(opts or MethodOptions(), **options, seed=cfg.seed)
    inputs = [model_dir, data] + ([eval_data] if eval_data else [])
    if plot:
        from .. import plot as plots

        plots.check(plot, force, inputs=inputs, output=out)
    with OutputDir(out, inputs=inputs, force=force) as od:  # refuse a bad output before any work
        model, tok, arch = load_base(model_dir, placement)
        seq2seq = bool(model.config.is_encoder_decoder)
        train_ex = load_examples(data, tok, seq2seq=seq2seq, max_length=max_length)
        eval_ex = load_examples(eval_data, tok, seq2seq=seq2seq, max_length=max_length) if eval_data else None
        torch.manual_seed(cfg.seed)  # peft initialises A (LoRA) and prompts randomly
        model = place(kind.wrap(model, arch, opts), placement)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        before, hist, after = fit(model, tok, train_ex, eval_ex, cfg, seq2seq=seq2seq)
        if not is_main_process():  # data-parallel workers: the main process writes the one output
            od.abort()
            return {}
        kind.save(model, od, os.path.abspath(model_dir), opts)
        od.write_json("training.json", {"method": kind.name, **kind.training_record(opts), "data": os.path.abspath(data),
                                        "eval_data": os.path.abspath(eval_data) if eval_data else None,
                                        "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr,
                                        "batch_size": cfg.batch_size, "trainable": trainable,
                                        "before": before, "after": after, "history": hist.as_dict()})
        path = od.commit()
    if plot:
        plots.loss_curves(plot, hist.as_dict(), before, "eval" if eval_ex else "train",
                          f"train {kind.name} on {arch.family}: {os.path.basename(path)}")
    return {"output": path, "plot": plot, "method": kind.name, "family": arch.family, "trainable": trainable, "parameters": total,
            "steps": hist.steps, "device": hist.device, "mixed_precision": hist.mixed_precision,
            "evaluated_on": "eval" if eval_ex else "train", "before": before, "after": after}
