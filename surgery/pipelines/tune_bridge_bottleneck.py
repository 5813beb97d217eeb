"""tune-bridge for AdapterHub bottleneck adapters: the route tune_bridge takes for an AdapterHub directory.

The bridge keeps LLM residual coordinates `kept.residual` (W_down is that selection), and every
adapter quantity lives in the residual space, so the bridge's adapter is the LLM adapter restricted
to them (surgery.pipelines.bottleneck.restrict_sites: W_down's columns, W_up's rows, b_up's
entries). It is hooked into the bridge, tuned with the shared loop, and its update is scattered back
at the kept coordinates (lift_sites); the other coordinates keep the LLM adapter's values.
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
        self.bridge_w = restrict_sites(ad.modules, self.kept)

    def wrap(self, model, bdir: str):
        from ..arch import load_arch
        from ..train.bottleneck import WithBottleneck, attach_bottleneck

        barch = load_arch(model.config.to_dict(), f"{bdir}/config.json")
        if barch.dims["hidden"] != len(self.kept):
            raise AdapterError(f"the bridge at {bdir} has hidden size {barch.dims['hidden']} but its bridge.json keeps "
                               f"{len(self.kept)} residual coordinates", "re-create the bridge with `surgery prune-bridge`")
        return WithBottleneck(model, attach_bottleneck(model, barch, self.ad.bn, weights=self.bridge_w, name=self.ad.name))

    def write(self, od, pm, arch, llm_config: dict) -> None:
        from .bottleneck import lift_sites, write_bottleneck

        pm.bottleneck.detach()
        tuned = {m: {k: v.cpu() for k, v in w.items()} for m, w in pm.bottleneck.site_weights().items()}
        new = lift_sites(self.ad.modules, self.bridge_w, tuned, self.kept)
        write_bottleneck(od, self.ad.name, self.ad.bn, new, llm_config, arch.dims["hidden"], self.ad.base)

    @property
    def modules(self) -> int:
        return len(self.ad.modules)
