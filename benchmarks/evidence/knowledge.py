"""How much of the corpus's facts a pretrained model holds, before any tuning: an 8-way cloze per task.

For the first 160 dev questions of a task ("which module defines X?", "what is the first argument of
X?", ...), score the eight candidate answers in the pretraining text's own wording ("X(args) in
<module>", "X(<arg>", "X(args) in module: <Verb>") by their summed log-likelihood and count the entry
as known when the true answer scores highest (chance: 1/8). It separates what each model memorised
from the question format that LoRA has to learn.
"""

from __future__ import annotations

import json


def cloze(task: str, model_dir: str, dev_jsonl: str, limit: int = 160) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.evidence.corpus import split
    from benchmarks.evidence.tasks import LABELS, cloze_text, question

    by_qual = {}
    for e in split()[0]:
        by_qual.setdefault(e["qual"], e)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct = n = 0
    with open(dev_jsonl) as f:
        rows = [json.loads(line) for line in f][:limit]
    with torch.no_grad():
        for r in rows:
            e = by_qual[question(task, r["prompt"])]
            texts = [cloze_text(task, e, lab) for lab in LABELS[task]]
            enc = tok(texts, return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
            ll = (logp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]).sum(-1)
            correct += int(LABELS[task][int(ll.argmax())] == r["completion"].strip())
            n += 1
    return correct / n
