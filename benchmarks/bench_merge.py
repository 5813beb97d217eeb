"""Benchmark merge-lora against peft's pipeline and extract-lora against mergekit-extract-lora.

    python benchmarks/bench_merge.py                 # writes benchmarks/.work/merge/*, updates docs/benchmarks.md
    python benchmarks/bench_merge.py --only merge    # re-run one half, keep the other's last results

Generates (no downloads) bf16 llama-style checkpoints (hidden 1536, GQA 12/2 heads, MLP 4352,
vocab 32000) in 300 MB shards at two depths (8 and 16 layers: ~0.6 and ~1.0 GB), a rank-16 LoRA on
all seven linear modules, and tuned = base + a random full-rank delta on those modules. Each tool
runs in its own subprocess under /usr/bin/time (wall seconds, peak RSS). mergekit is taken from
benchmarks/.work/venv (make one with `python -m venv benchmarks/.work/venv && benchmarks/.work/venv/bin/pip
install torch==2.13.0 mergekit`); it is never a dependency of surgery.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORK = os.path.join(ROOT, "benchmarks", ".work", "merge")
MERGEKIT = os.path.join(ROOT, "benchmarks", ".work", "venv", "bin", "mergekit-extract-lora")
PY = sys.executable
MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=1536, intermediate_size=4352,
              num_attention_heads=12, num_key_value_heads=2, head_dim=128, vocab_size=32000,
              max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="bfloat16",
              hidden_act="silu", bos_token_id=1, eos_token_id=2)


def gen_model(path: str, layers: int, seed: int = 0) -> None:
    """Write the checkpoint tensor by tensor (never the whole model in memory)."""
    import torch

    from surgery.arch import load_arch
    from surgery.io.writer import OutputDir
    from surgery.pipelines.stream import write_checkpoint

    if os.path.exists(os.path.join(path, "config.json")):
        return
    cfg = dict(CONFIG, num_hidden_layers=layers)
    arch = load_arch(cfg)
    specs = [(t.name, torch.bfloat16, arch.shape(t)) for t in arch.stored_tensors()]
    g = torch.Generator().manual_seed(seed)

    def produce(name):
        shape = dict((n, s) for n, _, s in specs)[name]
        if len(shape) == 1:
            return (1 + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)

    with OutputDir(path, force=True) as od:
        write_checkpoint(od, specs, produce, config=cfg, side_from=None, max_shard_size="300MB")
        od.commit()


def gen_lora(base: str, path: str, r: int = 16) -> None:
    import torch

    from surgery.arch import load_arch
    from surgery.io.adapter import lora_config, lora_key, write_adapter
    from surgery.io.writer import OutputDir

    if os.path.exists(path):
        return
    cfg = json.load(open(os.path.join(base, "config.json")))
    arch = load_arch(cfg)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for s in arch.linears():
        if not any(s.module.endswith(m) for m in MODULES):
            continue
        n_out, n_in = arch.shape(s)
        tensors[lora_key(s.module, "lora_A.weight")] = (torch.randn(r, n_in, generator=g) / n_in ** 0.5).to(torch.bfloat16)
        tensors[lora_key(s.module, "lora_B.weight")] = (0.01 * torch.randn(n_out, r, generator=g)).to(torch.bfloat16)
    with OutputDir(path, force=True) as od:
        write_adapter(od, lora_config(base, r, 2 * r, [m.split(".")[-1] for m in MODULES], task_type="CAUSAL_LM"), tensors)
        od.commit()


def gen_tuned(base: str, path: str) -> None:
    """tuned = base + a random full-rank delta (std 0.002) on the seven linear modules."""
    import torch

    from surgery.io.checkpoint import Checkpoint
    from surgery.io.writer import OutputDir
    from surgery.pipelines.stream import write_checkpoint

    if os.path.exists(os.path.join(path, "config.json")):
        return
    ck = Checkpoint.open(base)
    g = torch.Generator().manual_seed(2)

    def produce(name):
        t = ck.read(name)
        if any(name.endswith(m + ".weight") for m in MODULES):
            t = (t.float() + 0.002 * torch.randn(t.shape, generator=g)).to(t.dtype)
        return t

    specs = [(k, ck.dtype(k), ck.shape(k)) for k in ck.keys()]
    with OutputDir(path, force=True) as od:
        write_checkpoint(od, specs, produce, config=ck.config, side_from=None, max_shard_size="300MB")
        od.commit()


def measured(cmd: list[str], label: str) -> dict:
    """Run cmd under /usr/bin/time: wall seconds and peak RSS (MB) of that process tree's largest member."""
    tf = os.path.join(WORK, f"time-{label}.txt")
    # one BLAS thread for every tool: the 2 cores are shared, and oversubscribed multi-threaded BLAS is
    # 10-20x slower and erratic here (same setting for all tools, so ratios stay fair)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    t = time.time()
    r = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", tf, *cmd], env=env, capture_output=True, text=True)
    wall = time.time() - t
    if r.returncode != 0:
        return {"ok": False, "error": (r.stderr or r.stdout).strip().splitlines()[-1][:300], "wall_s": wall}
    _, rss_kb = open(tf).read().split()[-2:]
    return {"ok": True, "wall_s": round(wall, 2), "rss_mb": round(int(rss_kb) / 1024, 1)}


REPEAT = 3


def _summary(runs: list[dict]) -> dict:
    bad = [r for r in runs if not r["ok"]]
    if bad:
        return bad[0]
    walls = sorted(r["wall_s"] for r in runs)
    return {"ok": True, "wall_s": walls[len(walls) // 2], "walls": walls, "rss_mb": max(r["rss_mb"] for r in runs)}


def peft_pipeline_cmd(base, adapter, out):
    code = ("import sys,torch; from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
            "m=AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
            "m=PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload()\n"
            "m.save_pretrained(sys.argv[3], max_shard_size='300MB')\n")
    return [PY, "-c", code, base, adapter, out]


def compare_merged(ours: str, ref: str) -> dict:
    """Largest |ours - peft| and the share of elements that differ (peft rounds Δ to bf16 before adding)."""
    from surgery.io.checkpoint import Checkpoint

    a, b = Checkpoint.open(ours), Checkpoint.open(ref)
    worst, diff, n = 0.0, 0, 0
    for k in a.keys():
        x, y = a.read(k).float(), b.read(k).float()
        d = (x - y).abs()
        worst = max(worst, float(d.max()))
        diff += int((d > 0).sum())
        n += d.numel()
    return {"max_abs_diff": worst, "frac_elements_differing": diff / n}


def adapter_errors(adapter: str, base: str, tuned: str) -> dict:
    """Per module ‖Δ − s·B A‖ / ‖Δ‖ of a written adapter (ours or mergekit's), on the stored factors."""
    from surgery.io.adapter import Adapter
    from surgery.io.checkpoint import Checkpoint
    from surgery.kinds.lora import modules as lora_modules
    from surgery.ops.lowrank import relative_error

    cb, ct = Checkpoint.open(base), Checkpoint.open(tuned)
    out = {}
    for m in lora_modules(Adapter.open(adapter)):
        d = ct.read(m.module + ".weight").double() - cb.read(m.module + ".weight").double()
        out[m.module] = relative_error(d, m.A.double() * m.scaling, m.B)
    return out


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def main() -> None:
    """`--only merge` or `--only extract` re-runs one half and keeps the other half's last results."""
    os.makedirs(WORK, exist_ok=True)
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    surgery = [PY, "-m", "surgery"]
    saved = os.path.join(WORK, "results.json")
    res = json.load(open(saved)) if only and os.path.exists(saved) else {"sizes": {}}
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if only != "extract":
        res["sizes"] = {}
    for layers in (8, 16) if only != "extract" else ():
        base, lora = os.path.join(WORK, f"base{layers}"), os.path.join(WORK, f"lora{layers}")
        gen_model(base, layers)
        gen_lora(base, lora)
        size = dir_bytes(base)
        # alternate the two tools REPEAT times and keep the median wall time (the machine is shared and
        # its load swings within seconds) and the largest peak RSS
        runs = {"ours": [], "peft": []}
        for i in range(REPEAT):
            # both tools start with no output (removing a previous 1 GB output is not merge work)
            subprocess.run(["rm", "-rf", os.path.join(WORK, f"ours{layers}")])
            runs["ours"].append(measured([*surgery, "merge-lora", base, lora, "-o", os.path.join(WORK, f"ours{layers}"),
                                          "--force", "--max-shard-size", "300MB"], f"ours{layers}"))
            runs["peft"].append(measured(peft_pipeline_cmd(base, lora, os.path.join(WORK, f"peft{layers}")), f"peft{layers}"))
            subprocess.run(["rm", "-rf", os.path.join(WORK, f"peft{layers}")] if i < REPEAT - 1 else ["true"])
        ours, peft = (_summary(runs[k]) for k in ("ours", "peft"))
        row = {"layers": layers, "checkpoint_bytes": size, "ours": ours, "peft": peft}
        if ours["ok"] and peft["ok"]:
            row["agreement"] = compare_merged(os.path.join(WORK, f"ours{layers}"), os.path.join(WORK, f"peft{layers}"))
        res["sizes"][str(layers)] = row
        print(json.dumps(row), flush=True)
    if only == "merge":
        return finish(res)
    base, tuned = os.path.join(WORK, "base16"), os.path.join(WORK, "tuned16")
    gen_tuned(base, tuned)
    ex = {"ours": measured([*surgery, "extract-lora", base, tuned, "-o", os.path.join(WORK, "ex-ours"), "--rank", "16",
                            "--force"], "ex-ours")}
    if os.path.exists(MERGEKIT):
        out = os.path.join(WORK, "ex-mergekit")
        subprocess.run(["rm", "-rf", out])
        ex["mergekit"] = measured([MERGEKIT, "--model", tuned, "--base-model", base, "--out-path", out,
                                   "--max-rank", "16", "--no-copy-tokenizer"], "ex-mergekit")
    else:
        ex["mergekit"] = {"ok": False, "error": f"{MERGEKIT} not found (see the module docstring to install it)"}
    errs = {k: adapter_errors(os.path.join(WORK, f"ex-{k}"), base, tuned) for k in ("ours", "mergekit") if ex[k]["ok"]}
    for k in errs:
        ex[k]["adapter_bytes"] = dir_bytes(os.path.join(WORK, f"ex-{k}"))
        ex[k]["max_rel_error"] = max(errs[k].values())
        ex[k]["mean_rel_error"] = sum(errs[k].values()) / len(errs[k])
    if len(errs) == 2:
        gaps = [errs["ours"][m] - errs["mergekit"][m] for m in errs["ours"]]
        ex["max_error_gap_ours_minus_mergekit"] = max(gaps)
        ex["modules_where_ours_is_worse_by_more_than_1e-6"] = sum(g > 1e-6 for g in gaps)
    res["extract"] = ex
    print(json.dumps(ex), flush=True)
    finish(res)


def finish(res: dict) -> None:
    json.dump(res, open(os.path.join(WORK, "results.json"), "w"), indent=2)
    if "extract" in res and res["sizes"]:
        from benchmarks.merge_report import write_section

        write_section(res, os.path.join(ROOT, "docs", "benchmarks.md"))


if __name__ == "__main__":
    main()
