"""Run the SLM and the LLM forward on the same inputs and accumulate paired activation moments.

Only forward passes, one window of LLM layers at a time (stream.py: only the window's weights
are in memory, in the checkpoint's dtype; memory.py chooses the windows). Forward hooks on the modules the family map names read each needed space; rows of the two
models are paired token by token:
  * text  — each model tokenizes the text with its own tokenizer; a token of one is paired with the
            token of the other that ends at the same character (identical tokenizers pair every token);
  * vocab — every shared token string run alone as a one-token sequence (the data-free mode).
"""

from __future__ import annotations

from ...io.progress import progress
from ...io.tokenizer import check_ids, vocab_limit
from ...ops.project import Moments
from .memory import CHUNK_TOKENS
from .plan import module_path, slice_of


def shared_vocab(tok_s, tok_l) -> list[tuple[int, int]]:
    """[(slm id, llm id)] for token strings both vocabularies hold, in SLM id order."""
    vs, vl = tok_s.get_vocab(), tok_l.get_vocab()
    ns, nl = vocab_limit(tok_s), vocab_limit(tok_l)  # tokens past a model's embedding cannot be run
    return sorted((i, vl[t]) for t, i in vs.items() if t in vl and (ns is None or i < ns) and (nl is None or vl[t] < nl))


def _pair_by_offsets(offs_s, offs_l) -> tuple[list[int], list[int]]:
    """Positions whose tokens end at the same character in both tokenizations."""
    end_l = {}
    for j, (_, e) in enumerate(offs_l):
        end_l.setdefault(e, j)
    ps, pl, seen = [], [], set()
    for i, (_, e) in enumerate(offs_s):
        if e in end_l and e not in seen:
            seen.add(e)
            ps.append(i)
            pl.append(end_l[e])
    return ps, pl


def text_batches(texts, tok_s, tok_l, seq_len: int, batch: int):
    """Yield (ids_s, mask_s, rows_s, ids_l, mask_l, rows_l): rows index the flattened [B·T] positions."""
    import torch

    for b0 in range(0, len(texts), batch):
        chunk = texts[b0:b0 + batch]
        enc = []
        for tok in (tok_s, tok_l):
            e = tok(chunk, truncation=True, max_length=seq_len, return_offsets_mapping=True,
                    padding=True, return_tensors="pt")
            check_ids(tok, e["input_ids"], "the calibration text")
            enc.append(e)
        rows_s, rows_l = [], []
        T_s, T_l = enc[0]["input_ids"].shape[1], enc[1]["input_ids"].shape[1]
        for b in range(len(chunk)):
            offs = []
            for e in enc:
                m = e["attention_mask"][b].bool()
                offs.append([tuple(o) if m[k] else (-1, -1) for k, o in enumerate(e["offset_mapping"][b].tolist())])
            ps, pl = _pair_by_offsets(*offs)
            pairs = [(i, j) for i, j in zip(ps, pl) if offs[0][i][1] >= 0]
            rows_s += [b * T_s + i for i, _ in pairs]
            rows_l += [b * T_l + j for _, j in pairs]
        yield (enc[0]["input_ids"], enc[0]["attention_mask"], torch.tensor(rows_s),
               enc[1]["input_ids"], enc[1]["attention_mask"], torch.tensor(rows_l))


def vocab_batches(pairs, batch: int):
    """Each shared token alone: one-token sequences, paired row by row."""
    import torch

    for b0 in range(0, len(pairs), batch):
        chunk = pairs[b0:b0 + batch]
        ids_s = torch.tensor([[i] for i, _ in chunk])
        ids_l = torch.tensor([[j] for _, j in chunk])
        ones = torch.ones_like(ids_s)
        rows = torch.arange(len(chunk))
        yield ids_s, ones, rows, ids_l, ones.clone(), rows


class Recorder:
    """Forward hooks on the modules of (layer, key) that take each batch's paired rows ([rows, n]) as
    they are computed: into `store` (the SLM's, kept until the LLM has run the same batch), or straight
    into `sink(where, x)` (the LLM's, folded into the moments inside the hook, so no batch of LLM
    activations outlives its layer's forward). `rows` is the batch's paired positions; set it per batch."""

    def __init__(self, model, arch, stack: str, wanted: dict, sink=None):
        """wanted: {layer: [Capture]}."""
        self.store, self.handles, self.sink, self.rows = {}, [], sink, None
        mods = dict(model.named_modules())
        for layer, caps in wanted.items():
            for cap in caps:
                start, stop = slice_of(arch, cap)
                mod = mods[module_path(arch, stack, layer, cap.module)]
                self.handles.append(mod.register_forward_hook(self._hook((layer, cap.key), cap.side, start, stop)))

    def _hook(self, where, side, start, stop):
        def hook(module, args, output):
            x = args[0] if side == "in" else output
            x = x.detach()[..., start:stop]
            x = x.reshape(-1, x.shape[-1])[self.rows].to("cpu")  # a compact copy of the paired rows only
            if self.sink is None:
                self.store[where] = x
            else:
                self.sink(where, x)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def accumulate(streams, stack, windows, batches, pairing, wanted, needs, on_window) -> None:
    """Moments per (llm layer, key), one window of LLM layers at a time.

    streams: (SLM, LLM) LayerStreams, primed on `batches` (each (…, rows_s, …, rows_l));
    windows: [(start, stop)] of LLM layers; pairing: {llm layer: slm layer}; wanted: ({slm layer:
    captures}, {llm layer: captures}); needs: {SpaceKey: Directions} (fit.py).
    Per batch the SLM's paired rows of the window's spaces are kept; the LLM's are added to the
    float64 moments inside its hooks, CHUNK_TOKENS rows at a time (memory.py), and dropped.
    on_window(moments) fits and frees each window's moments before the next is captured.
    Progress (io/progress.py: a bar with an ETA on a terminal, a log line every N seconds otherwise)
    counts batches over all windows, since each window runs every batch through its layers once.
    """
    import contextlib

    s_stream, l_stream = streams
    slm_layers = [sorted({pairing[j] for (j, _) in needs if a <= j < b}) for a, b in windows]
    with progress(len(windows) * len(batches), "transfer: calibration passes", unit="batches") as advance:
        for w, (a, b) in enumerate(windows):
            need = {(j, key): v for (j, key), v in needs.items() if a <= j < b}
            used = slm_layers[w]
            later = [i for ls in slm_layers[w + 1:] for i in ls]
            if used:  # SLM layers up to the last one used; resume where the next window's SLM layers start
                stop_s = used[-1] + 1
                s_ctx = s_stream.window(s_stream.cur, stop_s, min([stop_s] + later))
            else:
                s_ctx = contextlib.nullcontext(lambda b: None)
            moments: dict = {}
            rec_s = Recorder(s_stream.model, s_stream.arch, stack, {i: wanted[0][i] for i in used})

            def add(where, xl, rec_s=rec_s, moments=moments, need=need):
                j, key = where
                xs = rec_s.store[(pairing[j], key)]
                if (j, key) not in moments:
                    dirs = need[(j, key)]
                    moments[(j, key)] = Moments(xs.shape[1], xl.shape[1], dirs.to_llm, dirs.to_slm)
                moments[(j, key)].add(xs, xl, CHUNK_TOKENS)

            rec_l = Recorder(l_stream.model, l_stream.arch, stack,
                             {j: wanted[1][j] for j in range(a, b) if j in wanted[1]}, sink=add)
            try:
                with s_ctx as step_s, l_stream.window(a, b, b) as step_l:
                    for n, (_, _, rows_s, _, _, rows_l) in enumerate(batches):
                        rec_s.rows, rec_l.rows = rows_s, rows_l
                        if not len(rows_s):  # nothing paired: the batch still runs, to carry its hidden state
                            rec_s.rows = rec_l.rows = slice(0, 0)
                        step_s(n)
                        step_l(n)
                        rec_s.store.clear()
                        advance(1, f"LLM layers {a}..{b - 1}" if b - a > 1 else f"LLM layer {a}")
            finally:
                rec_s.close()
                rec_l.close()
            on_window(a, b, moments)
