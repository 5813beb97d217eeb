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

# Every dtype tag the safetensors format defines -> (torch dtype name or None, bits per element).
# A tag whose torch dtype is missing (the 6-bit floats; F4 on older torch) still opens, so `inspect`
# can list the file; reading such a tensor is refused with its name.
DTYPES = {
    "BOOL": ("bool", 8), "U8": ("uint8", 8), "I8": ("int8", 8), "I16": ("int16", 16), "U16": ("uint16", 16),
    "I32": ("int32", 32), "U32": ("uint32", 32), "I64": ("int64", 64), "U64": ("uint64", 64),
    "F16": ("float16", 16), "BF16": ("bfloat16", 16), "F32": ("float32", 32), "F64": ("float64", 64),
    "C64": ("complex64", 64),
    "F8_E4M3": ("float8_e4m3fn", 8), "F8_E5M2": ("float8_e5m2", 8), "F8_E8M0": ("float8_e8m0fnu", 8),
    "F4": (None, 4), "F6_E2M3": (None, 6), "F6_E3M2": (None, 6),
}
TAG_OF = {name: tag for tag, (name, _) in DTYPES.items() if name}
MAX_HEADER = 100_000_000  # the safetensors library's limit on the JSON header


def dtype_tag(dtype) -> str:
    """torch dtype -> safetensors tag."""
    name = str(dtype).replace("torch.", "")
    if name not in TAG_OF:
        raise CheckpointError(f"dtype {name} cannot be stored in safetensors")
    return TAG_OF[name]


def itemsize(tag: str) -> int:
    """Bytes per element of a whole-byte dtype."""
    return DTYPES[tag][1] // 8


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
        name = DTYPES[self.dtype][0]
        if name is None or not _torch_has(name):
            raise CheckpointError(f"{self.path}: tensor {self.name} is stored as {self.dtype}, which this torch cannot hold",
                                  "convert the tensor to a supported dtype, or upgrade torch")
        return name


def _torch_has(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


U64 = 2**64  # the library's sizes are Rust usize: larger values, or products that overflow, are refused


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < U64


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict, int]:
    """Parse and validate a safetensors header: ({name: TensorInfo}, metadata, data offset).

    The checks are the safetensors library's own (safetensors/src/tensor.rs, read_metadata and
    Metadata::validate), done before any tensor is allocated or any output written: header length
    within the file and at most 100 MB; UTF-8 JSON object whose values are objects with a known
    dtype, a shape of non-negative ints and two data_offsets; __metadata__ maps strings to strings;
    sorted by offset, the tensors tile the data buffer exactly (no gap, overlap or trailing bytes),
    each spanning numel x itemsize bytes. Messages name the file and tensor, never the file's bytes.
    """
    bad = lambda what: CheckpointError(f"{path}: {what}", "re-download or re-save the shard; it is not a valid safetensors file")  # noqa: E731
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise bad("truncated (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or n > size - 8:
                raise bad(f"header length {n} does not fit the file ({size} bytes)")
            text = f.read(n).decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"header is not UTF-8 (byte {8 + e.start})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or type(e).__name__})", "check the file's permissions") from None
    try:
        header = json.loads(text)
    except ValueError as e:
        raise bad(f"header is not valid JSON ({getattr(e, 'msg', 'parse error')} at byte {8 + getattr(e, 'pos', 0)})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map strings to strings")
    base = 8 + n
    spans = []
    for name, h in header.items():
        if not isinstance(h, dict):
            raise bad(f"entry {name!r} is not an object")
        tag, shape, offs = h.get("dtype"), h.get("shape"), h.get("data_offsets")
        if tag not in DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {str(tag)[:20]!r}")
        if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
            raise bad(f"tensor {name!r} has a shape that is not a list of non-negative integers")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_uint(o) for o in offs) or offs[0] > offs[1]:
            raise bad(f"tensor {name!r} has data_offsets that are not two integers 0 <= begin <= end")
        numel = 1
        for s in shape:
            numel *= s
            if numel >= U64:
                raise bad(f"tensor {name!r} has a shape whose size overflows")
        bits = numel * DTYPES[tag][1]
        if bits >= U64:
            raise bad(f"tensor {name!r} has a shape whose size overflows")
        if bits % 8 or offs[1] - offs[0] != bits // 8:
            raise bad(f"tensor {name!r} spans {offs[1] - offs[0]} bytes but {tag}{shape} needs {bits / 8:g}")
        spans.append((offs[0], offs[1], name, tag, shape))
    spans.sort(key=lambda t: (t[0], t[1]))
    end = 0
    for s, e, name, _, _ in spans:
        if s != end:
            raise bad(f"tensor {name!r} starts at byte {s} of the data but the previous tensor ends at {end} "
                      "(offsets must tile the data without gaps or overlaps)")
        end = e
    if base + end != size:
        raise bad(f"the tensors cover {end} bytes of data but the file holds {size - base}")
    infos = {name: TensorInfo(name, tag, shape, base + s, base + e, path) for s, e, name, tag, shape in spans}
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
