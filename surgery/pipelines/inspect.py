"""What is in a checkpoint or adapter directory, as a plain dict (the CLI renders it).

An adapter is described by its kind (surgery.kinds: describe).
"""

from __future__ import annotations

import os

from ..errors import SurgeryError


def describe(path: str) -> dict:
    """What is in a model directory (family, widths, parameters, dtypes, shards, ties) or an adapter
    directory (kind, rank/alpha, targets, modules), as the dict `surgery inspect --json` prints."""
    from ..kinds import detect

    kind = detect(path)
    if kind is not None:
        return kind.describe(path)
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        return describe_adapter(path)
    return describe_model(path)


def describe_model(path: str) -> dict:
    from ..arch import family_specs
    from ..arch.generic import GenericArch, linear_map
    from ..io.checkpoint import Checkpoint

    ck = Checkpoint.open(path)
    info = {"kind": "model", "path": ck.path, "model_type": ck.config.get("model_type")}
    params = 0
    for k in ck.keys():
        n = 1
        for s in ck.shape(k):
            n *= s
        params += n
    shards = [{"file": s, "bytes": os.path.getsize(os.path.join(ck.path, s))} for s in ck.shards]
    info.update(parameters=params, dtypes=ck.dtypes(), shards=shards, bytes=sum(s["bytes"] for s in shards),
                tensors=len(ck.keys()), side_files=ck.side_files())
    family_specs()  # a bad --family file or SURGERY_FAMILIES is an error, not a note
    try:
        arch = linear_map(ck)
    except SurgeryError as e:
        info["family"] = None
        info["note"] = str(e)
        return info
    if isinstance(arch, GenericArch):  # no widths to report: only what the checkpoint itself says
        info.update(family=arch.family, linear_modules=len(arch.by_module()), layer_linears=len(arch.linears()))
        return info
    d = arch.dims
    info.update(family=arch.family, layers=dict(arch.stacks), hidden=d["hidden"], heads=d["heads"],
                kv_heads=d["kv_heads"], head_dim=d["head_dim"], intermediate=d["intermediate"], vocab=d["vocab"],
                tied={k: v for k, v in arch.tied().items()})
    expected = {t.name for t in arch.stored_tensors()}
    have = set(ck.keys())
    # a tied tensor may still be stored (some savers write both copies)
    optional = set(arch.tied())
    info["missing"] = sorted(expected - have)
    info["unexpected"] = sorted(have - expected - optional)
    return info


def describe_adapter(path: str) -> dict:
    """A PEFT adapter of a kind surgery does not know (e.g. P_TUNING): what the format itself says."""
    from ..io.adapter import Adapter

    ad = Adapter.open(path)
    cfg = ad.config
    return {"kind": "adapter", "path": ad.path, "type": None, "peft_type": ad.peft_type, "base": ad.base,
            "parameters": ad.num_parameters(),
            "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in ad.tensors.values()}),
            "num_virtual_tokens": cfg.get("num_virtual_tokens"), "token_dim": cfg.get("token_dim"),
            "num_layers": cfg.get("num_layers")}
