"""Open a Hugging Face checkpoint directory and read one tensor at a time.

Layouts understood, in order of preference:
  model.safetensors | model.safetensors.index.json + shards | pytorch_model.bin(.index.json).
No transformers model object is built: file-level surgery needs only names, shapes and bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import CheckpointError
from .jsonfile import load_json
from .paths import member
from .safetensors_file import TensorInfo, read_header, read_tensor

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")

# Files beside the weights that a written checkpoint should carry along.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass
class Checkpoint:
    path: str
    config: dict
    infos: dict[str, TensorInfo] = field(default_factory=dict)  # safetensors only
    shards: list[str] = field(default_factory=list)
    _bin: dict | None = None  # key -> file for the pytorch_model.bin fallback
    _bin_cache: tuple | None = None

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str) -> "Checkpoint":
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise CheckpointError(f"model directory {path} does not exist", "pass the directory that holds config.json")
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} is a file, not a model directory", "pass the directory that holds config.json")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            if any(os.path.exists(os.path.join(path, f)) for f in ADAPTER_FILES):
                raise CheckpointError(f"{path} is an adapter directory, not a model",
                                      "pass the base model directory here and the adapter where an adapter is expected")
            raise CheckpointError(f"{path} has no config.json", "pass a Hugging Face model directory (config.json + weights)")
        config = load_json(member(path, "config.json"), CheckpointError, "restore the file from the original model")
        ck = cls(path=path, config=config)
        ck._index_weights()
        return ck

    def _index_weights(self) -> None:
        p = lambda n: os.path.join(self.path, n)  # noqa: E731
        if os.path.exists(p(SAFE_INDEX)):
            wmap = self._read_index(SAFE_INDEX)
            self.shards = sorted(set(wmap.values()))
            for shard in self.shards:
                infos, _, _ = read_header(self._shard_path(shard, SAFE_INDEX))
                self.infos.update(infos)
            missing = [k for k in wmap if k not in self.infos]
            if missing:
                raise CheckpointError(f"{self.path}: {len(missing)} tensors in the index are in no shard, e.g. {missing[0]}",
                                      "re-save the checkpoint or fix its index")
        elif os.path.exists(p(SAFE_SINGLE)):
            self.shards = [SAFE_SINGLE]
            self.infos, _, _ = read_header(self._shard_path(SAFE_SINGLE))
        elif os.path.exists(p(BIN_INDEX)):
            wmap = self._read_index(BIN_INDEX)
            files = {v: self._shard_path(v, BIN_INDEX) for v in set(wmap.values())}
            self._bin = {k: files[v] for k, v in wmap.items()}
            self.shards = sorted(files)
        elif os.path.exists(p(BIN_SINGLE)):
            self._bin = None
            self._load_bin_keys(self._shard_path(BIN_SINGLE))
            self.shards = [BIN_SINGLE]
        else:
            raise CheckpointError(f"{self.path} has config.json but no weights",
                                  "expected model.safetensors, a sharded index, or pytorch_model.bin")

    def _read_index(self, name: str) -> dict[str, str]:
        """The index's weight_map, checked to map tensor names to file names."""
        where = os.path.join(self.path, name)
        fix = "re-save the checkpoint or restore its index from the original"
        index = load_json(where, CheckpointError, fix)
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{where} has no \"weight_map\" object of tensor name -> shard file", fix)
        return wmap

    def _shard_path(self, name: str, index: str | None = None) -> str:
        """A weights file of this checkpoint, refused unless it is a regular file inside it (io/paths.py)."""
        return member(self.path, name, os.path.join(self.path, index) if index else None)

    def _load_bin_keys(self, file: str) -> None:
        sd = self._bin_file(file)
        self._bin = {k: file for k in sd}

    def _bin_file(self, file: str) -> dict:
        if self._bin_cache and self._bin_cache[0] == file:
            return self._bin_cache[1]
        sd = load_state_dict(file, mmap=True)  # mmap keeps the fallback from loading all at once
        self._bin_cache = (file, sd)
        return sd

    # ---- queries -------------------------------------------------------------------------
    @property
    def is_safetensors(self) -> bool:
        return self._bin is None

    def keys(self) -> list[str]:
        return list(self.infos) if self.is_safetensors else list(self._bin)

    def __contains__(self, key: str) -> bool:
        return key in self.infos if self.is_safetensors else key in self._bin

    def shape(self, key: str) -> tuple:
        if self.is_safetensors:
            return self._info(key).shape
        return tuple(self._bin_file(self._bin[key])[key].shape)

    def dtype(self, key: str):
        import torch

        if self.is_safetensors:
            return getattr(torch, self._info(key).torch_dtype_name)
        return self._bin_file(self._bin[key])[key].dtype

    def nbytes(self, key: str) -> int:
        if self.is_safetensors:
            return self._info(key).nbytes
        t = self._bin_file(self._bin[key])[key]
        return t.numel() * t.element_size()

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self.keys())

    def _info(self, key: str) -> TensorInfo:
        try:
            return self.infos[key]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {key}",
                                  "check the model family; `surgery inspect` lists what is there") from None

    def read(self, key: str):
        """One tensor, in its stored dtype, in memory we own (no mmap)."""
        if self.is_safetensors:
            return read_tensor(self._info(key))
        if key not in self._bin:
            raise CheckpointError(f"{self.path} has no tensor {key}", "check the model family")
        return self._bin_file(self._bin[key])[key].clone()

    def side_files(self) -> list[str]:
        return [f for f in SIDE_FILES if os.path.exists(os.path.join(self.path, f))]

    def dtypes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.keys():
            name = str(self.dtype(k)).replace("torch.", "")
            out[name] = out.get(name, 0) + 1
        return out

    def main_dtype(self):
        """The dtype most parameters are stored in (by element count)."""
        import torch

        count: dict = {}
        for k in self.keys():
            n = 1
            for s in self.shape(k):
                n *= s
            count[self.dtype(k)] = count.get(self.dtype(k), 0) + n
        return max(count, key=count.get) if count else torch.float32


def load_state_dict(file: str, error=CheckpointError, mmap: bool = False) -> dict:
    """A state dict from a safetensors file or a pickle (.bin), without ever executing code.

    Pickles are loaded with weights_only=True. torch's own messages are not passed on: they quote the
    file's bytes ("invalid load key, 'r'") and advise weights_only=False, which is exactly the risk."""
    import pickle

    import torch

    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(file)
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends; their messages quote no bytes
            raise error(f"cannot read {file} ({str(e).splitlines()[0][:200]})",
                        "the file is corrupt or truncated; re-download or re-save it") from None
    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            # the legacy (pre-zip, torch < 1.6) format cannot be mapped: read it whole
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise error(f"{file} is a pickle that needs code execution to load, which surgery never does",
                        "convert it to safetensors in an environment you trust") from None
        raise error(f"{file} is not a PyTorch checkpoint (unreadable pickle)",
                    "re-download it or convert it to safetensors") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types; their messages may quote the file
        raise error(f"cannot read {file} as a PyTorch checkpoint ({type(e).__name__})",
                    "re-download it or convert it to safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise error(f"{file} holds a {type(sd).__name__}, not a state dict of tensors",
                    "save the model's state_dict(), or convert it to safetensors")
    return sd
