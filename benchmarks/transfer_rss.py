"""Peak RSS of a real `surgery transfer` by phase, against transfer's cost model (docs/transfer.md, "Memory").

A mid-sized pair of random fp32 llamas (SLM 2 x 512, MLP 1408; LLM 4 x 1024, MLP 2816, GQA 16/2; vocab
32000), LoRA r 8 on all seven linear modules, 64 x 128 calibration tokens, --scale none, one torch
thread. The transfer runs in this process; a thread samples /proc/self/statm every 2 ms, tagged with
the phase (priming pass, windows, a fit). Prints one JSON line: peaks per phase, RSS when the first
window starts, CPU seconds, and the cost model's per-layer terms (MB).

    python benchmarks/transfer_rss.py --build              # the pair, once, under --work
    python benchmarks/transfer_rss.py [--max-memory 4GB] [--src DIR]   # DIR: another checkout's source
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLM = dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1408,
           vocab_size=32000, head_dim=64, tie_word_embeddings=False)
LLM = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=2, intermediate_size=2816,
           vocab_size=32000, head_dim=64, tie_word_embeddings=False)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(work: str) -> None:
    from fixtures import build_lora, build_model
    from fixtures.corpus import documents

    build_model("llama", f"{work}/slm", **SLM)
    build_model("llama", f"{work}/llm", **LLM)
    build_lora(f"{work}/slm", f"{work}/lora", targets=ALL, r=8, alpha=16)
    with open(f"{work}/calib.txt", "w") as f:
        f.write("\n".join(documents(64, seed=5)))


def measure(work: str, max_memory: str | None) -> dict:
    import resource

    import torch

    torch.set_num_threads(1)
    import surgery.pipelines.transfer.fit as tf
    import surgery.pipelines.transfer.stream as ts
    from surgery.pipelines.transfer import transfer
    from surgery.pipelines.transfer.memory import rss_bytes

    samples, phase, done = [], ["import"], []

    def sampler():
        while not done:
            samples.append((phase[0], rss_bytes()))
            time.sleep(0.002)

    real_prime, real_window = ts.LayerStream.prime, ts.LayerStream.window

    def prime(self, batches):
        phase[0] = "prime"
        return real_prime(self, batches)

    @contextmanager
    def window(self, a, b, c):
        phase[0] = "windows"
        with real_window(self, a, b, c) as step:
            yield step

    def fitting(f):
        def g(*a, **k):
            phase[0] = "fit"
            try:
                return f(*a, **k)
            finally:
                phase[0] = "windows"
        return g

    ts.LayerStream.prime, ts.LayerStream.window = prime, window
    for d in list(tf.DIRECTIONS):
        tf.DIRECTIONS[d] = fitting(tf.DIRECTIONS[d])
    pred: dict = {}
    real_terms = getattr(tf, "_layer_terms", None)  # absent in code before the cost model was split by term
    if real_terms:
        def terms(*a):
            w, t = real_terms(*a)
            pred["weights_MB"] = [x / 2**20 for x in w]
            pred["terms_MB"] = [{k: v / 2**20 for k, v in x.items()} for x in t]
            return w, t
        tf._layer_terms = terms
    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    t0 = time.time()
    transfer(f"{work}/lora", f"{work}/llm", f"{work}/out", data=f"{work}/calib.txt", samples=64, seq_len=128,
             scale="none", max_memory=max_memory, force=True)
    wall = time.time() - t0
    done.append(1)
    t.join()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {"max_memory": max_memory, "wall_s": round(wall, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1)}
    for p in ("prime", "windows", "fit"):
        v = [r for ph, r in samples if ph == p]
        out[f"{p}_peak_MB"] = round(max(v) / 2**20) if v else None
    out["first_window_start_MB"] = round(next(r for ph, r in samples if ph == "windows") / 2**20)
    return {**out, "model": pred}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/work/scratch/transfer/probe")
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--src", default=ROOT, help="the surgery source to measure (default: this checkout)")
    a = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, a.src)
    if a.build:
        os.makedirs(a.work, exist_ok=True)
        build(a.work)
        return
    print(json.dumps(measure(a.work, a.max_memory)))


if __name__ == "__main__":
    main()
