"""How much of fixtures/world.py's fixed facts a pretrained model holds: a 6-way cloze on homes.

For each person, score the six sentences "<name> lives <place>." by their summed log-likelihood
and count the person as known when the true place scores highest (chance: 1/6). It separates
what the models memorised from the template tokens that dominate the average LM loss. Reported
for the people the `home` task trains on and for those only its dev split asks about.
"""

from __future__ import annotations


def home_cloze(model_dir: str, first: int = 0, last: int | None = None) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fixtures.corpus import PLACES
    from fixtures.world import world

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    people = world()[first:last]
    correct = 0
    with torch.no_grad():
        for p in people:
            texts = [f"{p['name']} lives {place}." for place in PLACES]
            enc = tok(texts, return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
            tgt = ids[:, 1:]
            ll = (logp.gather(-1, tgt[..., None])[..., 0] * mask[:, 1:]).sum(-1)
            correct += int(PLACES[int(ll.argmax())] == p["place"])
    return correct / len(people)
