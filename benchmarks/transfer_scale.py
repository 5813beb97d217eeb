"""Peak memory and time of `surgery transfer` at real sizes: a 0.2B-shaped SLM + LoRA onto a
TinyLlama-1.1B-shaped LLM (random weights, bf16; hidden 2048, 22 layers, GQA 32/4, MLP 5632, vocab 32000).

Each transfer runs in its own subprocess; its peak RSS comes from wait4(). The ported adapter is then
checked: it loads with PeftModel.from_pretrained with no missing keys and gives a finite loss.
Models are built once and cached (random init, no downloads) under --work.

    flock /tmp/surgery-heavy.lock python benchmarks/transfer_scale.py [--work DIR] [--targets q_proj,v_proj]
        [--max-memory 3GB] [--samples 64] [--seq-len 128]
    python benchmarks/transfer_scale.py --plan     # the formula of docs/transfer.md for 1.1B and 7B
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # llama-family shapes; vocab 32000 as TinyLlama
    "0.2B": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                 head_dim=64),
    "1.1B": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                 head_dim=64),
}
CHECK = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
llm, adapter = sys.argv[1], sys.argv[2]
m = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.bfloat16)
p, info = PeftModel.from_pretrained(m, adapter), None
ids = torch.randint(4, 300, (1, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    loss = p(input_ids=ids, labels=ids).loss
assert torch.isfinite(loss), loss
print(f"loss {float(loss):.3f}")
"""


def run(cmd: list[str]) -> tuple[float, float, float, str]:
    """(peak RSS GB, wall s, CPU s, stdout) of a child process."""
    t = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT})
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark step failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 1024**2, time.time() - t, usage.ru_utime + usage.ru_stime, out


BUILD = """
import sys, json
from fixtures import build_lora, build_model
kind, out, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if kind == "model":
    build_model("llama", out, dtype="bfloat16", **arg)
else:
    build_lora(arg["slm"], out, targets=arg["targets"], r=16, alpha=32)
"""


def build(kind: str, out: str, arg: dict) -> str:
    """Built in a child process: the parent stays small, so a child's peak RSS (which Linux seeds
    with the parent's at fork/exec) measures only the child."""
    if not os.path.exists(os.path.join(out, "config.json")) and not os.path.exists(os.path.join(out, "adapter_config.json")):
        run([sys.executable, "-c", BUILD, kind, out, json.dumps(arg)])
    return out


PLAN_SHAPES = {  # (SLM, LLM) pairs of llama shapes for the paper plan; 7B = Llama-2-7B's shape
    "0.2B → 1.1B": ("0.2B", "1.1B"),
    "1.1B → 7B": ("1.1B", "7B"),
}
SHAPES_PLAN = {**SHAPES, "7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                    num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, head_dim=128)}


def spaces(shape: dict, targets: list[str]) -> dict:
    """{key: (width, to_llm?, to_slm?)} of one LLM layer for LoRA on `targets` (transfer/plan.py keys)."""
    h, hd = shape["hidden_size"], shape["head_dim"]
    q, kv, inner = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd, shape["intermediate_size"]
    reads = {"q_proj": "in.attn", "k_proj": "in.attn", "v_proj": "in.attn", "o_proj": "attn.o",
             "gate_proj": "in.mlp", "up_proj": "in.mlp", "down_proj": "mlp.inner"}
    writes = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "out.attn",
              "gate_proj": "mlp.inner", "up_proj": "mlp.inner", "down_proj": "out.mlp"}
    width = {"in.attn": h, "in.mlp": h, "attn.q": q, "attn.k": kv, "attn.v": kv, "attn.o": q,
             "mlp.inner": inner, "out.attn": h, "out.mlp": h, "res": h}
    out: dict = {}
    for t in targets:
        a, b = out.get(reads[t], (False, False)), out.get(writes[t], (False, False))
        out[reads[t]] = (a[0], True)
        out[writes[t]] = (True, b[1])
        if writes[t].startswith("out."):
            out["res"] = (True, out.get("res", (False, False))[1])
    return {k: (width[k], d) for k, d in out.items()}


def plan(targets: list[str], samples: int, seq_len: int, batch: int = 8) -> None:
    """The peak-memory formula of docs/transfer.md evaluated for one-layer windows (transfer/memory.py)."""
    from surgery.pipelines.transfer.memory import space_bytes

    print(f"Plan (one-layer windows, LoRA on {','.join(targets)}, {samples}×{seq_len} calibration tokens, "
          f"bf16 models, 0.35 GB libraries):")
    print("| SLM → LLM | LLM checkpoint | base | W_j + w_j | M_j + P_j + X_j | F_j | predicted peak |")
    print("|---|---|---|---|---|---|---|")
    for label, (s_name, l_name) in PLAN_SHAPES.items():
        S, L = SHAPES_PLAN[s_name], SHAPES_PLAN[l_name]

        def layer_params(c):
            h, i = c["hidden_size"], c["intermediate_size"]
            kv = c["num_key_value_heads"] * c["head_dim"]
            return 2 * h * h + 2 * h * kv + 3 * h * i

        def total(c):
            return c["num_hidden_layers"] * layer_params(c) + 2 * c["vocab_size"] * c["hidden_size"]

        sp_s, sp_l = spaces(S, targets), spaces(L, targets)
        res = fit = 0
        for k, (n_l, (to_llm, to_slm)) in sp_l.items():
            c = space_bytes(sp_s[k][0], n_l, to_llm, to_slm, batch * seq_len)
            res += c["resident"]
            fit = max(fit, c["fit"])
        weights = 2 * (layer_params(S) + layer_params(L))
        base = 0.35e9 + samples * seq_len * 2 * (S["hidden_size"] + L["hidden_size"]) + 2 * L["vocab_size"] * L["hidden_size"]
        g = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
        print(f"| {label} | {g(2 * total(L))} | {g(base)} | {g(weights)} | {g(res)} | {g(fit)} | "
              f"**{g(base + weights + res + fit)}** |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/work/scratch/transfer/scale")
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--max-memory", default="3GB")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--plan", action="store_true", help="print the peak-memory plan (formula) and exit")
    a = ap.parse_args()
    if a.plan:
        sys.path.insert(0, ROOT)
        for t in (a.targets, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"):
            plan(t.split(","), a.samples, a.seq_len)
        return
    os.makedirs(a.work, exist_ok=True)
    slm = build("model", os.path.join(a.work, "llama-0.2B"), SHAPES["0.2B"])
    llm = build("model", os.path.join(a.work, "llama-1.1B"), SHAPES["1.1B"])
    targets = a.targets.split(",")
    lora = build("lora", os.path.join(a.work, "lora-" + "-".join(targets)), {"slm": slm, "targets": targets})
    calib = os.path.join(a.work, "calib.txt")
    run([sys.executable, "-c", f"from fixtures.corpus import documents; open({calib!r}, 'w').write(chr(10).join(documents({a.samples}, seed=5)))"])
    out = os.path.join(a.work, "ported-" + "-".join(targets))
    cmd = [sys.executable, "-m", "surgery", "transfer", "--slm", lora, "--llm", llm, "-o", out, "--data", calib,
           "--samples", str(a.samples), "--seq-len", str(a.seq_len), "--max-memory", a.max_memory, "--force", "--json"]
    rss, wall, cpu, _ = run(cmd)
    _, _, _, check = run([sys.executable, "-c", CHECK, llm, out])
    ck = sum(os.path.getsize(os.path.join(llm, f)) for f in os.listdir(llm) if f.endswith(".safetensors")) / 1e9
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs")
    print(f"command: {' '.join(cmd[1:])}")
    print("| SLM | LLM (bf16 checkpoint) | LoRA targets | --max-memory | peak RSS | wall | CPU | ported adapter |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 0.2B-shaped | 1.1B-shaped ({ck:.2f} GB) | {a.targets} (r 16) | {a.max_memory} | {rss:.2f} GB | "
          f"{wall:.0f} s | {cpu:.0f} s | loads in peft, {check.strip()} |")


if __name__ == "__main__":
    main()
