"""Fit every projection a transfer needs: per (LLM layer, space, direction), from activations or embeddings.

`--map activations` pairs the two models' activations on calibration text at mapped layers.
`--map embeddings` is data-free: the residual a sublayer reads (in.*) uses one map fitted between
the token-embedding matrices over the shared vocabulary; every other space (q/k/v, attn.o,
mlp.inner, and the residual writes out.*, with the embedding map as their ridge prior) is fitted
on the shared vocabulary run as one-token sequences, so no calibration text is needed.
"""

from __future__ import annotations

from ..errors import DataError
from ..ops.project import Moments, fit_to_llm, fit_to_slm
from ..io.data import documents
from ..io.tokenizer import load_tokenizer
from .transfer_capture import accumulate, shared_vocab, text_batches, vocab_batches
from .transfer_maps import MapStore
from .transfer_memory import default_budget, plan_windows, rss_bytes, space_bytes, trim
from .transfer_plan import capture_points, slice_of
from .transfer_stream import LayerStream

DIRECTIONS = {"to_llm": fit_to_llm, "to_slm": fit_to_slm}


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


def fit_projections(ck_s, ck_l, arch_s, arch_l, stack, blocks, needs, *, map_kind, data, samples, seq_len,
                    ridge, batch, spill_dir, budget, embed_needed=False) -> tuple[MapStore, list, list, dict]:
    """needs: {slm layer: {key: {directions}}}. Returns (maps, records, warnings, embed maps).

    maps: {(llm layer, key, direction): float64 matrix}, spilled to `spill_dir` window by window;
    records: one dict per fit (transfer.json). `budget` (bytes, None: transfer_memory.default_budget)
    bounds the process's peak RSS.
    """
    tok_s, tok_l = (load_tokenizer(ck.path, offsets=True, pad=True) for ck in (ck_s, ck_l))
    maps, records, warnings, embed = MapStore(spill_dir, stack), [], [], {}
    emb = None
    if map_kind == "embeddings" or embed_needed:
        why = "--map embeddings" if map_kind == "embeddings" else "mapping virtual tokens"
        emb = embedding_moments(ck_s, ck_l, arch_s, arch_l, _vocab_pairs(tok_s, tok_l, why))
        for d, fit in DIRECTIONS.items():
            embed[d], rel, rank = fit(emb, ridge)
            records.append(_record(None, None, "embed", d, rel, rank, emb, "embeddings", d == "to_llm"))
        del emb
    slm_of = {j: i for i, blk in enumerate(blocks) for j in blk}
    captured, from_embed = {}, []
    for i, keys in sorted(needs.items()):
        for j in blocks[i]:
            for key, dirs in sorted(keys.items()):
                if map_kind == "embeddings" and key.startswith("in."):
                    from_embed.append((j, key, dirs))
                else:
                    captured[(j, key)] = ("to_llm" in dirs, "to_slm" in dirs)
                    if key.startswith("out.") and map_kind == "activations":  # the residual-stream map is its prior
                        captured[(j, "res")] = (True, captured.get((j, "res"), (False, False))[1])
    for j, key, dirs in from_embed:
        for d in sorted(dirs):
            maps.put((j, key, d), embed[d])
            r = next(r for r in records if r["space"] == "embed" and r["direction"] == d)
            records.append({**r, "llm_layer": j, "slm_layer": slm_of[j], "space": key})
    if not captured:
        return maps, records, warnings, embed
    source = map_kind if map_kind == "activations" else "vocab"
    if map_kind == "activations":
        if not data:
            raise DataError("--map activations needs calibration text", "pass --data FILE (one text per line), or use --map embeddings")
        batches = list(text_batches(documents(data, samples), tok_s, tok_l, seq_len, batch))
    else:
        batches = list(vocab_batches(_vocab_pairs(tok_s, tok_l, "--map embeddings"), 64))
    pts_s, pts_l = capture_points(arch_s, stack), capture_points(arch_l, stack)
    wanted_s, wanted_l = {}, {}
    for (j, key) in captured:
        wanted_s.setdefault(slm_of[j], set()).add(pts_s[key])
        wanted_l.setdefault(j, set()).add(pts_l[key])
    streams = (LayerStream(ck_s, arch_s, stack), LayerStream(ck_l, arch_l, stack))
    streams[0].prime([(b[0], b[1]) for b in batches])
    streams[1].prime([(b[3], b[4]) for b in batches])
    trim()
    windows = _windows(streams, captured, slm_of, pts_s, pts_l, batches, budget)

    def fit_window(a, b, moments):
        fitted = {}
        for (j, key), (gs, gl) in sorted(((k, v) for k, v in captured.items() if a <= k[0] < b),
                                         key=lambda kv: (kv[0][0], kv[0][1] != "res", kv[0][1])):
            m = moments.pop((j, key), None)
            if m is None or m.count == 0:
                raise DataError(f"no calibration token could be paired between the SLM and the LLM ({key}, layer {j})",
                                "pass text both tokenizers can read, or use --map embeddings")
            for d, want in (("to_llm", gs), ("to_slm", gl)):
                if not want:
                    continue
                prior = None
                if key.startswith("out.") and d == "to_llm":  # residual writes lean on the residual-stream (or embedding) map
                    prior = fitted.get((j, "res", "to_llm"), embed.get("to_llm"))
                fit = DIRECTIONS[d]
                fitted[(j, key, d)], rel, rank = fit(m, ridge, prior) if prior is not None else fit(m, ridge)
                rec = _record(j, slm_of[j], key, d, rel, rank, m, source, d == "to_llm")
                records.append(rec)
                if m.count < rec["dim"]:
                    warnings.append(f"layer {j} {key} ({d}): {m.count} calibration tokens for a {rec['dim']}-dim "
                                    f"space, so the fit has rank ≤ {m.count}; pass more --samples or longer texts")
                elif d == "to_llm" and rank < rec["dim"] and prior is None and not rec["silent"]:
                    # (a to_slm map of lower rank is normal: the LLM's silent directions carry nothing)
                    warnings.append(f"layer {j} {key}: the fit resolves {rank} of {rec['dim']} dims of the SLM's "
                                    f"space (rel. residual {rel:.2g}); adapter components in the others are shrunk")
            del m
        maps.spill(fitted)
        del fitted
        trim()

    accumulate(streams, stack, windows, batches, slm_of, (wanted_s, wanted_l), captured, fit_window)
    return maps, records, warnings, embed


def _windows(streams, captured, slm_of, pts_s, pts_l, batches, budget) -> list[tuple[int, int]]:
    """Windows of LLM layers [0, last captured layer] whose peak fits in what the budget leaves."""
    s_stream, l_stream = streams
    tokens = max(max(b[0].numel(), b[3].numel()) for b in batches)
    last = max(j for j, _ in captured)
    costs = []
    for j in range(last + 1):
        res = l_stream.layer_bytes(j) + (s_stream.layer_bytes(slm_of[j]) if j in slm_of else 0)
        fit = 0
        for (jj, key), (gs, gl) in captured.items():
            if jj == j:
                n_s = _width(s_stream.arch, pts_s[key])
                n_l = _width(l_stream.arch, pts_l[key])
                c = space_bytes(n_s, n_l, gs, gl, tokens)
                res += c["resident"]
                fit = max(fit, c["fit"])
        costs.append((res, fit))
    fixed = rss_bytes() + 64 * 2**20  # + allocator slack and the Python objects we do not count
    if budget is None:
        budget = default_budget(costs, fixed)
    return plan_windows(costs, budget - fixed - budget // 20, budget)


def _width(arch, cap) -> int:
    a, b = slice_of(arch, cap)
    return b - a


def _record(j, i, key, direction, rel, rank, m, source, from_slm: bool) -> dict:
    dim = (m.ss if from_slm else m.ll).shape[0]
    target = m.tr_ll if from_slm else m.tr_ss
    return {"llm_layer": j, "slm_layer": i, "space": key, "direction": direction, "rel_residual": round(rel, 6),
            "rank": rank, "dim": dim, "tokens": m.count, "silent": target == 0.0, "source": source}
