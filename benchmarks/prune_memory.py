"""Peak memory of prune-bridge against a plain forward+backward on the same batch.

Builds a llama-layout model of a few hundred MB locally (fixtures.build_model; no downloads), then
runs, each in its own subprocess, in the same run:
  load      load the model and do nothing else (the floor: weights + libraries)
  plain     one forward+backward of the LM loss on the calibration batch (parameter gradients,
            as any fine-tuning step would allocate them)
  prune:M   `surgery prune-bridge` with importance M on that same single batch
and reads each child's peak RSS from wait4(). Writes a markdown section to stdout; paste it into
docs/benchmarks.md.

    python benchmarks/prune_memory.py [--layers 8] [--hidden 1024] [--batch 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "benchmarks", ".work", "prune_memory")

PLAIN = """
import sys, torch
from surgery.io.model import load_model
from surgery.pipelines.calibration import batches, token_blocks
model_dir, data, n, L = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
blocks, _ = token_blocks(model_dir, data, n, L, 0)
model = load_model(model_dir, dispatch="gpu", auto_dtype="stored")  # as prune-bridge loads it
if sys.argv[5] == "plain":
    for b in batches(blocks, n, False):
        model(**b).loss.backward()
"""


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a child process."""
    t = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT})
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark step failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 1024, time.time() - t  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    from fixtures import build_model
    from fixtures.corpus import documents

    os.makedirs(WORK, exist_ok=True)
    model_dir = os.path.join(WORK, f"llama-{a.hidden}x{a.layers}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_model("llama", model_dir, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                    num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 256,
                    head_dim=64, max_position_embeddings=max(128, a.seq_len))
    data = os.path.join(WORK, "calib.txt")
    with open(data, "w") as f:
        f.write("\n".join(documents(400, seed=3)) + "\n")
    size_mb = sum(os.path.getsize(os.path.join(model_dir, x)) for x in os.listdir(model_dir) if x.endswith(".safetensors")) / 1e6
    py = sys.executable
    args = [model_dir, data, str(a.batch), str(a.seq_len)]
    rows = [("load model only", *peak_rss([py, "-c", PLAIN, *args, "load"]))]
    rows.append(("plain forward+backward", *peak_rss([py, "-c", PLAIN, *args, "plain"])))
    for method in ("fisher-mask", "fisher-param", "magnitude"):
        out = os.path.join(WORK, f"bridge-{method}")
        cmd = [py, "-m", "surgery", "prune-bridge", model_dir, "-o", out, "--data", data, "--samples", str(a.batch),
               "--seq-len", str(a.seq_len), "--batch-size", str(a.batch), "--importance", method, "--force"]
        rows.append((f"prune-bridge --importance {method}", *peak_rss(cmd)))
    plain = rows[1][1]
    print(f"### prune-bridge peak memory ({time.strftime('%Y-%m-%d')})\n")
    print(f"Model: llama layout, hidden {a.hidden}, {a.layers} layers, float32, {size_mb:.0f} MB of weights; "
          f"one batch of {a.batch} x {a.seq_len} tokens.  ")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}, CPU only.  ")
    print(f"Command: `python benchmarks/prune_memory.py --layers {a.layers} --hidden {a.hidden} --batch {a.batch} "
          f"--seq-len {a.seq_len}`\n")
    print("| run | peak RSS (MB) | / plain fwd+bwd | seconds |\n|---|---:|---:|---:|")
    for name, mb, sec in rows:
        print(f"| {name} | {mb:.0f} | {mb / plain:.2f}x | {sec:.1f} |")


if __name__ == "__main__":
    main()
