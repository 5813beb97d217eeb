"""DoRA (Liu et al., 2024, arXiv:2402.09353): a LoRA whose rows are renormalised to a learned magnitude.

Files: a LoRA adapter (lora.py) with use_dora and lora_magnitude_vector per module. Merge is
W' = f ⊙ (W + ΔW) with f = m / ‖W + ΔW‖ per output row (ops.lora); the norms are written beside
the merged checkpoint (dora_norms.safetensors) because W' no longer holds them, and unmerge reads
them back. Transfer and tune-bridge refuse it: the magnitudes depend on the base weights' row norms,
which neither a projection nor a restriction preserves.
"""

from __future__ import annotations

from ..errors import AdapterError
from ..ops.lora import dora_factor, dora_norm, fold
from .base import Kind, MergeTarget, PeftRefine, Step
from .lora import bias_steps, details, module_delta, modules

NORMS = "dora_norms.safetensors"  # n = ‖W + ΔW‖ per DoRA module, written beside a merged checkpoint


class Dora(PeftRefine, Kind):
    name = "dora"
    title = "DoRA"
    peft_type = "LORA"
    commands = ("eval", "inspect", "merge-lora", "unmerge-lora", "refine")

    def matches(self, path, config):
        return super().matches(path, config) and bool(config.get("use_dora"))

    def merge_steps(self, ad, target: MergeTarget, weight: float, sign: int) -> list:
        steps = []
        for m in modules(ad):
            spec, label, delta = module_delta(ad, target, m, weight)
            if m.magnitude is None:  # a layer peft left without DoRA: a plain LoRA step
                steps.append((spec.name, Step(label, lambda w, orig, d=delta: fold(w, d, sign), delta)))
            elif weight != 1.0:
                raise AdapterError(f"{label}: a DoRA adapter cannot be merged with weight {weight}",
                                   "DoRA rescales whole rows; merge it with weight 1")
            elif sign < 0:
                if target.norms_in is None or spec.name not in target.norms_in:
                    raise AdapterError(
                        f"{label}: unmerging DoRA needs the row norms ‖W+ΔW‖ recorded at merge time ({NORMS})",
                        "unmerge a checkpoint written by `surgery merge-lora`; a DoRA merge loses each row's norm, "
                        "so only the row directions are recoverable")
                factor = dora_factor(m.magnitude, target.norms_in[spec.name], spec.transposed)
                steps.append((spec.name, Step(label, lambda w, orig, d=delta, f=factor: fold(w, d, sign, f))))
            else:
                def merge(w, orig, d=delta, spec=spec, mag=m.magnitude):
                    # peft: the norm is taken on the *unmerged* base weight plus this adapter's delta
                    dense = d.dense()
                    n = dora_norm(orig.float(), dense, spec.transposed)
                    target.norms_out[spec.name] = n
                    return fold(w, dense, sign, dora_factor(mag, n, spec.transposed))

                steps.append((spec.name, Step(label, merge)))
            steps += bias_steps(target, m, spec, label, weight, sign)
        return steps

    def details(self, ad) -> dict:
        return details(ad)


KIND = Dora()
