"""Peak memory and time of `surgery transfer` at real sizes: a 0.2B-shaped SLM + LoRA onto a
TinyLlama-1.1B-shaped LLM (random weights, bf16; hidden 2048, 22 layers, GQA 32/4, MLP 5632, vocab 32000).

Each transfer runs in its own subprocess; its peak RSS comes from wait4(). The ported adapter is then
checked: it loads with PeftModel.from_pretrained, every stored tensor placed, and gives a finite loss.
Models are built once and cached (random init, no downloads) under --work.

    flock /tmp/surgery-heavy.lock python benchmarks/transfer_scale.py [--work DIR] [--targets q_proj,v_proj]
        [--max-memory 3GB (default: none, one layer a window)] [--samples 64] [--seq-len 128] [--scale none|auto]
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
TARGETS, MAX_MEMORY, SAMPLES, SEQ_LEN = ["q_proj", "v_proj"], None, 64, 128  # the measured setting (scale.py too)
CHECK = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
import os
from safetensors import safe_open
llm, adapter = sys.argv[1], sys.argv[2]
m = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.bfloat16)
p = PeftModel.from_pretrained(m, adapter)
with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
    stored = len(list(f.keys()))
live = sum("lora_" in k for k in p.state_dict())
assert live == stored, f"the adapter holds {stored} tensors but peft placed {live}"
print(f"{stored} adapter tensors placed,", end=" ")
ids = torch.randint(4, 300, (1, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    loss = p(input_ids=ids, labels=ids).loss
assert torch.isfinite(loss), loss
print(f"loss {float(loss):.3f}")
"""


def transfer_command(lora: str, llm: str, out: str, calib: str, samples: int, seq_len: int, max_memory: str | None,
                     scale: str = "none") -> list[str]:
    """The measured command (benchmarks/scale.py runs the same one for its transfer row): the streamed port,
    --scale none by default; --scale auto (transfer's default) then loads the LLM whole for its forward passes,
    so its peak is the LLM's inference memory rather than the streamed window's: measure both.
    max_memory None: transfer's default (one LLM layer a window)."""
    budget = ["--max-memory", max_memory] if max_memory else []
    return [sys.executable, "-m", "surgery", "transfer", "--slm", lora, "--llm", llm, "-o", out, "--data", calib,
            "--samples", str(samples), "--seq-len", str(seq_len), *budget, "--scale", scale, "--force", "--json"]


def check_command(llm: str, ported: str) -> list[str]:
    """A child that loads the ported adapter with PeftModel.from_pretrained and prints its finite loss."""
    return [sys.executable, "-c", CHECK, llm, ported]


def write_calibration(path: str, samples: int) -> None:
    from fixtures.corpus import documents

    with open(path, "w") as f:
        f.write("\n".join(documents(samples, seed=5)))


def run(cmd: list[str]) -> tuple[float, float, float, str]:
    """(peak RSS GiB, wall s, CPU s, stdout) of a child process."""
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
                                    num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, head_dim=128),
               "70B": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                           intermediate_size=28672, vocab_size=32000, head_dim=128)}


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


def layer_params(c: dict) -> int:
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    return 2 * h * h + 2 * h * kv + 3 * h * i


def peak_terms(slm: dict, llm: dict, targets: list[str], samples: int, seq_len: int, batch: int = 8) -> dict:
    """Bytes of each term of the peak-memory formula of docs/transfer.md (one-layer windows, transfer's
    default; transfer/memory.py) for one SLM -> LLM pair of bf16 models; "peak" is their sum."""
    from surgery.pipelines.transfer.memory import layer_bytes

    sp_s, sp_l = spaces(slm, targets), spaces(llm, targets)
    terms = layer_bytes([(sp_s[k][0], n_l, to_llm, to_slm) for k, (n_l, (to_llm, to_slm)) in sp_l.items()],
                        batch * seq_len)
    t = {"checkpoint": 2 * (llm["num_hidden_layers"] * layer_params(llm) + 2 * llm["vocab_size"] * llm["hidden_size"]),
         "base": 0.35e9 + samples * seq_len * 2 * (slm["hidden_size"] + llm["hidden_size"])
         + 2 * llm["vocab_size"] * llm["hidden_size"],
         "weights": 2 * (layer_params(slm) + layer_params(llm)), "resident": terms["moments"] + terms["acts"],
         "fit": terms["maps"] + terms["fit"]}
    return {**t, "peak": t["base"] + t["weights"] + t["resident"] + t["fit"]}


def plan(targets: list[str], samples: int, seq_len: int, batch: int = 8) -> None:
    """The peak-memory formula of docs/transfer.md evaluated for one-layer windows (transfer/memory.py)."""
    print(f"Plan (one-layer windows, LoRA on {','.join(targets)}, {samples}×{seq_len} calibration tokens, "
          f"bf16 models, 0.35 GB libraries):")
    print("| SLM → LLM | LLM checkpoint | base | W_j + w_j | M_j + X_j | P_j + F_j | predicted peak |")
    print("|---|---|---|---|---|---|---|")
    for label, (s_name, l_name) in PLAN_SHAPES.items():
        t = peak_terms(SHAPES_PLAN[s_name], SHAPES_PLAN[l_name], targets, samples, seq_len, batch)
        g = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
        print(f"| {label} | {g(t['checkpoint'])} | {g(t['base'])} | {g(t['weights'])} | {g(t['resident'])} | "
              f"{g(t['fit'])} | **{g(t['peak'])}** |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/work/scratch/transfer/scale")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--max-memory", default=MAX_MEMORY, help="transfer's --max-memory (default: not passed, one layer a window)")
    ap.add_argument("--samples", type=int, default=SAMPLES)
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN)
    ap.add_argument("--plan", action="store_true", help="print the peak-memory plan (formula) and exit")
    ap.add_argument("--scale", default="none", choices=("none", "auto"),
                    help="transfer's --scale: none = the streamed port alone; auto = + the forward passes that size it")
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
    run([sys.executable, "-c", f"from benchmarks.transfer_scale import write_calibration; write_calibration({calib!r}, {a.samples})"])
    out = os.path.join(a.work, "ported-" + "-".join(targets) + ("" if a.scale == "none" else "-" + a.scale))
    cmd = transfer_command(lora, llm, out, calib, a.samples, a.seq_len, a.max_memory, a.scale)
    rss, wall, cpu, _ = run(cmd)
    _, _, _, check = run(check_command(llm, out))
    ck = sum(os.path.getsize(os.path.join(llm, f)) for f in os.listdir(llm) if f.endswith(".safetensors")) / 1e9
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs")
    print(f"command: {' '.join(cmd[1:])}")
    print("| SLM | LLM (bf16 checkpoint) | LoRA targets | --max-memory | --scale | peak RSS | wall | CPU | ported adapter |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| 0.2B-shaped | 1.1B-shaped ({ck:.2f} GB) | {a.targets} (r 16) | {a.max_memory or 'default'} | {a.scale} | {rss:.2f} GiB | "
          f"{wall:.0f} s | {cpu:.0f} s | loads in peft, {check.strip()} |")


if __name__ == "__main__":
    main()
