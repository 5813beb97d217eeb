"""extract-lora: a PEFT LoRA adapter approximating TUNED − BASE, one linear module at a time.

Per module: read both weights (one tensor each), Δ in float32 in peft's [out, in] orientation
(GPT-2's Conv1D stores [in, out]: the adapter gets fan_in_fan_out=True), truncated SVD
(surgery.ops.lowrank), factors rounded once to the adapter dtype, and the relative error measured on
the rounded factors. Bias deltas ride in peft's lora_bias (lora_B.bias, absorbed on merge as
scaling·b; scaling is 1 here) so peft applies them. Tied weights are read once through the family
map, never copied. Tensors that differ but are not linear targets (norms, embeddings) are listed in
the report as not carried.
"""

from __future__ import annotations

import os
import time

from ..arch.generic import linear_map
from ..errors import AdapterError, ArchitectureError, ShapeError
from ..io.adapter import lora_config, lora_key, split_targets, targets_module, write_adapter, WEIGHTS
from ..io.checkpoint import Checkpoint
from ..io.model import DTYPES
from ..io.progress import progress as progress_of
from ..io.writer import OutputDir, check_finite
from ..ops.lowrank import VERIFY_TOL, energy_rank, lora_factors, relative_error, spectrum_svd, sumsq64, truncated_svd
from .stream import mmap_large_buffers


def _reader(ck: Checkpoint, arch):
    ties = arch.tied()

    def read(name):
        return ck.read(name if name in ck or name not in ties else ties[name])

    return read


def _check_pair(b: Checkpoint, t: Checkpoint):
    ab, at = linear_map(b), linear_map(t, say=False)
    if ab.family != at.family:
        raise ArchitectureError(f"base is {ab.family} but tuned is {at.family}", "extract between two checkpoints of one model")
    for spec in ab.stored_tensors():
        if spec.name in b and spec.name in t and b.shape(spec.name) != t.shape(spec.name):
            raise ShapeError(f"{spec.name} is {list(b.shape(spec.name))} in base but {list(t.shape(spec.name))} in tuned",
                             "extract between checkpoints of the same size")
    return ab


def _targets(arch, targets):
    targets = split_targets(targets)
    mods = [s for s in arch.linears() if (s.role != "lm_head" if not targets else targets_module({"target_modules": list(targets)}, s.module))]
    if not mods:
        raise AdapterError(f"no linear module of this {arch.family} model matches --targets {' '.join(targets or [])}",
                           "`surgery inspect` the model; targets are module-name suffixes like q_proj or attn.c_attn")
    if len({s.transposed for s in mods}) > 1:
        raise AdapterError("the targets mix Conv1D and Linear layouts", "peft's fan_in_fan_out is one flag: extract them separately")
    return mods


def extract_lora(base: str, tuned: str, out: str, *, rank: int | None = None, energy: float | None = None,
                 targets: list[str] | None = None, dtype: str = "auto", seed: int = 0, force: bool = False,
                 verify: bool = True, plot: str | None = None, progress: bool | None = None) -> dict:
    """Write a LoRA adapter approximating tuned − base; returns per-module errors and sizes.

    verify: check each module's error against the Eckart–Young optimum from its spectrum (an exact SVD
    for a module whose randomized SVD misses it by more than 1e-3); off, it is ~2.5× faster at 1B widths.
    """
    import torch

    t0 = time.time()
    if (rank is None) == (energy is None):
        raise AdapterError("give exactly one of --rank and --energy", "e.g. --rank 16, or --energy 0.9 to keep 90% of each delta's energy")
    if rank is not None and rank < 1:
        raise AdapterError(f"--rank {rank} must be at least 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise AdapterError(f"--energy {energy} must be in (0, 1]", "e.g. --energy 0.9")
    if dtype not in DTYPES:
        raise AdapterError(f"unknown --dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
    if plot:
        if not verify:
            raise AdapterError("--plot draws each module's spectrum, which --no-verify skips", "drop one of them")
        from .. import plot as plots

        plots.check(plot, force, inputs=[base, tuned], output=out)
    mmap_large_buffers()
    cb, ct = Checkpoint.open(base), Checkpoint.open(tuned)
    arch = _check_pair(cb, ct)
    mods = _targets(arch, targets)
    out_dtype = cb.main_dtype() if dtype == "auto" else getattr(torch, dtype)
    rb, rt = _reader(cb, arch), _reader(ct, arch)
    by_name = arch.by_name()
    tensors, rows, bias, spectra = {}, [], {}, {}
    with progress_of(len(mods), "extract-lora", unit="modules", enabled=progress) as advance:
        for s in mods:
            wb, wt = rb(s.name), rt(s.name)
            # float32 Δ (float64 for float64 checkpoints): each element is tuned − base rounded once, to
            # 2⁻²⁴ relative (exact for bf16/fp16 weights less than 2¹⁶ apart), so ‖Δ₃₂ − Δ‖ ≤ 6e-8 ‖Δ‖, far
            # below any truncation error; the float64 products with it promote a block at a time (mm64)
            d = wt.to(torch.float64 if wt.dtype == torch.float64 else torch.float32)
            d -= wb  # promoted on the fly: no float32 copy of the base
            del wb, wt
            check_finite(f"{s.name} (tuned - base)", d)
            d = d.T if s.transposed else d  # peft's A/B are [r, in] / [out, r] in either layout
            if energy is not None:
                U, S, Vh = spectrum_svd(d)
                spectrum = S
                r = energy_rank(S, energy)
                opt = float(S[r:].square().sum()) ** 0.5 / max(float(S.square().sum()) ** 0.5, 1e-300)
                U, S, Vh, method, svd_err = U[:, :r], S[:r], Vh[:r], "exact", opt
            else:
                U, S, Vh, method, svd_err, opt, spectrum = truncated_svd(d, rank, seed, verify=verify)
            A, B = (x.to(out_dtype).contiguous() for x in lora_factors(U, S, Vh))
            tensors[lora_key(s.module, "lora_A.weight")] = A
            tensors[lora_key(s.module, "lora_B.weight")] = B
            rows.append(_checked({"module": s.module, "shape": list(d.shape), "rank": int(S.shape[0]), "method": method,
                                  "rel_error": relative_error(d, A, B), "optimum": opt, "delta_norm": sumsq64(d) ** 0.5}, svd_err))
            advance(1, s.module)
            if plot:
                spectra[s.module] = spectrum.tolist()
            bname = s.name[: -len("weight")] + "bias"
            if bname in by_name:
                bias[s.module] = (rt(bname).double() - rb(bname).double()).float()
    carried = {s.name for s in mods} | {s.name[: -len("weight")] + "bias" for s in mods}
    not_carried = _differing(cb, ct, [n for n in cb.keys() if n not in carried])
    use_bias = any(bool(b.abs().max() > 0) for b in bias.values())
    if use_bias:
        for s in mods:  # peft's lora_bias is one flag: bias-less layers get a zero bias (their lora_B has one)
            b = bias.get(s.module)
            n_out = tensors[lora_key(s.module, "lora_B.weight")].shape[0]
            tensors[lora_key(s.module, "lora_B.bias")] = (b if b is not None else torch.zeros(n_out)).to(out_dtype)
    ranks = {row["module"]: row["rank"] for row in rows}
    r = max(ranks.values())
    pattern = {m: k for m, k in ranks.items() if k != r}
    cfg = lora_config(cb.path, r, r, [s.module for s in mods], fan_in_fan_out=mods[0].transposed,
                      rank_pattern=pattern, alpha_pattern=dict(pattern), lora_bias=use_bias,
                      task_type="SEQ_2_SEQ_LM" if len(arch.stacks) > 1 or cb.config.get("is_encoder_decoder") else "CAUSAL_LM")
    with OutputDir(out, inputs=[cb.path, ct.path], force=force) as od:
        write_adapter(od, cfg, tensors)
        size = os.path.getsize(od.path(WEIGHTS))
        path = od.commit()
    if plot:
        how = f"--rank {rank}" if rank is not None else f"--energy {energy}"
        plots.spectra(plot, spectra, {row["module"]: row["rank"] for row in rows},
                      f"extract-lora {how}\nsingular values of tuned − base")
    return {"output": path, "plot": plot, "modules": rows, "rank": r, "energy": energy, "lora_bias": use_bias,
            "adapter_bytes": size, "adapter_params": sum(t.numel() for t in tensors.values()),
            "model_bytes": cb.total_bytes(), "not_carried": not_carried, "dtype": str(out_dtype).replace("torch.", ""),
            "seconds": round(time.time() - t0, 3)}


def _checked(row: dict, svd_error: float | None) -> dict:
    """Refuse to write a module worse than no adapter (relative error ≥ 1), or one whose SVD missed the
    Eckart–Young optimum even after the exact fallback: either is an error, never a table row."""
    err, opt = row["rel_error"], row["optimum"]
    if svd_error is not None and opt is not None and svd_error > opt + VERIFY_TOL:
        raise AdapterError(f"{row['module']} {row['shape']}: the rank-{row['rank']} SVD has relative error {svd_error:.6f} "
                           f"against an optimum of {opt:.6f}; nothing was written", "please report this with the module's shape")
    if row["delta_norm"] > 0 and err >= 1.0:
        raise AdapterError(f"{row['module']}: the rank-{row['rank']} factors in the adapter dtype have relative error {err:.4f} "
                           f"(the optimum is {opt:.4f}), worse than no adapter; nothing was written" if opt is not None else
                           f"{row['module']}: the rank-{row['rank']} factors have relative error {err:.4f}, worse than no adapter; "
                           "nothing was written", "the delta underflows the adapter dtype: pass --dtype float32")
    return row


def _differing(cb: Checkpoint, ct: Checkpoint, names: list[str]) -> list[str]:
    """Stored tensors outside the targets that tuned changed (one tensor pair in memory at a time)."""
    import torch

    out = []
    for n in names:
        if n not in ct or not torch.equal(cb.read(n), ct.read(n)):
            out.append(n)
    return out
