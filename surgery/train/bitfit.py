"""BitFit training (Ben Zaken, Ravfogel & Goldberg, ACL 2022): only the additive bias vectors learn.

Which tensors are biases is the family map's word (roles `bias` and `norm_bias`, LayerNorm's
included), as for extract-bitfit. The result is written in the `surgery.bitfit/1` format of
docs/formats.md (bitfit.safetensors under checkpoint names in the base's dtype + the bitfit.json
manifest), so `surgery apply-bitfit BASE OUT` turns it into a full checkpoint and `surgery eval
--adapter OUT` applies it in memory.
"""

from __future__ import annotations

import os

from ..arch import arch_of
from ..errors import AdapterError
from ..io.checkpoint import Checkpoint
from ..io.hashing import config_sha256
from ..io.writer import ShardedWriter

FORMAT = "surgery.bitfit/1"
TENSORS = "bitfit.safetensors"
MANIFEST = "bitfit.json"
BIAS_ROLES = ("bias", "norm_bias")


def bias_names(arch) -> list[str]:
    return [t.name for t in arch.stored_tensors() if t.role in BIAS_ROLES]


def freeze_to_biases(model, arch):
    """Make exactly the family map's bias tensors trainable; refuse models without any."""
    names = set(bias_names(arch))
    params = dict(model.named_parameters())
    if not names or not names <= set(params):
        raise AdapterError(f"this {arch.family} model has no bias parameters under its config, so BitFit has nothing to train",
                           "use --method lora (or a model built with biases)")
    for n, p in params.items():
        p.requires_grad_(n in names)
    return model


def save_bitfit(model, out, base_dir: str) -> dict:
    """Write the trained biases + manifest into the OutputDir; returns the manifest."""
    base = Checkpoint.open(base_dir)
    arch = arch_of(base)
    params = dict(model.named_parameters())
    kept, sq = {}, 0.0
    for name in bias_names(arch):
        b = base.read(name)
        t = params[name].detach().cpu().to(b.dtype)  # the base's dtype, as extract-bitfit keeps it
        sq += float(((t.float() - b.float()) ** 2).sum())
        kept[name] = t.contiguous()
    w = ShardedWriter(out, [(n, t.dtype, tuple(t.shape)) for n, t in kept.items()], max_shard_size=2 ** 62,
                      prefix=TENSORS.split(".")[0])
    for n, t in kept.items():
        w.write(n, t)
    w.close()
    sha = config_sha256(base.path)
    delta = sum(t.numel() * t.element_size() for t in kept.values())
    dtype = str(base.main_dtype()).replace("torch.", "")
    manifest = {
        "format": FORMAT,
        "base": {"path": base.path, "config_sha256": sha, "family": arch.family},
        "tuned": {"path": None, "config_sha256": sha, "trained_by": "surgery train --method bitfit"},
        "dtype": dtype,
        "kept": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "kind": "bias"}
                 for n, t in kept.items()],
        "heads": [], "dropped": [],
        "norms": {"bias_norm": sq ** 0.5, "other_norm": 0.0, "total_norm": sq ** 0.5, "outside_fraction": 0.0,
                  "changed_biases": len(kept), "changed_other": 0, "largest_other": []},
        "sizes": {"delta_bytes": delta, "model_bytes": base.total_bytes(), "fraction": delta / max(1, base.total_bytes())},
        "config": base.config,
    }
    out.write_json(MANIFEST, manifest)
    return manifest


def is_bitfit(adapter_dir: str) -> bool:
    return os.path.exists(os.path.join(adapter_dir, MANIFEST))


def load_bitfit(model, adapter_dir: str):
    """Copy the saved biases into a loaded base model (in place), checking names and shapes."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, TENSORS)
    if not os.path.exists(path):
        raise AdapterError(f"{adapter_dir} has {MANIFEST} but no {TENSORS}", "copy it next to the manifest")
    sd = load_file(path)
    params = dict(model.named_parameters())
    bad = [k for k in sd if k not in params or params[k].shape != sd[k].shape]
    if bad:
        raise AdapterError(f"{adapter_dir}: {bad[0]} does not fit this model",
                           "apply the BitFit biases to the model they were trained on")
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)
    return model


