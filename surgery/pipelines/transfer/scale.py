"""`--scale auto`: size a ported LoRA's deltas on the LLM with forward passes only.

Between two independently trained models the fitted maps (fit.py) are noisy, and a noisy map can
blow a delta up: on the evidence pair (docs/method-experiments.md, "Transfer's scale") the ported gate/up deltas of
the LLM's first layer changed their modules' outputs by 117-137 % of the base output where the
SLM's own deltas changed theirs by 38-40 %, and `--depth block` adds each SLM delta to every LLM
layer of its block, so the residual stream receives it k times. The port alone took the LLM's dev
loss from 4.49 (no adapter) to 5.9-8.7. Two forward-only corrections:

1. normalise: each ported module's B is scaled so that its delta's size relative to the module's
   base output, ‖ΔW x‖ / ‖W x‖ over the calibration tokens, is the SLM module's own relative size
   divided by k (the LLM layers that module was duplicated into);
2. alpha: one global factor on top, chosen among the candidates below by the LLM's loss on the
   calibration text. alpha = 0 (the LLM without the adapter: the zero start's B = 0) and the raw
   port are candidates, so the start is never worse than either on that text.

Only LoRA is scaled (the other kinds are written as ported, and transfer.json says so). The LLM is
loaded whole for these forward passes (inference memory, like `surgery eval`); `--scale none` keeps
transfer's streamed, one-window memory.
"""

from __future__ import annotations

import re

SCALES = ("auto", "none")
ALPHAS = (0.25, 0.5, 1.0, 2.0)  # global factors tried on the normalised port (beside 0 and the raw port)


def _batches(model_dir: str, data: str, samples: int, seq_len: int, batch: int):
    """The first `samples` records of `data` with text (those the fits read: io.data.documents) as
    (input_ids, attention_mask, labels) batches, labelled as training labels them: every token of a text
    record, only the completion of a prompt/completion record. Unlike a training file, kinds may mix;
    a record too short to score (one token) is skipped."""
    from ...errors import DataError
    from ...io.data import iter_records
    from ...io.tokenizer import load_tokenizer
    from ...train.data import collate, encode, pad_id_of

    tok = load_tokenizer(model_dir, pad=True)
    ex = []
    for rec in iter_records(data):
        if len(ex) >= samples:
            break
        if rec.document(tok).strip():
            try:
                ex += encode([rec], tok, seq2seq=False, max_length=seq_len)
            except DataError:
                continue
    pad = pad_id_of(tok, None)
    return [tuple(collate(ex[i:i + batch], pad, False).values()) for i in range(0, len(ex), batch)]


def _load(model_dir: str, adapter: str, dtype: str):
    """The base model with `adapter` on it (peft), eval mode, and {module path: its LoRA layer}."""
    from peft import PeftModel

    from ...io.model import Placement, load_model

    model = load_model(model_dir, Placement(dtype, device="cpu"), auto_dtype="stored")
    pm = PeftModel.from_pretrained(model, adapter).eval()
    layers = {}
    for name, m in pm.named_modules():
        if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
            layers[re.sub(r"^base_model\.model\.", "", name)] = m
    return pm, layers


def forward_pass(model, batches, layers: dict | None = None) -> tuple[float, dict[str, float]]:
    """(mean loss per labelled token, computed as training scores it (train.score.batch_nll: the LM head a
    chunk of tokens at a time, never the full logits); and, for each LoRA layer in `layers`,
    ‖ΔW x‖ / ‖W x‖ over the batches' tokens, padding excluded: ΔW = its LoRA delta)."""
    import torch

    from ...train.score import batch_nll

    sums = {name: [0.0, 0.0] for name in layers or {}}
    mask_now = {}

    def hook(name):
        def f(mod, inp, out):
            x = inp[0]
            base = mod.base_layer(x)
            # peft keeps the adapter in float32 beside bf16/fp16 weights and casts x in its own forward
            a = mod.lora_A["default"]
            delta = mod.lora_B["default"](a(x.to(a.weight.dtype))) * mod.scaling["default"]
            keep = mask_now["m"].unsqueeze(-1).to(torch.float32)
            sums[name][0] += float((delta.float() * keep).pow(2).sum())
            sums[name][1] += float((base.float() * keep).pow(2).sum())
        return f

    hooks = [m.register_forward_hook(hook(name)) for name, m in (layers or {}).items()]
    total, n = 0.0, 0
    try:
        with torch.inference_mode():
            for ids, mask, labels in batches:
                mask_now["m"] = mask
                nll, k = batch_nll(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, False)
                total += float(nll)
                n += k
    finally:
        for h in hooks:
            h.remove()
    return total / max(n, 1), {name: (d / b) ** 0.5 if b > 0 else 0.0 for name, (d, b) in sums.items()}


def choose_scale(od, *, slm_adapter: str, slm_base: str, llm: str, data: str, samples: int, seq_len: int, batch: int,
                 dtype: str, slm_module_of, copies_of) -> dict:
    """Scale the LoRA written in `od` (an OutputDir holding the ported adapter) and return the record for
    transfer.json. slm_module_of(llm module) -> the SLM module it was ported from; copies_of(llm module) ->
    how many LLM layers that SLM module went into."""
    import torch
    from safetensors.torch import load_file

    from ...io.adapter import WEIGHTS, write_weights

    l_batches = _batches(llm, data, samples, seq_len, batch)
    if not l_batches:
        return {"mode": "none", "reason": f"no record of {data} has two tokens to score"}
    s_model, s_layers = _load(slm_base, slm_adapter, dtype)
    _, e_slm = forward_pass(s_model, _batches(slm_base, data, samples, seq_len, batch), s_layers)
    del s_model, s_layers
    l_model, l_layers = _load(llm, od.tmp, dtype)
    raw_loss, e_llm = forward_pass(l_model, l_batches, l_layers)
    norm = {}
    for name in l_layers:
        e_s, e_l = e_slm.get(slm_module_of(name), 0.0), e_llm[name]
        norm[name] = 1.0 if e_l == 0 else e_s / (e_l * copies_of(name))
    raw_B = {name: m.lora_B["default"].weight.detach().clone() for name, m in l_layers.items()}
    raw_b = {name: m.lora_B["default"].bias.detach().clone() for name, m in l_layers.items()
             if m.lora_B["default"].bias is not None}

    def apply(factors: dict[str, float]) -> None:
        for name, m in l_layers.items():
            m.lora_B["default"].weight.data.copy_(raw_B[name] * factors[name])
            if name in raw_b:
                m.lora_B["default"].bias.data.copy_(raw_b[name] * factors[name])

    losses = [{"start": "raw", "alpha": 1.0, "loss": round(raw_loss, 6)}]
    for kind, a in [("zero", 0.0)] + [("normalised", a) for a in ALPHAS]:
        apply({n: a * (norm[n] if kind == "normalised" else 1.0) for n in l_layers})
        losses.append({"start": kind, "alpha": a, "loss": round(forward_pass(l_model, l_batches)[0], 6)})
    best = min(losses, key=lambda r: (r["loss"], r["start"] != "zero"))  # a tie goes to doing nothing
    factors = {n: best["alpha"] * (norm[n] if best["start"] == "normalised" else 1.0) for n in l_layers}
    del l_model, l_layers
    tensors = load_file(od.path(WEIGHTS))
    for key in list(tensors):
        m = re.match(r"^base_model\.model\.(.+)\.lora_B\.(weight|bias)$", key)
        if m:
            tensors[key] = (tensors[key].to(torch.float32) * factors[m.group(1)]).to(tensors[key].dtype)
    write_weights(od, tensors)  # inside od's temporary directory: atomic with the rest of the output
    return {"mode": "auto", "chosen": best, "candidates": losses, "examples": sum(len(b[0]) for b in l_batches),
            "tokens": sum(int((b[2][:, 1:] != -100).sum()) for b in l_batches),
            "relative_effect": {n: {"slm": round(e_slm.get(slm_module_of(n), 0.0), 6), "llm": round(e_llm[n], 6),
                                    "copies": copies_of(n), "normalise": round(norm[n], 6), "factor": round(factors[n], 6)}
                                for n in sorted(factors)}}
