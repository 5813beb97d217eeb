"""The PEFT adapter directory format: adapter_config.json + adapter_model.safetensors.

Every key-prefix rule lives here and nowhere else:
  * tuner weights are saved as  base_model.model.<module path>.<param>   (adapter name stripped),
    e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight;
  * modules_to_save are saved as base_model.model.<module path>.<weight|bias> — the full replacement
    of that module (peft >= 0.11 drops the `.modules_to_save.<name>` infix; older files have it);
  * prompt learning (prompt/prefix tuning) saves a single `prompt_embeddings` tensor.
Pattern rules follow peft: rank/alpha_pattern keys match a module name by regex at a dot boundary;
target_modules is a list of name suffixes or one regex matched against the full module name.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from ..errors import AdapterError
from .adapterhub import is_adapterhub_dir
from .checkpoint import load_state_dict
from .jsonfile import load_json
from .paths import member
from .writer import check_finite

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"

PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")


def scaling(r, alpha, rslora: bool = False) -> float:
    """peft's adapter scaling: alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def pattern_key(patterns: dict, module: str) -> str | None:
    """peft's rule: a pattern key matches when it matches the module name's tail at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def layer_index(module: str) -> int | None:
    m = re.search(r"\.(\d+)\.", module)
    return int(m.group(1)) if m else None


def split_targets(targets) -> list[str] | None:
    """One --targets syntax everywhere: a list, "q_proj,v_proj", or a list of such (repeated flags)."""
    if targets is None:
        return None
    items = [targets] if isinstance(targets, str) else list(targets)
    return [t.strip() for item in items for t in item.split(",") if t.strip()] or None


def targets_module(config: dict, module: str) -> bool:
    """Would peft wrap `module` under this config (target_modules, exclude_modules, layers_to_transform)?"""
    tm = config.get("target_modules")
    if tm is None:
        return False
    if isinstance(tm, str):
        ok = tm == "all-linear" or re.fullmatch(tm, module) is not None
    else:
        ok = any(module == t or module.endswith("." + t) for t in tm)
    ex = config.get("exclude_modules")
    if ok and ex:
        ok = not (re.fullmatch(ex, module) if isinstance(ex, str) else any(module == t or module.endswith("." + t) for t in ex))
    ltt = config.get("layers_to_transform")
    if ok and ltt is not None:
        idx = layer_index(module)
        ltt = [ltt] if isinstance(ltt, int) else ltt
        ok = idx is not None and idx in ltt
    return ok


@dataclass
class Adapter:
    path: str
    config: dict
    tensors: dict = field(default_factory=dict)  # saved key -> tensor

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str) -> "Adapter":
        path = os.path.abspath(path)
        cfg_path = os.path.join(path, CONFIG)
        if not os.path.isdir(path):
            raise AdapterError(f"adapter directory {path} does not exist", "pass a PEFT adapter directory (adapter_config.json + weights)")
        if not os.path.exists(cfg_path):
            if os.path.exists(os.path.join(path, "config.json")):
                raise AdapterError(f"{path} is a model directory, not an adapter",
                                   "pass the PEFT adapter directory (with adapter_config.json) here")
            raise AdapterError(f"{path} has no {CONFIG}", "pass a PEFT adapter directory")
        config = load_json(cfg_path, AdapterError, "restore it from the trained adapter")

        if is_adapterhub_dir(path):  # merge-lora and friends land here: say what it is and where it works
            raise AdapterError(f"{path} is a bottleneck adapter (AdapterHub layout); bottleneck adapters add modules "
                               "and cannot be merged into weights", "use it with `surgery eval --adapter`")
        if "peft_type" not in config:
            raise AdapterError(f"{cfg_path} has no peft_type", "is this a PEFT adapter? (AdapterHub adapters are the bottleneck kind)")
        return cls(path=path, config=config, tensors=_load_weights(path))

    @property
    def peft_type(self) -> str:
        return str(self.config["peft_type"]).upper()

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def module_params(self, known: tuple) -> dict[str, dict]:
        """{module path: {param: tensor}} for tuner weights (not modules_to_save); `known` are the
        parameter names the adapter's kind saves per module (e.g. lora_A.weight)."""
        saved = self.modules_to_save()
        out: dict[str, dict] = {}
        for key, t in self.tensors.items():
            if not key.startswith(PREFIX):
                continue
            rest = key[len(PREFIX):]
            if rest.endswith(".base_layer.weight"):
                # peft's save_embedding_layers copies a targeted embedding/lm_head's *base* weight;
                # it is the base model's own tensor, not part of the adapter's delta
                continue
            for p in known:
                if rest.endswith("." + p):
                    out.setdefault(rest[: -len(p) - 1], {})[p] = t
                    break
            else:
                if not any(rest.startswith(m + ".") for m in saved):
                    raise AdapterError(f"{self.path}: unrecognised adapter key {key}",
                                       "this adapter kind or peft version is not supported; re-save it with peft >= 0.11")
        return out

    def modules_to_save(self) -> dict[str, dict]:
        """{module path: {weight|bias: tensor}} for modules saved whole (e.g. a task head)."""
        names = self.config.get("modules_to_save") or []
        out: dict[str, dict] = {}
        for key, t in self.tensors.items():
            rest = key[len(PREFIX):] if key.startswith(PREFIX) else key
            rest = re.sub(r"\.modules_to_save\.[^.]+\.", ".", rest)  # older peft layout
            mod, _, param = rest.rpartition(".")
            if any(mod == n or mod.endswith("." + n) for n in names) and param in ("weight", "bias"):
                out.setdefault(mod, {})[param] = t
        return out

    def rank_alpha(self, module: str, r, alpha) -> tuple:
        """(r, alpha) of `module`: the config's defaults given, overridden by rank_pattern / alpha_pattern."""
        cfg = self.config
        rk = pattern_key(cfg.get("rank_pattern") or {}, module)
        ak = pattern_key(cfg.get("alpha_pattern") or {}, module)
        return (cfg["rank_pattern"][rk] if rk is not None else r), (cfg["alpha_pattern"][ak] if ak is not None else alpha)

    def prompt_embeddings(self):
        if self.peft_type not in PROMPT_TYPES:
            raise AdapterError(f"{self.path} is a {self.peft_type} adapter, not prompt learning")
        if "prompt_embeddings" not in self.tensors:
            raise AdapterError(f"{self.path} has no prompt_embeddings tensor", "re-save the adapter with peft")
        return self.tensors["prompt_embeddings"]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _load_weights(path: str) -> dict:
    # adapters are small: loading whole is fine
    for name in (WEIGHTS, WEIGHTS_BIN):
        if os.path.lexists(os.path.join(path, name)):
            return load_state_dict(member(path, name, error=AdapterError), AdapterError)
    raise AdapterError(f"{path} has {CONFIG} but no {WEIGHTS}", "copy the adapter weights next to its config")


def lora_key(module: str, param: str) -> str:
    return f"{PREFIX}{module}.{param}"


def saved_module_key(module: str, param: str) -> str:
    return f"{PREFIX}{module}.{param}"


def write_adapter(outdir, config: dict, tensors: dict) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an OutputDir (keys already full)."""
    write_weights(outdir, tensors)
    outdir.write_json(CONFIG, config)


def write_weights(outdir, tensors: dict) -> None:
    """Write adapter_model.safetensors into an OutputDir, NaN/inf refused by name; also over the file already
    there (transfer --scale rewrites the ported weights): the OutputDir's temporary directory is what makes
    the output atomic, and safetensors' load_file copies, so nothing still reads the old file."""
    from safetensors.torch import save_file

    clean = {}
    for k in sorted(tensors):
        check_finite(k, tensors[k])
        clean[k] = tensors[k].detach().contiguous().cpu()
    save_file(clean, outdir.path(WEIGHTS), metadata={"format": "pt"})


def lora_config(base: str | None, r: int, alpha: float, target_modules, **extra) -> dict:
    """A minimal adapter_config.json that peft's LoraConfig accepts (unknown keys are not allowed)."""
    cfg = {
        "peft_type": "LORA", "task_type": extra.pop("task_type", None), "base_model_name_or_path": base,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(target_modules) if not isinstance(target_modules, str) else target_modules,
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    cfg.update(extra)
    return cfg
