"""Training memory of the method's stages against LoRA directly on the LLM (Jin et al. 2023, Table 6/7).

Stages, at the same batch and sequence length, LoRA r=8 (alpha 16) on the same modules:
  slm            `surgery train` LoRA on the small model                       (Algorithm 1, step 1)
  bridge         `surgery tune-bridge` on the default bridge (`prune-bridge --reduction 16`: every
                 residual channel kept, depth planned with the widths, `--drop-layers auto`; the LLM
                 itself is never loaded)                                      (steps 4-7)
  bridge-drop    the same with `--drop-layers L/2` (half the layers, wider MLPs for the same budget)
  bridge-narrow  the same with `--residual prune` (the paper's narrow bridge, for comparison)
  bridge-prefix  the evidence's bridge: `--reduction 10 --drop-by first`, tuned by `tune-bridge --prefix`,
                 which feeds it the LLM's stored hidden states and does not hold its token embedding
                 (tensor count only; the forward-only pass before it is its own row, below)
  bridge-prefix-wide  the same plan with the evidence's wider kept layers (benchmarks/evidence/run.py
                 last_layer_widths: on the pair every head, 2 kv groups instead of 1, and 202 instead of 139
                 neurons): the r10 plan's depth with its heads and kv groups x2 and its neurons x 202/139
                 (only at --shape tinyllama, where that plan keeps 7 of 22 layers, 8 heads / 1 kv / 1875)
  bridge-prefix-rank64  docs/method-experiments.md section 10's bridge: bridge-prefix-wide's plan with the pair's 45
                 instead of 202 neurons (x 1875/139: 607) and its LoRA at rank 64 (`tune-bridge --rank 64`; only at tinyllama)
  bridge-memory  `prune-bridge --memory-reduction 5 --train-shape BATCHxSEQ` (this run's shape): the bridge
                 planned so its tune-bridge --prefix step holds <= 1/5 of LoRA on the LLM's (on the evidence
                 pair it is exactly the evidence's bridge, 4 heads / 202 neurons; here its own plan, by the
                 same rule: docs/prune-bridge.md)
  llm            `surgery train` LoRA directly on the LLM                     (the PEFT baseline)

Two measures per stage:
* tensor count: the bytes of every tensor a training step holds at the end of its forward pass --
  the model's weights, the tensors autograd saved for the backward (unique storages, weights not
  counted twice), and the trainable parameters' gradient and two AdamW moments (fp32; the parameters
  themselves are weights). The counter is the library's, surgery/train/memory.py (prune-bridge
  --memory-reduction plans with it); until 2026-11-30 12:00 this script counted the LoRA parameters a
  fifth time (param + grad + 2 moments on top of the weights), which cost every ratio below ~0.5 %.
  Computed exactly on the meta device (no arithmetic, so the 1.1B shape takes seconds); this is what
  GPU memory would hold, the paper's measure, without allocator slack or the backward's transients.
* peak RSS: one real process per stage (`surgery train` / `tune-bridge`, 1 step at --shape tinyllama),
  ru_maxrss, with the RSS after importing torch/transformers/peft beside it.

    python benchmarks/train_memory.py                       # GPT-2-shaped pair, ~5 min on 2 cores
    python benchmarks/train_memory.py --shape tinyllama     # TinyLlama-1.1B / 0.2B shapes, random
    python benchmarks/train_memory.py --shape tinyllama --no-rss   # the tensor count only (seconds)

Models are random, built locally under --work (no downloads); the tokenizer is the fixtures' (384
tokens), so at --shape tinyllama the 32000-row vocabulary is real in size but only its first rows
are ever read.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=2048,
                 tie_word_embeddings=False)
SHAPES = {
    "small": {"family": "gpt2", "targets": ["c_attn", "c_proj", "c_fc"],
              "slm": dict(n_embd=512, n_layer=6, n_head=8, n_positions=256),
              "llm": dict(n_embd=1024, n_layer=8, n_head=16, n_positions=256)},
    "tinyllama": {"family": "llama", "targets": LLAMA_TARGETS,
                  "slm": dict(TINYLLAMA, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                              num_attention_heads=16),
                  "llm": TINYLLAMA},
}
BRIDGES = {"bridge": [], "bridge-drop": ["--drop-layers", "HALF"], "bridge-narrow": ["--residual", "prune"],
           "bridge-prefix": ["--reduction", "10", "--drop-by", "first"]}
# the evidence's bridge's widths carried to TinyLlama's shape (the r10 plan there, scaled as on the pair;
# docs/method-experiments.md section 8): explicit sizes, so only for that shape
WIDE = {"tinyllama": ["--reduction", "10", "--drop-by", "first", "--drop-layers", "15", "--num-attention-heads", "16",
                      "--num-key-value-heads", "2", "--intermediate-size", str(round(1875 * 202 / 139))]}
# section 10's bridge at this shape: WIDE with 45 neurons on the pair instead of 202, its LoRA at rank 64
RANK64 = {"tinyllama": WIDE["tinyllama"][:-1] + [str(round(1875 * 45 / 139))]}
RANKS = {"bridge-prefix-rank64": 64}  # a stage's LoRA rank (tune-bridge --rank) where it is not 8
TINY_ONLY = ("bridge-prefix-wide", "bridge-prefix-rank64")  # absolute widths carried to TinyLlama's shape
# tuned with `tune-bridge --prefix` (the evidence's bridge): its token embedding is not held (without_embedding)
PREFIX = ("bridge-prefix", *TINY_ONLY, "bridge-memory")
FIXED = {"--num-attention-heads": "heads", "--num-key-value-heads": "kv_heads", "--intermediate-size": "intermediate"}
MEMORY_REDUCTION = 5.0  # bridge-memory's M: issue 16's line
STAGES = ("slm", *BRIDGES, *TINY_ONLY, "bridge-memory", "llm")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def counted_stages(shape: dict) -> tuple:
    """Stages with a tensor count at this shape: the wide --prefix bridge's sizes are TinyLlama's, and GPT-2
    has no --prefix bridge (tune-bridge refuses it: the stored state already holds the position embeddings)."""
    return tuple(s for s in STAGES if (s not in TINY_ONLY or shape is SHAPES["tinyllama"])
                 and (s not in PREFIX or shape["family"] != "gpt2"))


def _bridge_args(shape: dict, stage: str) -> list[str]:
    if stage == "bridge-prefix-wide":
        return WIDE["tinyllama"]
    if stage == "bridge-prefix-rank64":
        return RANK64["tinyllama"]
    half = str(shape["llm"].get("num_hidden_layers", shape["llm"].get("n_layer")) // 2)
    args = [half if a == "HALF" else a for a in BRIDGES[stage]]
    return args if "--reduction" in args else ["--reduction", "16", *args]


def rss_stages(shape: dict) -> tuple:
    """Stages run for real: at the 1.1B shape the narrow bridge is only counted (it costs a 1.1B
    prune and a training run on a 2-core machine, and the tensor count already compares it); the
    --prefix bridge only counted at both (its real run adds the LLM's forward pass, counted as its own row)."""
    return tuple(s for s in counted_stages(shape) if s not in PREFIX and not (shape is SHAPES["tinyllama"] and s == "bridge-narrow"))


def config_of(shape: dict, stage: str, work: str, batch: int = 4, seq: int = 256) -> dict:
    """The config.json of the model a stage trains (a bridge's comes from prune-bridge's plan; bridge-memory's
    from the --memory-reduction plan at batch x seq tokens)."""
    sys.path.insert(0, ROOT)
    from fixtures.build import _config
    from surgery.arch import load_arch
    from surgery.pipelines.bridge_memory import plan_by_memory
    from surgery.pipelines.bridge_plan import bridge_config, plan_bridge

    if stage in ("slm", "llm"):
        return _config(shape["family"], **shape[stage]).to_dict()
    arch = load_arch(_config(shape["family"], **shape["llm"]).to_dict())
    if stage == "bridge-memory":  # the last layers: bridge_config's layer lists follow the LLM's kept ones
        p = plan_by_memory(arch, MEMORY_REDUCTION, batch, seq)
        return bridge_config(arch, p["sizes"], {st: list(range(p["drop"], n)) for st, n in arch.stacks.items()})
    a = _bridge_args(shape, stage)
    drop = int(a[a.index("--drop-layers") + 1]) if "--drop-layers" in a else None  # None: prune-bridge's auto depth
    residual = "prune" if "prune" in a else "keep"
    fixed = {k: int(a[a.index(flag) + 1]) for flag, k in FIXED.items() if flag in a}
    sizes, drop = plan_bridge(arch, float(a[a.index("--reduction") + 1]), fixed, residual=residual, drop_layers=drop)
    return bridge_config(arch, sizes, {st: list(range(n - drop)) for st, n in arch.stacks.items()})


def tensor_count(config: dict, targets: list[str], batch: int, seq: int, device: str = "meta", prefix: bool = False,
                 rank: int = 8) -> dict:
    """Bytes a LoRA training step holds at the end of its forward pass (surgery.train.memory.step_bytes,
    on the meta device; device="cpu" runs the same step for real, which the tests compare it with). prefix:
    the model is a `tune-bridge --prefix` bridge, fed stored hidden states without holding its token embedding.
    rank: the LoRA's (8 unless a bridge is tuned with `tune-bridge --rank`, which puts its kept layers at it)."""
    from surgery.train.memory import step_bytes

    return step_bytes(config, batch, seq, rank=rank, targets=targets, prefix=prefix, device=device)


def method_counts(shape: dict, counts: dict, work: str) -> dict:
    """The method's stages that do not train a LoRA step, counted like the others (fp32 throughout):

    prune-bridge  its Fisher pass (fisher-mask, prune-bridge's defaults: blocks of 128 tokens, a micro-batch
                  of importance.MICRO_TOKENS): the LLM's weights, every block's checkpointed input, and one
                  block's recomputed saved activations while it runs its backward (the LLM's per-layer
                  saved activations of a LoRA step at the micro-batch's shape)
    transfer      transfer's own cost model (surgery/pipelines/transfer/memory.py) at its defaults (64 texts
                  of 128 tokens, batches of 8), for the spaces it captures for LoRA on every llama linear
                  layer (as the evidence run's transfer does): per LLM layer its and its SLM layer's weights,
                  float64 moments, one batch's paired SLM activations (the LLM's go into the moments in
                  chunks), the map being fitted and the residual prior; throughout, both models' hidden
                  states; the LLM's embedding only in the priming pass, before any layer (the peak is the
                  larger phase). Its default (one layer a window), and as many layers as --max-memory 4GB takes.
    refine        the LLM's weights with its LoRA and one regenerated direction tensor: no saved activations.
    prefix pass   tune-bridge --prefix's forward-only pass: the LLM's weights with its LoRA and the hidden states
                  it holds before writing a shard (at most bridge_prefix.SHARD_BYTES; fewer records hold less)."""
    from surgery.pipelines.importance import MICRO_TOKENS
    from surgery.pipelines.prune import PruneConfig
    from surgery.pipelines.transfer.memory import DEFAULT, layer_bytes
    from surgery.pipelines.transfer.run import TransferConfig

    llm, slm = config_of(shape, "llm", work), config_of(shape, "slm", work)
    out = {}
    pc = PruneConfig()
    rows = min(pc.batch_size, max(1, MICRO_TOKENS // pc.seq_len))
    step = tensor_count(llm, shape["targets"], rows, pc.seq_len)
    layers, hidden = llm.get("num_hidden_layers", llm.get("n_layer")), llm.get("hidden_size", llm.get("n_embd"))
    loss = step["kinds"].get("loss", 0)
    held = int((step["saved"] - loss) / layers + layers * rows * pc.seq_len * hidden * 4 + loss)
    w = counts["llm"]["weights"] - counts["llm"]["trainable"] // 3  # the LLM without its LoRA
    out["prune-bridge (Fisher)"] = {"weights": w, "saved": held, "trainable": 0, "total": w + held,
                                    "params": counts["llm"]["params"]}
    if shape["family"] == "llama" and len(shape["targets"]) == 7:
        tc = TransferConfig()

        def dims(c):
            kv = c["num_key_value_heads"] * c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
            q = c["num_attention_heads"] * c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
            return {"res": c["hidden_size"], "q": q, "kv": kv, "mlp": c["intermediate_size"]}

        ds, dl = dims(slm), dims(llm)
        # (space, to_llm, to_slm) per LLM layer, as transfer captures them for LoRA on q,k,v,o,gate,up,down
        spaces = [("kv", 1, 0), ("kv", 1, 0), ("q", 1, 0), ("q", 0, 1), ("res", 0, 1), ("res", 0, 1),
                  ("mlp", 1, 1), ("res", 1, 0), ("res", 1, 0), ("res", 1, 0)]
        terms = layer_bytes([(ds[k], dl[k], bool(a), bool(b)) for k, a, b in spaces], tc.batch * tc.seq_len)

        def layer_weights(c, d):
            return 4 * (2 * d["res"] * d["q"] + 2 * d["res"] * d["kv"] + 3 * d["res"] * d["mlp"] + 2 * d["res"])

        lw = layer_weights(llm, dl) + layer_weights(slm, ds)
        hidden = 4 * tc.samples * tc.seq_len * (ds["res"] + dl["res"])  # both models' stored hidden states
        embedding = 4 * llm["vocab_size"] * dl["res"]  # held by the priming pass only, before any layer
        per_layer = lw + terms["moments"] + terms["acts"]
        fits = max(1, min(layers, int((DEFAULT - hidden - embedding - terms["maps"] - terms["fit"]) // per_layer)))
        for name, n in (("transfer (default: one layer a window)", 1), ("transfer (--max-memory 4GB)", fits)):
            w, h = max((n * lw, n * (terms["moments"] + terms["acts"]) + terms["maps"] + hidden), (embedding, hidden),
                       key=sum)
            out[name] = {"weights": w, "saved": h, "trainable": 0, "params": 0, "total": w + h}
    lora = counts["llm"]["trainable"] // 3
    out["refine (LLM, forward only)"] = {"weights": counts["llm"]["weights"], "saved": 0, "trainable": 0,
                                         "total": counts["llm"]["weights"], "params": counts["llm"]["params"],
                                         "z": lora}
    if not any(st in PREFIX for st in counts):  # a family without a --prefix bridge (counted_stages)
        return out
    from surgery.pipelines.bridge_prefix import SHARD_BYTES

    out["tune-bridge --prefix pass (LLM forward only)"] = {"weights": counts["llm"]["weights"], "saved": SHARD_BYTES,
                                                          "trainable": 0, "params": counts["llm"]["params"],
                                                          "total": counts["llm"]["weights"] + SHARD_BYTES}
    return out


def setup(shape: dict, work: str, seq: int, train_docs: int) -> None:
    sys.path.insert(0, ROOT)
    from fixtures import build_lora, build_model
    from fixtures.corpus import documents

    os.makedirs(work, exist_ok=True)
    for name in ("slm", "llm"):
        if not os.path.exists(os.path.join(work, name, "config.json")):
            build_model(shape["family"], os.path.join(work, name), **shape[name])
    if not os.path.exists(os.path.join(work, "llm-lora", "adapter_config.json")):
        build_lora(os.path.join(work, "llm"), os.path.join(work, "llm-lora"), targets=shape["targets"], r=8, alpha=16)
    docs = documents(train_docs + 4, seed=0, per_doc=max(12, seq // 10))  # every example fills --seq tokens
    for name, part in (("train.jsonl", docs[:train_docs]), ("dev.jsonl", docs[train_docs:train_docs + 1]),
                       ("calib.txt", docs)):
        with open(os.path.join(work, name), "w") as f:
            f.write("".join((json.dumps({"text": d}) if name.endswith("jsonl") else d) + "\n" for d in part))
    for stage in rss_stages(shape):
        if stage not in BRIDGES:
            continue
        out = os.path.join(work, stage)
        if not os.path.exists(os.path.join(out, "bridge.json")):
            # which units are kept does not change training memory: magnitude needs no backward
            cmd = [sys.executable, "-m", "surgery", "prune-bridge", os.path.join(work, "llm"), "-o", out, "--data",
                   os.path.join(work, "calib.txt"), "--importance", "magnitude", "--samples", "2", "--seq-len", "32",
                   "--json", *_bridge_args(shape, stage)]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT})


def child(stage: str, shape: dict, work: str, steps: int, batch: int, seq: int) -> dict:
    sys.path.insert(0, ROOT)
    # Import every heavy library before the baseline, so "- imports" is what models and training add.
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers
    from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: F401

    from surgery.pipelines.train import train_adapter
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.loop import TrainConfig

    transformers.utils.logging.set_verbosity_error()
    base = rss_mb()
    cfg = TrainConfig(epochs=100, max_steps=steps, batch_size=batch, lr=1e-4)
    data, dev = os.path.join(work, "train.jsonl"), os.path.join(work, "dev.jsonl")  # a small dev set: cheap before/after
    out = os.path.join(work, f"out-{stage}")
    t = time.time()
    if stage.startswith("bridge"):
        s = tune_bridge(os.path.join(work, "llm-lora"), os.path.join(work, stage), data, out, eval_data=dev,
                        max_length=seq, force=True, cfg=cfg, prefix=False)  # the --prefix stages are only counted
        params = s["bridge_parameters"]
    else:
        s = train_adapter(os.path.join(work, stage), data, out, method="lora", rank=8, alpha=16, targets=shape["targets"],
                          eval_data=dev, max_length=seq, force=True, cfg=cfg)
        params = s["parameters"] - s["trainable"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"stage": stage, "gpu_peak_mb": gpu, "params": params, "trainable": s["trainable"], "steps": s["steps"],
            "peak_rss_mb": peak, "import_rss_mb": base, "seconds": time.time() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--work", default=None)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 2; 1 at --shape tinyllama)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="tokens per example (default 128; 256 at tinyllama)")
    ap.add_argument("--no-rss", action="store_true", help="only the tensor count (no models built or trained)")
    ap.add_argument("--child", choices=STAGES)
    ap.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    big = a.shape == "tinyllama"
    a.steps = a.steps or (1 if big else 2)
    a.seq = a.seq or (256 if big else 128)
    a.work = a.work or os.path.join(ROOT, "benchmarks", ".work", f"train_memory-{a.shape}")
    shape = SHAPES[a.shape]
    if a.child:
        print("RESULT " + json.dumps(child(a.child, shape, a.work, a.steps, a.batch, a.seq)))
        return
    if a.setup:
        setup(shape, a.work, a.seq, train_docs=a.batch * a.steps)
        return
    counts = {s: tensor_count(config_of(shape, s, a.work, a.batch, a.seq), shape["targets"], a.batch, a.seq, prefix=s in PREFIX,
                              rank=RANKS.get(s, 8))
              for s in counted_stages(shape)}
    counts.update(method_counts(shape, counts, a.work))
    rows = {}
    if not a.no_rss:
        # models are built in their own process: a child's ru_maxrss counts the pages it shared with
        # this process when forked, so this process must stay small
        subprocess.run([sys.executable, __file__, "--setup", "--shape", a.shape, "--work", a.work, "--steps", str(a.steps),
                        "--batch", str(a.batch), "--seq", str(a.seq)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        for stage in rss_stages(shape):
            cmd = [sys.executable, __file__, "--child", stage, "--shape", a.shape, "--work", a.work,
                   "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq)]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if r.returncode:
                sys.exit(f"{stage} failed:\n{r.stderr[-3000:]}")
            rows[stage] = json.loads(r.stdout.rsplit("RESULT ", 1)[1])
    gb = 1e9
    other = "".join(f" ({st}: r={r})" for st, r in RANKS.items() if st in counts)
    print(f"shape {a.shape}, batch {a.batch} x {a.seq} tokens, LoRA r=8{other} on {', '.join(shape['targets'])}, fp32\n")
    print("Tensor count (meta device: weights + saved activations + the LoRA's gradient and AdamW moments):\n")
    print("| stage | params | weights GB | saved activations GB | trainable state GB | total GB | LLM / this |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    llm = counts["llm"]["total"]
    for s, c in counts.items():
        print(f"| {s} | {c['params'] / 1e6:.1f}M | " if c['params'] else f"| {s} | - | ", end="")
        print(f"{c['weights'] / gb:.3f} | {c['saved'] / gb:.3f} | "
              f"{c['trainable'] / gb:.4f} | {c['total'] / gb:.3f} | {llm / c['total']:.2f}x |")
    kinds = {st: c["kinds"] for st, c in counts.items() if c.get("kinds")}
    print("\nSaved activations by kind (GB; the module that saved each tensor; `lora`: the adapted linear layers' "
          "inputs, which LoRA's A needs for its gradient, and the rank-8 A x for B):\n")
    print("| kind | " + " | ".join(kinds) + " |\n|---|" + "---:|" * len(kinds))
    from surgery.train.memory import KINDS

    for k, label, _ in KINDS:
        if any(k in v for v in kinds.values()):
            print(f"| {label} | " + " | ".join(f"{v.get(k, 0) / gb:.3f}" for v in kinds.values()) + " |")
    if rows:
        print(f"\nPeak RSS ({a.steps} step(s); `- imports` subtracts the RSS after importing the libraries):\n")
        print("| stage | frozen params | trainable | peak RSS MB | - imports MB | LLM / this (peak) | LLM / this (- imports) | s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        L = rows["llm"]
        for s, r in rows.items():
            added, l_added = r["peak_rss_mb"] - r["import_rss_mb"], L["peak_rss_mb"] - L["import_rss_mb"]
            print(f"| {s} | {r['params'] / 1e6:.1f}M | {r['trainable'] / 1e3:.0f}K | {r['peak_rss_mb']:.0f} | {added:.0f} | "
                  f"{L['peak_rss_mb'] / r['peak_rss_mb']:.2f}x | {l_added / added:.2f}x | {r['seconds']:.0f} |")
        if L["gpu_peak_mb"]:
            for s, r in rows.items():
                print(f"{s:14} GPU peak allocated {r['gpu_peak_mb']:9.0f} MB   LLM/this {L['gpu_peak_mb'] / r['gpu_peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
