"""Where a ported LoRA hurts the LLM: per module, the delta's size relative to the module's output on the
LLM against the SLM's, and the LLM's dev loss / accuracy with only some modules or layers ported, or
every B scaled by one factor (docs/method-experiments.md, "Transfer's scale").

    python -m benchmarks.transfer_diagnose --evidence benchmarks/.work/evidence-4394e841445a-t2c03ed \
        --task verb --seed 0 [--adapter DIR]

--adapter: the ported adapter to examine (default: the evidence's <task>/s<seed>/transfer, the raw
port). The SLM side is the evidence's <task>/s<seed>/slm_lora. SLM layer i is compared with the LLM
layers of its block (transfer.json's depth map). Forward passes only, on the dev set, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--evidence", required=True)
    ap.add_argument("--task", default="verb")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapter", default=None)
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from surgery.pipelines.transfer.scale import _load, forward_pass
    from surgery.train.data import collate, load_examples, pad_id_of
    from surgery.train.methods import load_base
    from surgery.train.score import evaluate_examples

    key = re.sub(r"-t[0-9a-f]{6}$", "", os.path.basename(a.evidence.rstrip("/")).removeprefix("evidence-"))
    pair = os.path.join(ROOT, "benchmarks", ".work", "pairs", key)
    port = a.adapter or os.path.join(a.evidence, a.task, f"s{a.seed}", "transfer")
    slm_ad = os.path.join(a.evidence, a.task, f"s{a.seed}", "slm_lora")
    dev = os.path.join(a.evidence, "data", f"{a.task}-dev.jsonl")
    with open(os.path.join(port, "transfer.json")) as f:
        blocks = next(iter(json.load(f)["depth_map"].values()))
    slm_of = {j: i for i, blk in enumerate(blocks) for j in blk}

    def side(model_dir, adapter):
        model, layers = _load(model_dir, adapter, "float32")
        tok = load_base(model_dir)[1]
        ex = load_examples(dev, tok, seq2seq=False, max_length=64)
        pad = pad_id_of(tok, model.config)
        batches = [tuple(collate(ex[i:i + 32], pad, False).values()) for i in range(0, len(ex), 32)]
        return model, layers, ex, pad, batches

    def short(name):
        m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)", name)
        return int(m.group(1)), m.group(2)

    L, l_layers, ex, pad, l_batches = side(os.path.join(pair, "llm"), port)
    S, s_layers, _, _, s_batches = side(os.path.join(pair, "slm"), slm_ad)
    _, e_s = forward_pass(S, s_batches, s_layers)
    _, e_l = forward_pass(L, l_batches, l_layers)
    e_s = {short(n): v for n, v in e_s.items()}
    raw = {n: m.lora_B["default"].weight.detach().clone() for n, m in l_layers.items()}

    def dev_with(factor) -> str:
        for n, m in l_layers.items():
            m.lora_B["default"].weight.data.copy_(raw[n] * factor(n))
        r = evaluate_examples(L, ex, batch_size=32, pad_id=pad, seq2seq=False)
        return f"{r['loss']:.3f} / {100 * r['accuracy']:.1f}"

    print("| LLM module | ‖ΔWx‖/‖Wx‖ on the LLM | SLM module | on the SLM | ratio |")
    print("|---|---:|---|---:|---:|")
    for n in sorted(e_l, key=short):
        j, mod = short(n)
        s = e_s[(slm_of[j], mod)]
        print(f"| {j}.{mod} | {e_l[n]:.3f} | {slm_of[j]}.{mod} | {s:.3f} | {e_l[n] / s:.2f} |")
    print("\n| LLM with | dev loss / accuracy |\n|---|---|")
    print(f"| no adapter | {dev_with(lambda n: 0.0)} |")
    print(f"| the whole port | {dev_with(lambda n: 1.0)} |")
    for f in (0.1, 0.25, 0.5):
        print(f"| the port, every B x {f} | {dev_with(lambda n: f)} |")
    for mod in MODULES:
        print(f"| only {mod} | {dev_with(lambda n: float(n.endswith(mod)))} |")
    for j in sorted(slm_of):
        print(f"| only layer {j} | {dev_with(lambda n: float(short(n)[0] == j))} |")
    norm = {n: e_s[(slm_of[short(n)[0]], short(n)[1])] / e_l[n] if e_l[n] else 1.0 for n in l_layers}
    k = {n: len(blocks[slm_of[short(n)[0]]]) for n in l_layers}
    print(f"| each module's effect set to the SLM's | {dev_with(lambda n: norm[n])} |")
    print(f"| ... and divided by the block size (--scale auto's normalise) | {dev_with(lambda n: norm[n] / k[n])} |")


if __name__ == "__main__":
    main()
