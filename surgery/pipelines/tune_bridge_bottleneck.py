"""tune-bridge for AdapterHub bottleneck adapters: the route tune_bridge takes for an AdapterHub directory.

The bridge keeps LLM residual coordinates `kept.residual` (W_down is that selection), and every
adapter quantity lives in the residual space, so the bridge's adapter is the LLM adapter restricted
to them (surgery.pipelines.bottleneck.restrict_sites: W_down's columns, W_up's rows, b_up's
entries). It is hooked into the bridge, tuned with the shared loop, and its update is scattered back
at the kept coordinates (lift_sites); the other coordinates keep the LLM adapter's values. When the
bridge dropped layers (--drop-layers), their sites are left as given and the others are renamed to
the bridge's layer numbers (AdapterHub's leave_out layer ids too).
"""

from __future__ import annotations

from ..errors import AdapterError


class BottleneckRoute:
    kind = "bottleneck"

    def __init__(self, adapter_dir: str, arch, kept: dict):
        from ..io.adapterhub import read_adapterhub
        from .bottleneck import check_fits, restrict_sites

        self.ad = ad = read_adapterhub(adapter_dir)
        self.path = ad.path
        fix = "pass the adapter `surgery transfer` wrote for this LLM"
        check_fits(ad, arch, "LLM", fix, fix)
        self.kept = kept["residual"]
        self.rename = _site_names(arch, kept)  # LLM site module -> bridge site module (kept layers only)
        self.bridge_w = restrict_sites({self.rename[m]: w for m, w in ad.modules.items() if m in self.rename}, self.kept)
        self.bn = _bridge_bn(ad.bn, arch, kept)

    def wrap(self, model, bdir: str):
        from ..arch import load_arch
        from ..train.bottleneck import WithBottleneck, attach_bottleneck

        barch = load_arch(model.config.to_dict(), f"{bdir}/config.json")
        if barch.dims["hidden"] != len(self.kept):
            raise AdapterError(f"the bridge at {bdir} has hidden size {barch.dims['hidden']} but its bridge.json keeps "
                               f"{len(self.kept)} residual coordinates", "re-create the bridge with `surgery prune-bridge`")
        return WithBottleneck(model, attach_bottleneck(model, barch, self.bn, weights=self.bridge_w, name=self.ad.name))

    def write(self, od, pm, arch, llm_config: dict) -> None:
        from .bottleneck import lift_sites, write_bottleneck

        pm.bottleneck.detach()
        tuned = {m: {k: v.cpu() for k, v in w.items()} for m, w in pm.bottleneck.site_weights().items()}
        back = {b: m for m, b in self.rename.items()}
        old = {back[b]: self.ad.modules[back[b]] for b in self.bridge_w}
        lifted = lift_sites(old, {back[b]: w for b, w in self.bridge_w.items()},
                            {back[b]: w for b, w in tuned.items()}, self.kept)
        new = {m: lifted.get(m, w) for m, w in self.ad.modules.items()}  # sites of dropped layers: as given
        write_bottleneck(od, self.ad.name, self.ad.bn, new, llm_config, arch.dims["hidden"], self.ad.base)

    @property
    def modules(self) -> int:
        return len(self.ad.modules)


def _site_names(arch, kept: dict) -> dict:
    """{LLM site module: the same site's module in the bridge}, for the layers the bridge keeps."""
    from .bridge_plan import bridge_layer

    out = {}
    for site in arch.bottleneck_sites():
        j = bridge_layer(kept, site.stack, site.layer)
        if j is not None:
            prefix = arch.spec["stacks"][site.stack]["prefix"]
            out[site.module] = prefix.format(i=j) + site.module[len(prefix.format(i=site.layer)):]
    return out


def _bridge_bn(bn: dict, arch, kept: dict) -> dict:
    """The adapter config for the bridge: AdapterHub's leave_out counts layers across stacks, so its
    ids move when the bridge drops layers."""
    from .bridge_plan import bridge_layer

    leave = set(bn.get("leave_out") or [])
    if not leave:
        return bn
    new, offset = [], 0
    for stack, n in arch.stacks.items():
        for i in range(n):
            j = bridge_layer(kept, stack, i)
            if offset + i in leave and j is not None:
                new.append(j + _bridge_offset(kept, stack))
        offset += n
    return {**bn, "leave_out": sorted(new)}


def _bridge_offset(kept: dict, stack: str) -> int:
    """Bridge layers in the stacks before `stack` (AdapterHub numbers layers across stacks)."""
    n = 0
    for st, layers in kept["layers"].items():
        if st == stack:
            return n
        n += sum(e is not None for e in layers)
    return n
