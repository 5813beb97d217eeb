"""Bottleneck adapters through train, transfer, tune-bridge and eval: the glue those commands call.

Everything is keyed by site module path (surgery.arch.BottleneckSite.module), the same keys
surgery.io.adapterhub reads and writes and surgery.train.bottleneck hooks:
  modules = {site module path: {"W_down", "b_down", "W_up", "b_up"}}
A bridge has the LLM's depth and module names, so LLM and bridge share site keys.
"""

from __future__ import annotations

from ..errors import AdapterError


def write_bottleneck(od, name: str, bn: dict, modules: dict, model_config: dict, hidden: int,
                     base: str | None = None) -> None:
    """Write an AdapterHub adapter into an open OutputDir (train and tune-bridge add their own json next to it).

    The reduction_factor is set so AdapterHub builds the widths the weights have (a port keeps r
    while the hidden size grows). `bn["leave_out"]` must list the layers without adapters (for a
    port: the list port_sites returns).
    """
    from ..io.adapterhub import adapterhub_config, reduction_factor_for, write_adapterhub

    widths = {int(w["W_down"].shape[0]) for w in modules.values()}
    if len(widths) != 1:
        raise AdapterError(f"sites have different bottleneck widths {sorted(widths)}",
                           "use one width per adapter (a per-layer reduction_factor mapping is not written)")
    bn = dict(bn, reduction_factor=reduction_factor_for(hidden, widths.pop()))
    write_adapterhub(od, adapterhub_config(name, bn, model_config, hidden, base), modules)


def save_bottleneck(out: str, name: str, bn: dict, modules: dict, model_config: dict, hidden: int,
                    base: str | None = None, inputs: list[str] = (), force: bool = False) -> str:
    """Write an AdapterHub adapter directory atomically (write_bottleneck into a fresh OutputDir)."""
    from ..io.writer import OutputDir

    od = OutputDir(out, inputs=list(inputs), force=force)
    try:
        write_bottleneck(od, name, bn, modules, model_config, hidden, base)
        return od.commit()
    finally:
        od.abort()


def port_sites(ad, llm_arch, depth_map: dict, maps) -> tuple[dict, list[int]]:
    """Port an SLM adapter to the LLM's sites: W_down·P_in, P_out·W_up, P_out·b_up (surgery.ops.bottleneck).

    ad: the SLM's BottleneckAdapter (surgery.io.adapterhub.read_adapterhub).
    depth_map: {stack: [SLM layer for each LLM layer]} (the same depth map LoRA transfer uses).
    maps(stack, slm_layer, llm_layer, placement) -> (P_in [d_slm, d_llm], P_out [d_llm, d_slm]),
      with x_llm ≈ P_out x_slm and P_in its left inverse (for a coordinate embedding E: Eᵀ, E).
    Returns the LLM modules and the AdapterHub layer ids of LLM layers left without adapters.
    """
    from ..ops.bottleneck import port_bottleneck

    slm = {(s, layer, p): mod for mod, (s, layer, p) in ad.placements.items()}
    out, leave_out = {}, set()
    for site in llm_arch.bottleneck_sites():
        if not ad.bn.get(site.placement):
            continue
        try:
            src_layer = depth_map[site.stack][site.layer]
        except (KeyError, IndexError):
            raise AdapterError(f"the depth map has no SLM layer for {site.stack} layer {site.layer}",
                               "give one SLM layer per LLM layer and stack") from None
        src = slm.get((site.stack, src_layer, site.placement))
        if src is None:  # that SLM layer had no adapter (leave_out): neither does this LLM layer
            leave_out.add(site.index)
            continue
        w = ad.modules[src]
        P_in, P_out = maps(site.stack, src_layer, site.layer, site.placement)
        out[site.module] = port_bottleneck(w["W_down"], w["b_down"], w["W_up"], w["b_up"], P_in, P_out)
    if not out:
        raise AdapterError(f"{ad.path}: no adapter site maps onto the LLM", "check the depth map and the adapter's placements")
    return out, sorted(leave_out)


def restrict_sites(modules: dict, kept_residual) -> dict:
    """The bridge's adapters: every site restricted to the bridge's kept residual coordinates."""
    from ..ops.bottleneck import restrict_bottleneck

    return {m: restrict_bottleneck(w, kept_residual, kept_residual) for m, w in modules.items()}


def lift_sites(old_llm: dict, old_bridge: dict, new_bridge: dict, kept_residual) -> dict:
    """The LLM's adapters after bridge tuning: each site's update scattered back at the kept coordinates."""
    from ..ops.bottleneck import lift_bottleneck

    if set(old_llm) != set(new_bridge) or set(old_bridge) != set(new_bridge):
        raise AdapterError("the bridge's adapter sites differ from the LLM's", "tune the adapter restrict_sites produced")
    return {m: lift_bottleneck(old_llm[m], old_bridge[m], new_bridge[m], kept_residual, kept_residual) for m in old_llm}


def attach_saved(model, arch, path: str):
    """eval --adapter on an AdapterHub directory: read it, check it fits `model`, hook it in."""
    from ..io.adapterhub import read_adapterhub
    from ..train.bottleneck import attach_bottleneck

    ad = read_adapterhub(path)
    check_fits(ad, arch, "model", "use the adapter with the model family it was trained or ported for",
               "port it to this model with `surgery transfer` first")
    return attach_bottleneck(model, arch, ad.bn, weights=ad.modules, name=ad.name)


def check_fits(ad, arch, role: str, family_fix: str, width_fix: str) -> None:
    """Refuse an adapter saved for another family, or reading another width than `arch`'s residual."""
    from ..arch import family_for_model_type

    if family_for_model_type(ad.config["model_type"])["family"] != arch.family:
        raise AdapterError(f"{ad.path} is a {ad.config['model_type']} adapter but the {role} is {arch.family}", family_fix)
    d = {int(w["W_down"].shape[1]) for w in ad.modules.values()}
    if d != {arch.dims["hidden"]}:
        raise AdapterError(f"{ad.path} reads width {sorted(d)} but the {role}'s hidden size is {arch.dims['hidden']}",
                           width_fix)
