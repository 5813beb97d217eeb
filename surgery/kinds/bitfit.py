"""BitFit (Ben Zaken, Ravfogel & Goldberg, ACL 2022): only the bias vectors learn.

Files: the `surgery.bitfit/1` format (docs/formats.md): bitfit.safetensors under checkpoint names +
the bitfit.json manifest; train/bitfit.py freezes, saves and loads it, pipelines/bitfit.py extracts
and applies it (`surgery extract-bitfit` / `apply-bitfit`, which fold it into a checkpoint).
"""

from __future__ import annotations

import os

from ..errors import AdapterError
from .base import Kind


class Bitfit(Kind):
    name = "bitfit"
    title = "BitFit, bias-only"
    commands = ("train", "eval", "inspect")

    def matches(self, path, config):
        from ..train.bitfit import is_bitfit

        return is_bitfit(path)

    def read(self, path: str) -> dict:
        from ..io.jsonfile import load_json
        from ..train.bitfit import MANIFEST

        m = load_json(os.path.join(path, MANIFEST), AdapterError, "re-create it with `surgery extract-bitfit`")
        if not isinstance(m, dict) or not isinstance(m.get("kept"), list):
            raise AdapterError(f"{os.path.join(path, MANIFEST)} is not a BitFit manifest (no \"kept\" list)",
                               "re-create it with `surgery extract-bitfit`")
        return m

    def wrap(self, model, arch, opts):
        from ..train.bitfit import freeze_to_biases

        return freeze_to_biases(model, arch)

    def save(self, model, od, base: str, opts) -> None:
        from ..train.bitfit import save_bitfit

        save_bitfit(model, od, base)

    def attach(self, model, path: str, arch):
        from ..train.bitfit import load_bitfit

        return load_bitfit(model, path)

    def describe(self, path: str) -> dict:
        m = self.read(path)
        base = m.get("base") or {}
        return {"kind": "adapter", "path": os.path.abspath(path), "type": self.name, "format": m.get("format"),
                "base": base.get("path"), "family": base.get("family"), "dtype": m.get("dtype"),
                "parameters": sum(_numel(k.get("shape", [])) for k in m["kept"]),
                "biases": sum(1 for k in m["kept"] if k.get("kind") == "bias"), "heads": m.get("heads") or []}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


KIND = Bitfit()
