"""The generic linear-layer map, for models no family file covers.

Merging, unmerging, extracting and inspecting need far less than a family map: a LoRA key names its
module, and that module's weight, shape and dtype are in the checkpoint. So a model of an unknown
family still works when every linear layer is what `nn.Linear` stores: a 2-D `<module>.weight`
laid out [out, in]. What it cannot know is data a family file carries: a transposed layout
(GPT-2's Conv1D keeps [in, out] — only a family file says so), fused q|k|v spaces, and tied weights
that are not stored (an adapter on a tied `lm_head` is refused here). Pruning and transfer need
those spaces and stay refused without a family map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import TensorSpec, find_family, load_arch

FAMILY = "generic"
_LAYER = re.compile(r"\.\d+\.")  # a numbered layer: model.layers.3.mlp... / encoder.block.0...


@dataclass
class GenericArch:
    """The subset of `Arch` that merge, unmerge, extract and inspect use, built from the checkpoint."""

    config: dict
    shapes: dict  # stored tensor -> shape
    family: str = FAMILY
    stacks: dict = field(default_factory=dict)

    def tensors(self) -> list[TensorSpec]:
        out = []
        for name, shape in self.shapes.items():
            linear = len(shape) == 2 and name.endswith(".weight")
            out.append(TensorSpec(name=name, dims=tuple((f"axis{i}",) for i in range(len(shape))),
                                  role="weight" if linear or len(shape) != 1 else "vector",
                                  module=name[: -len(".weight")] if linear else None))
        return out

    def stored_tensors(self) -> list[TensorSpec]:
        return self.tensors()

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors()}

    def by_module(self) -> dict[str, TensorSpec]:
        """Every 2-D weight an adapter may name (lm_head and embeddings included: the adapter decides)."""
        return {t.module: t for t in self.tensors() if t.module is not None}

    def linears(self) -> list[TensorSpec]:
        """Default targets when nothing names them (extract-lora): the 2-D weights inside numbered
        layers, minus embeddings (a layer-local embedding such as T5's relative bias is no linear)."""
        return [t for t in self.by_module().values() if _LAYER.search(t.name) and "embed" not in t.module
                and not t.module.endswith("_bias")]

    def shape(self, t: TensorSpec) -> tuple:
        return tuple(self.shapes[t.name])

    def tied(self) -> dict[str, str]:
        return {}

    def tie_flag(self, name: str) -> str | None:
        return None


def linear_map(checkpoint, say: bool = True):
    """The family map of `checkpoint`, or the generic linear-layer map when no family covers it
    (saying so in one stderr note unless `say` is false, e.g. for the second model of a pair)."""
    import os

    from ..log import note

    model_type = checkpoint.config.get("model_type")
    where = os.path.join(checkpoint.path, "config.json")
    if not model_type or find_family(model_type) is not None:
        return load_arch(checkpoint.config, where)  # also the "no model_type" error
    if say:
        note(f"model_type {model_type!r} has no family map; using the generic linear-layer map (2-D weights "
             f"named by their module, [out, in] like nn.Linear); add a family with --family FILE.json (docs/arch.md)")
    return GenericArch(config=checkpoint.config, shapes={k: tuple(checkpoint.shape(k)) for k in checkpoint.keys()})
