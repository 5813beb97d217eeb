"""transfer's memory: what one window of LLM layers holds, and which layers share a window.

Peak RSS of a transfer (docs/transfer.md, "Memory"):

    peak ≈ base + Σ_{j in window} (W_j + w_j + M_j + X_j) + max_{j in window} (F_j + P_j)

    base  libraries + the stored hidden states of both models (tokens × hidden × dtype) + the largest
          non-layer tensor (embeddings, read once for the priming pass and dropped)
    W_j   LLM layer j's weights in its own dtype; w_j the SLM layer it pairs with
    M_j   its float64 moments: per space 8·(n_s² + n_l² + n_l·n_s) (only the Grams a direction needs)
    X_j   one batch's paired SLM activations, kept until the LLM has run that batch: tokens · n_s · 4 B per
          space; the LLM's are folded into the moments inside the forward hook, CHUNK_TOKENS rows at a
          time, so on top only the widest space's LLM rows (tokens · n_l · 4 B) and one chunk's float64
          copies (CHUNK_TOKENS · (n_s + n_l) · 8 B)
    P_j   the map being fitted (8·n_s·n_l; each map is spilled to disk as soon as it is fitted) and the
          layer's residual-stream map, the prior of its out.* fits (counted as its largest to-LLM map:
          an upper bound, since layer_bytes does not know which space is the residual)
    F_j   the transient of fitting one map: to the LLM 8·(3n_s² + 5·n_s·n_l) (eigendecomposition, per-row
          solves), to the SLM 8·(2n_l² + 3·n_s·n_l) (Cholesky)

Without --max-memory every window is one LLM layer: each layer runs every batch once whatever the
window, so a bigger one buys no time (docs/transfer.md, measured) and only holds more layers'
moments. With --max-memory the window grows layer by layer while the sum stays under the budget; a
layer that does not fit alone is an error naming --max-memory, before any work.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from ...errors import ResourceError

FLAG = "--max-memory"


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_bytes() -> int:
    """MemAvailable (what the kernel can hand out without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


DEFAULT = 4 * 10**9  # no --max-memory: one layer a window, refused if it needs more than this and than the machine has
CHUNK_TOKENS = 256  # rows of paired activations converted to float64 and added to the moments at once
ACT_BYTES = 4  # captured activations, counted as float32 (a bf16 model's are half)


def ceiling() -> int:
    """80 % of what this machine can still give, plus what we already hold."""
    return rss_bytes() + int(0.8 * available_bytes())


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def layer_bytes(spaces, tokens: int) -> dict:
    """The terms of one LLM layer (weights aside) for its spaces [(n_s, n_l, to_llm, to_slm)], `tokens` a batch:
    moments M, SLM activations held per batch X, the largest map plus the residual prior P, fit transient F."""
    moments = sum(8 * (n_s * n_s * a + n_l * n_l * b + n_l * n_s) for n_s, n_l, a, b in spaces)
    acts = sum(tokens * n_s * ACT_BYTES for n_s, _, _, _ in spaces)
    acts += max((tokens * n_l * ACT_BYTES + min(tokens, CHUNK_TOKENS) * (n_s + n_l) * 8 for n_s, n_l, _, _ in spaces),
                default=0)
    prior = max((8 * n_s * n_l for n_s, n_l, a, _ in spaces if a), default=0)  # the res map: at most the widest to-LLM map
    maps = max((8 * n_s * n_l for n_s, n_l, _, _ in spaces), default=0) + prior
    fit = max((max(8 * (3 * n_s * n_s + 5 * n_s * n_l) if a else 0, 8 * (2 * n_l * n_l + 3 * n_s * n_l) if b else 0)
               for n_s, n_l, a, b in spaces), default=0)
    return {"moments": moments, "acts": acts, "maps": maps, "fit": fit}


def window_costs(weights: list[int], terms: list[dict]) -> list[tuple[int, int]]:
    """Per LLM layer (bytes held while its window runs, bytes of its largest fit): plan_windows' input."""
    return [(w + t["moments"] + t["acts"], t["maps"] + t["fit"]) for w, t in zip(weights, terms)]


def one_layer_windows(costs: list[tuple[int, int]], fixed: int) -> list[tuple[int, int]]:
    """No --max-memory: a window per layer, after checking the widest fits in what the machine can give."""
    budget_windows(costs, fixed, max(ceiling(), DEFAULT))  # raises, naming --max-memory, if one layer cannot fit
    return [(j, j + 1) for j in range(len(costs))]


def budget_windows(costs: list[tuple[int, int]], fixed: int, budget: int) -> list[tuple[int, int]]:
    """plan_windows under `budget` bytes, after what the process already holds (`fixed`) and a 5 % margin."""
    return plan_windows(costs, budget - fixed - budget // 20, budget)


def plan_windows(costs: list[tuple[int, int]], budget_left: int, budget: int) -> list[tuple[int, int]]:
    """costs[j] = (resident bytes, fit transient bytes) of LLM layer j → consecutive windows [start, stop)."""
    windows, start, held, peak_fit = [], 0, 0, 0
    for j, (res, fit) in enumerate(costs):
        if res + fit > budget_left:
            raise ResourceError(
                f"LLM layer {j} alone needs {gb(res + fit)} (weights, float64 moments and fits) but {FLAG} {gb(budget)} "
                f"leaves {gb(max(budget_left, 0))} after the models' fixed part",
                f"raise {FLAG}, or port fewer modules per layer (the widest space costs most)")
        if j > start and held + res + max(peak_fit, fit) > budget_left:
            windows.append((start, j))
            start, held, peak_fit = j, 0, 0
        held += res
        peak_fit = max(peak_fit, fit)
    if costs:
        windows.append((start, len(costs)))
    return windows


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "can't allocate memory", "cannot allocate memory", "out of memory", "defaultcpuallocator"))


@contextmanager
def memory_guard(budget: int):
    """Turn an allocation failure anywhere inside into one line that names the budget flag."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        raise ResourceError(f"ran out of memory (budget {FLAG} {gb(budget)}, {gb(available_bytes())} available now)",
                            f"pass a smaller {FLAG} so fewer layers are held at once, or free memory; "
                            "nothing was written") from None


def trim() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so RSS follows the window."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


MMAP_THRESHOLD = 1 << 20  # bytes: every tensor of 1 MiB or more gets its own mapping, returned to the OS on free
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def map_large_allocations() -> bool:
    """Make glibc serve every allocation of MMAP_THRESHOLD bytes or more from its own mmap, for the rest
    of the process; False where that is not glibc.

    Why: glibc's default threshold is dynamic. Once a large block is freed it rises to that block's size,
    so later tensors of up to 32 MB come from the heap, whose freed pages stay resident (trim() returns
    only the top of the heap). transfer allocates and frees ~100 MB moments and fit temporaries window
    after window, so RSS came to exceed the cost model above (the window's live tensors) by 40-80 %: on
    the mid-sized pair of benchmarks/transfer_rss.py 1154 MB peak against 518 MB predicted above a 389 MB
    start, so a tight --max-memory could be overrun. With large blocks mapped the peak is 805 MB (423 MB
    above the start, under the model), and at 1.1B 0.65 GiB instead of 1.22 GiB, but CPU time grows by
    15 % and ~55 % (every layer's activations over 1 MiB are mapped and faulted in afresh); docs/transfer.md,
    "Memory". So transfer calls this only under --max-memory, where the budget is a promise. Process-wide
    and not undone: glibc has no call that restores the dynamic threshold."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
