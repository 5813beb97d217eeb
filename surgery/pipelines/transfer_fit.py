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
from .transfer_capture import accumulate, load_model, shared_vocab, text_batches, vocab_batches
from .transfer_plan import capture_points

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
                    ridge, batch, embed_needed=False) -> tuple[dict, list, list, dict]:
    """needs: {slm layer: {key: {directions}}}. Returns (maps, records, warnings, embed maps).

    maps: {(llm layer, key, direction): float64 matrix}; records: one dict per fit (transfer.json).
    """
    tok_s, tok_l = (load_tokenizer(ck.path, offsets=True, pad=True) for ck in (ck_s, ck_l))
    maps, records, warnings, embed = {}, [], [], {}
    emb = None
    if map_kind == "embeddings" or embed_needed:
        why = "--map embeddings" if map_kind == "embeddings" else "mapping virtual tokens"
        emb = embedding_moments(ck_s, ck_l, arch_s, arch_l, _vocab_pairs(tok_s, tok_l, why))
        for d, fit in DIRECTIONS.items():
            embed[d], rel, rank = fit(emb, ridge)
            records.append(_record(None, None, "embed", d, rel, rank, emb, "embeddings", d == "to_llm"))
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
            maps[(j, key, d)] = embed[d]
            r = next(r for r in records if r["space"] == "embed" and r["direction"] == d)
            records.append({**r, "llm_layer": j, "slm_layer": slm_of[j], "space": key})
    if captured:
        source = map_kind if map_kind == "activations" else "vocab"
        if map_kind == "activations":
            if not data:
                raise DataError("--map activations needs calibration text", "pass --data FILE (one text per line), or use --map embeddings")
            batches = text_batches(documents(data, samples, tok_s), tok_s, tok_l, seq_len, batch)
        else:
            batches = vocab_batches(_vocab_pairs(tok_s, tok_l, "--map embeddings"), 64)
        pts_s, pts_l = capture_points(arch_s, stack), capture_points(arch_l, stack)
        wanted_s, wanted_l = {}, {}
        for (j, key) in captured:
            wanted_s.setdefault(slm_of[j], set()).add(pts_s[key])
            wanted_l.setdefault(j, set()).add(pts_l[key])
        models = (load_model(ck_s.path), load_model(ck_l.path))
        moments = accumulate(models, (arch_s, arch_l), stack, wanted_s, wanted_l, slm_of, batches, captured)
        del models
        for (j, key), (gs, gl) in sorted(captured.items(), key=lambda kv: (kv[0][0], kv[0][1] != "res", kv[0][1])):
            m = moments.get((j, key))
            if m is None or m.count == 0:
                raise DataError(f"no calibration token could be paired between the SLM and the LLM ({key}, layer {j})",
                                "pass text both tokenizers can read, or use --map embeddings")
            for d, want in (("to_llm", gs), ("to_slm", gl)):
                if want:
                    prior = None
                    if key.startswith("out.") and d == "to_llm":  # residual writes lean on the residual-stream (or embedding) map
                        prior = maps.get((j, "res", "to_llm"), embed.get("to_llm"))
                    fit = DIRECTIONS[d]
                    maps[(j, key, d)], rel, rank = fit(m, ridge, prior) if prior is not None else fit(m, ridge)
                    rec = _record(j, slm_of[j], key, d, rel, rank, m, source, d == "to_llm")
                    records.append(rec)
                    if m.count < rec["dim"]:
                        warnings.append(f"layer {j} {key} ({d}): {m.count} calibration tokens for a {rec['dim']}-dim "
                                        f"space, so the fit has rank ≤ {m.count}; pass more --samples or longer texts")
                    elif d == "to_llm" and rank < rec["dim"] and prior is None and not rec["silent"]:
                        # (a to_slm map of lower rank is normal: the LLM's silent directions carry nothing)
                        warnings.append(f"layer {j} {key}: the fit resolves {rank} of {rec['dim']} dims of the SLM's "
                                        f"space (rel. residual {rel:.2g}); adapter components in the others are shrunk")
    return maps, records, warnings, embed


def _record(j, i, key, direction, rel, rank, m, source, from_slm: bool) -> dict:
    dim = (m.ss if from_slm else m.ll).shape[0]
    target = m.tr_ll if from_slm else m.tr_ss
    return {"llm_layer": j, "slm_layer": i, "space": key, "direction": direction, "rel_residual": round(rel, 6),
            "rank": rank, "dim": dim, "tokens": m.count, "silent": target == 0.0, "source": source}
