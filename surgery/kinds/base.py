"""What every adapter kind answers, and the small records the commands hand it.

A kind is one object (an instance of a `Kind` subclass, one module per kind in this package) with
the operations the commands need. A command never asks for a kind by name: it finds the kind of a
directory (`surgery.kinds.detect`) or of `--method` (`surgery.kinds.get`), checks that the kind
lists the command (`surgery.kinds.require`), and calls the operation. The base class refuses every
operation, so a kind implements exactly what its `commands` tuple claims (tests/test_kinds.py
checks the two agree).

Operations, by command:
  read(path)                                  every command: the opened adapter
  merge_steps(ad, target, weight, sign)       merge-lora / unmerge-lora: the delta of each module
  transfer_needs(ad, port) / port(ad, port)   transfer: which spaces to fit; carry the weights over
  bridge_route(path, arch, kept, rank, seed)  tune-bridge: restrict to the bridge, lift back (rank: LoRA's --rank)
  wrap(model, arch, opts) / save(...)         train: put fresh trainable weights on a model; write them
  attach(model, path, arch)                   eval: put saved weights on a loaded model
  tunable(model, path, arch) / save_tuned(...) refine: saved weights on the frozen LLM, as tensors to
                                              tune in place; write them back in the input's format
  describe(path)                              inspect
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import AdapterError, NumericsError
from ..io.adapter import Adapter, write_adapter
from ..io.writer import nonfinite_count

COMMANDS = ("train", "eval", "inspect", "merge-lora", "unmerge-lora", "transfer", "tune-bridge", "refine")


@dataclass
class MethodOptions:
    """The options `surgery train` passes to a kind's wrap(); each kind reads the ones it has."""

    rank: int = 8
    alpha: float | None = None  # default 2 x rank
    targets: list | None = None  # module-name suffixes; default: the kind's own choice from the family map
    virtual_tokens: int = 8
    adapter_config: str = "houlsby"
    reduction_factor: float | None = None
    seed: int = 0


@dataclass
class Step:
    """One change to one output tensor of a merge: fn(current float32, original stored) -> new float32."""

    label: str  # "adapter-dir:module" for messages
    fn: object
    lowrank: object = None  # a plain LoRA step's LowRankDelta: lets merge fold in place, row block by block


@dataclass
class MergeTarget:
    """The checkpoint a merge writes, as the kinds see it: its family map and what DoRA records."""

    arch: object
    by_module: dict  # module path -> linear TensorSpec (built once)
    by_name: dict  # tensor name -> TensorSpec
    norms_in: dict | None = None  # DoRA row norms recorded at merge time (unmerge reads them)
    norms_out: dict = field(default_factory=dict)  # DoRA row norms computed while merging
    generic: bool = False  # the generic linear-layer map (no family file): every weight is nn.Linear's [out, in]
    path: str = ""  # the checkpoint, for messages

    def linear(self, ad, module: str):
        """(spec, shape as stored, (out, in)) of the linear layer an adapter module wraps."""
        spec = self.by_module.get(module)
        if spec is None and self.generic:
            raise AdapterError(f"{ad.path}: module {module} has no 2-D weight {module}.weight in {self.path}",
                               "was the adapter trained on another base? (a tied lm_head needs a family file: docs/arch.md)")
        if spec is None:
            raise AdapterError(f"{ad.path}: module {module} is not a linear layer of this {self.arch.family} model",
                               "was the adapter trained on another base? `surgery inspect` shows both")
        shape = self.arch.shape(spec)
        return spec, shape, ((shape[1], shape[0]) if spec.transposed else shape)


@dataclass
class PortContext:
    """What `surgery transfer` knows when a kind carries its weights over (see pipelines/transfer/run.py).

    maps[(llm layer, space key, "to_slm"|"to_llm")] are the fitted projections; `embed` the
    embedding-space maps; `roles` the SLM layer's {module suffix: ModuleRole}; locate(module) ->
    (stack, layer, suffix) in the SLM; llm_module(layer, suffix) -> module path in the LLM;
    kv_keys() -> the key and value spaces of self-attention.
    """

    arch_s: object
    arch_l: object
    stack: str
    blocks: list  # per SLM layer, its block of LLM layers
    chosen: list | None = None  # per SLM layer, the LLM layers that take its modules (--depth)
    maps: dict = field(default_factory=dict)
    embed: dict = field(default_factory=dict)
    llm_path: str = ""
    llm_config: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)
    locate: object = None
    llm_module: object = None
    kv_keys: object = None


def checked(label: str, t):
    """Refuse a delta with NaN or inf before anything is written."""
    bad = nonfinite_count(t)
    if bad:
        raise NumericsError(f"{label}: the adapter's delta has {bad} NaN/inf values",
                            "the adapter is broken (check its weights and alpha/scaling); nothing was written")
    return t


class Kind:
    """The operations of one adapter kind (module doc). Subclasses set the attributes and override
    the operations their `commands` name."""

    name = ""  # the one name: --method, "kind" in every JSON record, error messages
    title = ""  # for help and docs, e.g. "LoRA (Hu et al. 2021)"
    commands: tuple = ()
    peft_type: str | None = None  # adapter_config.json's peft_type, for kinds saved in PEFT's format
    layered = False  # transfer: modules sit in chosen layers, so --depth applies
    needs_embeddings = False  # transfer: fit the embedding-space map

    def matches(self, path: str, config: dict | None) -> bool:
        """Is the directory `path` (adapter_config.json contents, or None) saved by this kind?"""
        return self.peft_type is not None and isinstance(config, dict) and \
            str(config.get("peft_type", "")).upper() == self.peft_type

    def _refuse(self, command: str):
        from . import require  # lazy: the registry (kinds/__init__.py) imports this module

        require(self, command)
        raise NotImplementedError(f"{self.name} lists {command} but does not implement it")  # a bug, not bad input

    def read(self, path: str):
        return Adapter.open(path)

    def merge_steps(self, ad, target: MergeTarget, weight: float, sign: int) -> list:
        return self._refuse("merge-lora" if sign > 0 else "unmerge-lora")

    def transfer_needs(self, ad, port: PortContext) -> dict:
        return {}

    def port(self, ad, port: PortContext):
        """A function writing the ported adapter into an OutputDir."""
        return self._refuse("transfer")

    def bridge_route(self, path: str, arch, kept: dict, rank: int | None = None, seed: int = 0):
        return self._refuse("tune-bridge")

    def wrap(self, model, arch, opts: MethodOptions):
        return self._refuse("train")

    def save(self, model, od, base: str, opts: MethodOptions) -> None:
        """PEFT kinds: peft's own save_pretrained, with the base's path recorded."""
        model.peft_config["default"].base_model_name_or_path = base
        model.save_pretrained(od.tmp)

    def training_record(self, opts: MethodOptions) -> dict:
        """Extra keys for training.json."""
        return {}

    def attach(self, model, path: str, arch):
        """PEFT kinds: peft's own loader, after our reader has checked the directory."""
        from peft import PeftModel

        self.read(path)  # clear errors for a missing or malformed directory
        try:
            return PeftModel.from_pretrained(model, path)
        except (RuntimeError, ValueError, KeyError) as e:
            raise AdapterError(f"{path} does not fit this model ({str(e).splitlines()[0]})",
                               "evaluate the adapter on the model it was trained or transferred for") from e

    def tunable(self, model, path: str, arch):
        """refine: (the frozen `model` with the saved adapter on it, the adapter's tensors in a fixed
        order). Every parameter ends with requires_grad False: refine updates them in place."""
        return self._refuse("refine")

    def tunable_layers(self, model, params, arch) -> list:
        """refine --layers: (stack, layer) of each of tunable's `params` (None: outside every layer), found
        by the tensor's name in `model` (peft names them after the module they adapt)."""
        names = {id(p): n for n, p in model.named_parameters()}
        return [arch.layer_of(names.get(id(p), "")) for p in params]

    def save_tuned(self, od, path: str, model, llm_config: dict, arch) -> None:
        """refine: write the tuned tensors of `model` into the OutputDir in the format `path` has."""
        return self._refuse("refine")

    def describe(self, path: str) -> dict:
        """inspect: the fields every PEFT-format kind shares, then the kind's own (details)."""
        ad = self.read(path)
        return {"kind": "adapter", "path": ad.path, "type": self.name, "peft_type": ad.peft_type, "base": ad.base,
                "parameters": ad.num_parameters(),
                "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in ad.tensors.values()}), **self.details(ad)}

    def details(self, ad) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"<kind {self.name}>"


def peft_tunable(kind: Kind, model, path: str):
    """refine for a PEFT-format kind: peft's loader with is_trainable, which marks exactly the
    adapter's tensors; they are collected by name (a fixed order) and then frozen too."""
    from peft import PeftModel

    kind.read(path)  # clear errors for a missing or malformed directory
    try:
        pm = PeftModel.from_pretrained(model, path, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"{path} does not fit this LLM ({str(e).splitlines()[0]})",
                           "pass the adapter written for this LLM (by `surgery transfer` or `tune-bridge`)") from e
    params = [p for _, p in sorted(pm.named_parameters()) if p.requires_grad]
    pm.requires_grad_(False)
    return pm, params


def write_peft_tuned(kind: Kind, od, path: str, model) -> None:
    """refine for a PEFT-format kind: the input's adapter_config.json, its keys, its dtypes (rounded once)."""
    from peft import get_peft_model_state_dict

    ad = kind.read(path)
    new = get_peft_model_state_dict(model)
    if set(new) != set(ad.tensors):
        extra, missing = sorted(set(new) - set(ad.tensors)), sorted(set(ad.tensors) - set(new))
        raise AdapterError(f"peft saves other keys than {ad.path} holds (missing {missing[:2]}, unexpected {extra[:2]})",
                           f"pass a {kind.name} adapter as peft saves it")
    write_adapter(od, ad.config, {k: new[k].detach().cpu().to(ad.tensors[k].dtype) for k in new})


class PeftRefine:
    """refine for a kind saved in PEFT's format (mixed in before Kind): peft_tunable and
    write_peft_tuned above, as methods."""

    def tunable(self, model, path: str, arch):
        return peft_tunable(self, model, path)

    def save_tuned(self, od, path: str, model, llm_config: dict, arch) -> None:
        write_peft_tuned(self, od, path, model)
