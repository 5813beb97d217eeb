"""Fit every projection a transfer needs: per (LLM layer, space, direction), from activations or embeddings.

`--map activations` pairs the two models' activations on calibration text at mapped layers.
`--map embeddings` is data-free: the residual a sublayer reads (in.*) uses one map fitted between
the token-embedding matrices over the shared vocabulary; every other space (q/k/v, attn.o,
mlp.inner, and the residual writes out.*, with the embedding map as their ridge prior) is fitted
on the shared vocabulary run as one-token sequences, so no calibration text is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ...errors import DataError
from ...ops.project import Moments, fit_to_llm, fit_to_slm
from ...io.data import documents
from ...io.tokenizer import load_tokenizer
from .capture import accumulate, shared_vocab, text_batches, vocab_batches
from .maps import MapStore
from .memory import budget_windows, layer_bytes, map_large_allocations, one_layer_windows, rss_bytes, trim, window_costs
from .plan import capture_points, slice_of
from .stream import LayerStream

DIRECTIONS = {"to_llm": fit_to_llm, "to_slm": fit_to_slm}


class SpaceKey(NamedTuple):
    """One space of one LLM layer: what a set of moments is accumulated for."""
    layer: int
    space: str


class MapKey(NamedTuple):
    """One fitted map: (LLM layer, space, "to_llm" | "to_slm"); a plain tuple to the kinds' ports."""
    layer: int
    space: str
    direction: str


@dataclass(frozen=True)
class Directions:
    """Which maps a space needs: into the LLM (needs the SLM's Gram) and/or into the SLM (the LLM's)."""
    to_llm: bool = False
    to_slm: bool = False

    def __or__(self, other: "Directions") -> "Directions":
        return Directions(self.to_llm or other.to_llm, self.to_slm or other.to_slm)


@dataclass(frozen=True)
class Pair:
    """The two models of a transfer and the depth map between them."""
    ck_s: object
    ck_l: object
    arch_s: object
    arch_l: object
    stack: str
    blocks: list  # per SLM layer, its block of LLM layers

    @property
    def slm_of(self) -> dict[int, int]:
        return {j: i for i, blk in enumerate(self.blocks) for j in blk}


@dataclass(frozen=True)
class FitOptions:
    """How the maps are fitted (the transfer command's flags)."""
    map_kind: str = "activations"
    data: str | None = None
    samples: int = 64
    seq_len: int = 128
    ridge: float = 1e-9
    batch: int = 8
    budget: int | None = None  # peak-RSS bytes; None: one LLM layer a window (memory.one_layer_windows)
    dtype: str = "auto"  # the streamed layers' dtype (auto: each checkpoint's own)


@dataclass
class Fits:
    """What fit_projections returns: the maps (disk-backed), one record per fit, warnings, embedding maps."""
    maps: MapStore
    records: list = field(default_factory=list)  # dicts, as written to transfer.json
    warnings: list = field(default_factory=list)
    embed: dict = field(default_factory=dict)  # {"to_llm" | "to_slm": matrix} of the embedding map


def embedding_moments(ck_s, ck_l, arch_s, arch_l, pairs) -> Moments:
    """Moments of the token-embedding rows of the shared vocabulary (SLM row ↔ LLM row)."""
    import torch

    def table(ck, arch):
        t = next(t for t in arch.tensors() if t.role == "embedding" and t.dims[0] == ("vocab",))
        return ck.read(t.tied_to or t.name).to(torch.float64)

    ids_s = torch.tensor([i for i, _ in pairs])
    ids_l = torch.tensor([j for _, j in pairs])
    E_s, E_l = table(ck_s, arch_s)[ids_s], table(ck_l, arch_l)[ids_l]
    m = Moments(E_s.shape[1], E_l.shape[1])
    m.add(E_s, E_l)
    return m


def _vocab_pairs(tok_s, tok_l, why: str):
    pairs = shared_vocab(tok_s, tok_l)
    if not pairs:
        raise DataError(f"the SLM and LLM tokenizers share no token strings, and {why} needs a shared vocabulary",
                        "use --map activations with --data FILE (text pairs tokens by character offsets), "
                        "or pick an LLM from the SLM's tokenizer family")
    return pairs


def fit_projections(pair: Pair, needs: dict, opts: FitOptions, spill_dir: str, embed_needed: bool = False) -> Fits:
    """needs: {slm layer: {key: {directions}}} (a kind's transfer_needs). Each map is spilled to `spill_dir`
    as soon as it is fitted; opts.budget bounds the process's peak RSS (None: one LLM layer at a time)."""
    ck_s, ck_l, arch_s, arch_l, stack = pair.ck_s, pair.ck_l, pair.arch_s, pair.arch_l, pair.stack
    tok_s, tok_l = (load_tokenizer(ck.path, offsets=True, pad=True) for ck in (ck_s, ck_l))
    fits = Fits(MapStore(spill_dir, stack))
    if opts.map_kind == "embeddings" or embed_needed:
        why = "--map embeddings" if opts.map_kind == "embeddings" else "mapping virtual tokens"
        emb = embedding_moments(ck_s, ck_l, arch_s, arch_l, _vocab_pairs(tok_s, tok_l, why))
        for d, fit in DIRECTIONS.items():
            fits.embed[d], rel, rank = fit(emb, opts.ridge)
            fits.records.append(_record(None, None, "embed", d, rel, rank, emb, "embeddings", d == "to_llm"))
        del emb
    slm_of = pair.slm_of
    captured, from_embed = _plan_spaces(pair, needs, opts.map_kind)
    for key, dirs in from_embed:
        for d in sorted(dirs):
            fits.maps.put(MapKey(key.layer, key.space, d), fits.embed[d])
            r = next(r for r in fits.records if r["space"] == "embed" and r["direction"] == d)
            fits.records.append({**r, "llm_layer": key.layer, "slm_layer": slm_of[key.layer], "space": key.space})
    if not captured:
        return fits
    source = opts.map_kind if opts.map_kind == "activations" else "vocab"
    if opts.map_kind == "activations":
        if not opts.data:
            raise DataError("--map activations needs calibration text", "pass --data FILE (one text per line), or use --map embeddings")
        batches = list(text_batches(documents(opts.data, opts.samples, tok_s), tok_s, tok_l, opts.seq_len, opts.batch))
    else:
        batches = list(vocab_batches(_vocab_pairs(tok_s, tok_l, "--map embeddings"), 64))
    pts_s, pts_l = capture_points(arch_s, stack), capture_points(arch_l, stack)
    wanted_s, wanted_l = {}, {}
    for key in captured:
        wanted_s.setdefault(slm_of[key.layer], set()).add(pts_s[key.space])
        wanted_l.setdefault(key.layer, set()).add(pts_l[key.space])
    if opts.budget is not None:  # a budget is a promise: RSS must follow the live tensors the cost model counts
        map_large_allocations()
    streams = (LayerStream(ck_s, arch_s, stack, dtype=opts.dtype), LayerStream(ck_l, arch_l, stack, dtype=opts.dtype))
    streams[0].prime([(b[0], b[1]) for b in batches])
    streams[1].prime([(b[3], b[4]) for b in batches])
    trim()
    windows = _windows(streams, captured, slm_of, pts_s, pts_l, batches, opts.budget)

    def fit_window(a, b, moments):
        priors = {}  # the layer's residual-stream map, which its out.* fits lean on
        for key, dirs in sorted(((k, v) for k, v in captured.items() if a <= k.layer < b),
                                key=lambda kv: (kv[0].layer, kv[0].space != "res", kv[0].space)):
            j, space = key
            m = moments.pop(key, None)
            if m is None or m.count == 0:
                raise DataError(f"no calibration token could be paired between the SLM and the LLM ({space}, layer {j})",
                                "pass text both tokenizers can read, or use --map embeddings")
            for d, want in (("to_llm", dirs.to_llm), ("to_slm", dirs.to_slm)):
                if not want:
                    continue
                prior = None
                if space.startswith("out.") and d == "to_llm":  # residual writes lean on the residual-stream (or embedding) map
                    prior = priors.get(j, fits.embed.get("to_llm"))
                fit = DIRECTIONS[d]
                M, rel, rank = fit(m, opts.ridge, prior) if prior is not None else fit(m, opts.ridge)
                fits.maps.spill({MapKey(j, space, d): M})  # to disk now: a window holds one map at a time
                if space == "res" and d == "to_llm":
                    priors[j] = M
                del M
                rec = _record(j, slm_of[j], space, d, rel, rank, m, source, d == "to_llm")
                fits.records.append(rec)
                fits.warnings.extend(_warnings(rec, m, prior is not None))
            del m
        priors.clear()
        trim()

    accumulate(streams, stack, windows, batches, slm_of, (wanted_s, wanted_l), captured, fit_window)
    return fits


def _plan_spaces(pair: Pair, needs: dict, map_kind: str) -> tuple[dict, list]:
    """({SpaceKey: Directions} to capture, [(SpaceKey, directions)] taken from the embedding map)."""
    captured: dict[SpaceKey, Directions] = {}
    from_embed = []
    for i, keys in sorted(needs.items()):
        for j in pair.blocks[i]:
            for space, dirs in sorted(keys.items()):
                key = SpaceKey(j, space)
                if map_kind == "embeddings" and space.startswith("in."):
                    from_embed.append((key, dirs))
                    continue
                captured[key] = Directions("to_llm" in dirs, "to_slm" in dirs)
                if space.startswith("out.") and map_kind == "activations":  # the residual-stream map is its prior
                    res = SpaceKey(j, "res")
                    captured[res] = captured.get(res, Directions()) | Directions(to_llm=True)
    return captured, from_embed


def _warnings(rec: dict, m, has_prior: bool) -> list[str]:
    j, space, d, dim, rank = rec["llm_layer"], rec["space"], rec["direction"], rec["dim"], rec["rank"]
    if m.count < dim:
        return [f"layer {j} {space} ({d}): {m.count} calibration tokens for a {dim}-dim "
                f"space, so the fit has rank ≤ {m.count}; pass more --samples or longer texts"]
    if d == "to_llm" and rank < dim and not has_prior and not rec["silent"]:
        # (a to_slm map of lower rank is normal: the LLM's silent directions carry nothing)
        return [f"layer {j} {space}: the fit resolves {rank} of {dim} dims of the SLM's "
                f"space (rel. residual {rec['rel_residual']:.2g}); adapter components in the others are shrunk"]
    return []


def _windows(streams, captured, slm_of, pts_s, pts_l, batches, budget) -> list[tuple[int, int]]:
    """Windows of LLM layers [0, last captured layer]: one layer each, or (a --max-memory budget) as many
    as its cost model (memory.py) fits in what the budget leaves."""
    s_stream, l_stream = streams
    weights, terms = _layer_terms(streams, captured, slm_of, pts_s, pts_l, batches)
    costs = window_costs(weights, terms)
    fixed = rss_bytes() + 64 * 2**20  # + allocator slack and the Python objects we do not count
    if budget is None:
        return one_layer_windows(costs, fixed)
    return budget_windows(costs, fixed, budget)


def _layer_terms(streams, captured, slm_of, pts_s, pts_l, batches) -> tuple[list[int], list[dict]]:
    """Per LLM layer up to the last captured: (its and its SLM layer's weight bytes, memory.layer_bytes terms)."""
    s_stream, l_stream = streams
    tokens = max(max(b[0].numel(), b[3].numel()) for b in batches)
    last = max(key.layer for key in captured)
    weights, terms = [], []
    for j in range(last + 1):
        weights.append(l_stream.layer_bytes(j) + (s_stream.layer_bytes(slm_of[j]) if j in slm_of else 0))
        spaces = [(_width(s_stream.arch, pts_s[key.space]), _width(l_stream.arch, pts_l[key.space]), dirs.to_llm, dirs.to_slm)
                  for key, dirs in captured.items() if key.layer == j]
        terms.append(layer_bytes(spaces, tokens))
    return weights, terms


def _width(arch, cap) -> int:
    a, b = slice_of(arch, cap)
    return b - a


def _record(j, i, key, direction, rel, rank, m, source, from_slm: bool) -> dict:
    dim = (m.ss if from_slm else m.ll).shape[0]
    target = m.tr_ll if from_slm else m.tr_ss
    return {"llm_layer": j, "slm_layer": i, "space": key, "direction": direction, "rel_residual": round(rel, 6),
            "rank": rank, "dim": dim, "tokens": m.count, "silent": target == 0.0, "source": source}
