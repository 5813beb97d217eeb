"""Peak memory of the pipeline's training stages against LoRA directly on the LLM (Jin et al. 2023, Table 6/7).

Three separate subprocesses in one run, same data, batch and sequence length:
  (a) slm:    `surgery train` LoRA on the small model            (Algorithm 1, step 1)
  (b) bridge: `surgery tune-bridge` on a bridge sliced from the LLM (steps 4-7; the LLM is never loaded)
  (c) llm:    `surgery train` LoRA directly on the LLM            (the PEFT baseline)
Each reports its peak RSS (getrusage ru_maxrss) and its RSS after imports, before any model is
loaded, so the table shows the whole process and the part the model and training add.
Models are GPT-2-shaped, random, built locally (no downloads) under benchmarks/.work/.

    python benchmarks/train_memory.py            # ~2-4 minutes on 2 CPU cores
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
SLM = dict(n_embd=512, n_layer=6, n_head=8, n_positions=256)
LLM = dict(n_embd=1024, n_layer=8, n_head=16, n_positions=256)
BRIDGE_FRACTION = 0.4375  # keeps 448 of 1024 residual dims, 7 of 16 heads, 1792 of 4096 MLP units: about the SLM's size
TARGETS = ["c_attn", "c_proj", "c_fc"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def setup(work: str) -> None:
    sys.path.insert(0, ROOT)
    from fixtures import build_lora, build_model
    from fixtures.bridge import build_bridge
    from fixtures.corpus import documents

    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(work, "slm", "config.json")):
        build_model("gpt2", os.path.join(work, "slm"), **SLM)
    if not os.path.exists(os.path.join(work, "llm", "config.json")):
        build_model("gpt2", os.path.join(work, "llm"), **LLM)
        build_lora(os.path.join(work, "llm"), os.path.join(work, "llm-lora"), targets=TARGETS, r=8, alpha=16)
        build_bridge(os.path.join(work, "llm"), os.path.join(work, "bridge"), fraction=BRIDGE_FRACTION, seed=0)
    docs = documents(36, seed=0, per_doc=12)  # ~150+ tokens each: every example fills --seq tokens
    for name, part in (("train.jsonl", docs[:32]), ("dev.jsonl", docs[32:])):
        with open(os.path.join(work, name), "w") as f:
            f.write("".join(json.dumps({"text": d}) + "\n" for d in part))


def child(stage: str, work: str, steps: int, batch: int, seq: int) -> dict:
    sys.path.insert(0, ROOT)
    # Import every heavy library before the baseline, so "- imports" is what models and training add.
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers
    from transformers import GPT2LMHeadModel  # noqa: F401

    from surgery.pipelines.train import train_adapter
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.loop import TrainConfig

    transformers.utils.logging.set_verbosity_error()
    base = rss_mb()
    cfg = TrainConfig(epochs=100, max_steps=steps, batch_size=batch, lr=1e-4)
    data, dev = os.path.join(work, "train.jsonl"), os.path.join(work, "dev.jsonl")  # a small dev set: cheap before/after
    out = os.path.join(work, f"out-{stage}")
    t = time.time()
    if stage == "bridge":
        s = tune_bridge(os.path.join(work, "llm-lora"), os.path.join(work, "bridge"), data, out, eval_data=dev,
                        max_length=seq, force=True, cfg=cfg)
        params = s["bridge_parameters"]
    else:
        s = train_adapter(os.path.join(work, stage), data, out, method="lora", rank=8, alpha=16, targets=TARGETS,
                          eval_data=dev, max_length=seq, force=True, cfg=cfg)
        params = s["parameters"] - s["trainable"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None  # the paper's measure
    return {"stage": stage, "gpu_peak_mb": gpu, "params": params, "trainable": s["trainable"], "steps": s["steps"],
            "peak_rss_mb": peak, "import_rss_mb": base, "seconds": time.time() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(ROOT, "benchmarks", ".work", "train_memory"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--child", choices=["slm", "bridge", "llm"])
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.work, a.steps, a.batch, a.seq)))
        return
    setup(a.work)
    rows = []
    for stage in ("slm", "bridge", "llm"):
        cmd = [sys.executable, __file__, "--child", stage, "--work", a.work, "--steps", str(a.steps),
               "--batch", str(a.batch), "--seq", str(a.seq)]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode:
            sys.exit(f"{stage} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.rsplit("RESULT ", 1)[1]))
    llm = rows[-1]
    print(f"batch {a.batch}, seq {a.seq}, {a.steps} steps, LoRA r=8 on {', '.join(TARGETS)}")
    print(f"{'stage':8} {'frozen params':>14} {'trainable':>10} {'peak RSS MB':>12} {'- imports MB':>13} "
          f"{'LLM/this (peak)':>16} {'LLM/this (model+train)':>23} {'s':>6}")
    for r in rows:
        added = r["peak_rss_mb"] - r["import_rss_mb"]
        llm_added = llm["peak_rss_mb"] - llm["import_rss_mb"]
        print(f"{r['stage']:8} {r['params'] / 1e6:13.1f}M {r['trainable'] / 1e3:9.0f}K {r['peak_rss_mb']:12.0f} "
              f"{added:13.0f} {llm['peak_rss_mb'] / r['peak_rss_mb']:15.2f}x {llm_added / added:22.2f}x {r['seconds']:6.1f}")
    if llm["gpu_peak_mb"]:
        for r in rows:
            print(f"{r['stage']:8} GPU peak allocated {r['gpu_peak_mb']:9.0f} MB   LLM/this {llm['gpu_peak_mb'] / r['gpu_peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
