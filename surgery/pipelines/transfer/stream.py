"""Run a causal LM one window of layers at a time, holding only that window's weights.

Why: transfer needs every layer's activations but never a gradient, so — as SparseGPT and Wanda do
for pruning — the model never has to be in memory whole. The skeleton is built on the meta device
(accelerate's `init_empty_weights`), and each layer's weights are read from the checkpoint, in the
checkpoint's own dtype, only while its window runs, then dropped back to meta.

`prime` does one cheap pass per calibration batch: only the parameters outside the layer stack
(embeddings) are loaded, and every layer's `forward` is replaced by a recorder that notes the
arguments the model hands it (causal mask, rotary embeddings, position ids…: computed once by the
model's own code, so nothing family-specific is re-implemented here) and passes its input through;
the pass stops at the last layer. Kept per batch: the hidden state entering the next layer to run and
each layer's other arguments (small, mostly shared tensors).

`window(start, stop, resume)` then materialises layers [start, stop); its step(b) runs batch b's
stored hidden state through them (the caller's forward hooks see their activations) and stores the
state entering layer `resume`.
"""

from __future__ import annotations

from contextlib import contextmanager

from ...errors import CheckpointError
from .plan import module_path


class _Stop(Exception):
    """Raised by the last layer's recorder: the priming pass needs nothing after the layer stack."""


class LayerStream:
    def __init__(self, ck, arch, stack: str, device: str = "cpu", dtype: str = "auto"):
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ck, self.arch, self.stack, self.device = ck, arch, stack, device
        self.dtype = ck.main_dtype() if dtype == "auto" else getattr(torch, dtype)
        if not self.dtype.is_floating_point:
            self.dtype = torch.float32
        config = AutoConfig.from_pretrained(ck.path)
        config.use_cache = False
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval()
        self.n = arch.stacks[stack]
        self.prefix = [module_path(arch, stack, i, "") for i in range(self.n)]
        self.layers = [self.model.get_submodule(p.rstrip(".")) for p in self.prefix]
        self.states: list = []  # per batch: hidden state entering layer self.cur
        self.calls: list = []  # per batch: per layer (other positional args, keyword args)
        self.cur = 0

    # -- weights ---------------------------------------------------------------------------------
    def _params(self, inside):
        return [(name, p) for name, p in self.model.named_parameters() if inside(name)]

    def _key(self, name: str) -> str:
        if name in self.ck:
            return name
        base = self.model.base_model_prefix + "."
        if name.startswith(base) and name[len(base):] in self.ck:  # checkpoints saved from the bare base model
            return name[len(base):]
        raise CheckpointError(f"{self.ck.path} has no tensor {name}", "the checkpoint does not match its config.json")

    def load(self, inside) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, p in self._params(inside):
            if p.device.type == "meta":
                value = self.ck.read(self._key(name)).to(self.dtype)
                set_module_tensor_to_device(self.model, name, self.device, value=value)

    def free(self, inside) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, p in self._params(inside):
            if p.device.type != "meta":
                set_module_tensor_to_device(self.model, name, "meta")

    def _in_layers(self, start: int, stop: int):
        pre = tuple(self.prefix[start:stop])
        return lambda name: name.startswith(pre) if pre else False

    def _outside(self, name: str) -> bool:
        base = self.model.base_model_prefix + "."
        return name.startswith(base) and not name.startswith(tuple(self.prefix))

    def layer_bytes(self, i: int) -> int:
        return sum(self.ck.nbytes(self._key(n)) // self.ck.dtype(self._key(n)).itemsize * self.dtype.itemsize
                   for n, _ in self._params(self._in_layers(i, i + 1)))

    # -- passes ----------------------------------------------------------------------------------
    def prime(self, batches) -> None:
        """batches: [(input_ids, attention_mask)]; records what each layer is called with."""
        import torch

        record: dict = {}
        last = self.n - 1

        def recorder(i):
            def forward(*args, **kwargs):
                if args:
                    h, rest = args[0], args[1:]
                else:
                    h, rest = kwargs.pop("hidden_states"), ()
                if i == 0:
                    record["h"] = h
                record[i] = (rest, kwargs)
                if i == last:
                    raise _Stop
                return h
            return forward

        self.load(self._outside)
        for i, layer in enumerate(self.layers):
            layer.forward = recorder(i)
        try:
            with torch.no_grad():
                for ids, mask in batches:
                    try:
                        self.model.base_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                              use_cache=False)
                    except _Stop:
                        pass
                    self.states.append(record.pop("h"))
                    self.calls.append([record.pop(i) for i in range(self.n)])
        finally:
            for layer in self.layers:
                del layer.forward  # back to the class's forward
            self.free(self._outside)

    @contextmanager
    def window(self, start: int, stop: int, resume: int):
        """Load layers [start, stop); yield step(b), which runs batch b through them and keeps the
        state entering layer `resume` (start ≤ resume ≤ stop); free the layers on the way out."""
        if start != self.cur or not start <= resume <= stop:
            raise ValueError(f"window [{start}, {stop}) resuming at {resume} from layer {self.cur}")
        inside = self._in_layers(start, stop)
        self.load(inside)
        try:
            yield lambda b: self._step(b, start, stop, resume)
            self.cur = resume
        finally:
            self.free(inside)

    def _step(self, b: int, start: int, stop: int, resume: int) -> None:
        import torch

        h = self.states[b]
        keep = h if resume == start else None
        with torch.no_grad():
            for i in range(start, stop):
                rest, kwargs = self.calls[b][i]
                out = self.layers[i](h, *rest, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
                if i + 1 == resume:
                    keep = h
        self.states[b] = keep
