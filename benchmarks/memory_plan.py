"""What `prune-bridge --memory-reduction M` plans (pipelines/bridge_memory.py), and how long planning takes.

Two shapes:
  pair       the evidence pair's LLM (benchmarks/.work/pairs/<key>/llm: llama, 4 layers x 128, 2 kv groups,
             384 neurons) at 16 x 64 tokens, the evidence's tune-bridge batch and --max-length; the committed
             bridge (benchmarks/evidence/run.py last_layer_widths: the last layer, 4 heads, 202 neurons) was
             sized by hand to this line: 9,572,480 bytes, 5.003x below LoRA on the LLM's 47,894,912.
             The LLM's count is also taken by the evidence's own counter (a real CPU step,
             benchmarks/evidence/memory.training_bytes) to show the two agree.
  tinyllama  TinyLlama-1.1B's config (benchmarks/train_memory.py --shape tinyllama) at 4 x 256 tokens; no
             weights are needed: the plan counts on the meta device. The evidence's bridge carried to this
             shape by hand (train_memory.py's bridge-prefix-wide: 7 layers, 16 heads / 2 kv, 2725 neurons)
             is counted beside it.

    python benchmarks/memory_plan.py [--pair benchmarks/.work/pairs/4394e841445a] [--m 5] [--more 3,8,10,20]
        [--ranks 16,32,64]

--ranks plans at --m with the bridge's layers tuned at a higher LoRA rank (prune-bridge --bridge-rank R, for
tune-bridge --rank R); the LLM's LoRA stays rank 8. On the pair these are docs/method-experiments.md §10's
hand-sized rank candidates.

Prints markdown (docs/benchmarks.md, "prune-bridge --memory-reduction"). Planning time is wall time after
torch, transformers and peft are imported (a first plan in a fresh process adds their ~3 s import).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def plan(cfg: dict, m: float, batch: int, seq: int, bridge_rank: int | None = None) -> tuple[dict, float]:
    from surgery.arch import load_arch
    from surgery.pipelines.bridge_memory import plan_by_memory

    t = time.time()
    p = plan_by_memory(load_arch(cfg), m, batch, seq, bridge_rank=bridge_rank)
    return p, time.time() - t


def row(name: str, cfg: dict, p: dict, secs: float | None) -> str:
    s, r = p["sizes"], p["record"]
    kept = cfg["num_hidden_layers"] - p["drop"]
    t = "-" if secs is None else f"{secs:.2f}"
    return (f"| {name} | {r['memory_reduction']:g} | {r['bridge_rank']} | {kept} of {cfg['num_hidden_layers']} (the last) | "
            f"{s['heads']} / {s['kv_heads']} of {cfg['num_attention_heads']} / {cfg['num_key_value_heads']} | "
            f"{s['intermediate']} of {cfg['intermediate_size']} | {r['bridge_bytes']:,} | {r['llm_lora_bytes']:,} | "
            f"{r['ratio']:.3f}x | {r['counts']} | {t} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default=os.path.join(ROOT, "benchmarks", ".work", "pairs", "4394e841445a"))
    ap.add_argument("--m", type=float, default=5.0)
    ap.add_argument("--more", default="3,8,10,20", help="other M values to plan at both shapes")
    ap.add_argument("--ranks", default="16,32,64", help="bridge ranks (--bridge-rank, tune-bridge --rank) to plan at --m")
    a = ap.parse_args()
    import torch  # noqa: F401  (imported before timing: planning time excludes the libraries' import)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from benchmarks.train_memory import TINYLLAMA, WIDE
    from fixtures.build import _config
    from surgery.errors import SurgeryError

    shapes = []
    llm_dir = os.path.join(a.pair, "llm")
    if os.path.exists(os.path.join(llm_dir, "config.json")):
        with open(os.path.join(llm_dir, "config.json")) as f:
            shapes.append(("evidence pair, 16 x 64", json.load(f), 16, 64))
    else:
        print(f"(no pair at {a.pair}: its rows are skipped)")
    shapes.append(("TinyLlama-1.1B, 4 x 256", _config("llama", **TINYLLAMA).to_dict(), 4, 256))
    print("| shape | M | bridge rank | layers kept | heads / kv groups | MLP neurons | bridge step bytes | "
          "LoRA on the LLM bytes | LLM / bridge | counts | plan s |")
    print("|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|")
    plans = {}
    runs = [(m, None) for m in [a.m] + [float(x) for x in a.more.split(",") if x]]
    runs += [(a.m, int(r)) for r in a.ranks.split(",") if r]
    for name, cfg, b, s in shapes:
        for m, rank in runs:
            try:
                p, secs = plan(cfg, m, b, s, rank)
            except SurgeryError as e:
                print(f"| {name} | {m:g} | {rank or 8} | {e.what} | | | | | | | |")
                continue
            if rank is None:
                plans[(name, m)] = p
            print(row(name, cfg, p, secs))
    print()
    if shapes[0][0].startswith("evidence"):
        from benchmarks.evidence.memory import training_bytes

        name, cfg, b, s = shapes[0]
        real = training_bytes(llm_dir, b, s)["total"]
        p = plans.get((name, a.m))
        print(f"- evidence pair: LoRA on the LLM by the evidence's counter (a real CPU step): {real:,} bytes; the "
              f"plan's meta count: {p['record']['llm_lora_bytes']:,} ({'equal' if real == p['record']['llm_lora_bytes'] else 'DIFFERENT'}).")
        w = (p["sizes"]["heads"], p["sizes"]["intermediate"], cfg["num_hidden_layers"] - p["drop"])
        print(f"- evidence pair, M={a.m:g}: the plan keeps the last {w[2]} layer(s) with {w[0]} heads and {w[1]} neurons; "
              f"the committed bridge (run.py last_layer_widths) keeps the last 1 with 4 heads and 202 neurons.")
    # the evidence's bridge carried to TinyLlama by hand (train_memory.py WIDE), counted the same way
    from surgery.arch import load_arch
    from surgery.pipelines.bridge_plan import bridge_config
    from surgery.train.memory import step_bytes

    tl = shapes[-1][1]
    arch = load_arch(tl)
    f = WIDE["tinyllama"]
    drop = int(f[f.index("--drop-layers") + 1])
    sizes = {"hidden": tl["hidden_size"], "heads": int(f[f.index("--num-attention-heads") + 1]),
             "kv_heads": int(f[f.index("--num-key-value-heads") + 1]), "intermediate": int(f[f.index("--intermediate-size") + 1])}
    n = tl["num_hidden_layers"]
    wide = step_bytes(bridge_config(arch, sizes, {"layers": list(range(drop, n))}), 4, 256, prefix=True)["total"]
    llm = plans[(shapes[-1][0], a.m)]["record"]["llm_lora_bytes"]
    print(f"- TinyLlama-1.1B: the evidence's bridge carried by hand (train_memory.py bridge-prefix-wide: {n - drop} layers, "
          f"{sizes['heads']} / {sizes['kv_heads']}, {sizes['intermediate']} neurons) counts {wide:,} bytes, "
          f"{llm / wide:.3f}x below LoRA on the LLM.")


if __name__ == "__main__":
    main()
