"""Attach bottleneck adapters to an unmodified transformers model with forward hooks.

Where: the family map's `bottleneck` sites (surgery.arch.Arch.bottleneck_sites). At each active
site a forward pre-hook on the `residual` module (the norm in front of the sublayer) records the
residual stream x, and a forward hook on the `output` module replaces the sublayer output h by
surgery.ops.bottleneck.site_sublayer(h, x, ...), so the block's own `x + h` becomes AdapterHub's y.
Nothing is added to the model's module tree: `model.save_pretrained` and `state_dict()` stay
clean, and `detach()` restores the model exactly.

Parameters mirror AdapterHub's `Adapter` module (adapter_down = Sequential(Linear, activation),
adapter_up = Linear), so weights map 1:1 to its saved keys (surgery.io.adapterhub).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError
from ..io.adapterhub import check_bn_config, down_size
from ..ops.bottleneck import activation, site_sublayer


class _Act(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.f = activation(name)

    def forward(self, x):
        return self.f(x)


class Bottleneck(nn.Module):
    """One adapter: W_down [r, d] (+ b_down), activation, W_up [d, r] (+ b_up)."""

    def __init__(self, hidden: int, down: int, non_linearity: str):
        super().__init__()
        self.adapter_down = nn.Sequential(nn.Linear(hidden, down), _Act(non_linearity))
        self.adapter_up = nn.Linear(down, hidden)

    def weights(self) -> dict:
        lin = self.adapter_down[0]
        return {"W_down": lin.weight, "b_down": lin.bias, "W_up": self.adapter_up.weight, "b_up": self.adapter_up.bias}

    def load(self, w: dict) -> None:
        with torch.no_grad():
            for name, p in self.weights().items():
                if tuple(w[name].shape) != tuple(p.shape):
                    raise AdapterError(f"{name} has shape {list(w[name].shape)}, the site needs {list(p.shape)}",
                                       "the adapter was trained for a model of another width")
                p.copy_(w[name].to(p.dtype))

    def init(self, scheme: str, g: torch.Generator) -> None:
        """AdapterHub's init_weights schemes (methods/modeling.py), drawn from a seeded generator."""
        lin, up = self.adapter_down[0], self.adapter_up
        with torch.no_grad():
            if scheme == "bert":
                lin.weight.normal_(0.0, 0.02, generator=g)
                up.weight.normal_(0.0, 0.02, generator=g)
            elif scheme == "houlsby":
                nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2, generator=g)
                nn.init.trunc_normal_(up.weight, std=1e-2, a=-2e-2, b=2e-2, generator=g)
            elif scheme == "mam_adapter":
                nn.init.kaiming_uniform_(lin.weight, a=5 ** 0.5, generator=g)
                up.weight.zero_()
            else:
                raise AdapterError(f"unknown init_weights {scheme!r}", "use bert, houlsby or mam_adapter")
            lin.bias.zero_()
            up.bias.zero_()


class BottleneckAdapters(nn.Module):
    """The trainable adapters of one model, keyed by site; hooks live until detach()."""

    def __init__(self, name: str, bn: dict, sites: list, hidden: int, downs: dict):
        super().__init__()
        self.name, self.bn, self.sites = name, bn, {s.module: s for s in sites}
        self.adapters = nn.ModuleDict({_key(s.module): Bottleneck(hidden, downs[s.module], bn["non_linearity"])
                                       for s in sites})
        self.flags = {"scaling": float(bn.get("scaling", 1.0)), "original_ln_before": bool(bn["original_ln_before"]),
                      "residual_before_ln": bool(bn["residual_before_ln"]), "original_ln_after": bool(bn["original_ln_after"])}
        self.dropout = float(bn.get("dropout") or 0.0)
        self._handles: list = []
        self._x: dict = {}

    def site_weights(self) -> dict:
        """{site module path: {W_down, b_down, W_up, b_up}} detached (what surgery.io.adapterhub writes)."""
        return {m: {k: v.detach() for k, v in self.adapters[_key(m)].weights().items()} for m in self.sites}

    def parameter_sites(self) -> dict:
        """{id(tensor): its BottleneckSite} for every adapter tensor (refine --layers selects by the site's layer)."""
        return {id(p): site for mod, site in self.sites.items() for p in self.adapters[_key(mod)].parameters()}

    def _attach(self, model) -> None:
        for mod, site in self.sites.items():
            ad = self.adapters[_key(mod)]
            self._handles.append(model.get_submodule(site.residual).register_forward_pre_hook(
                self._remember(mod), with_kwargs=True))
            self._handles.append(model.get_submodule(site.output).register_forward_hook(self._adapt(mod, ad)))

    def _remember(self, mod):
        def hook(module, args, kwargs):
            self._x[mod] = args[0] if args else next(iter(kwargs.values()))
        return hook

    def _adapt(self, mod, ad: Bottleneck):
        def hook(module, args, output):
            h = output if isinstance(output, torch.Tensor) else output[0]
            x = self._x.pop(mod, None)
            if x is None:
                raise AdapterError(f"bottleneck site {mod}: the sublayer ran without its norm", "this model's forward "
                                   "does not match the family map's bottleneck sites")
            w = ad.weights()
            dt = w["W_down"].dtype
            act = ad.adapter_down[1].f
            # AdapterHub's adapter dropout acts when the model trains (the hooked module's mode)
            new = site_sublayer(h.to(dt), x.to(dt), w, act, **self.flags, dropout=self.dropout,
                                training=module.training).to(h.dtype)
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])
        return hook

    def detach(self) -> None:
        """Remove every hook: the model computes exactly what it did before attach."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._x.clear()


def _key(module_path: str) -> str:
    return module_path.replace(".", "-")  # ModuleDict keys may not contain dots


def attach_bottleneck(model, arch, bn: dict, weights: dict | None = None, name: str = "adapter",
                      init: str | None = None, seed: int = 0) -> BottleneckAdapters:
    """Hook AdapterHub bottleneck adapters into `model` (whose family map is `arch`); returns their module.

    bn: AdapterHub's BnConfig dict (surgery.io.adapterhub.bn_config). weights: {site module path:
    {W_down, b_down, W_up, b_up}} to load (e.g. BottleneckAdapter.modules); without it the adapters
    are initialised with `init` (default: the config's init_weights), seeded.
    """
    check_bn_config(bn, "adapter config")
    leave_out = set(bn.get("leave_out") or [])
    sites = [s for s in arch.bottleneck_sites() if bn.get(s.placement) and s.index not in leave_out]
    if weights is not None:
        have, want = set(weights), {s.module for s in sites}
        if have != want:
            extra, missing = sorted(have - want), sorted(want - have)
            raise AdapterError(f"the adapter's sites do not match the config on this model "
                               f"(missing: {missing[:3]}, unexpected: {extra[:3]})",
                               "use the adapter with the model family and layer count it was made for")
    hidden = arch.dims["hidden"]
    # a loaded adapter keeps its own width (a port keeps r); a fresh one gets hidden // reduction_factor
    downs = {s.module: int(weights[s.module]["W_down"].shape[0]) if weights is not None else down_size(bn, hidden, s.index)
             for s in sites}
    param = next(iter(model.parameters()))
    mods = BottleneckAdapters(name, bn, sites, hidden, downs).to(param.device)
    if weights is not None:
        for m in sites:
            mods.adapters[_key(m.module)].load(weights[m.module])
    else:
        g = torch.Generator().manual_seed(seed)
        for m in sites:
            mods.adapters[_key(m.module)].init(init or bn.get("init_weights", "bert"), g)
    mods._attach(model)
    return mods


class WithBottleneck(nn.Module):
    """A frozen model and its hooked bottleneck adapters as one module, so the shared training loop
    (which optimises `parameters()` with requires_grad) and the scorer (which calls the model) need
    no adapter-specific code. The model's own module tree and state_dict stay untouched."""

    def __init__(self, model, bottleneck: BottleneckAdapters):
        super().__init__()
        model.requires_grad_(False)
        self.model, self.bottleneck = model, bottleneck

    @property
    def config(self):
        return self.model.config

    def get_output_embeddings(self):  # the scorer's chunked loss runs the LM head itself (train/score.py)
        return self.model.get_output_embeddings()

    def forward(self, **kwargs):
        return self.model(**kwargs)
