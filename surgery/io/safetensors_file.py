"""Minimal safetensors reader/writer that never maps a whole file.

Why not `safetensors.safe_open`: it memory-maps the shard, and every page a tensor touches stays
in our resident set until the file is closed, so streaming a 5 GB shard costs 5 GB of RSS. Here
each tensor is read with one positioned read into a fresh buffer that dies with the tensor.
Format: 8-byte little-endian header length, JSON header, then raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct

from ..errors import CheckpointError

# safetensors dtype tag -> (torch dtype name, bytes per element)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
TAG_OF = {name: tag for tag, (name, _) in DTYPES.items()}


def dtype_tag(dtype) -> str:
    """torch dtype -> safetensors tag."""
    name = str(dtype).replace("torch.", "")
    if name not in TAG_OF:
        raise CheckpointError(f"dtype {name} cannot be stored in safetensors")
    return TAG_OF[name]


def itemsize(tag: str) -> int:
    return DTYPES[tag][1]


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "start", "end", "path")

    def __init__(self, name, dtype, shape, start, end, path):
        self.name, self.dtype, self.shape, self.start, self.end, self.path = name, dtype, tuple(shape), start, end, path

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype_name(self) -> str:
        return DTYPES[self.dtype][0]


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict, int]:
    """Parse a safetensors header: ({name: TensorInfo}, metadata, data offset)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is truncated (no header)", "re-download or re-save the shard")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path} has a corrupt header (length {n}, file {size} bytes)",
                                      "re-download or re-save the shard")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}", "check the file is a complete safetensors shard") from e
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    infos = {}
    for name, h in header.items():
        if h.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {h.get('dtype')}")
        s, e = h["data_offsets"]
        if base + e > size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends at byte {base + e} but the file has {size}",
                                  "re-download or re-save the shard")
        infos[name] = TensorInfo(name, h["dtype"], h["shape"], base + s, base + e, path)
    return infos, meta, base


def read_tensor(info: TensorInfo):
    """Read one tensor with a single positioned read into memory we own."""
    import torch

    dt = getattr(torch, info.torch_dtype_name)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dt)
    # torch.empty, not bytearray: a bytearray is zero-filled first, one more pass over every page
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(info.path, "rb", buffering=0) as f:
        f.seek(info.start)
        view, got = memoryview(buf.numpy()), 0
        while got < info.nbytes:  # one read(2) returns at most ~2 GiB on Linux
            k = f.readinto(view[got:])
            if not k:
                break
            got += k
    if got != info.nbytes:
        raise CheckpointError(f"{info.path}: short read for {info.name} ({got} of {info.nbytes} bytes)",
                              "the shard is truncated; re-download or re-save it")
    return buf.view(dt).reshape(info.shape)


class SafetensorsWriter:
    """Write one safetensors file whose tensor list is known up front.

    Knowing names, dtypes and shapes first lets us write the header, then each tensor straight to
    its offset as it is produced — in any order — so nothing is ever buffered or copied twice.
    """

    def __init__(self, path: str, specs: list[tuple[str, str, tuple]], metadata: dict | None = None):
        self.path = path
        header, off = {}, 0
        self.slots = {}
        for name, tag, shape in specs:
            n = itemsize(tag)
            for s in shape:
                n *= s
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [off, off + n]}
            self.slots[name] = (off, n, tag, tuple(shape))
            off += n
        meta = {"format": "pt", **(metadata or {})}
        blob = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
        self.base = 8 + len(blob)
        self.total = off
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(blob)))
        self.f.write(blob)
        self.f.truncate(self.base + off)
        self.pending = set(self.slots)

    def write(self, name: str, tensor) -> None:
        off, n, tag, shape = self.slots[name]
        if dtype_tag(tensor.dtype) != tag or tuple(tensor.shape) != shape:
            raise CheckpointError(f"internal: {name} planned as {tag}{list(shape)} but got "
                                  f"{dtype_tag(tensor.dtype)}{list(tensor.shape)}")
        t = tensor.detach().contiguous().cpu()
        self.f.seek(self.base + off)
        if n:
            # uint8 view works for every dtype (bf16 and fp8 have no numpy equivalent)
            self.f.write(memoryview(t.view(-1).view(__import__("torch").uint8).numpy()))
        self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            missing = sorted(self.pending)[:3]
            self.f.close()
            raise CheckpointError(f"internal: {len(self.pending)} planned tensors never written, e.g. {missing}")
        self.f.close()
