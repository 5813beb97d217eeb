"""Give freed tensor memory back to the operating system at once (glibc only; elsewhere nothing).

PyTorch's CPU tensors come from malloc. glibc serves a request of 128 KiB or more with its own mmap
and unmaps it on free, but after such a block is freed it raises that threshold (up to 32 MiB) so
later blocks of that size come from the heap, whose freed space it keeps. A pass that allocates and
frees activations of varying sizes (a block's recompute, a chunk of logits) then leaves hundreds of
MiB of freed-but-resident memory: at TinyLlama's shape prune-bridge's peak RSS went from 2601 to
2994 MiB (with the same tensors live) for that reason alone; refine's MeZO forwards, with the same
tensors live as one inference pass, kept 60-200 MiB more than `surgery eval` at 2 TinyLlama layers, growing
with the steps (docs/benchmarks.md). Fixing the threshold at 128 KiB keeps every large tensor in its own
mapping, returned on free, for the price of a page fault per fresh page (refine: ~4 % more wall time).
"""

from __future__ import annotations

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h); setting it also turns off the dynamic adjustment
THRESHOLD = 128 * 1024
_done = False


def return_freed_memory() -> bool:
    """Call before a memory-bound pass (idempotent); True when glibc accepted the setting."""
    global _done
    if not _done:
        import ctypes

        try:
            libc = ctypes.CDLL(None)  # the C library this process already runs on
            libc.gnu_get_libc_version  # glibc only: other mallocs have other knobs
            _done = libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1
        except (OSError, AttributeError):
            pass
    return _done
