"""MeZO: memory-efficient zeroth-order tuning (Malladi et al., "Fine-Tuning Language Models with Just
Forward Passes", NeurIPS 2023), i.e. SPSA (Spall 1992) with the direction regenerated from a seed.

One step on parameters θ (here: an adapter's, the LLM frozen) with loss L, step seed s, scale ε and
learning rate η:

    z ~ N(0, I) drawn from a generator seeded with s (one tensor per parameter, in a fixed order)
    θ += ε·z;   L₊ = L(θ)          (perturb in place)
    θ -= 2ε·z;  L₋ = L(θ)
    θ += ε·z                       (back to θ, up to float rounding)
    g = (L₊ − L₋) / (2ε)           (the SPSA estimate of the directional derivative z·∇L)
    θ -= η·g·z                     (E[g·z] = ∇L: an unbiased estimate of a gradient step as ε → 0)

z is never stored: each of the four passes over θ regenerates it from s, one parameter at a time,
so the extra memory is one tensor the size of the largest parameter. Nothing here needs autograd:
the caller runs `loss` without it (torch.inference_mode) and there is no optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch


def directions(params: Sequence[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """z for each parameter, in order, from one generator seeded with `seed` (the same seed gives the same z).

    One generator per device the parameters live on, so CUDA parameters draw on the GPU; z is drawn
    in float32 whatever the parameter's dtype, so a half-precision adapter sees the same direction.
    """
    gens: dict = {}
    for p in params:
        g = gens.get(p.device)
        if g is None:
            g = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        yield torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)


@torch.no_grad()
def add_direction_(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """θ += scale·z(seed), in place, one parameter at a time."""
    for p, z in zip(params, directions(params, seed)):
        if p.dtype in (torch.float16, torch.bfloat16):  # add in float32, round once to the parameter's dtype
            p.copy_(p.float().add_(z, alpha=scale))
        else:
            p.add_(z.to(p.dtype), alpha=scale)


def spsa_step(params: Sequence[torch.Tensor], loss: Callable[[], float], seed: int, lr: float,
              eps: float) -> tuple[float, float, float]:
    """One MeZO step in place; returns (L₊, L₋, g) with g = (L₊ − L₋)/(2ε).

    `loss` evaluates the loss at the parameters' current values (the same batch both times, and
    deterministically: dropout off). The caller decides what to do with a non-finite g; θ is left
    at its unperturbed value before the update is applied, and the update is skipped when g is
    not finite, so a failed step never leaves θ perturbed.
    """
    add_direction_(params, seed, eps)
    lp = float(loss())
    add_direction_(params, seed, -2.0 * eps)
    lm = float(loss())
    add_direction_(params, seed, eps)
    g = (lp - lm) / (2.0 * eps)
    if math.isfinite(g):
        add_direction_(params, seed, -lr * g)
    return lp, lm, g


def spsa_multi_step(params: Sequence[torch.Tensor], loss: Callable[[], float], seeds: Sequence[int], lr: float,
                    eps: float) -> tuple[float, float, float]:
    """One step along k = len(seeds) directions: g_i = (L(θ+εz_i) − L(θ−εz_i))/(2ε) for each z_i at the
    same θ, then θ -= (lr/k)·Σ g_i·z_i: the average of k SPSA gradient estimates, 2k forward passes.
    Returns the means of L₊, L₋ and g; k = 1 is spsa_step exactly. A non-finite g_i skips the update
    (g is then NaN). The z_i are regenerated from their seeds, so the memory is still one direction tensor.
    """
    if len(seeds) == 1:
        return spsa_step(params, loss, seeds[0], lr, eps)
    gs, lps, lms = [], [], []
    for s in seeds:
        lp, lm, g = spsa_step(params, loss, s, 0.0, eps)
        lps.append(lp)
        lms.append(lm)
        gs.append(g)
    k = len(seeds)
    if all(math.isfinite(g) for g in gs):
        for s, g in zip(seeds, gs):
            add_direction_(params, s, -lr * g / k)
        g_all = sum(gs) / k
    else:
        g_all = float("nan")
    return sum(lps) / k, sum(lms) / k, g_all


def spsa_estimate(params: Sequence[torch.Tensor], loss: Callable[[], float], seed: int, eps: float) -> float:
    """(L(θ+εz) − L(θ−εz)) / (2ε) without updating θ (a step with lr 0): what spsa_step would use."""
    return spsa_step(params, loss, seed, 0.0, eps)[2]


def step_seeds(seed: int, steps: int) -> list[int]:
    """The per-step seeds of a run: drawn from one generator seeded with `seed`, so a run is reproducible
    and two runs with different seeds share no direction."""
    g = torch.Generator().manual_seed(seed)
    return [int(s) for s in torch.randint(0, 2**62, (steps,), generator=g, dtype=torch.int64)]
