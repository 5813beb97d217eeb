"""extract-bitfit / apply-bitfit: store only the biases (and new task heads) a fine-tune changed.

Files (docs/formats.md, "bitfit"): OUT/bitfit.safetensors holds the kept tensors under their
checkpoint names, in TUNED's dtype, so applying them is a byte copy and the round trip is exact;
OUT/bitfit.json is the manifest (format surgery.bitfit/1). Which tensors are biases comes from
the family map (roles `bias` and `norm_bias`), never from names.
"""

from __future__ import annotations

import os

from ..arch import arch_of
from ..errors import ArchitectureError, CheckpointError, SurgeryError
from ..io.checkpoint import Checkpoint
from ..io.hashing import config_sha256
from ..io.jsonfile import load_json
from ..io.safetensors_file import read_header, read_tensor
from ..io.writer import OutputDir, ShardedWriter
from ..ops.bitfit import delta_sq_norm, norm_split, same_bits
from .stream import write_checkpoint

FORMAT = "surgery.bitfit/1"
TENSORS = "bitfit.safetensors"
MANIFEST = "bitfit.json"
BIAS_ROLES = ("bias", "norm_bias")  # BitFit trains every additive bias, LayerNorm's included


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def extract_bitfit(base_path: str, tuned_path: str, out: str, *, force: bool = False) -> dict:
    """Write OUT/bitfit.safetensors + OUT/bitfit.json; returns the manifest."""
    base, tuned = Checkpoint.open(base_path), Checkpoint.open(tuned_path)
    arch = arch_of(base)
    roles = {t.name: t.role for t in arch.stored_tensors()}
    if not any(r in BIAS_ROLES for r in roles.values()):
        raise ArchitectureError(f"{base.path} is a {arch.family} model without bias terms (its family map lists none "
                                "under this config), so a bias-only (BitFit) delta does not apply",
                                "extract the weight delta with `surgery extract-krona` or as a LoRA instead")
    kept, heads, other = {}, [], []
    bias_sq = other_sq = 0.0
    for name in tuned.keys():
        t = tuned.read(name)
        if name not in base or base.shape(name) != tuple(t.shape):
            kept[name] = t  # a task head (or a resized tensor) BitFit trains whole
            heads.append(name)
            continue
        b = base.read(name)
        if b.dtype != t.dtype:
            raise CheckpointError(f"{name} is {_dtype_name(b.dtype)} in BASE but {_dtype_name(t.dtype)} in TUNED",
                                  "save TUNED in BASE's dtype (save_pretrained after .to(dtype)) so the delta is exact")
        if same_bits(b, t):
            continue
        sq = delta_sq_norm(b, t)
        if roles.get(name) in BIAS_ROLES:
            kept[name] = t
            bias_sq += sq
        else:
            other.append((name, sq ** 0.5))
            other_sq += sq
        del b, t
    n_bias = len(kept) - len(heads)
    if not kept:
        raise SurgeryError(f"no bias or task head of {tuned.path} differs from {base.path}",
                           "check that TUNED is the fine-tuned model and BASE the model it started from")
    other.sort(key=lambda x: (-x[1], x[0]))
    delta_bytes = sum(t.numel() * t.element_size() for t in kept.values())
    manifest = {
        "format": FORMAT,
        "base": {"path": base.path, "config_sha256": config_sha256(base.path), "family": arch.family},
        "tuned": {"path": tuned.path, "config_sha256": config_sha256(tuned.path)},
        "dtype": _dtype_name(tuned.main_dtype()),
        "kept": [{"name": n, "shape": list(t.shape), "dtype": _dtype_name(t.dtype),
                  "kind": "head" if n in heads else "bias"} for n, t in kept.items()],
        "heads": heads,
        # in BASE but not in TUNED (a causal LM head a classifier replaced): apply-bitfit leaves them out
        "dropped": [n for n in base.keys() if n not in tuned],
        "norms": {**norm_split(bias_sq, other_sq), "changed_biases": n_bias, "changed_other": len(other),
                  "largest_other": [[n, v] for n, v in other[:5]]},
        "sizes": {"delta_bytes": delta_bytes, "model_bytes": tuned.total_bytes(),
                  "fraction": delta_bytes / max(1, tuned.total_bytes())},
        "config": tuned.config,  # written back verbatim: a classifier's config differs from BASE's
    }
    with OutputDir(out, inputs=[base.path, tuned.path], force=force) as od:
        specs = [(n, t.dtype, tuple(t.shape)) for n, t in kept.items()]
        w = ShardedWriter(od, specs, max_shard_size=2 ** 62, prefix="bitfit")
        for n, t in kept.items():
            w.write(n, t)
        w.close()
        od.write_json(MANIFEST, manifest)
        manifest = {**manifest, "output": od.commit()}
    return manifest


def read_manifest(delta_dir: str) -> dict:
    path = os.path.join(os.path.abspath(delta_dir), MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{delta_dir} has no {MANIFEST}", "pass the directory `surgery extract-bitfit` wrote")
    m = load_json(path, CheckpointError, "re-run `surgery extract-bitfit`")
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {m.get('format')!r}, expected {FORMAT!r}",
                              "pass a directory written by `surgery extract-bitfit`")
    return m


def apply_bitfit(base_path: str, delta_dir: str, out: str, *, force: bool = False, max_shard_size="5GB") -> dict:
    """Write OUT = BASE with the delta's biases and heads: the tuned model, byte for byte."""
    import torch

    base = Checkpoint.open(base_path)
    m = read_manifest(delta_dir)
    want, have = m["base"]["config_sha256"], config_sha256(base.path)
    if want != have:
        raise CheckpointError(f"{base.path}/config.json (sha256 {have[:12]}…) is not the base this delta was extracted "
                              f"from ({m['base']['path']}, sha256 {want[:12]}…)",
                              f"pass {m['base']['path']} (or an identical copy) as BASE")
    tfile = os.path.join(os.path.abspath(delta_dir), TENSORS)
    if not os.path.exists(tfile):
        raise CheckpointError(f"{delta_dir} has no {TENSORS}", "copy it next to bitfit.json, or re-run extract-bitfit")
    infos, _, _ = read_header(tfile)
    kept = {k["name"]: k for k in m["kept"]}
    for name, k in kept.items():
        info = infos.get(name)
        if info is None or list(info.shape) != k["shape"] or info.torch_dtype_name != k["dtype"]:
            raise CheckpointError(f"{tfile}: {name} is missing or differs from the manifest ({k['dtype']}{k['shape']})",
                                  "the delta directory is corrupt; re-run `surgery extract-bitfit`")
        if k["kind"] == "bias" and (name not in base or list(base.shape(name)) != k["shape"]):
            raise CheckpointError(f"BASE {base.path} has no {name} of shape {k['shape']}",
                                  f"pass {m['base']['path']} as BASE")
    dropped, heads = set(m["dropped"]), set(m["heads"])
    # a reshaped tensor (resized embeddings) is a head that replaces BASE's tensor of that name
    specs = [(n, base.dtype(n), base.shape(n)) for n in base.keys() if n not in dropped and n not in heads]
    specs += [(n, getattr(torch, kept[n]["dtype"]), tuple(kept[n]["shape"])) for n in m["heads"]]

    def produce(name):
        return read_tensor(infos[name]) if name in kept else base.read(name)

    with OutputDir(out, inputs=[base.path, delta_dir], force=force) as od:
        write_checkpoint(od, specs, produce, config=m["config"], side_from=base.path,
                         max_shard_size=max_shard_size, description="applying bitfit")
        path = od.commit()
    return {"output": path, "biases": len(kept) - len(m["heads"]), "heads": m["heads"], "dropped": sorted(dropped),
            "tensors": len(specs)}
