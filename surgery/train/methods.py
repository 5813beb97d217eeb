"""Models and parameter-efficient methods for training: load a base, wrap it, save what was learned.

LoRA, LoKr, prompt and prefix tuning are peft's own layers (configs built here, nothing
re-implemented). BitFit trains only the bias vectors (surgery/train/bitfit.py) and is saved in the
`surgery.bitfit/1` format that extract-bitfit and apply-bitfit use.
Which layers are linear, and whether they are stored transposed (GPT-2's Conv1D), comes from the
family map, so no code here knows a family by name.
"""

from __future__ import annotations


from ..errors import AdapterError, CheckpointError

METHODS = ("lora", "prompt", "prefix", "lokr", "bitfit")


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
        from .bitfit import freeze_to_biases

        return freeze_to_biases(model, arch)
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


def save(model, out, *, method: str, base: str) -> None:
    """Write what was learned into the OutputDir: a PEFT adapter, or bitfit.safetensors + bitfit.json."""
    if method == "bitfit":
        from .bitfit import save_bitfit

        save_bitfit(model, out, base)
        return
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(out.tmp)


def attach(model, adapter_dir: str):
    """Put a saved adapter (PEFT or BitFit) on a loaded base model, for evaluation."""
    from .bitfit import is_bitfit, load_bitfit

    if is_bitfit(adapter_dir):
        return load_bitfit(model, adapter_dir)
    from peft import PeftModel

    from ..io.adapter import Adapter

    Adapter.open(adapter_dir)  # clear errors for a missing or malformed directory
    try:
        return PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"{adapter_dir} does not fit this model ({str(e).splitlines()[0]})",
                           "evaluate the adapter on the model it was trained or transferred for") from e

