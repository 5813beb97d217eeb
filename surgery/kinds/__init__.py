"""The adapter kinds: one module each, and the one registry that says which commands accept which.

Adding a kind is its module (a `Kind` subclass instance named KIND, see base.py), one line in
REGISTRY, tests and docs. Commands look kinds up here and never branch on a kind's name, so the
"not supported" message and the lists in --help come from the same place.

Kind modules import torch, transformers and peft only inside functions: `surgery --help` imports
this registry.
"""

from __future__ import annotations

import os
from importlib import import_module

from ..errors import AdapterError
from ..io.jsonfile import load_json
from .base import COMMANDS, Kind, MethodOptions

# One line per kind: its module, in the order --help lists them. Each kind's matches() is exclusive
# (lora and dora split LoRA configs on use_dora).
REGISTRY = (
    "lora",
    "dora",
    "lokr",
    "ia3",
    "prompt",
    "prefix",
    "bottleneck",
    "bitfit",
)
ALIASES = {"adapter": "bottleneck"}  # the old `--method adapter`, still accepted

_loaded: dict[str, Kind] = {}


def all_kinds() -> list[Kind]:
    for name in REGISTRY:
        if name not in _loaded:
            _loaded[name] = import_module(f"{__name__}.{name}").KIND
    return [_loaded[n] for n in REGISTRY]


def names(command: str | None = None) -> list[str]:
    """Kind names, in registry order; only those `command` accepts when given."""
    return [k.name for k in all_kinds() if command is None or command in k.commands]


def get(name: str, command: str | None = None) -> Kind:
    """The kind called `name` (e.g. --method), checked against `command` when given."""
    name = ALIASES.get(name, name)
    for k in all_kinds():
        if k.name == name:
            if command:
                require(k, command)
            return k
    raise AdapterError(f"unknown adapter kind {name!r}", f"choose one of {', '.join(names(command))}")


def require(kind: Kind, command: str) -> None:
    assert command in COMMANDS, command
    if command not in kind.commands:
        raise AdapterError(f"{kind.name} is not supported by {command} (supported: {', '.join(names(command))})",
                           _FIX.get(command, "use one of the supported kinds"))


_FIX = {
    "merge-lora": "only kinds that change weights can be folded in; keep the adapter separate "
                  "(`surgery eval --adapter`) or extract a LoRA from the tuned model",
    "unmerge-lora": "unmerge only what merge-lora can fold in",
    "transfer": "retrain the SLM adapter as one of the supported kinds (surgery train --method ...)",
    "tune-bridge": "transfer an adapter of a supported kind first (surgery train --method ..., then surgery transfer)",
}


def _config(path: str) -> dict | None:
    f = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(f):
        return None
    try:
        return load_json(f, AdapterError, "")
    except AdapterError:
        return None  # the kind's reader gives the precise error


def detect(path: str) -> Kind | None:
    """The kind whose files are in the directory `path`, or None."""
    cfg = _config(path)
    for k in all_kinds():
        if k.matches(path, cfg):
            return k
    return None


def kind_of(path: str, command: str) -> Kind:
    """The kind of the adapter directory `path`, refusing one `command` does not accept."""
    kind = detect(path)
    if kind is None:
        from ..io.adapter import Adapter

        ad = Adapter.open(path)  # a missing or malformed directory gets its own precise error
        raise AdapterError(f"{ad.path} is a {ad.peft_type} adapter, which surgery does not know "
                           f"(supported by {command}: {', '.join(names(command))})",
                           "use a PEFT adapter of a supported kind")
    require(kind, command)
    return kind





def support_table() -> str:
    """The markdown table of which command accepts which kind (docs/kinds.md holds a copy; a test compares)."""
    rows = ["| kind | " + " | ".join(COMMANDS) + " |", "|---|" + "---|" * len(COMMANDS)]
    for k in all_kinds():
        rows.append(f"| `{k.name}` ({k.title}) | " + " | ".join("yes" if c in k.commands else "-" for c in COMMANDS) + " |")
    return "\n".join(rows)
