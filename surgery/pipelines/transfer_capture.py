"""Run the SLM and the LLM forward on the same inputs and accumulate paired activation moments.

Only forward passes: the LLM never needs gradients, and it is loaded with accelerate's
`device_map="auto"` so it may be larger than one device (layers spill to CPU or disk).
Forward hooks on the modules the family map names read each needed space; rows of the two
models are paired token by token:
  * text  — each model tokenizes the text with its own tokenizer; a token of one is paired with the
            token of the other that ends at the same character (identical tokenizers pair every token);
  * vocab — every shared token string run alone as a one-token sequence (the data-free mode).
"""

from __future__ import annotations

import os

from ..io.tokenizer import check_ids, vocab_limit
from ..ops.project import Moments
from .transfer_plan import module_path, slice_of


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


def _needs_dispatch(path: str) -> bool:
    """accelerate's device_map="auto" when there is a GPU or the model would not fit in free memory."""
    import torch

    from ..io.checkpoint import Checkpoint

    if torch.cuda.is_available():
        return True
    try:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return 2 * Checkpoint.open(path).total_bytes() > free  # float32 copy of a possibly 16-bit checkpoint


def load_model(path: str, auto: bool | None = None):
    """The model for forward passes only; dispatched over devices (and disk) by accelerate when needed."""
    import torch
    from transformers import AutoModelForCausalLM

    auto = _needs_dispatch(path) if auto is None else auto
    kw = {"device_map": "auto"} if auto else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    return model.eval()


class Recorder:
    """Forward hooks that keep, per (layer, key), the last batch's activations as [B·T, n]."""

    def __init__(self, model, arch, stack: str, wanted: dict):
        """wanted: {layer: [Capture]}."""
        self.store, self.handles = {}, []
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
            self.store[where] = x.reshape(-1, x.shape[-1]).to("cpu")
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def accumulate(models, archs, stack, wanted_s, wanted_l, pairing, batches, needs) -> dict:
    """Moments per (llm layer, key). pairing: {llm layer: slm layer}; needs: {(j, key): (slm gram?, llm gram?)}."""
    import torch

    rec_s = Recorder(models[0], archs[0], stack, wanted_s)
    rec_l = Recorder(models[1], archs[1], stack, wanted_l)
    moments: dict = {}
    try:
        with torch.no_grad():
            for ids_s, m_s, rows_s, ids_l, m_l, rows_l in batches:
                if len(rows_s) == 0:
                    continue
                # the base model (no LM head): logits are not needed, only the hooked activations
                for model, ids, mask in ((models[0], ids_s, m_s), (models[1], ids_l, m_l)):
                    model.base_model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
                for (j, key), (gs, gl) in needs.items():
                    xs = rec_s.store[(pairing[j], key)][rows_s]
                    xl = rec_l.store[(j, key)][rows_l]
                    if (j, key) not in moments:
                        moments[(j, key)] = Moments(xs.shape[1], xl.shape[1], gs, gl)
                    moments[(j, key)].add(xs, xl)
    finally:
        rec_s.close()
        rec_l.close()
    return moments
