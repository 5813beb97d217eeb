"""`surgery refine --layers SPEC`: which layers' adapter tensors a forward-only stage perturbs and moves.

MeZO's estimate gets noisier with every parameter it perturbs (its variance grows with their number),
so after tune-bridge, which trained only the layers its bridge held, the forward passes can be spent
on the layers it did not. The other tensors are not perturbed, not updated, and written back as read.

SPEC, against the LLM's stacks (the family map's `stacks`):
  all               every adapter tensor (the default: refine as without --layers, bit for bit)
  0-2 / 0,1,2       these layers of every stack (each index must exist in each stack)
  decoder:0-2,...   per stack, for a model with several (T5: encoder, decoder)
  untuned           the layers a tune-bridge output's bridge did not hold: its tune_bridge.json names
                    the bridge, whose bridge.json lists the dropped layers
"""

from __future__ import annotations

import os
import re

from ..errors import AdapterError, ShapeError, SurgeryError
from ..io.jsonfile import load_json

ALL = "all"
UNTUNED = "untuned"
_ITEM = re.compile(r"^(?:(?P<stack>[A-Za-z_][\w.]*):)?(?P<lo>\d+)(?:-(?P<hi>\d+))?$")
_FIX = "pass --layers all, a list such as 0-2 or 0,1,3 (STACK:0-2 on a model with several stacks), or untuned"


def parse_layers(spec: str | None) -> list | str | None:
    """None for every layer; UNTUNED; else [(stack or None, first, last)] (syntax only: no model needed)."""
    if spec is None or spec.strip() == ALL:
        return None
    if spec.strip() == UNTUNED:
        return UNTUNED
    out = []
    for item in spec.split(","):
        m = _ITEM.match(item.strip())
        if not m or (m["hi"] is not None and int(m["hi"]) < int(m["lo"])):
            raise SurgeryError(f"--layers {spec!r}: cannot read {item.strip()!r}", _FIX)
        out.append((m["stack"], int(m["lo"]), int(m["hi"] if m["hi"] is not None else m["lo"])))
    return out


def dropped_layers(bridge: str, what: str, fix: str) -> dict[str, list[int]]:
    """{stack: sorted LLM layers} the prune-bridge output `bridge` dropped (its bridge.json), stacks that dropped
    none left out. bridge.json travels with the bridge, so it is read as any user's JSON (io.jsonfile) and every
    index must be a plain non-negative int; WHAT starts each error line."""
    if not isinstance(bridge, str):
        raise AdapterError(f"{what}: the bridge's path is {bridge!r}, not a path", fix)
    path = os.path.join(bridge, "bridge.json")
    if not os.path.exists(path):
        raise AdapterError(f"{what}: {path} is missing (it lists the layers the bridge dropped)", fix)
    layers = load_json(path, AdapterError, fix).get("layers")
    dropped = layers.get("dropped") if isinstance(layers, dict) else None
    if not isinstance(dropped, dict) or not all(  # a hostile file: indices are plain non-negative ints
            isinstance(v, list) and all(type(i) is int and i >= 0 for i in v) for v in dropped.values()):
        raise AdapterError(f"{what}: the dropped layers in {bridge}'s bridge.json are malformed", fix)
    return {st: sorted(v) for st, v in dropped.items() if v}


def untuned_layers(adapter_dir: str) -> dict[str, list[int]]:
    """{stack: LLM layers} that the bridge of tune-bridge output `adapter_dir` dropped (it tuned the others)."""
    fix = "pass the layers explicitly (--layers 0-2)"
    path = os.path.join(adapter_dir, "tune_bridge.json")
    if not os.path.exists(path):
        raise AdapterError(f"--layers untuned: {path} is missing (untuned reads a tune-bridge output's "
                           "tune_bridge.json and its bridge's bridge.json)", fix)
    bridge = load_json(path, AdapterError, fix).get("bridge")
    dropped = dropped_layers(bridge, "--layers untuned", fix)
    if not dropped:
        raise AdapterError(f"--layers untuned: the bridge {bridge} held every layer of the LLM, so none is untuned",
                           "refine every layer (leave out --layers)")
    return dropped


def resolve_layers(parsed, arch, adapter_dir: str) -> dict[str, set[int]] | None:
    """{stack: layer indices} of the LLM `arch` that parse_layers' result names (None: every tensor)."""
    if parsed is None:
        return None
    if parsed == UNTUNED:
        parsed = [(st, i, i) for st, v in untuned_layers(adapter_dir).items() for i in v]
    chosen: dict[str, set[int]] = {}
    for stack, lo, hi in parsed:
        if stack is not None and stack not in arch.stacks:
            raise ShapeError(f"--layers: the LLM has no stack {stack!r} (its stacks: {', '.join(arch.stacks)})", _FIX)
        for st in [stack] if stack else list(arch.stacks):
            n = arch.stacks[st]
            if hi >= n:
                where = f" in its {st} stack" if len(arch.stacks) > 1 else ""
                raise ShapeError(f"--layers: layer {hi} is out of range (the LLM has {n} layers{where}: 0-{n - 1})",
                                 "pass layers that exist" + (f", or qualify them by stack (STACK:{lo}-{hi})"
                                                             if len(arch.stacks) > 1 else ""))
            chosen.setdefault(st, set()).update(range(lo, hi + 1))
    return chosen


def describe(chosen: dict[str, set[int]] | None) -> dict[str, list[int]] | str:
    """refine.json's record of the selection: "all", or {stack: sorted layers}."""
    return ALL if chosen is None else {st: sorted(v) for st, v in chosen.items()}


def select(params: list, where: list, chosen: dict[str, set[int]], spec: str) -> list:
    """The tensors of `params` in the chosen layers (where[i] = (stack, layer) or None), in their order."""
    out = [p for p, w in zip(params, where) if w is not None and w[1] in chosen.get(w[0], ())]
    if not out:
        held = sorted({w for w in where if w is not None})
        raise AdapterError(f"--layers {spec}: the adapter has no tensor in those layers (it has tensors in "
                           f"{', '.join(f'{st} {i}' for st, i in held) or 'no layer'})",
                           "pick layers the adapter covers (`surgery inspect ADAPTER` lists its modules)")
    return out
