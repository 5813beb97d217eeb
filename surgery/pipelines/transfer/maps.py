"""The fitted maps of a transfer, spilled to disk window by window and read back one at a time.

A 1B-scale LLM's maps alone can outweigh a layer (an MLP inner space 5632 wide against a 2816-wide
SLM is 127 MB per direction in float64), so a window's maps go to a float32 safetensors file in the
output's temporary directory as soon as they are fitted; the port reads each map when it needs it,
and `write` assembles projections.safetensors (docs/formats.md) without holding them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ...io.safetensors_file import SafetensorsWriter, dtype_tag
from ...io.writer import check_finite


def map_name(stack: str, key: tuple) -> str:
    j, space, direction = key
    return f"{stack}.{j}.{space}.{direction}"


class MapStore(Mapping):
    """{(llm layer, space, direction): float64 map}; disk-backed after `spill`."""

    def __init__(self, folder: str, stack: str):
        self.folder, self.stack = folder, stack
        self.where: dict = {}  # key -> spill file
        self.mem: dict = {}  # small maps kept in memory (the shared embedding map reused per layer)
        self.files: list[str] = []

    def put(self, key, m) -> None:
        self.mem[key] = m

    def spill(self, maps: dict) -> None:
        from safetensors.torch import save_file

        if not maps:
            return
        tensors = {map_name(self.stack, k): m.float().contiguous() for k, m in maps.items()}
        for name, t in tensors.items():
            check_finite(name, t)
        path = os.path.join(self.folder, f".maps-{len(self.files)}.safetensors")
        save_file(tensors, path)
        self.files.append(path)
        self.where.update(dict.fromkeys(maps, path))

    def __getitem__(self, key):
        import torch
        from safetensors import safe_open

        if key in self.mem:
            return self.mem[key]
        with safe_open(self.where[key], "pt") as f:
            return f.get_tensor(map_name(self.stack, key)).to(torch.float64)

    def __iter__(self):
        return iter(sorted({**self.mem, **self.where}))

    def __len__(self) -> int:
        return len({**self.mem, **self.where})

    def write(self, path: str, extra: dict, metadata: dict) -> None:
        """projections.safetensors: every map (float32) plus `extra` {name: tensor}; spill files removed."""
        import torch
        from safetensors import safe_open

        specs = {}
        for f in self.files:
            with safe_open(f, "pt") as h:
                for name in h.keys():
                    specs[name] = tuple(h.get_slice(name).get_shape())
        specs.update({map_name(self.stack, k): tuple(m.shape) for k, m in self.mem.items()})
        specs.update({name: tuple(t.shape) for name, t in extra.items()})
        w = SafetensorsWriter(path, [(n, dtype_tag(torch.float32), s) for n, s in sorted(specs.items())], metadata)
        for f in self.files:
            with safe_open(f, "pt") as h:
                for name in h.keys():
                    w.write(name, h.get_tensor(name))
        for name, t in [(map_name(self.stack, k), m) for k, m in self.mem.items()] + list(extra.items()):
            t = t.float().contiguous()
            check_finite(name, t)
            w.write(name, t)
        w.close()
        for f in self.files:
            os.remove(f)
        self.files, self.where = [], {}
