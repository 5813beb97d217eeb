"""Training memory of one LoRA step, measured tensor by tensor (not process RSS).

At the evidence pair's size (under a million parameters) a process's RSS is ~95 % Python, torch
and transformers, so RSS ratios say little about the method. This counts what training itself
holds at the peak of a step, for a given model and the LoRA that `surgery train` puts on it:
  weights      every parameter of the model the loss is back-propagated through (bytes as stored)
  activations  every tensor autograd saves for the backward pass, counted once per storage
               (torch.autograd.graph.saved_tensors_hooks during the forward pass)
  lora state   trainable parameters x 3 (their gradients and AdamW's two moments)
at a stated batch shape. The loss is the trainer's own (surgery.train.score.batch_nll: the LM head a
chunk of tokens at a time, so no stage keeps full-vocabulary logits for backward), with every token
labelled, so the count is an upper bound for prompt/completion training, whose prompt tokens skip the head. It is the memory that scales with the model; the paper's Tables 6-7
report GPU memory, which is the same quantity plus the CUDA context.
"""

from __future__ import annotations


def _lora_model_and_counter(model_dir: str, batch: int, seq: int, rank: int, seed: int):
    """The model with `surgery train`'s LoRA, a seeded batch, and a saved-tensor hook pair that
    records each storage autograd saves once (both measures below count the same way)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    ids = torch.randint(4, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    seen: dict[tuple, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    return model, ids, seen, hooks


def training_bytes(model_dir: str, batch: int, seq: int, rank: int = 8, seed: int = 0) -> dict:
    model, ids, seen, hooks = _lora_model_and_counter(model_dir, batch, seq, rank, seed)
    from surgery.train.score import batch_nll

    model.train()
    with hooks:
        nll, n = batch_nll(model, {"input_ids": ids, "labels": ids}, seq2seq=False)
    (nll / n).backward()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # parameters saved for backward are already counted as weights
    params = {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()}
    acts = sum(v for k, v in seen.items() if k not in params)
    return {"weights": weights, "activations": acts, "lora_state": 3 * trainable,
            "total": weights + acts + 3 * trainable, "batch": batch, "seq": seq}


def inference_bytes(model_dir: str, batch: int, seq: int, rank: int = 8, seed: int = 0) -> dict:
    """The same count for `surgery refine` (MeZO): the LLM's weights and its LoRA, run in inference mode.

    Nothing is saved for a backward pass and there is no gradient or optimizer state; the direction z
    is regenerated one tensor at a time, so one LoRA tensor's worth more. Transient activations (one
    layer's at a time) are not counted, as on the training side. The forward is run under the same
    saved-tensor hook to show that it saves nothing.
    """
    import torch

    model, ids, seen, hooks = _lora_model_and_counter(model_dir, batch, seq, rank, seed)
    model.eval()
    with hooks, torch.inference_mode():
        model(input_ids=ids, labels=ids)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lora = [p for p in model.parameters() if p.requires_grad]
    z = max(p.numel() * p.element_size() for p in lora)
    return {"weights": weights, "activations": sum(seen.values()), "lora_state": z,
            "total": weights + sum(seen.values()) + z, "batch": batch, "seq": seq}


def memory_table(slm: str, llm: str, bridges: dict, batch: int, seq: int) -> dict:
    """Every stage's count, as results.json's "train_memory" holds it (run.py and main() below)."""
    return {"slm": training_bytes(slm, batch, seq), "llm": training_bytes(llm, batch, seq),
            **{f"bridge ({k})": training_bytes(v["dir"], batch, seq) for k, v in bridges.items()},
            "refine (LLM, forward only)": inference_bytes(llm, batch, seq)}


def main() -> None:
    """Recount the memory of an existing run and regenerate docs/results.md from it:
        python -m benchmarks.evidence.memory benchmarks/.work/evidence-<key>/results.json
    The counts depend only on the models and the batch shape, so this equals a full re-run's."""
    import json
    import os
    import sys

    from benchmarks.evidence.report import write_docs

    path = sys.argv[1]
    with open(path) as f:
        results = json.load(f)
    s, first = results["settings"], next(iter(results["tasks"].values()))
    pair = results["pair"]
    results["train_memory"] = memory_table(os.path.join(pair, "slm"), os.path.join(pair, "llm"), first["bridges"],
                                           s["batch"], s["max_length"])
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    write_docs(path, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs"))


if __name__ == "__main__":
    main()
