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


def _lora_model(model_dir: str, batch: int, seq: int, rank: int, seed: int, edit=None, frozen=(), rank_pattern=None):
    """The model with `surgery train`'s LoRA and a seeded batch; edit(model) runs before the LoRA goes
    on, and the LoRA parameters whose names contain one of `frozen` are not trained. rank_pattern: peft's,
    other ranks for some modules (alpha 2 x rank throughout: the count does not depend on alpha)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if edit is not None:
        edit(model)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                             rank_pattern=rank_pattern or {}))
    for n, p in model.named_parameters():
        if "lora_" in n and any(f in n for f in frozen):
            p.requires_grad_(False)
    ids = torch.randint(4, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return model, ids


def training_bytes(model_dir: str, batch: int, seq: int, rank: int = 8, seed: int = 0, prefix: bool = False,
                   edit=None, frozen=()) -> dict:
    """One LoRA step: weights, saved activations (and what they are: surgery.train.memory.KINDS), state.
    prefix: the step of `tune-bridge --prefix`, whose bridge reads stored hidden states in place of its token
    embedding and does not hold the embedding (bridge_prefix.load_without_embedding): counted with a stand-in
    that gives each batch its states, as the stored ones are given (one [batch, seq, hidden] tensor, no gradient).
    edit, frozen: see _lora_model (benchmarks/method_experiments.py --cascade counts a bridge with a frozen layer)."""
    from surgery.train.memory import by_kind, saved_tensors, without_embedding
    from surgery.train.score import batch_nll

    model, ids = _lora_model(model_dir, batch, seq, rank, seed, edit, frozen)
    if prefix:
        without_embedding(model.get_base_model())
    model.train()
    with saved_tensors(model) as seen:
        nll, n = batch_nll(model, {"input_ids": ids, "labels": ids}, seq2seq=False)
    (nll / n).backward()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    acts = sum(b for _, b in seen.values())
    return {"weights": weights, "activations": acts, "lora_state": 3 * trainable,
            "total": weights + acts + 3 * trainable, "batch": batch, "seq": seq, "kinds": by_kind(seen)}


def inference_bytes(model_dir: str, batch: int, seq: int, rank: int = 8, seed: int = 0, rank_pattern=None,
                    layers: dict | None = None) -> dict:
    """The same count for `surgery refine` (MeZO): the LLM's weights and its LoRA, run in inference mode.

    Nothing is saved for a backward pass and there is no gradient or optimizer state; the direction z
    is regenerated one tensor at a time, so one LoRA tensor's worth more. Transient activations (one
    layer's at a time) are not counted, as on the training side. The forward is run under the same
    saved-tensor hook to show that it saves nothing. layers: {stack: LLM layers} refine --layers perturbs (the
    direction is then the largest of their LoRA tensors); None: every LoRA tensor.
    """
    import torch

    from surgery.train.memory import saved_tensors

    model, ids = _lora_model(model_dir, batch, seq, rank, seed, rank_pattern=rank_pattern)
    model.eval()
    with saved_tensors(model) as seen, torch.inference_mode():
        model(input_ids=ids, labels=ids)
    acts = sum(b for _, b in seen.values())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if layers is None:
        lora = [p for p in model.parameters() if p.requires_grad]
    else:
        from surgery.arch import load_arch

        arch = load_arch(model.config.to_dict())
        lora = [p for n, p in model.named_parameters() if p.requires_grad
                and (w := arch.layer_of(n)) is not None and w[1] in layers.get(w[0], ())]
    z = max(p.numel() * p.element_size() for p in lora)
    return {"weights": weights, "activations": acts, "lora_state": z,
            "total": weights + acts + z, "batch": batch, "seq": seq}


def fisher_bytes(llm_dir: str, rows: int, seq: int, rank: int = 8) -> dict:
    """prune-bridge's Fisher pass (fisher-mask), counted the same way: the LLM's weights; every block's
    input, which the block checkpoints keep for the backward (importance.block_checkpointing); and,
    while one block runs its backward, that block's recomputed saved activations, taken as the LLM's
    per-layer saved activations of a LoRA step at the micro-batch's shape (`rows` x `seq` tokens:
    importance.MICRO_TOKENS). The structural masks and their gradients are a few hundred floats."""
    import json
    import os

    with open(os.path.join(llm_dir, "config.json")) as f:
        cfg = json.load(f)
    step = training_bytes(llm_dir, rows, seq, rank)
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    block = (step["activations"] - step["kinds"].get("loss", 0)) / layers
    inputs = layers * rows * seq * hidden * 4
    acts = int(block + inputs + step["kinds"].get("loss", 0))
    return {"weights": step["weights"], "activations": acts, "lora_state": 0, "total": step["weights"] + acts,
            "batch": rows, "seq": seq}


def transfer_bytes(adapter: str, llm_dir: str, data: str | None, samples: int, seq_len: int,
                   map_kind: str = "activations", budget: str = "4GB") -> tuple[dict, dict]:
    """transfer (forward only, the LLM streamed a window of layers at a time), from transfer's own cost
    model (surgery/pipelines/transfer/memory.py): a window's layer weights (both models) and what it
    holds for them (the float64 moments, one batch's paired SLM activations and the LLM's in chunks, the
    map being fitted and the residual prior), plus what the run holds throughout: both models' stored
    hidden states. The largest non-layer tensor (the LLM's embedding) is held only by the priming pass,
    before any layer is loaded, so the peak is the larger of the two phases. The fit's own transient (an
    eigendecomposition) is left out, as the training rows leave out their transients. Returns (the
    default: one LLM layer a window, the windows `--max-memory budget` plans). The run stops once planned."""
    import json
    import os
    import tempfile

    import surgery.pipelines.transfer.fit as tf
    from surgery.pipelines.transfer import transfer
    from surgery.pipelines.transfer.run import _budget

    seen: dict = {}
    windows = tf._windows

    class Planned(Exception):
        pass

    def record_windows(streams, captured, slm_of, pts_s, pts_l, batches, _):
        seen["weights"], seen["terms"] = tf._layer_terms(streams, captured, slm_of, pts_s, pts_l, batches)
        seen["default"] = windows(streams, captured, slm_of, pts_s, pts_l, batches, None)
        seen["budget"] = windows(streams, captured, slm_of, pts_s, pts_l, batches, _budget(budget))
        s_stream, l_stream = streams
        seen["hidden"] = sum(b[0].numel() * s_stream.arch.dims["hidden"] + b[3].numel() * l_stream.arch.dims["hidden"]
                             for b in batches) * 4
        raise Planned

    tf._windows = record_windows
    try:
        with tempfile.TemporaryDirectory() as tmp:
            transfer(adapter, llm_dir, os.path.join(tmp, "out"), data=data, map_kind=map_kind, samples=samples,
                     seq_len=seq_len)
    except Planned:
        pass
    finally:
        tf._windows = windows
    with open(os.path.join(llm_dir, "config.json")) as f:
        cfg = json.load(f)
    embedding = cfg["vocab_size"] * cfg["hidden_size"] * 4

    def count(windows):
        def phase(a, b):
            t = seen["terms"][a:b]
            held = sum(x["moments"] + x["acts"] for x in t) + max((x["maps"] for x in t), default=0)
            return sum(seen["weights"][a:b]), held + seen["hidden"]
        w, h = max([phase(a, b) for a, b in windows] + [(embedding, seen["hidden"])], key=sum)  # + the priming pass
        return {"weights": w, "activations": h, "lora_state": 0, "total": w + h, "windows": windows}

    return count(seen["default"]), count(seen["budget"])


def _flags(cmd: str) -> dict:
    import shlex

    a = shlex.split(cmd)
    return {k: v for k, v in zip(a, a[1:]) if k.startswith("--")}


def _prefix_tuned(bridge: dict) -> bool:
    """Whether the evidence tunes this bridge (a prune-bridge stage record) with a non-empty --prefix, so that
    its training step holds no token embedding: run.py passes --prefix to a `--drop-by first` bridge, and the
    prefix is empty when the bridge kept the LLM's layer 0 (bridge_prefix.prefix_layers)."""
    import json
    import os

    from surgery.pipelines.bridge_prefix import prefix_layers

    if "--drop-by first" not in bridge.get("cmd", ""):
        return False
    with open(os.path.join(bridge["dir"], "bridge.json")) as f:
        return prefix_layers(json.load(f)) > 0


def memory_table(slm: str, llm: str, bridges: dict, batch: int, seq: int, transfer: dict | None = None,
                 prefix_tokens: int | None = None, tune_args: dict | None = None, refine_layers: str | None = None) -> dict:
    """Every stage's count, as results.json's "train_memory" holds it (run.py and main() below).

    bridges: prune-bridge's stage records by kind ({"dir", "cmd"}); transfer: a transfer stage record.
    The Fisher pass and transfer are counted at the settings their command lines used. tune_args: tune-bridge's
    extra arguments by kind (run.tune_args): with `--rank R` the bridge's LoRA is counted at rank R, and refine's
    (on the keep bridge's lifted adapter) at rank R on the LLM layers that bridge kept, 8 elsewhere. refine_layers:
    refine's --layers ("untuned": the layers the keep bridge dropped): its direction tensor is the largest LoRA
    tensor of those layers. run.py passes none: its last refine is on every layer, and the pre-refine's smaller
    direction leaves it under that row."""
    from surgery.pipelines.importance import MICRO_TOKENS
    from surgery.pipelines.prune import PruneConfig
    from surgery.pipelines.transfer.run import TransferConfig

    table = {"slm": training_bytes(slm, batch, seq), "llm": training_bytes(llm, batch, seq)}
    if transfer is not None:
        f, d = _flags(transfer["cmd"]), TransferConfig()
        table["transfer"], table["transfer (--max-memory 4GB)"] = transfer_bytes(
            f["--slm"], llm, f.get("--data"), int(f.get("--samples", d.samples)), int(f.get("--seq-len", d.seq_len)),
            f.get("--map", d.map_kind))
        if getattr(d, "scale", "none") != "none" and f.get("--scale", d.scale) != "none" and f.get("--data"):
            # --scale auto then runs the whole LLM (with the port on it) forward over the --data batches:
            # inference memory, counted as refine's row is; the stage's count is the larger of the two
            scale = inference_bytes(llm, d.batch, int(f.get("--seq-len", d.seq_len)))
            table["transfer (--scale auto passes)"] = scale
            if scale["total"] > table["transfer"]["total"]:
                table["transfer"] = {**scale, "from": "transfer (--scale auto passes)"}
    for k, v in bridges.items():
        if "cmd" in v:
            f, d = _flags(v["cmd"]), PruneConfig()
            length = int(f.get("--seq-len", d.seq_len))
            rows = min(int(f.get("--batch-size", d.batch_size)), max(1, MICRO_TOKENS // length))
            table[f"prune-bridge ({k})"] = fisher_bytes(llm, rows, length)
    ranks = {k: _rank_of((tune_args or {}).get(k) or []) for k in bridges}
    table.update({f"bridge ({k})": training_bytes(v["dir"], batch, seq, rank=ranks[k] or 8, prefix=_prefix_tuned(v))
                  for k, v in bridges.items()})
    grown = _kept_pattern(llm, bridges["keep"]["dir"], ranks["keep"]) if ranks.get("keep") else None
    table["refine (LLM, forward only)"] = inference_bytes(llm, batch, seq, rank_pattern=grown,
                                                          layers=_refined(llm, bridges["keep"]["dir"], refine_layers))
    if prefix_tokens:
        # tune-bridge --prefix: the LLM forward only (as refine), holding the records' hidden states (float32)
        # until a shard is written, at most bridge_prefix.SHARD_BYTES; training then reads them a batch at a
        # time (the bridge row)
        import json
        import os

        from surgery.pipelines.bridge_prefix import SHARD_BYTES

        with open(os.path.join(llm, "config.json")) as f:
            held = min(prefix_tokens * json.load(f)["hidden_size"] * 4, SHARD_BYTES)
        r = inference_bytes(llm, batch, seq)
        table[PREFIX_PASS] = {**r, "activations": r["activations"] + held, "total": r["total"] + held}
    return table


PREFIX_PASS = "tune-bridge --prefix pass (LLM forward only)"  # (it runs the start adapter: rank 8 throughout)


def _rank_of(args: list[str]) -> int | None:
    """--rank R in tune-bridge's arguments, or None."""
    return int(args[args.index("--rank") + 1]) if "--rank" in args else None


def _refined(llm: str, bridge_dir: str, spec: str | None) -> dict | None:
    """{stack: layers} refine --layers SPEC perturbs on the keep bridge's lifted adapter (untuned: the layers that
    bridge dropped, as refine reads them through tune_bridge.json), None for every layer."""
    import json
    import os

    from surgery.arch import load_arch
    from surgery.train.layers import UNTUNED, dropped_layers, parse_layers, resolve_layers

    parsed = parse_layers(spec)
    if parsed is None:
        return None
    if parsed == UNTUNED:
        return {st: set(v) for st, v in dropped_layers(bridge_dir, "refine's memory", "re-create the bridge").items()}
    with open(os.path.join(llm, "config.json")) as f:
        return resolve_layers(parsed, load_arch(json.load(f)), bridge_dir)


def _kept_pattern(llm: str, bridge_dir: str, rank: int) -> dict:
    """peft rank_pattern giving `rank` to every module of the LLM layers the bridge kept (bridge.json)."""
    import json
    import os
    import re

    from surgery.arch import load_arch

    with open(os.path.join(llm, "config.json")) as f:
        arch = load_arch(json.load(f))
    with open(os.path.join(bridge_dir, "bridge.json")) as f:
        dropped = json.load(f)["layers"].get("dropped") or {}
    return {re.escape(arch.spec["stacks"][st]["prefix"].format(i=i)) + ".*": rank
            for st, n in arch.stacks.items() for i in range(n) if i not in dropped.get(st, [])}


def main() -> None:
    """Recount the memory of an existing run and regenerate docs/results.md from it:
        python -m benchmarks.evidence.memory benchmarks/.work/evidence-<key>/results.json
    The counts depend only on the models and the batch shape, so this equals a full re-run's."""
    import json
    import os
    import sys

    from benchmarks.evidence.report import write_docs
    from benchmarks.evidence.run import prefix_tokens_of, tunes_with_prefix

    path = sys.argv[1]
    with open(path) as f:
        results = json.load(f)
    s, first = results["settings"], next(iter(results["tasks"].values()))
    pair = results["pair"]
    prefix_tokens = None
    if tunes_with_prefix(results.get("bridge_args", {}).get("keep", [])):
        data = os.path.join(results["work"], "data")
        prefix_tokens = prefix_tokens_of(os.path.join(pair, "llm"), [[os.path.join(data, f"{t}-{split}.jsonl")
                                         for split in ("train", "dev")] for t in results["tasks"]], s["max_length"])
    results["train_memory"] = memory_table(os.path.join(pair, "slm"), os.path.join(pair, "llm"), first["bridges"],
                                           s["batch"], s["max_length"], first["seeds"][0]["transfer"]["transfer"],
                                           prefix_tokens=prefix_tokens, tune_args=results.get("tune_args"),
                                           refine_layers=results.get("refine_layers"))
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    write_docs(path, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs"))


if __name__ == "__main__":
    main()
