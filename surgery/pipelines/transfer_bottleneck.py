"""Bottleneck adapters (AdapterHub Houlsby / Pfeiffer) through `surgery transfer`.

An adapter reads and writes the residual stream at its site, so it needs the same residual maps
LoRA's residual-writing modules use, fitted by transfer_fit at the mapped LLM layers:

  P_out = to_llm map of out.<sublayer>   (what o_proj / down_proj write; LoRA's B_llm = P_out·B)
  P_in  = to_slm map of out.<sublayer>   for Houlsby wiring (the adapter reads h, the sublayer output)
        = to_slm map of res              when original_ln_before (Pfeiffer: it reads the stream x + h)

The sublayer of a site is the one its `residual` norm feeds (the family map's norm `reads`), so no
family is named here. W_down·P_in, P_out·W_up, P_out·b_up is surgery.ops.bottleneck.port_bottleneck
(via surgery.pipelines.bottleneck.port_sites). Depth follows LoRA's map: each LLM layer chosen for
SLM layer i gets layer i's adapters; LLM layers that get none are written to `leave_out`.
"""

from __future__ import annotations

from ..arch import bottleneck_templates
from ..errors import ArchitectureError


def site_keys(arch, stack: str) -> dict[str, str]:
    """{placement: out.<sublayer>} for the bottleneck sites of `stack`."""
    norms = {t["name"]: t for t in arch.spec["layer"][stack] if t.get("role") == "norm" and t.get("reads")}
    keys = {}
    for st, placement, _, entry in bottleneck_templates(arch.spec):
        norm = norms.get(entry["residual"] + ".weight")
        if st == stack and norm is None:
            raise ArchitectureError(f"family {arch.family}: the {placement} site's residual module {entry['residual']} "
                                    "is not a norm the layer map names", "fix the bottleneck section of its family file")
        if st == stack:
            keys[placement] = f"out.{norm['reads']}"
    return keys


def _keys(ad, arch, stack, placement) -> tuple[str, str]:
    out = site_keys(arch, stack)[placement]
    return ("res" if ad.flags["original_ln_before"] else out), out


def bottleneck_needs(ad, arch, stack) -> dict:
    """{slm layer: {key: {directions}}}: P_in (to_slm) and P_out (to_llm) for every SLM site."""
    from .bottleneck import check_fits

    fix = "pass --slm-base DIR: the SLM the adapter was trained on"
    check_fits(ad, arch, "SLM", fix, fix)
    needs: dict = {}
    for st, i, placement in ad.placements.values():
        if st != stack:
            continue
        in_key, out_key = _keys(ad, arch, stack, placement)
        keys = needs.setdefault(i, {})
        keys.setdefault(in_key, set()).add("to_slm")
        keys.setdefault(out_key, set()).add("to_llm")
        if in_key == "res":  # keep the residual map's to_llm fit too: it is the out.* fits' prior
            keys["res"].add("to_llm")
    return needs


def port_bottleneck_adapter(ad, arch_s, arch_l, stack, chosen, maps) -> tuple[dict, list[int]]:
    """(LLM site modules, leave_out) for the adapter; chosen: per SLM layer, the LLM layers that take it."""
    from .bottleneck import port_sites

    slm_of = [None] * arch_l.stacks[stack]  # an LLM layer outside every chosen list gets no adapter
    for i, layers in enumerate(chosen):
        for j in layers:
            slm_of[j] = i

    def site_maps(st, i, j, placement):
        in_key, out_key = _keys(ad, arch_s, st, placement)
        return maps[(j, in_key, "to_slm")], maps[(j, out_key, "to_llm")]

    return port_sites(ad, arch_l, {stack: slm_of}, site_maps)
