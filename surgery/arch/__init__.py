"""Architecture knowledge as data: one JSON file per model family in `families/`.

A family file names every weight (templated per layer), which *space* each tensor axis lives in
(residual stream, per-head attention q/k/v/o, MLP inner, vocabulary, ...), which tensors are linear
layers (PEFT targets) and whether they are stored transposed (GPT-2's Conv1D keeps [in, out]),
fused layouts (`"attn.q|attn.k|attn.v"` = concatenation along that axis), and tied weights.
Pipelines (merge, prune, transfer) ask only this map; nothing else branches on model_type.
Adding a family = adding one file; see docs/arch.md.
"""

from __future__ import annotations

import ast
import operator
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

from ..errors import ArchitectureError
from ..io.jsonfile import load_json

FAMILY_DIR = os.path.join(os.path.dirname(__file__), "families")
ENV_DIRS = "SURGERY_FAMILIES"  # os.pathsep-separated directories of user family files
REQUIRED = ("family", "model_types", "dims", "spaces", "stacks", "globals", "layer")
_user_files: list[str] = []  # --family FILE.json, in the order given (later ones win)


def use_family_files(paths) -> list[dict]:
    """Make these user family files (the CLI's --family) the ones read ahead of the installed and
    SURGERY_FAMILIES maps, replacing any given before; returns their maps."""
    specs = [_read_family(os.path.abspath(p)) for p in paths]
    _user_files[:] = [s["_path"] for s in specs]
    return specs


def _read_family(path: str) -> dict:
    if not os.path.isfile(path):
        raise ArchitectureError(f"family file {path} does not exist", "pass a family map .json (format: docs/arch.md)")
    spec = load_json(path, ArchitectureError, "fix the file (format: docs/arch.md)")
    missing = [k for k in REQUIRED if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise ArchitectureError(f"family file {path} lacks {', '.join(missing)}",
                                "copy an installed family file and edit it (docs/arch.md)")
    if not isinstance(spec["model_types"], list) or not all(isinstance(t, str) for t in spec["model_types"]):
        raise ArchitectureError(f"family file {path}: model_types must be a list of config.json model_type strings")
    spec["_path"] = path
    return spec


def _user_dirs() -> tuple[str, ...]:
    return tuple(d for d in os.environ.get(ENV_DIRS, "").split(os.pathsep) if d)


@lru_cache(maxsize=None)
def _specs(dirs: tuple, files: tuple) -> dict[str, dict]:
    # installed files first, then SURGERY_FAMILIES directories, then --family files: a later file
    # covering the same model_type (or family name) replaces the earlier one
    paths = [os.path.join(FAMILY_DIR, f) for f in sorted(os.listdir(FAMILY_DIR)) if f.endswith(".json")]
    for d in dirs:
        if not os.path.isdir(d):
            raise ArchitectureError(f"{ENV_DIRS} names {d}, which is not a directory",
                                    "set it to directories of family .json files, separated by ':'")
        paths += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".json")]
    specs: dict[str, dict] = {}
    for p in [*paths, *files]:
        spec = _read_family(p)
        for name, old in list(specs.items()):
            if name == spec["family"] or set(old["model_types"]) & set(spec["model_types"]):
                del specs[name]
        specs[spec["family"]] = spec
    return specs


def family_specs() -> dict[str, dict]:
    """{family: map} of every family known now: installed, SURGERY_FAMILIES, --family."""
    return _specs(_user_dirs(), tuple(_user_files))


def find_family(model_type: str) -> dict | None:
    for spec in family_specs().values():
        if model_type in spec["model_types"]:
            return spec
    return None


def family_for_model_type(model_type: str) -> dict:
    spec = find_family(model_type)
    if spec is not None:
        return spec
    known = ", ".join(sorted(t for s in family_specs().values() for t in s["model_types"]))
    raise ArchitectureError(f"model_type {model_type!r} has no family map (known: {known})",
                            f"add a family file with --family FILE.json or in a {ENV_DIRS} directory (docs/arch.md)")


# config.json keys that transformers' models read to change the logits after the LM head (Gemma 2/3's
# soft cap, Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier, MuseGlimmer's
# output_multiplier). A config carrying one its family file does not declare has ops we do not know.
POST_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def logit_ops(config: dict) -> tuple | None:
    """What the model does to its LM head's output before the loss, as (op, value) pairs in order, from its
    family file's "logits" list ({"op": one of ops.loss.POST_OPS, "value": the config key holding its
    parameter}; an op whose key is absent or null is off); () for none. None when that is not known: a
    model_type without a family file, or a config carrying a POST_HEAD_KEYS entry its family does not
    declare. The chunked LM head (ops/loss.py) applies these ops itself; a None sends the caller to the
    model's own full logits, which cannot be wrong, only larger."""
    spec = find_family(config.get("model_type") or "")
    if spec is None:
        return None
    declared = spec.get("logits", [])
    bad = [d for d in declared if not isinstance(d, dict) or not isinstance(d.get("op"), str) or not isinstance(d.get("value"), str)]
    if bad:
        raise ArchitectureError(f"family {spec['family']}: \"logits\" entry {bad[0]!r} is not {{\"op\": ..., \"value\": "
                                "a config.json key}", "fix the family file (docs/arch.md)")
    if any(config.get(k) is not None for k in POST_HEAD_KEYS if k not in {d["value"] for d in declared}):
        return None
    return tuple((d["op"], float(config[d["value"]])) for d in declared if config.get(d["value"]) is not None)


# --- tiny arithmetic for dims like "hidden // heads" or "4 * hidden" ----------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _eval(expr: str, names: dict):
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if names.get(node.id) is None:
                raise KeyError(node.id)
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


@dataclass(frozen=True)
class TensorSpec:
    """One weight of a concrete model, with what each axis means."""

    name: str
    dims: tuple  # per axis: tuple of space names concatenated along that axis
    role: str  # weight | bias | norm | norm_bias | embedding | lm_head | position_bias
    stack: str | None = None
    layer: int | None = None
    module: str | None = None  # full module path when this is a linear layer's weight
    transposed: bool = False  # stored [in, out] (Conv1D) instead of [out, in]
    tied_to: str | None = None  # another tensor this one equals (not stored when tied)
    reads: str | None = None  # for norms: which sublayer reads the normalized stream
    reads_from: str | None = None  # for cross-attention k/v: the stack whose output they read

    @property
    def out_dims(self) -> tuple:
        return self.dims[1] if self.transposed else self.dims[0]

    @property
    def in_dims(self) -> tuple:
        return self.dims[0] if self.transposed else self.dims[1]


@dataclass(frozen=True)
class BottleneckSite:
    """Where one AdapterHub bottleneck adapter sits in a concrete model (full module paths)."""

    stack: str
    layer: int
    index: int  # AdapterHub's layer id: layers counted across stacks (T5: encoder first, then decoder)
    placement: str  # mh_adapter | output_adapter | cross_adapter
    module: str  # AdapterHub hangs the adapter here: <module>.adapters.<name>.adapter_down.0.weight
    output: str  # this module's output (tensor or first of a tuple) is the sublayer output h
    residual: str  # this module's input is the residual stream x entering the sublayer


def bottleneck_templates(spec: dict) -> list[tuple[str, str, str, dict]]:
    """(stack, placement, layer prefix template, site entry) for every bottleneck site of a family."""
    sites = spec.get("bottleneck")
    if not sites:
        raise ArchitectureError(f"family {spec['family']} has no bottleneck adapter sites",
                                "add a 'bottleneck' section to its family file (docs/arch.md)")
    out = []
    for stack in spec["stacks"]:
        for placement, entry in sites.get(stack, {}).items():
            out.append((stack, placement, spec["stacks"][stack]["prefix"], entry))
    return out


@dataclass
class Arch:
    family: str
    spec: dict
    config: dict
    dims: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)
    stacks: dict = field(default_factory=dict)  # stack name -> number of layers

    @property
    def norm(self) -> str:
        return self.spec.get("norm", "rms")

    @property
    def prune(self) -> dict:
        """What structured pruning needs beyond the tensor map: which config key holds each width
        (`config_keys`), neuron spaces and the width they follow (`neurons`), attention groups whose
        heads must be one set per stack (`shared_heads`), and an output scale that depends on the width."""
        return self.spec.get("prune", {})

    def head_groups(self, stack: str) -> dict[str, list[str]]:
        """{attention group: its head spaces} used by the layers of `stack` ("attn" -> attn.q, ...)."""
        out: dict[str, list[str]] = {}
        for t in self.spec["layer"][stack]:
            for axis in t["dims"]:
                for space in axis.split("|"):
                    if "head" in self.spec["spaces"][space]:
                        group = out.setdefault(space.split(".")[0], [])
                        if space not in group:
                            group.append(space)
        return out

    def is_kv(self, space: str) -> bool:
        return bool(self.spec["spaces"][space].get("kv"))

    def space_size(self, space: str) -> int:
        try:
            return int(_eval(self.spec["spaces"][space]["size"], self.dims))
        except KeyError:
            raise ArchitectureError(f"family {self.family} has no space {space!r}") from None

    def head_size(self, space: str) -> int:
        h = self.spec["spaces"][space].get("head", 1)
        return int(_eval(h, self.dims)) if isinstance(h, str) else int(h)

    def axis_size(self, axis: tuple) -> int:
        return sum(self.space_size(s) for s in axis)

    def tied(self) -> dict[str, str]:
        """{tensor: tensor it is tied to} for the ties active under this config."""
        out = {}
        for t in self.spec["globals"]:
            if "tied_to" not in t or (t.get("tied_when") and not self.flags.get(t["tied_when"])):
                continue
            out[t["name"]] = t["tied_to"]
        return out

    def tie_flag(self, name: str) -> str | None:
        """The config flag whose truth ties `name` to another tensor (e.g. tie_word_embeddings), if any."""
        for t in self.spec["globals"]:
            if t["name"] == name and "tied_to" in t:
                return t.get("tied_when")
        return None

    def tensors(self) -> list[TensorSpec]:
        """Every weight of this model, globals first then stack by stack, layer by layer."""
        ties = self.tied()
        out = []
        for t in self.spec["globals"]:
            if self._active(t):
                out.append(self._make(t, t["name"], None, None, ties))
        for stack, n in self.stacks.items():
            prefix = self.spec["stacks"][stack]["prefix"]
            for i in range(n):
                for t in self.spec["layer"][stack]:
                    if not self._active(t) or ("only_layer" in t and t["only_layer"] != i):
                        continue
                    out.append(self._make(t, prefix.format(i=i) + t["name"], stack, i, ties))
        return out

    def stored_tensors(self) -> list[TensorSpec]:
        """Tensors a checkpoint file holds: tied copies are not stored."""
        return [t for t in self.tensors() if t.tied_to is None]

    def linears(self) -> list[TensorSpec]:
        return [t for t in self.tensors() if t.module is not None]

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors()}

    def by_module(self) -> dict[str, TensorSpec]:
        return {t.module: t for t in self.tensors() if t.module is not None}

    def layer_of(self, name: str) -> tuple[str, int] | None:
        """(stack, layer) of a tensor or module named inside a layer of this model, or None (a global, an
        embedding). The stack's prefix may follow a wrapper's own (peft's base_model.model.model.layers.3...)."""
        for stack, n in self.stacks.items():
            pre = re.escape(self.spec["stacks"][stack]["prefix"]).replace(re.escape("{i}"), r"(\d+)")
            m = re.search(rf"(?:^|\.){pre}", name)
            if m and int(m[1]) < n:
                return stack, int(m[1])
        return None

    def bottleneck_sites(self) -> list[BottleneckSite]:
        """Every place a bottleneck adapter can sit, stack by stack, layer by layer."""
        templates = bottleneck_templates(self.spec)
        out, offset = [], 0
        for stack, n in self.stacks.items():
            for i in range(n):
                for st, placement, prefix, e in templates:
                    if st == stack:
                        p = prefix.format(i=i)
                        out.append(BottleneckSite(stack, i, offset + i, placement, p + e["module"],
                                                  p + e["output"], p + e["residual"]))
            offset += n
        return out

    def shape(self, t: TensorSpec) -> tuple:
        return tuple(self.axis_size(a) for a in t.dims)

    def num_parameters(self) -> int:
        n = 0
        for t in self.stored_tensors():
            p = 1
            for s in self.shape(t):
                p *= s
            n += p
        return n

    def _active(self, t: dict) -> bool:
        return not t.get("when") or bool(self.flags.get(t["when"]))

    def _make(self, t, name, stack, layer, ties) -> TensorSpec:
        module = None
        if t.get("module"):
            module = (self.spec["stacks"][stack]["prefix"].format(i=layer) if stack else "") + t["module"]
        return TensorSpec(
            name=name, dims=tuple(tuple(d.split("|")) for d in t["dims"]),
            role=t.get("role", "weight"), stack=stack, layer=layer, module=module,
            transposed=bool(t.get("transposed")), tied_to=ties.get(name),
            reads=t.get("reads"), reads_from=t.get("reads_from"),
        )


def _resolve(alternatives, config: dict, known: dict):
    """First alternative that resolves: a config key, a known name, an expression, or a literal."""
    for alt in alternatives:
        if isinstance(alt, bool) or isinstance(alt, int):
            return alt
        if isinstance(alt, dict):
            if "startswith" in alt:
                key, prefix = alt["startswith"]
                v = config.get(key)
                return isinstance(v, str) and v.startswith(prefix)
            if "not" in alt:
                return not known.get(alt["not"])
            continue
        if alt in config and config[alt] is not None:
            return config[alt]
        if alt in known and known[alt] is not None:
            return known[alt]
        try:
            return _eval(alt, known)
        except (KeyError, ValueError, SyntaxError):
            continue
    return None


def load_arch(config: dict, where: str = "config.json") -> Arch:
    """Build the concrete architecture map of a model from its config.json contents."""
    model_type = config.get("model_type")
    if not model_type:
        raise ArchitectureError(f"{where} has no model_type", "is this a Hugging Face model config?")
    spec = family_for_model_type(model_type)
    arch = Arch(family=spec["family"], spec=spec, config=config)
    for name, alts in spec["dims"].items():
        v = _resolve(alts, config, arch.dims)
        if v is None:
            raise ArchitectureError(f"{where}: cannot determine {name} for {spec['family']} (tried {alts})",
                                    "add the field to config.json")
        arch.dims[name] = int(v)
    for name, alts in spec.get("flags", {}).items():
        arch.flags[name] = bool(_resolve(alts, config, arch.flags))
    for stack, s in spec["stacks"].items():
        v = _resolve(s["count"], config, arch.dims)
        if v is None:
            raise ArchitectureError(f"{where}: cannot determine the layer count of {stack} (tried {s['count']})",
                                    "add the field to config.json")
        arch.stacks[stack] = int(v)
    if arch.dims["heads"] % arch.dims["kv_heads"]:
        raise ArchitectureError(f"{where}: {arch.dims['heads']} heads are not a multiple of {arch.dims['kv_heads']} kv heads",
                                "fix num_key_value_heads")
    return arch


def arch_of(checkpoint) -> Arch:
    return load_arch(checkpoint.config, os.path.join(checkpoint.path, "config.json"))
