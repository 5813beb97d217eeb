"""Models and parameter-efficient methods for training: load a base, wrap it, save what was learned.

LoRA, LoKr, prompt and prefix tuning are peft's own layers (configs built here, nothing
re-implemented). BitFit (Ben Zaken et al., 2022) trains only the bias vectors; it is saved as a
PEFT-free `bitfit.safetensors` holding the trained biases under their checkpoint names.
Which layers are linear, and whether they are stored transposed (GPT-2's Conv1D), comes from the
family map, so no code here knows a family by name.
"""

from __future__ import annotations

import os

from ..errors import AdapterError, CheckpointError

METHODS = ("lora", "prompt", "prefix", "lokr", "bitfit")
BITFIT_FILE = "bitfit.safetensors"
BITFIT_META = "bitfit.json"


def load_base(model_dir: str, dtype=None):
    """(model, tokenizer, arch) for a checkpoint directory; the model in float32 unless told."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from ..arch import arch_of
    from ..io.checkpoint import Checkpoint

    ck = Checkpoint.open(model_dir)  # checks the directory and gives a clear error first
    arch = arch_of(ck)
    config = AutoConfig.from_pretrained(ck.path)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(ck.path, dtype=dtype or torch.float32)
    try:
        tok = AutoTokenizer.from_pretrained(ck.path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ck.path} has no usable tokenizer ({e})",
                              "copy the tokenizer files (tokenizer.json, tokenizer_config.json) next to config.json") from e
    return model, tok, arch


def default_targets(arch) -> list[str]:
    """Every linear layer inside the layer stacks (not the LM head), as module-name suffixes."""
    names = set()
    for t in arch.linears():
        if t.stack is not None:
            names.add(t.module[len(arch.spec["stacks"][t.stack]["prefix"].format(i=t.layer)):])
    return sorted(names)


def targeted(arch, targets: list[str]):
    """The family map's linear tensors that these target suffixes select."""
    hits = [t for t in arch.linears() if any(t.module == s or t.module.endswith("." + s) for s in targets)]
    if not hits:
        raise AdapterError(f"--targets {','.join(targets)} match no linear layer of this {arch.family} model",
                           f"choose among {', '.join(default_targets(arch))}")
    return hits


def wrap(model, arch, method: str, *, rank: int = 8, alpha: float | None = None, targets=None,
         virtual_tokens: int = 8, seed: int = 0):
    """Return the model with only the method's parameters trainable (a PeftModel, or the model for bitfit)."""
    import torch

    if method not in METHODS:
        raise AdapterError(f"unknown method {method!r}", f"choose one of {', '.join(METHODS)}")
    torch.manual_seed(seed)  # peft initialises A (LoRA) and prompts randomly
    if method == "bitfit":
        return _bitfit(model, arch)
    import peft

    task = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    if method in ("prompt", "prefix"):
        cls = peft.PromptTuningConfig if method == "prompt" else peft.PrefixTuningConfig
        cfg = cls(task_type=task, num_virtual_tokens=virtual_tokens)
    else:
        targets = list(targets) if targets else default_targets(arch)
        hits = targeted(arch, targets)
        transposed = [t.module for t in hits if t.transposed]
        alpha = float(alpha if alpha is not None else 2 * rank)
        if method == "lokr":
            if transposed:
                raise AdapterError(f"{transposed[0]} is stored transposed (a Conv1D layer), which peft's LoKr cannot wrap",
                                   "use --method lora on this model, or target only nn.Linear layers")
            cfg = peft.LoKrConfig(task_type=task, r=rank, alpha=alpha, target_modules=targets)
        else:
            # fan_in_fan_out tells peft the base weight is [in, out]; the map knows which layers are.
            cfg = peft.LoraConfig(task_type=task, r=rank, lora_alpha=alpha, target_modules=targets,
                                  lora_dropout=0.0, fan_in_fan_out=bool(transposed))
    return peft.get_peft_model(model, cfg)


def _bitfit(model, arch):
    names = set(bias_names(model))
    if not names:
        raise AdapterError(f"this {arch.family} model has no bias parameters, so BitFit has nothing to train",
                           "use --method lora (or a model built with biases)")
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return model


def bias_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if n.endswith(".bias") and p.ndim == 1]


def save(model, out, *, method: str, base: str) -> None:
    """Write what was learned into the OutputDir: a PEFT adapter, or bitfit.safetensors + bitfit.json."""
    if method == "bitfit":
        from safetensors.torch import save_file

        from ..io.writer import check_finite

        tensors = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                check_finite(n, p)
                tensors[n] = p.detach().float().contiguous().cpu()
        save_file(dict(sorted(tensors.items())), out.path(BITFIT_FILE), metadata={"format": "pt"})
        out.write_json(BITFIT_META, {"format": "surgery.bitfit/1", "method": "bitfit", "base_model_name_or_path": base,
                                     "tensors": sorted(tensors)})
        return
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(out.tmp)


def attach(model, adapter_dir: str):
    """Put a saved adapter (PEFT or BitFit) on a loaded base model, for evaluation."""
    if os.path.exists(os.path.join(adapter_dir, BITFIT_FILE)):
        import torch
        from safetensors.torch import load_file

        sd = load_file(os.path.join(adapter_dir, BITFIT_FILE))
        params = dict(model.named_parameters())
        missing = [k for k in sd if k not in params or params[k].shape != sd[k].shape]
        if missing:
            raise AdapterError(f"{adapter_dir}: bias {missing[0]} does not fit this model",
                               "evaluate the BitFit biases on the model they were trained on")
        with torch.no_grad():
            for k, v in sd.items():
                params[k].copy_(v)
        return model
    from peft import PeftModel

    from ..io.adapter import Adapter

    Adapter.open(adapter_dir)  # clear errors for a missing or malformed directory
    try:
        return PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"{adapter_dir} does not fit this model ({str(e).splitlines()[0]})",
                           "evaluate the adapter on the model it was trained or transferred for") from e

