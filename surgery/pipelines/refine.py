"""`surgery refine`: forward-only tuning of an LLM's adapter on the LLM itself (MeZO; surgery.ops.mezo).

The optional last stage of Algorithm 1 (Jin, Zhang & Zong, 2023): after transfer and tune-bridge,
the adapter is plugged into the LLM and tuned there with two forward passes per step and no
gradient of anything, so the memory is that of inference on the LLM. The LLM's weights are frozen
and never written; OUT is the adapter in the input's own format (PEFT LoRA directory or AdapterHub
bottleneck layout), with refine.json beside it (settings, loss per logging step, evaluations).

A route per adapter kind says how to put the saved adapter on the LLM, which tensors are its
parameters, and how to write them back.
"""

from __future__ import annotations

import os

from ..errors import AdapterError
from ..train.zeroth import RefineConfig

__all__ = ["RefineConfig", "refine", "open_route"]


class LoraRoute:
    """A PEFT LoRA directory: peft loads it (is_trainable marks exactly the adapter's tensors), the
    tuned tensors are written under the input's keys, config and dtypes."""

    kind = "LoRA"

    def __init__(self, path: str):
        from ..io.adapter import Adapter

        self.ad = Adapter.open(path)
        self.path = self.ad.path
        if self.ad.peft_type != "LORA":
            raise AdapterError(f"{self.path} is a {self.ad.peft_type} adapter; refine tunes LoRA and bottleneck adapters",
                               "pass a LoRA (PEFT) or bottleneck (AdapterHub) adapter")

    def attach(self, model, arch):
        """(model with the adapter, the adapter's parameters in a fixed order)."""
        from peft import PeftModel

        try:
            pm = PeftModel.from_pretrained(model, self.path, is_trainable=True)
        except (RuntimeError, ValueError, KeyError) as e:
            raise AdapterError(f"{self.path} does not fit this LLM ({str(e).splitlines()[0]})",
                               "pass the adapter written for this LLM (by `surgery transfer` or `tune-bridge`)") from e
        params = [p for _, p in sorted(pm.named_parameters()) if p.requires_grad]
        pm.requires_grad_(False)  # no autograd: the adapter is updated in place by MeZO, never by backward
        return pm, params

    def write(self, od, model, llm_config: dict, arch) -> None:
        from peft import get_peft_model_state_dict

        from ..io.adapter import write_adapter

        new = get_peft_model_state_dict(model)
        if set(new) != set(self.ad.tensors):
            extra, missing = sorted(set(new) - set(self.ad.tensors)), sorted(set(self.ad.tensors) - set(new))
            raise AdapterError(f"peft saves other keys than {self.path} holds (missing {missing[:2]}, unexpected {extra[:2]})",
                               "pass a plain LoRA adapter saved by peft")
        # round once to the input's dtype (the tuning ran in the model's dtype)
        write_adapter(od, self.ad.config, {k: new[k].detach().cpu().to(self.ad.tensors[k].dtype) for k in new})


class BottleneckRoute:
    """An AdapterHub bottleneck adapter: hooked into the LLM (surgery.train.bottleneck), written back in AdapterHub's layout."""

    kind = "bottleneck"

    def __init__(self, path: str):
        from ..io.adapterhub import read_adapterhub

        self.ad = read_adapterhub(path)
        self.path = self.ad.path

    def attach(self, model, arch):
        from ..train.bottleneck import WithBottleneck
        from .bottleneck import attach_saved

        wb = WithBottleneck(model, attach_saved(model, arch, self.path))
        params = [p for _, p in sorted(wb.bottleneck.named_parameters())]
        wb.requires_grad_(False)
        return wb, params

    def write(self, od, model, llm_config: dict, arch) -> None:
        from .bottleneck import write_bottleneck

        model.bottleneck.detach()
        dtypes = {m: {k: t.dtype for k, t in w.items()} for m, w in self.ad.modules.items()}
        w = {m: {k: t.cpu().to(dtypes[m][k]) for k, t in ws.items()} for m, ws in model.bottleneck.site_weights().items()}
        write_bottleneck(od, self.ad.name, self.ad.bn, w, llm_config, arch.dims["hidden"], self.ad.base)


def open_route(adapter_dir: str):
    """The route for an adapter directory (AdapterHub layout or PEFT), with its errors for bad input."""
    from ..io.adapterhub import is_adapterhub_dir

    return (BottleneckRoute if is_adapterhub_dir(adapter_dir) else LoraRoute)(adapter_dir)


def refine(adapter_dir: str, llm_dir: str, data: str, out: str, *, eval_data: str | None = None,
           max_length: int = 512, force: bool = False, cfg: RefineConfig | None = None) -> dict:
    """Tune `adapter_dir` on the LLM `llm_dir` with MeZO on `data` (JSONL); write the adapter to `out`.

    Returns a summary: before/after metrics (on eval_data, else the training data), the loss
    history, parameter counts. `out` also gets refine.json with the same history.
    """
    from ..io.writer import OutputDir
    from ..train.data import load_examples
    from ..train.loop import place
    from ..train.methods import load_base
    from ..train.zeroth import mezo_fit

    cfg = cfg or RefineConfig()
    cfg.check()
    route = open_route(adapter_dir)
    inputs = [route.path, llm_dir, data] + ([eval_data] if eval_data else [])
    with OutputDir(out, inputs=inputs, force=force) as od:  # refuse a bad output before any work
        model, tok, arch = load_base(llm_dir)
        seq2seq = bool(model.config.is_encoder_decoder)
        train_ex = load_examples(data, tok, seq2seq=seq2seq, max_length=max_length)
        eval_ex = load_examples(eval_data, tok, seq2seq=seq2seq, max_length=max_length) if eval_data else None
        model.requires_grad_(False)
        wrapped, params = route.attach(model, arch)
        wrapped = place(wrapped)
        before, hist, after, kept = mezo_fit(wrapped, params, tok, train_ex, eval_ex, cfg, seq2seq=seq2seq)
        route.write(od, wrapped, model.config.to_dict(), arch)
        od.write_json("refine.json", {"method": "mezo", "kind": route.kind, "adapter": route.path,
                                      "llm": os.path.abspath(llm_dir), "data": os.path.abspath(data),
                                      "eval_data": os.path.abspath(eval_data) if eval_data else None,
                                      "seed": cfg.seed, "steps": cfg.steps, "lr": cfg.lr, "eps": cfg.eps,
                                      "batch_size": cfg.batch_size, "max_length": max_length,
                                      "eval_every": cfg.eval_every, "keep_best": cfg.keep_best, "kept_step": kept,
                                      "trainable": sum(p.numel() for p in params),
                                      "before": before, "after": after, "history": hist.as_dict()})
        path = od.commit()
    trainable = sum(p.numel() for p in params)
    return {"output": path, "kind": route.kind, "family": arch.family, "trainable": trainable,
            "llm_parameters": sum(p.numel() for p in wrapped.parameters()) - trainable, "steps": hist.steps,
            "device": hist.device,
            "evaluated_on": "eval" if eval_ex else "train", "kept_step": kept, "before": before, "after": after,
            "history": hist.as_dict()}
