"""Which spaces a transfer must map, and where in a model their activations are read.

Everything comes from the family map. Within one layer of a stack, each linear module reads one
space and writes one (or a fused concatenation of several). The keys used for fitting are:

  in.<sublayer>   the normalised residual a sublayer reads (q/k/v read `in.attn`, gate/up `in.mlp`);
                  captured at the input of the first module that reads it
  out.<sublayer>  the residual a module writes (o_proj → `out.attn`, down_proj → `out.mlp`);
                  captured at that module's output
  res             the raw residual stream entering the layer (input of its first norm); its map is the
                  prior the out.* fits fall back to in directions their own data barely excites
  <space>         an inner space (`attn.q`, `attn.k`, `attn.v`, `attn.o`, `mlp.inner`). When some
                  module *reads* the space (o_proj reads attn.o, down_proj reads mlp.inner) it is
                  captured there — after the nonlinearity, where its activations span the space;
                  otherwise at the output of the module that writes it (sliced out of a fused
                  output like GPT-2's q|k|v c_attn).

A module's LoRA needs `to_slm` of its input key (A_llm = A·Q) and `to_llm` of its output keys
(B_llm = P·B, block-diagonal over a fused output).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import AdapterError


@dataclass(frozen=True)
class Capture:
    key: str  # the space key (see module docstring)
    module: str  # module path inside the layer, e.g. "mlp.down_proj"
    side: str  # "in" (the module's input) or "out" (its output)
    axis: tuple  # the spaces along the captured vector (a fused axis for sliced outputs)


@dataclass(frozen=True)
class ModuleRole:
    module: str  # module path inside the layer
    in_key: str
    out_keys: tuple  # one per part of a (possibly fused) output axis
    out_axis: tuple


def layer_roles(arch, stack: str) -> dict[str, ModuleRole]:
    """{module suffix: its input key and output keys} for one layer of `stack`."""
    roles, reads = {}, None
    for t in arch.spec["layer"][stack]:
        if t.get("role") == "norm" and t.get("reads"):
            reads = t["reads"]  # modules after a norm read its output, until the next norm
        if not t.get("module") or not arch._active(t):
            continue
        dims = [tuple(d.split("|")) for d in t["dims"]]
        out_axis, in_axis = (dims[1], dims[0]) if t.get("transposed") else (dims[0], dims[1])
        sub = t.get("reads_from") or reads
        in_key = f"in.{sub}" if in_axis == ("residual",) else "|".join(in_axis)
        out_keys = (f"out.{reads}",) if out_axis == ("residual",) else out_axis
        roles[t["module"]] = ModuleRole(t["module"], in_key, out_keys, out_axis)
    return roles


def capture_points(arch, stack: str) -> dict[str, Capture]:
    """{key: where its activations are read} for one layer of `stack`."""
    roles = layer_roles(arch, stack)
    points: dict[str, Capture] = {}
    norm = next(t for t in arch.spec["layer"][stack] if t.get("role") == "norm")
    points["res"] = Capture("res", norm["name"].rpartition(".")[0], "in", ("residual",))
    for r in roles.values():  # spaces some module reads: its input (post-nonlinearity for mlp.inner)
        if r.in_key not in points:
            axis = ("residual",) if r.in_key.startswith("in.") else tuple(r.in_key.split("|"))
            points[r.in_key] = Capture(r.in_key, r.module, "in", axis)
    for r in roles.values():  # spaces only written: the writer's output
        for key in r.out_keys:
            if key not in points:
                points[key] = Capture(key, r.module, "out", r.out_axis)
    return points


def slice_of(arch, cap: Capture):
    """(start, stop) of cap.key along the captured vector of this model (fused outputs)."""
    if len(cap.axis) == 1:
        return 0, arch.axis_size(cap.axis)
    start = 0
    for s in cap.axis:
        if s == cap.key:
            return start, start + arch.space_size(s)
        start += arch.space_size(s)
    raise KeyError(cap.key)


def locate(arch, module: str) -> tuple[str, int, str]:
    """Full module path → (stack, layer, module suffix inside the layer)."""
    t = arch.by_module().get(module)
    if t is None or t.stack is None:
        raise AdapterError(f"adapter module {module} is not a linear layer inside a {arch.family} layer stack",
                           "transfer ports modules of the layer stacks only (not lm_head or embeddings); "
                           "retrain the SLM adapter without it")
    prefix = arch.spec["stacks"][t.stack]["prefix"].format(i=t.layer)
    return t.stack, t.layer, t.module[len(prefix):]


def module_path(arch, stack: str, layer: int, suffix: str) -> str:
    return arch.spec["stacks"][stack]["prefix"].format(i=layer) + suffix


def kv_keys(arch, stack) -> tuple[str, str]:
    """The key and value spaces of self-attention (spaces flagged kv, in map order)."""
    roles = layer_roles(arch, stack)
    kv = [k for r in roles.values() for k in r.out_keys if arch.spec["spaces"].get(k, {}).get("kv")]
    kv = list(dict.fromkeys(kv))
    if len(kv) < 2:
        raise AdapterError(f"family {arch.family} has no key/value spaces for prefix tuning")
    return kv[0], kv[1]
