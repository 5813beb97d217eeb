"""AdapterHub's bottleneck adapter directory, read and written with its own file and key names.

What `model.save_adapter(dir, name)` of the `adapters` library writes (loading.py, utils.py):
  adapter_config.json   {"config": {BnConfig fields}, "hidden_size", "model_class", "model_name",
                         "model_type", "name", "version"}, json.dump(indent=2, sort_keys=True)
  pytorch_adapter.bin   torch.save of the adapter's state dict (the default), or
  adapter.safetensors   the same tensors when saved with use_safetensors=True
(save_adapter also copies the model's static head into head_config.json + pytorch_model_head.bin;
load_adapter does not need them and an adapter does not change the head, so we neither write nor
read them.) Each adapter's keys are  <layer prefix><site module>.adapters.<name>.adapter_down.0.weight|bias
and .adapter_up.weight|bias (adapter_down is Sequential(Linear, activation)); the site module per
family and placement (mh_adapter / output_adapter / cross_adapter) is data in the family map
(`bottleneck` section), e.g. transformer.h.3.output_adapters (gpt2), model.layers.3.attention_adapters
(llama), decoder.block.1.layer.1 (t5 cross-attention).

We compute exactly what AdapterHub computes for sequential bottleneck adapters (surgery.ops.bottleneck
states the formula) and refuse the options that add other parameters or another computation
(parallel adapters, new layer norms, gating, PHM/Compacter, invertible adapters, learned scaling,
residual_before_ln="post_add", stochastic depth).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import AdapterError
from .checkpoint import load_state_dict
from .jsonfile import dumps, load_json
from .paths import member

CONFIG = "adapter_config.json"
WEIGHTS_BIN = "pytorch_adapter.bin"
WEIGHTS_SAFE = "adapter.safetensors"
VERSION = "adapters.1.3.0"  # the adapters release whose schema we write (>= 1.1: no legacy fix-ups on load)
PARAM_KEYS = {"W_down": "adapter_down.0.weight", "b_down": "adapter_down.0.bias",
              "W_up": "adapter_up.weight", "b_up": "adapter_up.bias"}
ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # files without "version" predate the rename

# BnConfig's fields and defaults (configuration/adapter_config.py); presets override some of them.
BN_DEFAULTS = {
    "mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
    "original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
    "init_weights": "bert", "init_weights_seed": None, "is_parallel": False, "scaling": 1.0, "use_gating": False,
    "residual_before_ln": True, "adapter_residual_before_ln": False, "inv_adapter": None,
    "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
    "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False,
    "shared_phm_rule": True, "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001,
    "learn_phm": True, "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True,
    "stochastic_depth": 0.0,
}
PRESETS = {  # DoubleSeqBnConfig (Houlsby et al. 2019) and SeqBnConfig (Pfeiffer et al. 2021)
    "houlsby": {"mh_adapter": True, "output_adapter": True, "original_ln_before": False, "non_linearity": "swish"},
    "pfeiffer": {"mh_adapter": False, "output_adapter": True, "original_ln_before": True, "non_linearity": "relu"},
}
# option -> (value we can compute, why another value is refused)
_REQUIRED = {
    "is_parallel": (False, "parallel adapters read the sublayer input"),
    "ln_before": (False, "it adds a layer norm inside the adapter"),
    "ln_after": (False, "it adds a layer norm inside the adapter"),
    "use_gating": (False, "it adds a gate"),
    "phm_layer": (False, "PHM (Compacter) layers are not plain linear maps"),
    "inv_adapter": (None, "invertible adapters act on the embeddings"),
}


def bn_config(kind: str, reduction_factor=None, non_linearity: str | None = None, **overrides) -> dict:
    """The full BnConfig dict AdapterHub saves for the 'houlsby' (double_seq_bn) or 'pfeiffer' (seq_bn) preset."""
    if kind not in PRESETS:
        raise AdapterError(f"unknown bottleneck adapter config {kind!r}", "use houlsby or pfeiffer")
    cfg = {**BN_DEFAULTS, **PRESETS[kind], **overrides}
    if reduction_factor is not None:
        cfg["reduction_factor"] = reduction_factor
    if non_linearity is not None:
        cfg["non_linearity"] = non_linearity
    check_bn_config(cfg, "--adapter-config")
    return cfg


def preset_of(cfg: dict) -> str:
    """'houlsby', 'pfeiffer' or 'custom': which preset's placement and wiring this config has."""
    for kind, p in PRESETS.items():
        if all(cfg.get(k) == v for k, v in p.items() if k != "non_linearity") and not cfg.get("cross_adapter"):
            return kind
    return "custom"


def check_bn_config(cfg: dict, where: str, check_activation: bool = True) -> None:
    """Refuse the options whose computation we do not reproduce exactly (module doc).

    check_activation=False skips resolving non_linearity (it imports transformers: seconds), for inspect.
    """
    from ..ops.bottleneck import activation

    arch = cfg.get("architecture")
    if arch not in (None, "bottleneck"):
        raise AdapterError(f"{where}: an AdapterHub {arch!r} adapter, not a bottleneck adapter",
                           "only bottleneck adapters (houlsby / pfeiffer) are supported here")
    for key, (ok, why) in _REQUIRED.items():
        if cfg.get(key, ok) != ok:
            raise AdapterError(f"{where}: {key}={cfg[key]!r} is not supported ({why})", f"use {key}={ok!r}")
    if not isinstance(cfg.get("scaling", 1.0), (int, float)) or isinstance(cfg.get("scaling"), bool):
        raise AdapterError(f"{where}: scaling={cfg['scaling']!r} is not supported (it adds a learned scale)",
                           "use a constant float scaling")
    if not isinstance(cfg.get("residual_before_ln", True), bool):
        raise AdapterError(f"{where}: residual_before_ln={cfg['residual_before_ln']!r} is not supported "
                           "(AdapterHub itself fails on it for models without a post-norm)", "use true or false")
    if cfg.get("stochastic_depth") not in (None, 0, 0.0):
        raise AdapterError(f"{where}: stochastic_depth={cfg['stochastic_depth']} is not supported", "use 0.0")
    try:
        if check_activation:
            activation(str(cfg.get("non_linearity")))
    except KeyError:
        raise AdapterError(f"{where}: unknown non_linearity {cfg.get('non_linearity')!r}",
                           "use a transformers activation name (relu, swish, gelu, gelu_new, tanh, ...)") from None


def down_size(cfg: dict, hidden: int, index: int) -> int:
    """Bottleneck width at AdapterHub layer `index`: int(hidden // reduction_factor), at least 1."""
    rf = cfg["reduction_factor"]
    if isinstance(rf, dict):
        rf = rf.get(str(index), rf.get("default"))
        if rf is None:
            raise AdapterError(f"reduction_factor {cfg['reduction_factor']} has no entry for layer {index} and no default",
                               'add "default": 16 to the mapping')
    return max(1, int(hidden // rf))


def reduction_factor_for(hidden: int, down: int):
    """A reduction_factor for which AdapterHub builds width `down` on a model of width `hidden`.

    A port keeps the bottleneck width r while the hidden size grows, so its config must say so:
    hidden // r when that divides, else a float between the neighbours that floors to r.
    """
    if hidden % down == 0:
        return hidden // down
    rf = hidden / (down + 0.5)
    assert int(hidden // rf) == down
    return rf


def is_adapterhub_dir(path: str) -> bool:
    """True for a directory AdapterHub's save_adapter wrote (adapter_config.json with a nested "config")."""
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        return False
    try:
        cfg = load_json(cfg_path, AdapterError, "")
    except AdapterError:
        return False
    return isinstance(cfg, dict) and "peft_type" not in cfg and isinstance(cfg.get("config"), dict) and "name" in cfg


@dataclass
class BottleneckAdapter:
    """An AdapterHub bottleneck adapter: its saved config and, per site module path, its weights."""

    path: str
    config: dict  # the whole adapter_config.json
    modules: dict = field(default_factory=dict)  # site module path -> {W_down, b_down, W_up, b_up}
    placements: dict = field(default_factory=dict)  # site module path -> (stack, layer, placement)

    peft_type = "BOTTLENECK"  # the kind name transfer and tune-bridge dispatch on, beside PEFT's

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def base(self) -> str | None:
        """The base model it was saved for (AdapterHub's model_name: a path, or a hub name)."""
        return self.config.get("model_name")

    @property
    def bn(self) -> dict:
        return self.config["config"]

    @property
    def flags(self) -> dict:
        """The keyword arguments of surgery.ops.bottleneck.site_output for this adapter."""
        c = self.bn
        return {"scaling": float(c.get("scaling", 1.0)), "original_ln_before": bool(c.get("original_ln_before", False)),
                "residual_before_ln": bool(c.get("residual_before_ln", True)),
                "original_ln_after": bool(c.get("original_ln_after", True))}

    def num_parameters(self) -> int:
        return sum(t.numel() for w in self.modules.values() for t in w.values())


def site_patterns(spec: dict) -> list:
    """(regex, stack, placement) matching the saved keys of every bottleneck site of a family."""
    from ..arch import bottleneck_templates

    out = []
    for stack, placement, prefix, entry in bottleneck_templates(spec):
        pre = re.escape(prefix).replace(re.escape("{i}"), r"(?P<layer>\d+)")
        # keys may carry a head model's extra prefix (e.g. T5AdapterModel's "transformer.")
        rx = re.compile(rf"^(?:.+\.)?(?P<module>{pre}{re.escape(entry['module'])})\.adapters\.(?P<name>[^.]+)\."
                        rf"(?P<param>adapter_down\.0\.weight|adapter_down\.0\.bias|adapter_up\.weight|adapter_up\.bias)$")
        out.append((rx, stack, placement))
    return out


def read_adapterhub(path: str, check_activation: bool = True) -> BottleneckAdapter:
    """Open an AdapterHub bottleneck adapter directory; weights are keyed by the family map's site paths."""
    from ..arch import family_for_model_type

    path = os.path.abspath(path)
    if not is_adapterhub_dir(path):
        raise AdapterError(f"{path} is not an AdapterHub adapter directory",
                           f"pass the directory save_adapter wrote ({CONFIG} with a nested \"config\" + {WEIGHTS_BIN})")
    cfg = load_json(os.path.join(path, CONFIG), AdapterError, "re-save the adapter with AdapterHub's save_adapter")
    bn = cfg["config"]
    if "version" not in cfg and bn.get("non_linearity") in ACTIVATION_RENAME:
        bn["non_linearity"] = ACTIVATION_RENAME[bn["non_linearity"]]  # what AdapterHub does on load
    bn = {**BN_DEFAULTS, **bn}
    cfg["config"] = bn
    check_bn_config(bn, os.path.join(path, CONFIG), check_activation)
    if not cfg.get("model_type"):
        raise AdapterError(f"{os.path.join(path, CONFIG)} has no model_type", "add the base model's model_type")
    spec = family_for_model_type(cfg["model_type"])
    ad = BottleneckAdapter(path=path, config=cfg)
    inverse = {v: k for k, v in PARAM_KEYS.items()}
    patterns = site_patterns(spec)
    for key, t in sorted(_load(path).items()):
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
        _check_site(path, mod, w)
    return ad


def _check_site(path: str, mod: str, w: dict) -> None:
    missing = [PARAM_KEYS[p] for p in PARAM_KEYS if p not in w]
    if missing:
        raise AdapterError(f"{path}: {mod} lacks {', '.join(missing)}", "the adapter file is incomplete; re-save it")
    r, d = w["W_down"].shape
    if tuple(w["W_up"].shape) != (d, r) or tuple(w["b_down"].shape) != (r,) or tuple(w["b_up"].shape) != (d,):
        raise AdapterError(f"{path}: {mod} has adapter_down {list(w['W_down'].shape)} and adapter_up "
                           f"{list(w['W_up'].shape)} that do not chain", "re-save the adapter")


def _load(path: str) -> dict:
    for name in (WEIGHTS_SAFE, WEIGHTS_BIN):
        if os.path.lexists(os.path.join(path, name)):
            return load_state_dict(member(path, name, error=AdapterError), AdapterError)
    raise AdapterError(f"{path} has {CONFIG} but neither {WEIGHTS_BIN} nor {WEIGHTS_SAFE}",
                       "copy the adapter weights next to its config")


def adapterhub_state_dict(name: str, modules: dict) -> dict:
    """{saved key: tensor} for {site module path: {W_down, b_down, W_up, b_up}}, keys sorted."""
    out = {}
    for mod in sorted(modules):
        for p, suffix in PARAM_KEYS.items():
            out[f"{mod}.adapters.{name}.{suffix}"] = modules[mod][p]
    return dict(sorted(out.items()))


def adapterhub_config(name: str, bn: dict, model_config: dict, hidden: int, model_name: str | None = None) -> dict:
    """The adapter_config.json AdapterHub's build_full_config writes for a model with this config.json."""
    return {"config": dict(bn), "hidden_size": hidden,
            "model_class": (model_config.get("architectures") or [None])[0],
            "model_name": model_name if model_name is not None else model_config.get("_name_or_path"),
            "model_type": model_config["model_type"], "name": name, "version": VERSION}


def write_adapterhub(outdir, config: dict, modules: dict) -> None:
    """Write adapter_config.json, pytorch_adapter.bin and adapter.safetensors into an OutputDir."""
    import torch
    from safetensors.torch import save_file

    from .writer import check_finite

    bn = config["config"]
    check_bn_config(bn, "adapter config")
    rf = bn["reduction_factor"]
    for mod, w in modules.items():
        if not isinstance(rf, dict) and int(w["W_down"].shape[0]) != max(1, int(config["hidden_size"] // rf)):
            raise AdapterError(f"{mod} has width {w['W_down'].shape[0]} but reduction_factor {rf} on hidden size "
                               f"{config['hidden_size']} builds {max(1, int(config['hidden_size'] // rf))}",
                               "set reduction_factor with surgery.io.adapterhub.reduction_factor_for(hidden, width)")
    sd = {}
    for k, t in adapterhub_state_dict(config["name"], modules).items():
        check_finite(k, t)
        sd[k] = t.detach().contiguous().cpu()
    torch.save(sd, outdir.path(WEIGHTS_BIN))  # what load_adapter reads by default
    save_file(sd, outdir.path(WEIGHTS_SAFE))  # what load_adapter(use_safetensors=True) reads
    text = dumps(config, name=CONFIG, indent=2, sort_keys=True)  # AdapterHub's exact formatting
    with open(outdir.path(CONFIG), "w", encoding="utf-8") as f:
        f.write(text)
