"""Models and parameter-efficient methods for training: load a base, wrap it, save what was learned.

LoRA, LoKr, prompt and prefix tuning are peft's own layers (configs built here, nothing
re-implemented). Bottleneck adapters (`adapter`: Houlsby / Pfeiffer) are hooked in by
surgery/train/bottleneck.py and saved in AdapterHub's layout (docs/adapters.md). BitFit trains only the bias vectors (surgery/train/bitfit.py) and is saved in the
`surgery.bitfit/1` format that extract-bitfit and apply-bitfit use.
Which layers are linear, and whether they are stored transposed (GPT-2's Conv1D), comes from the
family map, so no code here knows a family by name.
"""

from __future__ import annotations


from ..errors import AdapterError, CheckpointError

METHODS = ("lora", "prompt", "prefix", "lokr", "bitfit", "adapter")
ADAPTER_NAME = "adapter"  # the AdapterHub adapter name train writes (a fixed name keeps outputs byte-identical)


def load_base(model_dir: str, dtype=None):
    """(model, tokenizer, arch) for a checkpoint directory; the model in float32 unless told."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ..arch import arch_of
    from ..io.checkpoint import Checkpoint
    from ..io.tokenizer import load_tokenizer

    ck = Checkpoint.open(model_dir)  # checks the directory and gives a clear error first
    arch = arch_of(ck)
    config = AutoConfig.from_pretrained(ck.path)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(ck.path, dtype=dtype or torch.float32)
    return model, load_tokenizer(ck.path), arch


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
         virtual_tokens: int = 8, seed: int = 0, adapter_config: str = "houlsby", reduction_factor=None):
    """Return the model with only the method's parameters trainable.

    A PeftModel; the model itself for bitfit; a WithBottleneck (frozen model + hooked adapters) for
    `adapter`, whose bottleneck starts from AdapterHub's default `bert` init, seeded.
    """
    import torch

    if method not in METHODS:
        raise AdapterError(f"unknown method {method!r}", f"choose one of {', '.join(METHODS)}")
    torch.manual_seed(seed)  # peft initialises A (LoRA) and prompts randomly
    if method == "bitfit":
        from .bitfit import freeze_to_biases

        return freeze_to_biases(model, arch)
    if method == "adapter":
        from ..io.adapterhub import bn_config
        from .bottleneck import WithBottleneck, attach_bottleneck

        bn = bn_config(adapter_config, reduction_factor=reduction_factor)
        return WithBottleneck(model, attach_bottleneck(model, arch, bn, name=ADAPTER_NAME, seed=seed))
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
    """Write what was learned into the OutputDir: a PEFT adapter, bitfit.safetensors + bitfit.json, or an
    AdapterHub adapter (adapter_config.json + pytorch_adapter.bin + adapter.safetensors)."""
    if method == "adapter":
        from ..pipelines.bottleneck import write_bottleneck

        mods = model.bottleneck
        mods.detach()
        w = mods.site_weights()
        hidden = int(next(iter(w.values()))["W_down"].shape[1])
        write_bottleneck(out, mods.name, mods.bn, w, model.config.to_dict(), hidden, base)
        return
    if method == "bitfit":
        from .bitfit import save_bitfit

        save_bitfit(model, out, base)
        return
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(out.tmp)


def attach(model, adapter_dir: str, arch=None):
    """Put a saved adapter (PEFT, BitFit or AdapterHub bottleneck) on a loaded base model, for evaluation.

    A bottleneck adapter comes back as a WithBottleneck; call `.bottleneck.detach()` when done.
    """
    from ..io.adapterhub import is_adapterhub_dir
    from .bitfit import is_bitfit, load_bitfit

    if is_adapterhub_dir(adapter_dir):
        from ..arch import load_arch
        from ..pipelines.bottleneck import attach_saved
        from .bottleneck import WithBottleneck

        arch = arch or load_arch(model.config.to_dict())
        return WithBottleneck(model, attach_saved(model, arch, adapter_dir))

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

