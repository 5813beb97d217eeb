"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) in AdapterHub's directory layout.

Files: io/adapterhub.py reads and writes AdapterHub's format; everything here is keyed by site
module path (arch.BottleneckSite.module), the same keys that reader and the hooks of
train/bottleneck.py use:  modules = {site module path: {"W_down", "b_down", "W_up", "b_up"}}.
A bridge has the LLM's depth and module names, so LLM and bridge share site keys.

Transfer: an adapter reads and writes the residual stream at its site, so it needs the residual
maps LoRA's residual-writing modules use, fitted at the mapped LLM layers:
  P_out = to_llm map of out.<sublayer>   (what o_proj / down_proj write; LoRA's B_llm = P_out·B)
  P_in  = to_slm map of out.<sublayer>   for Houlsby wiring (the adapter reads h, the sublayer output)
        = to_slm map of res              when original_ln_before (Pfeiffer: it reads the stream x + h)
The sublayer of a site is the one its `residual` norm feeds (the family map's norm `reads`), so no
family is named here. W_down·P_in, P_out·W_up, P_out·b_up is ops.bottleneck.port_bottleneck. Depth
follows LoRA's map; LLM layers that get no adapter are written to `leave_out`.

tune-bridge: the bridge keeps LLM residual coordinates `kept.residual` (W_down is that selection),
and every adapter quantity lives in the residual space, so the bridge's adapter is the LLM adapter
restricted to them (W_down's columns, W_up's rows, b_up's entries); after tuning its update is
scattered back at the kept coordinates, and the other coordinates keep the LLM adapter's values.
Merge refuses it: an adapter adds modules, there is no weight to fold it into.
"""

from __future__ import annotations

import os
import re

from ..arch import bottleneck_templates, family_for_model_type, load_arch
from ..errors import AdapterError, ArchitectureError
from ..io.adapterhub import (BottleneckAdapter, CONFIG, PARAM_KEYS, adapterhub_config, bn_config, check_site,
                             is_adapterhub_dir, load_weights, preset_of, read_config, reduction_factor_for,
                             write_adapterhub)
from ..io.writer import OutputDir
from ..ops.bottleneck import activation, lift_bottleneck, port_bottleneck, restrict_bottleneck
from ..ops.slice import bridge_layer_ids, bridge_name
from .base import Kind, PortContext

ADAPTER_NAME = "adapter"  # the AdapterHub adapter name train writes (a fixed name keeps outputs byte-identical)


# ---- files ----------------------------------------------------------------------------------------
def site_patterns(spec: dict) -> list:
    """(regex, stack, placement) matching the saved keys of every bottleneck site of a family."""
    out = []
    for stack, placement, prefix, entry in bottleneck_templates(spec):
        pre = re.escape(prefix).replace(re.escape("{i}"), r"(?P<layer>\d+)")
        # keys may carry a head model's extra prefix (e.g. T5AdapterModel's "transformer.")
        rx = re.compile(rf"^(?:.+\.)?(?P<module>{pre}{re.escape(entry['module'])})\.adapters\.(?P<name>[^.]+)\."
                        rf"(?P<param>adapter_down\.0\.weight|adapter_down\.0\.bias|adapter_up\.weight|adapter_up\.bias)$")
        out.append((rx, stack, placement))
    return out


def check_activation(bn: dict, where: str) -> None:
    """non_linearity must name an activation transformers knows (importing it takes seconds: not for inspect)."""
    try:
        activation(str(bn.get("non_linearity")))
    except KeyError:
        raise AdapterError(f"{where}: unknown non_linearity {bn.get('non_linearity')!r}",
                           "use a transformers activation name (relu, swish, gelu, gelu_new, tanh, ...)") from None


def read_adapterhub(path: str, check_act: bool = True):
    """Open an AdapterHub bottleneck adapter directory (io.adapterhub reads the files); its weights are
    keyed by the family map's site paths. check_act=False skips the activation check (inspect)."""
    path = os.path.abspath(path)
    cfg = read_config(path)
    bn = cfg["config"]
    if check_act:
        check_activation(bn, os.path.join(path, CONFIG))
    spec = family_for_model_type(cfg["model_type"])
    ad = BottleneckAdapter(path=path, config=cfg)
    inverse = {v: k for k, v in PARAM_KEYS.items()}
    patterns = site_patterns(spec)
    for key, t in sorted(load_weights(path).items()):
        for rx, stack, placement in patterns:
            m = rx.match(key)
            if m:
                break
        else:
            raise AdapterError(f"{path}: unrecognised key {key}",
                               f"only bottleneck adapter weights at the {spec['family']} sites of the family map are supported")
        if m["name"] != ad.name:
            raise AdapterError(f"{path}: key {key} belongs to adapter {m['name']!r}, the config names {ad.name!r}",
                               "save one adapter per directory")
        if not bn.get(placement):
            raise AdapterError(f"{path}: weights for {placement} at {m['module']} but the config has {placement}=false",
                               f"set {placement}: true in {CONFIG} or remove those weights")
        ad.modules.setdefault(m["module"], {})[inverse[m["param"]]] = t
        ad.placements[m["module"]] = (stack, int(m["layer"]), placement)
    if not ad.modules:
        raise AdapterError(f"{path} holds no adapter weights", "re-save the adapter")
    for mod, w in ad.modules.items():
        check_site(path, mod, w)
    return ad


def write_bottleneck(od, name: str, bn: dict, modules: dict, model_config: dict, hidden: int,
                     base: str | None = None) -> None:
    """Write an AdapterHub adapter into an open OutputDir (train and tune-bridge add their own json next to it).

    The reduction_factor is set so AdapterHub builds the widths the weights have (a port keeps r
    while the hidden size grows). `bn["leave_out"]` must list the layers without adapters (for a
    port: the list port_sites returns).
    """
    widths = {int(w["W_down"].shape[0]) for w in modules.values()}
    if len(widths) != 1:
        raise AdapterError(f"sites have different bottleneck widths {sorted(widths)}",
                           "use one width per adapter (a per-layer reduction_factor mapping is not written)")
    bn = dict(bn, reduction_factor=reduction_factor_for(hidden, widths.pop()))
    write_adapterhub(od, adapterhub_config(name, bn, model_config, hidden, base), modules)


def save_bottleneck(out: str, name: str, bn: dict, modules: dict, model_config: dict, hidden: int,
                    base: str | None = None, inputs: list[str] = (), force: bool = False) -> str:
    """Write an AdapterHub adapter directory atomically (write_bottleneck into a fresh OutputDir)."""
    od = OutputDir(out, inputs=list(inputs), force=force)
    try:
        write_bottleneck(od, name, bn, modules, model_config, hidden, base)
        return od.commit()
    finally:
        od.abort()


def check_fits(ad, arch, role: str, family_fix: str, width_fix: str) -> None:
    """Refuse an adapter saved for another family, or reading another width than `arch`'s residual."""
    if family_for_model_type(ad.config["model_type"])["family"] != arch.family:
        raise AdapterError(f"{ad.path} is a {ad.config['model_type']} adapter but the {role} is {arch.family}", family_fix)
    d = {int(w["W_down"].shape[1]) for w in ad.modules.values()}
    if d != {arch.dims["hidden"]}:
        raise AdapterError(f"{ad.path} reads width {sorted(d)} but the {role}'s hidden size is {arch.dims['hidden']}",
                           width_fix)


def attach_saved(model, arch, path: str):
    """eval --adapter on an AdapterHub directory: read it, check it fits `model`, hook it in."""
    from ..train.bottleneck import attach_bottleneck  # lazy (here and below): it defines nn.Modules, so imports torch

    ad = read_adapterhub(path)
    check_fits(ad, arch, "model", "use the adapter with the model family it was trained or ported for",
               "port it to this model with `surgery transfer` first")
    return attach_bottleneck(model, arch, ad.bn, weights=ad.modules, name=ad.name)


# ---- port (transfer) ------------------------------------------------------------------------------
def port_sites(ad, llm_arch, depth_map: dict, maps) -> tuple[dict, list[int]]:
    """Port an SLM adapter to the LLM's sites: W_down·P_in, P_out·W_up, P_out·b_up (ops.bottleneck).

    ad: the SLM's BottleneckAdapter (io.adapterhub.read_adapterhub).
    depth_map: {stack: [SLM layer for each LLM layer]} (the same depth map LoRA transfer uses).
    maps(stack, slm_layer, llm_layer, placement) -> (P_in [d_slm, d_llm], P_out [d_llm, d_slm]),
      with x_llm ≈ P_out x_slm and P_in its left inverse (for a coordinate embedding E: Eᵀ, E).
    Returns the LLM modules and the AdapterHub layer ids of LLM layers left without adapters.
    """
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


# ---- restrict / lift (tune-bridge) ----------------------------------------------------------------
def restrict_sites(modules: dict, kept_residual) -> dict:
    """The bridge's adapters: every site restricted to the bridge's kept residual coordinates."""
    return {m: restrict_bottleneck(w, kept_residual, kept_residual) for m, w in modules.items()}


def lift_sites(old_llm: dict, old_bridge: dict, new_bridge: dict, kept_residual) -> dict:
    """The LLM's adapters after bridge tuning: each site's update scattered back at the kept coordinates."""
    if set(old_llm) != set(new_bridge) or set(old_bridge) != set(new_bridge):
        raise AdapterError("the bridge's adapter sites differ from the LLM's", "tune the adapter restrict_sites produced")
    return {m: lift_bottleneck(old_llm[m], old_bridge[m], new_bridge[m], kept_residual, kept_residual) for m in old_llm}


def _site_names(arch, kept: dict) -> dict:
    """{LLM site module: the same site's module in the bridge}, for the layers the bridge keeps."""
    out = {}
    for site in arch.bottleneck_sites():
        name = bridge_name(arch, site.stack, site.layer, site.module, kept)
        if name is not None:
            out[site.module] = name
    return out


class BottleneckRoute:
    """tune-bridge for an AdapterHub bottleneck adapter (module doc)."""

    def __init__(self, kind, path: str, arch, kept: dict):
        self.kind = kind
        self.ad = ad = read_adapterhub(path)
        self.path = ad.path
        fix = "pass the adapter `surgery transfer` wrote for this LLM"
        check_fits(ad, arch, "LLM", fix, fix)
        self.kept = kept["residual"]

        # sites of layers the bridge dropped (--drop-layers) stay as given; the rest get bridge names
        self.rename = _site_names(arch, kept)
        self.bridge_w = restrict_sites({self.rename[m]: w for m, w in ad.modules.items() if m in self.rename}, self.kept)
        self.bn = ad.bn if not ad.bn.get("leave_out") else {**ad.bn, "leave_out": bridge_layer_ids(arch, kept, ad.bn["leave_out"])}

    def wrap(self, model, bdir: str):
        from ..train.bottleneck import WithBottleneck, attach_bottleneck

        barch = load_arch(model.config.to_dict(), f"{bdir}/config.json")
        if barch.dims["hidden"] != len(self.kept):
            raise AdapterError(f"the bridge at {bdir} has hidden size {barch.dims['hidden']} but its bridge.json keeps "
                               f"{len(self.kept)} residual coordinates", "re-create the bridge with `surgery prune-bridge`")
        return WithBottleneck(model, attach_bottleneck(model, barch, self.bn, weights=self.bridge_w, name=self.ad.name))

    def write(self, od, pm, arch, llm_config: dict) -> None:
        pm.bottleneck.detach()
        tuned = {m: {k: v.cpu() for k, v in w.items()} for m, w in pm.bottleneck.site_weights().items()}
        back = {b: m for m, b in self.rename.items()}
        lifted = lift_sites({back[b]: self.ad.modules[back[b]] for b in self.bridge_w},
                            {back[b]: w for b, w in self.bridge_w.items()}, {back[b]: w for b, w in tuned.items()}, self.kept)
        new = {m: lifted.get(m, w) for m, w in self.ad.modules.items()}
        write_bottleneck(od, self.ad.name, self.ad.bn, new, llm_config, arch.dims["hidden"], self.ad.base)

    @property
    def modules(self) -> int:
        return len(self.ad.modules)


class Bottleneck(Kind):
    name = "bottleneck"
    title = "Houlsby / Pfeiffer, AdapterHub layout"
    commands = ("train", "eval", "inspect", "transfer", "tune-bridge", "refine")
    layered = True

    def matches(self, path, config):
        return is_adapterhub_dir(path)

    def read(self, path: str):
        return read_adapterhub(path)

    def transfer_needs(self, ad, port: PortContext) -> dict:
        """{slm layer: {key: {directions}}}: P_in (to_slm) and P_out (to_llm) for every SLM site."""
        arch, stack = port.arch_s, port.stack
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

    def port(self, ad, port: PortContext):
        arch_s, arch_l, stack = port.arch_s, port.arch_l, port.stack
        slm_of = [None] * arch_l.stacks[stack]  # an LLM layer outside every chosen list gets no adapter
        for i, layers in enumerate(port.chosen):
            for j in layers:
                slm_of[j] = i

        def site_maps(st, i, j, placement):
            in_key, out_key = _keys(ad, arch_s, st, placement)
            return port.maps[(j, in_key, "to_slm")], port.maps[(j, out_key, "to_llm")]

        modules, leave_out = port_sites(ad, arch_l, {stack: slm_of}, site_maps)
        return lambda od: write_bottleneck(od, ad.name, dict(ad.bn, leave_out=leave_out), modules, port.llm_config,
                                           arch_l.dims["hidden"], base=port.llm_path)

    def bridge_route(self, path: str, arch, kept: dict, rank: int | None = None, seed: int = 0):
        if rank is not None:
            raise AdapterError(f"tune-bridge --rank grows a LoRA adapter's rank; {path} is a bottleneck adapter, which has none",
                               "leave out --rank (a bottleneck's width is set by --reduction-factor when it is trained)")
        return BottleneckRoute(self, path, arch, kept)

    def wrap(self, model, arch, opts):
        """Hooked adapters on the frozen model, from AdapterHub's default `bert` init, seeded."""
        from ..train.bottleneck import WithBottleneck, attach_bottleneck

        bn = bn_config(opts.adapter_config, reduction_factor=opts.reduction_factor)
        check_activation(bn, "--adapter-config")
        return WithBottleneck(model, attach_bottleneck(model, arch, bn, name=ADAPTER_NAME, seed=opts.seed))

    def save(self, model, od, base: str, opts) -> None:
        mods = model.bottleneck
        mods.detach()
        w = mods.site_weights()
        hidden = int(next(iter(w.values()))["W_down"].shape[1])
        write_bottleneck(od, mods.name, mods.bn, w, model.config.to_dict(), hidden, base)

    def training_record(self, opts) -> dict:
        return {"adapter_config": opts.adapter_config}

    def attach(self, model, path: str, arch):
        """A WithBottleneck; call `.bottleneck.detach()` when done."""
        from ..train.bottleneck import WithBottleneck

        arch = arch or load_arch(model.config.to_dict())
        return WithBottleneck(model, attach_saved(model, arch, path))

    def tunable(self, model, path: str, arch):
        """The hooked adapters' W_down, b_down, W_up, b_up, every site, in name order."""
        wb = self.attach(model, path, arch)
        params = [p for _, p in sorted(wb.bottleneck.named_parameters())]
        wb.requires_grad_(False)
        return wb, params

    def tunable_layers(self, model, params, arch) -> list:
        """Each site's tensors are in its site's layer (the hooks' ModuleDict keys are no dotted module names)."""
        sites = model.bottleneck.parameter_sites()
        return [(sites[id(p)].stack, sites[id(p)].layer) if id(p) in sites else None for p in params]

    def save_tuned(self, od, path: str, model, llm_config: dict, arch) -> None:
        """AdapterHub's layout again, each tensor rounded once to the input's dtype."""
        ad = self.read(path)
        model.bottleneck.detach()
        w = {m: {k: t.cpu().to(ad.modules[m][k].dtype) for k, t in ws.items()}
             for m, ws in model.bottleneck.site_weights().items()}
        write_bottleneck(od, ad.name, ad.bn, w, llm_config, arch.dims["hidden"], ad.base)

    def describe(self, path: str) -> dict:
        """Preset, reduction factor, widths, where the adapters sit."""
        ad = read_adapterhub(path, check_act=False)  # keeps inspect free of the transformers import
        bn = ad.bn
        layers: dict = {}
        for stack, layer, _ in ad.placements.values():
            layers.setdefault(stack, set()).add(layer)
        return {"kind": "adapter", "path": ad.path, "type": self.name, "name": ad.name, "config": preset_of(bn),
                "base": ad.config.get("model_name"), "model_type": ad.config.get("model_type"),
                "parameters": ad.num_parameters(),
                "dtypes": sorted({str(t.dtype).replace("torch.", "") for w in ad.modules.values() for t in w.values()}),
                "reduction_factor": bn["reduction_factor"],
                "widths": sorted({int(w["W_down"].shape[0]) for w in ad.modules.values()}),
                "non_linearity": bn["non_linearity"], "scaling": bn.get("scaling", 1.0),
                "original_ln_before": bool(bn["original_ln_before"]), "residual_before_ln": bn["residual_before_ln"],
                "original_ln_after": bool(bn["original_ln_after"]),
                "placements": sorted({p for _, _, p in ad.placements.values()}),
                "layers": {s: sorted(v) for s, v in layers.items()}, "sites": len(ad.modules)}


KIND = Bottleneck()
