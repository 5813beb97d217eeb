"""Dev accuracy of an adapter on the LLM with its delta scaled per layer group (docs/method-experiments.md §7).

    python -m benchmarks.delta_scale --evidence benchmarks/.work/evidence-<key> --task arg --seeds 0,1,2 \
        --stage bridge-scaled --kept 0 --scales 0.5,1,1.5 --others 0,0.5,1

For each seed's `<task>/s<seed>/<stage>` (a LoRA adapter on the LLM), every LoRA B of the layers in
--kept (the layers the bridge kept, whose delta tune-bridge lifted) is multiplied by each of --scales,
and every LoRA B of the other layers (the transferred delta the bridge never saw) by each of --others;
one dev evaluation (exact match %, loss) per pair. Evaluation only: nothing is trained.
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--evidence", default=os.environ.get("SURGERY_EVIDENCE_WORK"))
    ap.add_argument("--task", default="arg")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--stage", default="bridge-scaled")
    ap.add_argument("--kept", default="0", help="LLM layers whose delta --scales multiplies (digits)")
    ap.add_argument("--scales", default="0.5,1,1.5")
    ap.add_argument("--others", default="1", help="factors for every other layer's delta")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from surgery.kinds import kind_of
    from surgery.train.data import load_examples, pad_id_of
    from surgery.train.methods import load_base
    from surgery.train.score import evaluate_examples

    ev = a.evidence.rstrip("/")
    key = re.sub(r"-t[0-9a-f]{6}$", "", os.path.basename(ev).removeprefix("evidence-"))
    llm = os.path.join(ROOT, "benchmarks", ".work", "pairs", key, "llm")
    kept = {int(c) for c in a.kept}
    for seed in map(int, a.seeds.split(",")):
        path = os.path.join(ev, a.task, f"s{seed}", a.stage)
        model, tok, arch = load_base(llm, None)
        model.requires_grad_(False)
        model, params = kind_of(path, "refine").tunable(model, path, arch)
        dev = load_examples(os.path.join(ev, "data", f"{a.task}-dev.jsonl"), tok, seq2seq=False, max_length=64)
        pad = pad_id_of(tok, model.config)
        bs = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if "lora_B" in n}
        for s_in in map(float, a.scales.split(",")):
            for s_out in map(float, a.others.split(",")):
                with torch.no_grad():
                    for n, (p, p0) in bs.items():
                        layer = int(re.search(r"\.layers\.(\d+)\.", n).group(1))
                        p.copy_(p0 * (s_in if layer in kept else s_out))
                m = evaluate_examples(model, dev, batch_size=32, pad_id=pad, seq2seq=False)
                print(json.dumps({"task": a.task, "seed": seed, "stage": a.stage, "kept_scale": s_in, "other_scale": s_out,
                                  "accuracy": round(100 * m["accuracy"], 1), "loss": round(m["loss"], 3)}), flush=True)


if __name__ == "__main__":
    main()
