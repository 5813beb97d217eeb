"""Peak memory of `surgery refine` (MeZO, forward passes only) against inference and LoRA backprop on the same LLM.

Three separate subprocesses in one run, same LLM, adapter, data, batch and sequence length:
  (a) eval:   `surgery eval --adapter` — inference on the LLM with the adapter (the floor refine must match)
  (b) refine: `surgery refine` — MeZO steps on the adapter, no autograd, no optimizer state
  (c) train:  `surgery train --method lora` on the LLM — the same LoRA shape trained by backprop + AdamW
Each child reports its peak RSS (getrusage ru_maxrss), its RSS after the imports (before any model
is loaded), and on a GPU torch.cuda.max_memory_allocated. Loading a checkpoint has its own
transient peak, which can hide what the stage itself needs, so each child also pages in every
weight right after the model is loaded, resets the kernel's high-water mark (/proc/self/clear_refs,
"5") and reports the working memory: the peak RSS after loading minus the RSS of the loaded model. Each stage also pays
its before/after evaluations (inference) on top of its steps, the same for refine and train.

Every stage runs twice, under each of two malloc settings (--malloc in the children):
  fixed: glibc's mmap threshold fixed at 128 KiB (surgery/io/allocator.py), so a freed tensor leaves the
         RSS at once and the working memory is the tensors the stage holds; eval and refine set it themselves
  glibc: glibc's default, whose threshold rises after the first large free, so later activations come from
         the heap and stay resident when freed (what eval and refine did before they set it; what train does)

The LLM is random, TinyLlama-1.1B-shaped in every width (hidden 2048, MLP 5632, 32 heads / 4 kv
heads, vocabulary 32000) with fewer layers (--layers; 22 is TinyLlama itself), float32, built
locally under --work (no downloads). LoRA r=8 on every linear layer of the blocks.

    flock /tmp/surgery-heavy.lock .venv/bin/python -m benchmarks.refine_memory   # ~10 min on 2 CPU cores
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
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, head_dim=64,
                 vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mark_after_load(loaded: dict) -> None:
    """Wrap the one model loader every stage uses: after it returns, record the RSS and reset the peak."""
    import surgery.train.methods as methods

    real = methods.load_base

    def load_base(*a, **kw):
        out = real(*a, **kw)
        if "rss" not in loaded:
            for p in out[0].parameters():  # page in every weight (safetensors maps them lazily)
                p.detach().sum()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
            loaded["rss"] = rss_mb()
        return out

    # the pipelines bind load_base by name when imported (from ..train.methods import load_base): patch
    # every module's binding, or a pipeline imported before this call would load through the original
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("surgery.") and getattr(mod, "load_base", None) is real:
            mod.load_base = load_base


def setup(work: str, layers: int, n: int) -> str:
    """Build the LLM, its LoRA and the data once per layer count; returns the model directory."""
    sys.path.insert(0, ROOT)
    from fixtures import build_lora, build_model
    from fixtures.corpus import documents

    llm = os.path.join(work, f"llm-{layers}")
    if not os.path.exists(os.path.join(llm, "config.json")):
        build_model("llama", llm, num_hidden_layers=layers, **TINYLLAMA)
    if not os.path.exists(os.path.join(llm + "-lora", "adapter_config.json")):
        build_lora(llm, llm + "-lora", targets=TARGETS, r=8, alpha=16)
    docs = documents(n, seed=0, per_doc=40)  # long enough that every example fills --seq tokens
    with open(os.path.join(work, "train.jsonl"), "w") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return llm


def set_malloc(mode: str) -> None:
    """fixed: return freed memory at once (io/allocator.py), for every stage; glibc: never, even in the
    commands that ask for it (they call the function by the name they imported, patched before that)."""
    sys.path.insert(0, ROOT)
    import surgery.io.allocator as allocator

    if mode == "fixed":
        assert allocator.return_freed_memory(), "glibc refused the mmap threshold"
    else:
        allocator.return_freed_memory = lambda: False


def spread(work: str, llm: str, batch: int, seq: int, n: int = 5) -> dict:
    """The same inference forward pass n times in one process, the high-water mark reset before each:
    how much the working memory of identical work varies (the allocator's doing, not the stage's)."""
    sys.path.insert(0, ROOT)
    import torch

    from surgery.kinds import get
    from surgery.train.data import collate, load_examples
    from surgery.train.methods import load_base
    from surgery.train.zeroth import batch_loss

    model, tok, arch = load_base(llm)
    model.requires_grad_(False)
    pm, _ = get("lora").tunable(model, llm + "-lora", arch)
    for p in pm.parameters():
        p.detach().sum()
    b = collate(load_examples(os.path.join(work, "train.jsonl"), tok, seq2seq=False, max_length=seq)[:batch], 0, False)
    out, kept, first = [], [], rss_mb()
    for _ in range(n):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss_mb()
        with torch.inference_mode():
            batch_loss(pm, b, False)
        out.append(rss_mb("VmHWM") - base)
        kept.append(rss_mb() - first)  # what the forwards so far left resident
    return {"stage": "spread", "working_mb": out, "resident_after_mb": kept}


def child(stage: str, work: str, llm: str, steps: int, batch: int, seq: int) -> dict:
    sys.path.insert(0, ROOT)
    # every heavy library before the baseline, so "above imports" is what the model and the stage add
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers

    from surgery.pipelines.evaluate import evaluate
    from surgery.pipelines.refine import RefineConfig, refine
    from surgery.pipelines.train import train_adapter
    from surgery.train.loop import TrainConfig

    transformers.utils.logging.set_verbosity_error()
    base, loaded = rss_mb(), {}
    mark_after_load(loaded)
    data, out, lora = os.path.join(work, "train.jsonl"), os.path.join(work, f"out-{stage}"), llm + "-lora"
    t = time.time()
    if stage == "eval":
        s = evaluate(llm, data, adapter=lora, batch_size=batch, max_length=seq)
        forwards, loss = -(-s["examples"] // batch), s["loss"]
    elif stage == "refine":
        s = refine(lora, llm, data, out, max_length=seq, force=True,
                   cfg=RefineConfig(steps=steps, batch_size=batch, progress=False))
        forwards, loss = 2 * steps, s["after"]["loss"]
    else:
        s = train_adapter(llm, data, out, method="lora", rank=8, targets=TARGETS, max_length=seq, force=True,
                          cfg=TrainConfig(epochs=100, max_steps=steps, batch_size=batch, lr=1e-4, progress=False))
        forwards, loss = steps, s["after"]["loss"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"stage": stage, "peak_rss_mb": peak, "imports_rss_mb": base, "above_imports_mb": peak - base,
            "loaded_rss_mb": loaded["rss"], "working_mb": rss_mb("VmHWM") - loaded["rss"],
            "gpu_peak_mb": gpu, "seconds": time.time() - t, "step_forwards": forwards, "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "benchmarks", ".work", "refine"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--child", default=None)
    ap.add_argument("--malloc", default="fixed", choices=("fixed", "glibc"))
    ap.add_argument("--llm", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    if a.child:
        set_malloc(a.malloc)
    if a.child == "spread":
        print(json.dumps({**spread(a.work, a.llm, a.batch, a.seq), "malloc": a.malloc}))
        return
    if a.child:
        print(json.dumps({**child(a.child, a.work, a.llm, a.steps, a.batch, a.seq), "malloc": a.malloc}))
        return
    os.makedirs(a.work, exist_ok=True)
    llm = setup(a.work, a.layers, a.batch)  # one batch of examples: the evaluations cost one forward each
    with open(os.path.join(llm, "config.json")) as f:
        cfg = json.load(f)
    rows = []
    for malloc in ("fixed", "glibc"):
        for stage in ("eval", "refine", "train", "spread"):
            r = subprocess.run([sys.executable, "-m", "benchmarks.refine_memory", "--child", stage, "--malloc", malloc,
                                "--work", a.work, "--llm", llm, "--steps", str(a.steps), "--batch", str(a.batch),
                                "--seq", str(a.seq)],
                               cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if r.returncode != 0:
                sys.exit(f"{stage} ({malloc}) failed:\n{r.stderr[-3000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    res = {"llm": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")},
           "batch": a.batch, "seq": a.seq, "steps": a.steps,
           "rows": [r for r in rows if r["stage"] != "spread"],
           "spread_mb": {r["malloc"]: {"working": r["working_mb"], "resident": r["resident_after_mb"]}
                         for r in rows if r["stage"] == "spread"},
           "machine": f"{os.cpu_count()} CPUs, torch {__import__('torch').__version__}"}
    by = {(r["malloc"], r["stage"]): r for r in res["rows"]}
    print(f"LLM: TinyLlama widths, {a.layers} layers; batch {a.batch} x {a.seq} tokens; {a.steps} steps")
    print(f"{'stage':8} {'malloc':7} {'peak RSS MB':>12} {'above imports':>14} {'loaded model':>13} {'working MB':>11} "
          f"{'x eval':>7} {'seconds':>8}")
    for r in res["rows"]:
        print(f"{r['stage']:8} {r['malloc']:7} {r['peak_rss_mb']:12.0f} {r['above_imports_mb']:14.0f} "
              f"{r['loaded_rss_mb'] - r['imports_rss_mb']:13.0f} {r['working_mb']:11.0f} "
              f"{r['working_mb'] / by[r['malloc'], 'eval']['working_mb']:7.2f} {r['seconds']:8.1f}")
    for malloc, sp in res["spread_mb"].items():
        t, f = by[malloc, "train"], by[malloc, "refine"]
        print(f"{malloc}: train / refine: peak RSS above imports {t['above_imports_mb'] / f['above_imports_mb']:.2f}x, "
              f"working memory {t['working_mb'] / f['working_mb']:.2f}x; one identical inference forward, {len(sp['working'])} "
              "times in one process: working MB " + ", ".join(f"{x:.0f}" for x in sp["working"])
              + "; resident after each, above the loaded model: " + ", ".join(f"{x:.0f}" for x in sp["resident"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
