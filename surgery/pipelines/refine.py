"""`surgery refine`: forward-only tuning of an LLM's adapter on the LLM itself (MeZO; surgery.ops.mezo).

The optional last stage of Algorithm 1 (Jin, Zhang & Zong, 2023): after transfer and tune-bridge,
the adapter is plugged into the LLM and tuned there with two forward passes per step and no
gradient of anything, so the memory is that of inference on the LLM. The LLM's weights are frozen
and never written; OUT is the adapter in the input's own format (a PEFT directory: LoRA, DoRA, LoKr,
(IA)³; or AdapterHub's bottleneck layout), with refine.json beside it (settings, loss per logging step, evaluations).

The adapter's kind (surgery.kinds) puts the saved adapter on the LLM, names its tensors and writes
them back (Kind.tunable / Kind.save_tuned); kinds list "refine" in their commands when they can.
"""

from __future__ import annotations

import os

from ..io.allocator import return_freed_memory
from ..io.writer import OutputDir
from ..kinds import kind_of
from ..train.data import MAX_LENGTH, load_examples
from ..train.layers import describe, parse_layers, resolve_layers, select
from ..train.loop import place
from ..train.methods import load_base
from ..train.zeroth import RefineConfig, mezo_fit

__all__ = ["RefineConfig", "refine"]


def refine(adapter_dir: str, llm_dir: str, data: str, out: str, *, eval_data: str | None = None,
           max_length: int = MAX_LENGTH, force: bool = False, cfg: RefineConfig | None = None, placement=None,
           layers: str | None = None) -> dict:
    """Tune `adapter_dir` on the LLM `llm_dir` with MeZO on `data` (JSONL); write the adapter to `out`.

    Returns a summary: before/after metrics (on eval_data, else the training data), the loss
    history, parameter counts. `out` also gets refine.json with the same history.
    placement: the LLM's dtype and device (surgery.io.model.Placement; default auto, as for train).
    layers: --layers SPEC (surgery.train.layers): only the adapter tensors of these LLM layers are
    perturbed and updated, the others are written back as read; None or "all": every tensor.
    """
    cfg = cfg or RefineConfig()
    cfg.check()
    parsed = parse_layers(layers)  # a malformed spec is refused before any loading
    kind = kind_of(adapter_dir, "refine")  # an unsupported kind is refused before any loading
    adapter_dir = os.path.abspath(adapter_dir)
    inputs = [adapter_dir, llm_dir, data] + ([eval_data] if eval_data else [])
    with OutputDir(out, inputs=inputs, force=force) as od:  # refuse a bad output before any work
        # thousands of forwards allocate and free activations: without this, glibc keeps the freed ones
        # resident and refine's RSS creeps above inference's (docs/benchmarks.md, "refine: MeZO ...")
        return_freed_memory()
        model, tok, arch = load_base(llm_dir, placement)
        seq2seq = bool(model.config.is_encoder_decoder)
        train_ex = load_examples(data, tok, seq2seq=seq2seq, max_length=max_length)
        eval_ex = load_examples(eval_data, tok, seq2seq=seq2seq, max_length=max_length) if eval_data else None
        model.requires_grad_(False)
        chosen = resolve_layers(parsed, arch, adapter_dir)
        wrapped, every = kind.tunable(model, adapter_dir, arch)
        params = every if chosen is None else select(every, kind.tunable_layers(wrapped, every, arch), chosen, layers)
        wrapped = place(wrapped, placement)
        before, hist, after, kept = mezo_fit(wrapped, params, tok, train_ex, eval_ex, cfg, seq2seq=seq2seq)
        trainable, adapter_total = sum(p.numel() for p in params), sum(p.numel() for p in every)
        kind.save_tuned(od, adapter_dir, wrapped, model.config.to_dict(), arch)
        od.write_json("refine.json", {"method": "mezo", "kind": kind.name, "adapter": adapter_dir,
                                      "llm": os.path.abspath(llm_dir), "data": os.path.abspath(data),
                                      "eval_data": os.path.abspath(eval_data) if eval_data else None,
                                      "seed": cfg.seed, "steps": cfg.steps, "lr": cfg.lr, "eps": cfg.eps,
                                      "batch_size": cfg.batch_size, "max_length": max_length,
                                      "eval_every": cfg.eval_every, "keep_best": cfg.keep_best, "backoff": cfg.backoff,
                                      "kept_step": kept, "lr_schedule": hist.lr,
                                      "layers": describe(chosen), "trainable": trainable,
                                      "adapter_parameters": adapter_total,
                                      "before": before, "after": after, "history": hist.as_dict()})
        path = od.commit()
    return {"output": path, "kind": kind.name, "family": arch.family, "trainable": trainable,
            "adapter_parameters": adapter_total, "layers": describe(chosen),
            "llm_parameters": sum(p.numel() for p in wrapped.parameters()) - adapter_total, "steps": hist.steps,
            "device": hist.device,
            "evaluated_on": "eval" if eval_ex else "train", "kept_step": kept, "lr_schedule": hist.lr, "before": before, "after": after,
            "history": hist.as_dict()}
