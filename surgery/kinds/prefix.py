"""Prefix tuning (Li & Liang, 2021): learned key and value prefixes in every layer's attention.

Files: PEFT's format, adapter_config.json (peft_type PREFIX_TUNING) + one `prompt_embeddings`
tensor [virtual tokens, layers · 2 · kv width] (per layer, key then value). Transfer: per LLM
layer j (from SLM layer i), k_j = P_k(j)·k_i and v_j = P_v(j)·v_i, so the LLM's attention sees keys
and values in its own head spaces. Every LLM layer needs a prefix, so prefixes fill the whole block.
"""

from __future__ import annotations

from ..errors import AdapterError
from ..io.adapter import write_adapter
from .base import Kind, PortContext
from .lora import task_type
from .prompt import describe_prompt


class Prefix(Kind):
    name = "prefix"
    title = "prefix tuning"
    peft_type = "PREFIX_TUNING"
    commands = ("train", "eval", "inspect", "transfer")

    def transfer_needs(self, ad, port: PortContext) -> dict:
        if ad.config.get("prefix_projection"):
            raise AdapterError(f"{ad.path} uses prefix_projection", "its MLP encoder cannot be projected; "
                               "retrain the SLM adapter with prefix_projection=False")
        k, v = port.kv_keys()
        return {i: {k: {"to_llm"}, v: {"to_llm"}} for i in range(port.arch_s.stacks[port.stack])}

    def port(self, ad, port: PortContext):
        import torch

        arch_s, arch_l, stack, maps = port.arch_s, port.arch_l, port.stack, port.maps
        k, v = port.kv_keys()
        n_s, n_l = arch_s.stacks[stack], arch_l.stacks[stack]
        kvd_s, kvd_l = arch_s.space_size(k), arch_l.space_size(k)
        e = ad.prompt_embeddings().to(torch.float64)
        if e.shape[1] != n_s * 2 * kvd_s:
            raise AdapterError(f"{ad.path}: prompt_embeddings width {e.shape[1]} is not layers·2·kv width ({n_s}·2·{kvd_s})",
                               "the adapter does not match its SLM base; pass the right --slm-base")
        e = e.view(e.shape[0], n_s, 2, kvd_s)  # peft's layout: per layer, key then value
        out = torch.zeros(e.shape[0], n_l, 2, kvd_l, dtype=torch.float64)
        for i, blk in enumerate(port.blocks):
            for j in blk:
                out[:, j, 0] = e[:, i, 0] @ maps[(j, k, "to_llm")].T
                out[:, j, 1] = e[:, i, 1] @ maps[(j, v, "to_llm")].T
        cfg = dict(ad.config)
        heads_l = kvd_l // arch_l.head_size(k)
        cfg.update(base_model_name_or_path=port.llm_path, num_layers=n_l, token_dim=kvd_l, num_attention_heads=heads_l,
                   encoder_hidden_size=kvd_l)
        tensors = {"prompt_embeddings": out.reshape(e.shape[0], -1).float()}
        return lambda od: write_adapter(od, cfg, tensors)

    def wrap(self, model, arch, opts):
        import peft

        return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type=task_type(model),
                                                                  num_virtual_tokens=opts.virtual_tokens))

    def details(self, ad) -> dict:
        return describe_prompt(ad)


KIND = Prefix()
