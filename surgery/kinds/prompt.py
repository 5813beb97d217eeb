"""Prompt tuning (Lester, Al-Rfou & Constant, 2021): learned virtual tokens in the embedding space.

Files: PEFT's format, adapter_config.json (peft_type PROMPT_TUNING) + one `prompt_embeddings`
tensor [virtual tokens, hidden]. Transfer carries the tokens through the fitted embedding map:
e_llm = P_embed · e_slm.
"""

from __future__ import annotations

from ..errors import AdapterError
from ..io.adapter import write_adapter
from .base import Kind, PortContext
from .lora import task_type


def describe_prompt(ad) -> dict:
    """inspect's fields for prompt-learning kinds."""
    cfg = ad.config
    return {"num_virtual_tokens": cfg.get("num_virtual_tokens"), "token_dim": cfg.get("token_dim"),
            "num_layers": cfg.get("num_layers")}


class Prompt(Kind):
    name = "prompt"
    title = "prompt tuning"
    peft_type = "PROMPT_TUNING"
    commands = ("train", "eval", "inspect", "transfer")
    needs_embeddings = True

    def port(self, ad, port: PortContext):
        import torch

        e = ad.prompt_embeddings().to(torch.float64)
        cfg = dict(ad.config)
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise AdapterError(f"{ad.path} has prompts for several submodules", "transfer supports decoder-only models")
        arch_l = port.arch_l
        cfg.update(base_model_name_or_path=port.llm_path, token_dim=arch_l.dims["hidden"],
                   num_attention_heads=arch_l.dims["heads"], num_layers=next(iter(arch_l.stacks.values())))
        if "encoder_hidden_size" in cfg:  # only some prompt-learning configs carry it
            cfg["encoder_hidden_size"] = cfg["token_dim"]
        tensors = {"prompt_embeddings": (e @ port.embed["to_llm"].T).float()}
        return lambda od: write_adapter(od, cfg, tensors)

    def wrap(self, model, arch, opts):
        import peft

        return peft.get_peft_model(model, peft.PromptTuningConfig(task_type=task_type(model),
                                                                  num_virtual_tokens=opts.virtual_tokens))

    def details(self, ad) -> dict:
        return describe_prompt(ad)


KIND = Prompt()
