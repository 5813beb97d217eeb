"""Stream a checkpoint into a new one, tensor by tensor: the skeleton every rewrite uses.

Peak memory is two tensors (one being written, the next being produced) plus what `produce`
builds; shards are planned up front, so each tensor is written straight to its place and dropped.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from ..io.checkpoint import SIDE_FILES, Checkpoint
from ..io.progress import byte_progress
from ..io.writer import OutputDir, ShardedWriter


def mmap_large_buffers() -> None:
    """Make freed tensor buffers leave the resident set at once (glibc only; elsewhere a no-op).

    Why: glibc serves allocations above its mmap threshold with mmap and unmaps them on free, but
    after the first such free it raises the threshold (up to 32 MB), so later tensor-sized buffers
    come from the heap, whose freed pages mostly stay resident: streaming then costs a few tensors'
    worth more than the largest one. A fixed 1 MB threshold (M_MMAP_THRESHOLD = -3) keeps peak RSS
    at the interpreter plus the tensors alive at that moment.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except (OSError, AttributeError):
        pass


def write_checkpoint(out: OutputDir, specs, produce, *, config: dict, side_from: str | None,
                     max_shard_size="5GB", description: str = "writing", progress: bool | None = None,
                     metadata: dict | None = None) -> ShardedWriter:
    """specs: [(name, dtype, shape)]; produce(name) -> tensor. Writes config.json and copies side files."""
    mmap_large_buffers()
    writer = ShardedWriter(out, specs, max_shard_size, metadata=metadata)

    def write_one(name, t, advance):
        writer.write(name, t)
        advance(t.numel() * t.element_size())

    # One write in flight on a helper thread while the next tensor is read and computed: file writes
    # and torch ops release the GIL, so I/O overlaps compute; memory stays at two tensors.
    with byte_progress(writer.total, description, progress) as advance, ThreadPoolExecutor(1) as pool:
        pending = None
        for name, _, _ in specs:
            t = produce(name)
            if pending is not None:
                pending.result()  # re-raises a write error here, in order
            pending = pool.submit(write_one, name, t, advance)
            del t
        if pending is not None:
            pending.result()
    writer.close()
    out.write_json("config.json", config)
    if side_from:
        out.copy_from(side_from, [f for f in SIDE_FILES if f != "config.json"])
    return writer


def copy_checkpoint(src: str, dst: str, *, force: bool = False, max_shard_size="5GB") -> str:
    """Rewrite a checkpoint unchanged (re-sharding it): the identity surgery."""
    ck = Checkpoint.open(src)
    specs = [(k, ck.dtype(k), ck.shape(k)) for k in ck.keys()]
    with OutputDir(dst, inputs=[ck.path], force=force) as out:
        write_checkpoint(out, specs, ck.read, config=json.loads(json.dumps(ck.config)), side_from=ck.path,
                         max_shard_size=max_shard_size, description="copying")
        return out.commit()
