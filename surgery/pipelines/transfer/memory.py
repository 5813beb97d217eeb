"""transfer's memory budget (`--max-memory`): which LLM layers are captured and fitted together.

Peak RSS of a transfer (docs/transfer.md, "Memory"):

    peak ≈ base + Σ_{j in window} (W_j + w_j + M_j + P_j + X_j) + max_{j in window} F_j

    base  libraries + the stored hidden states of both models (tokens × hidden × dtype) + the largest
          non-layer tensor (embeddings, read once for the priming pass and dropped)
    W_j   LLM layer j's weights in its own dtype; w_j the SLM layer it pairs with
    M_j   its float64 moments: per space 8·(n_s² + n_l² + n_l·n_s) (only the Grams a direction needs)
    P_j   its fitted maps until they are spilled to disk (float64, 8·n_s·n_l per direction)
    X_j   one batch's captured activations: tokens · (n_s + n_l) · 18 B (bf16/fp32 capture + float64 copies)
    F_j   the transient of fitting one map: to the LLM 8·(3n_s² + 5·n_s·n_l) (eigendecomposition, per-row
          solves), to the SLM 8·(2n_l² + 3·n_s·n_l) (Cholesky)

The window grows layer by layer while the sum stays under the budget; a layer that does not fit
alone is an error naming --max-memory, before any work.
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


DEFAULT = 4 * 10**9  # every layer runs once whatever the window, so a bigger one buys little time


def ceiling() -> int:
    """80 % of what this machine can still give, plus what we already hold."""
    return rss_bytes() + int(0.8 * available_bytes())


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def space_bytes(n_s: int, n_l: int, to_llm: bool, to_slm: bool, tokens: int) -> dict:
    """The budget terms of one (LLM layer, space): moments, maps, activations, fit transient."""
    moments = 8 * (n_s * n_s * to_llm + n_l * n_l * to_slm + n_l * n_s)
    maps = 8 * n_s * n_l * (to_llm + to_slm)
    acts = tokens * (n_s + n_l) * 18
    fit = max(8 * (3 * n_s * n_s + 5 * n_s * n_l) if to_llm else 0, 8 * (2 * n_l * n_l + 3 * n_s * n_l) if to_slm else 0)
    return {"resident": moments + maps + acts, "fit": fit}


def default_budget(costs: list[tuple[int, int]], fixed: int) -> int:
    """No --max-memory: 4 GB, or what the widest layer needs if more, up to 80 % of free memory."""
    need = fixed + max((r + f for r, f in costs), default=0)
    return min(max(DEFAULT, int(need * 1.1)), max(ceiling(), DEFAULT))


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
