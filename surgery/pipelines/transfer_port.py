"""Carry each supported adapter kind through the fitted projections into the LLM's spaces.

LoRA: A_llm = A·Q_in, B_llm = P_out·B (P_out block-diagonal over a fused q|k|v output), duplicated
into the chosen LLM layers of each SLM layer's block. Rank, alpha and rsLoRA are kept; a module
whose scaling differs from the config's default gets it folded into B.
Prompt tuning: virtual tokens live in the embedding space: e_llm = P_embed · e_slm.
Prefix tuning: per LLM layer j (from SLM layer i), key and value prefixes k_j = P_k(j)·k_i and
v_j = P_v(j)·v_i, so the LLM's attention sees keys and values in its own head spaces. Every LLM
layer needs a prefix, so prefixes always fill the whole block.
"""

from __future__ import annotations

import math

from ..errors import AdapterError
from ..io.adapter import lora_config, lora_key
from ..ops.project import port_lora
from .transfer_plan import layer_roles, locate, module_path


def lora_needs(ad, arch, stack) -> dict:
    """{slm layer: {key: {directions}}} for a LoRA adapter (refusing what cannot be ported)."""
    cfg = ad.config
    if cfg.get("use_dora"):
        raise AdapterError(f"{ad.path} is a DoRA adapter", "DoRA magnitudes depend on the base weights' column norms; "
                           "transfer supports plain LoRA, prompt tuning and prefix tuning")
    if ad.modules_to_save():
        raise AdapterError(f"{ad.path} saves whole modules ({', '.join(sorted(ad.modules_to_save()))})",
                           "a replaced module cannot be projected; retrain the SLM adapter without modules_to_save")
    roles = layer_roles(arch, stack)
    needs: dict = {}
    for lm in ad.lora_modules():
        st, i, suffix = locate(arch, lm.module)
        role = roles[suffix]
        keys = needs.setdefault(i, {})
        keys.setdefault(role.in_key, set()).add("to_slm")
        for k in role.out_keys:
            keys.setdefault(k, set()).add("to_llm")
    return needs


def kv_keys(arch, stack) -> tuple[str, str]:
    """The key and value spaces of self-attention (spaces flagged kv, in map order)."""
    roles = layer_roles(arch, stack)
    kv = [k for r in roles.values() for k in r.out_keys if arch.spec["spaces"].get(k, {}).get("kv")]
    kv = list(dict.fromkeys(kv))
    if len(kv) < 2:
        raise AdapterError(f"family {arch.family} has no key/value spaces for prefix tuning")
    return kv[0], kv[1]


def port_lora_adapter(ad, arch_s, arch_l, stack, chosen, maps, llm_path) -> tuple[dict, dict]:
    import torch

    cfg = ad.config
    r0 = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", r0)
    rslora = bool(cfg.get("use_rslora"))
    roles = layer_roles(arch_s, stack)
    tensors, targets, rank_pattern = {}, [], {}
    for lm in ad.lora_modules():
        _, i, suffix = locate(arch_s, lm.module)
        role = roles[suffix]
        r = lm.rank
        s_out = alpha / math.sqrt(r) if rslora else alpha / r
        for j in chosen[i]:
            Q = maps[(j, role.in_key, "to_slm")]
            P = torch.block_diag(*[maps[(j, k, "to_llm")] for k in role.out_keys])
            A2, B2, b2 = port_lora(lm.A, lm.B, Q, P, lm.bias)
            B2 = B2 * (lm.scaling / s_out)  # rank/alpha patterns folded in: one scaling rule per module
            name = module_path(arch_l, stack, j, suffix)
            tensors[lora_key(name, "lora_A.weight")] = A2
            tensors[lora_key(name, "lora_B.weight")] = B2
            if b2 is not None:
                tensors[lora_key(name, "lora_B.bias")] = b2 * (lm.scaling / s_out)
            targets.append(name)
            if r != r0:
                rank_pattern[name] = r
    extra = {k: cfg[k] for k in ("task_type", "fan_in_fan_out", "lora_bias") if k in cfg}
    config = lora_config(llm_path, r0, alpha, targets, use_rslora=rslora, rank_pattern=rank_pattern, **extra)
    return config, tensors


def port_prompt_adapter(ad, arch_l, embed, llm_path) -> tuple[dict, dict]:
    import torch

    e = ad.prompt_embeddings().to(torch.float64)
    cfg = dict(ad.config)
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(f"{ad.path} has prompts for several submodules", "transfer supports decoder-only models")
    cfg.update(base_model_name_or_path=llm_path, token_dim=arch_l.dims["hidden"],
               num_attention_heads=arch_l.dims["heads"], num_layers=next(iter(arch_l.stacks.values())))
    if "encoder_hidden_size" in cfg:  # only some prompt-learning configs carry it
        cfg["encoder_hidden_size"] = cfg["token_dim"]
    return cfg, {"prompt_embeddings": (e @ embed["to_llm"].T).float()}


def prefix_needs(ad, arch, stack) -> dict:
    if ad.config.get("prefix_projection"):
        raise AdapterError(f"{ad.path} uses prefix_projection", "its MLP encoder cannot be projected; "
                           "retrain the SLM adapter with prefix_projection=False")
    k, v = kv_keys(arch, stack)
    return {i: {k: {"to_llm"}, v: {"to_llm"}} for i in range(arch.stacks[stack])}


def port_prefix_adapter(ad, arch_s, arch_l, stack, blocks, maps, llm_path) -> tuple[dict, dict]:
    import torch

    k, v = kv_keys(arch_s, stack)
    n_s, n_l = arch_s.stacks[stack], arch_l.stacks[stack]
    kvd_s, kvd_l = arch_s.space_size(k), arch_l.space_size(k)
    e = ad.prompt_embeddings().to(torch.float64)
    if e.shape[1] != n_s * 2 * kvd_s:
        raise AdapterError(f"{ad.path}: prompt_embeddings width {e.shape[1]} is not layers·2·kv width ({n_s}·2·{kvd_s})",
                           "the adapter does not match its SLM base; pass the right --slm-base")
    e = e.view(e.shape[0], n_s, 2, kvd_s)  # peft's layout: per layer, key then value
    out = torch.zeros(e.shape[0], n_l, 2, kvd_l, dtype=torch.float64)
    for i, blk in enumerate(blocks):
        for j in blk:
            out[:, j, 0] = e[:, i, 0] @ maps[(j, k, "to_llm")].T
            out[:, j, 1] = e[:, i, 1] @ maps[(j, v, "to_llm")].T
    cfg = dict(ad.config)
    heads_l = kvd_l // arch_l.head_size(k)
    cfg.update(base_model_name_or_path=llm_path, num_layers=n_l, token_dim=kvd_l, num_attention_heads=heads_l,
               encoder_hidden_size=kvd_l)
    return cfg, {"prompt_embeddings": out.reshape(e.shape[0], -1).float()}
