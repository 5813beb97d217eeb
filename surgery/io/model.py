"""The one model loader: a checkpoint directory -> a transformers model, in the dtype and on the
device(s) asked for.

train, eval, prune-bridge, tune-bridge and refine load here (transfer streams its layers instead:
pipelines/transfer/stream.py), so the causal / seq2seq choice,
the dtype and the placement are decided in one place:

  dtype       auto: the checkpoint's own dtype when the model runs on a GPU, float32 on the CPU
              (CPU half-precision kernels are slow, and a 7B model in float32 needs 28 GB of GPU
              memory for no gain); or float32 | bfloat16 | float16.
  device      one device for the whole model: cpu, cuda, cuda:1, mps.
  device_map  accelerate's dispatch over the GPUs, spilling to CPU and then disk
              (auto | balanced | balanced_low_0 | sequential). Not with --device.

With neither, each command keeps its default (`dispatch`):
  "never"  load on the CPU; the training loop moves the model to its process's device (one GPU per
           process under `accelerate launch`, else the CPU) — train, eval, tune-bridge, refine;
  "gpu"    device_map="auto" when a GPU is present — prune-bridge (whose auto dtype is the
           checkpoint's on the CPU too: its Fisher passes recompute one block at a time in float32);
  "fit"    device_map="auto" when a GPU is present or the model would not fit in free memory — transfer.

Flags are checked by `Placement.check` before torch is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import SurgeryError
from .checkpoint import Checkpoint

DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype
EXTRA_DTYPES = ("float64",)  # from Python only: numerical checks (tests, benchmarks)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DISPATCH = ("never", "gpu", "fit")


@dataclass(frozen=True)
class Placement:
    """--dtype / --device / --device-map of one command."""

    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None

    def check(self) -> "Placement":
        if self.dtype not in DTYPES + EXTRA_DTYPES:
            raise SurgeryError(f"unknown --dtype {self.dtype!r}", f"choose one of {', '.join(DTYPES)}")
        if self.device and self.device_map:
            raise SurgeryError(f"--device {self.device} and --device-map {self.device_map} both given",
                               "use --device for one device, --device-map to spread the model over several")
        if self.device_map and self.device_map not in DEVICE_MAPS:
            raise SurgeryError(f"unknown --device-map {self.device_map!r}",
                               f"choose one of {', '.join(DEVICE_MAPS)} (or --device for one device)")
        if self.device and not _device_name_ok(self.device):
            raise SurgeryError(f"unknown --device {self.device!r}", "use cpu, cuda, cuda:N or mps")
        return self

    @property
    def gpu(self) -> bool:
        """Will the model run on a GPU?"""
        import torch

        if self.device:
            return self.device.startswith("cuda")
        return torch.cuda.is_available()

    def torch_dtype(self, path: str, auto: str = "device"):
        """The dtype to load in: as asked, or `auto` resolved against the checkpoint and the device
        (auto="stored": the checkpoint's dtype on the CPU too, for prune-bridge's block-wise float32 passes)."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if not self.gpu and auto != "stored":
            return torch.float32

        stored = Checkpoint.open(path).main_dtype()
        return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32

    def dispatch_map(self, path: str, dispatch: str, max_memory: dict | None = None) -> str | None:
        """The device_map to hand from_pretrained (None: load on the CPU)."""
        import torch

        assert dispatch in DISPATCH, dispatch
        if self.device_map or self.device:
            return self.device_map
        if dispatch == "never":
            return None
        if torch.cuda.is_available() or max_memory or (dispatch == "fit" and not _fits_in_memory(path)):
            return "auto"
        return None


def _device_name_ok(name: str) -> bool:
    base, _, index = name.partition(":")
    return base in ("cpu", "cuda", "mps") and (not index or (index.isdigit() and base == "cuda"))


def _fits_in_memory(path: str) -> bool:
    """Would a float32 copy of the checkpoint fit in free RAM (twice a possibly 16-bit checkpoint)?"""
    try:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return True
    return 2 * Checkpoint.open(path).total_bytes() <= free


def load_model(path: str, placement: Placement | None = None, *, dispatch: str = "never", auto_dtype: str = "device",
               max_memory: dict | None = None, offload_folder: str | None = None):
    """The transformers model of the checkpoint directory `path` (causal or seq2seq, from its config),
    in eval mode. A model placed by accelerate carries `hf_device_map`; the training loop leaves such
    a model where it is. max_memory ({device: "20GiB", "cpu": ...}) caps each device for accelerate's
    placement, which offloads what does not fit to CPU and then to `offload_folder` on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    placement = (placement or Placement()).check()
    ck = Checkpoint.open(path)  # a clear error for a missing or broken directory first
    config = AutoConfig.from_pretrained(ck.path)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    device_map = placement.dispatch_map(ck.path, dispatch, max_memory)
    kw = {"device_map": device_map} if device_map else {}
    if device_map and max_memory:
        kw["max_memory"] = max_memory
    if device_map and offload_folder:
        kw["offload_folder"] = offload_folder
    model = cls.from_pretrained(ck.path, dtype=placement.torch_dtype(ck.path, auto_dtype), **kw)
    if placement.device:
        model = model.to(placement.device)
    return model.eval()
