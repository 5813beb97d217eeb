"""Targeted comparisons for the method's stages on the evidence pair (docs/method-experiments.md).

    python -m benchmarks.method_experiments --task module --seeds 0 \
        --bridges r16,r16-drop3 --inits transfer,zero --refine-steps 1000 --eval-every 200

For one task and a few seeds of benchmarks/evidence (the pair it pretrained and the stages `make
evidence` already ran: slm_lora, transfer, fresh = the zero-initialised LoRA), each bridge named in
--bridges is built with `surgery prune-bridge` (library call), then for each start (--inits) the adapter
is tuned on it (`tune-bridge`, the evidence's settings), lifted into the LLM and refined there with
MeZO (`refine`, --keep-last), evaluating on dev every --eval-every steps, so one run gives the
accuracy after the lift and the refine curve. The bridge's training memory is counted tensor by
tensor (benchmarks/evidence/memory.py) beside LoRA on the LLM. Everything runs in this one process
(one thread), so each stage costs seconds, not a process start. Results are appended as JSON lines.

Bridge specs: `r<R>` (reduction R), `-drop<N>` (--drop-layers N), `-fisher` (--drop-by fisher),
`-narrow` (--residual prune), `-i<N>` (explicit --intermediate-size N), `-h<N>` (--num-attention-heads N),
`-v<N>` (--num-key-value-heads N), `-k<L..>` (keep exactly these LLM layers, e.g. k0 or k03: which layers a dropping plan keeps, in place
of prune-bridge's ranking). Example: r8-drop2.

--rank R (docs/method-experiments.md §10): tune-bridge --rank R, the start's kept-layer LoRA grown to rank R first;
the memory count trains the bridge's LoRA (its kept layers' only) at rank R.

--prefix (docs/method-experiments.md §7, §8): with a bridge whose first kept layer L is not 0 (r10-k3), tune-bridge
runs as `surgery tune-bridge --prefix` (the library call): the LLM's layers 0..L-1, with the start adapter on,
run once forward only over the training and dev records, and the kept layers train on those hidden states
in place of the bridge's token embedding, which is not held. The record's memory is what that training
step holds (benchmarks/evidence/memory.training_bytes(prefix=True)); the forward-only pass before it is
the evidence's `tune-bridge --prefix pass` row, the same for every bridge of a pair and task.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bridge_kwargs(spec: str) -> dict:
    m = re.fullmatch(r"r(\d+(?:\.\d+)?)((?:-(?:drop\d+|fisher|narrow|i\d+|h\d+|v\d+|k\d+))*)", spec)
    if not m:
        raise SystemExit(f"bad bridge spec {spec!r}: use r16, r16-drop3, r8-drop2-fisher, r16-narrow, r16-i32")
    kw = {"reduction": float(m.group(1))}
    for part in filter(None, m.group(2).split("-")):
        if part.startswith("drop"):
            kw["drop_layers"] = int(part[4:])
        elif part == "fisher":
            kw["drop_by"] = "fisher"
        elif part == "narrow":
            kw["residual"] = "prune"
        elif part.startswith("i"):
            kw["intermediate_size"] = int(part[1:])
        elif part.startswith("h"):
            kw["num_attention_heads"] = int(part[1:])
        elif part.startswith("v"):
            kw["num_key_value_heads"] = int(part[1:])
        elif part.startswith("k"):
            kw["keep_layers"] = sorted({int(c) for c in part[1:]})
    return kw


def prune_keeping(llm: str, out: str, calib: str, keep_layers=None, **kw) -> None:
    """prune-bridge, with `keep_layers` (LLM layer indices, single digits) overriding which layers its
    ranking keeps: its choose_dropped is swapped for one that drops the others, for this call only."""
    from surgery.pipelines import prune as pr

    if keep_layers is None:
        return pr.prune_bridge(llm, out, calib, samples=32, seq_len=32, force=True, progress=False, **kw)
    ranked = pr.choose_dropped

    def fixed(arch, scores, drop):
        return {st: [i for i in range(n) if i not in keep_layers] for st, n in arch.stacks.items()}

    with open(os.path.join(llm, "config.json")) as f:
        n_layers = json.load(f)["num_hidden_layers"]
    pr.choose_dropped = fixed
    try:
        pr.prune_bridge(llm, out, calib, samples=32, seq_len=32, force=True, progress=False,
                        **{**kw, "drop_layers": n_layers - len(keep_layers)})
    finally:
        pr.choose_dropped = ranked


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--evidence", default=os.environ.get("SURGERY_EVIDENCE_WORK"),
                    help="the evidence work directory (benchmarks/.work/evidence-<key>) with data/ and <task>/s<seed>/")
    ap.add_argument("--pair", default=None, help="the pretrained pair (default: the evidence's)")
    ap.add_argument("--work", default=os.path.join(ROOT, "benchmarks", ".work", "method"))
    ap.add_argument("--task", default="module")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--bridges", default="r16")
    ap.add_argument("--inits", default="transfer",
                    help="comma list of starts: transfer, zero (Table 8), another stage of the evidence's seed directory "
                         "(transfer-scaled), or a path; a suffix -only<L..> (transfer-only0) "
                         "zeroes the LoRA B of every LLM layer but these (the start's delta outside them removed)")
    ap.add_argument("--tune-epochs", type=float, default=3)
    ap.add_argument("--tune-lr", type=float, default=3e-3)
    ap.add_argument("--refine-steps", type=int, default=200)
    ap.add_argument("--refine-lr", type=float, default=None)
    ap.add_argument("--refine-eps", type=float, default=None)
    ap.add_argument("--refine-batch", type=int, default=16)
    ap.add_argument("--refine-layers", default=None,
                    help="refine --layers SPEC (0-2, untuned; docs/method-experiments.md §11): only these LLM layers' adapter "
                         "tensors are perturbed and updated. Output names get -L<SPEC>")
    ap.add_argument("--refine-only", action="store_true",
                    help="no bridge and no tune: refine each start (--inits, e.g. bridge-scaled: the evidence's tune-bridge "
                         "output, the method's refine input) as the evidence's method stage does; --bridges is ignored")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--balance-init", action="store_true",
                    help="tune from a copy of each start whose LoRA factors are balanced (ops.project.balance_factors; same delta)")
    ap.add_argument("--tag", default="", help="suffix for output names (variants of the same bridge/init)")
    ap.add_argument("--out", default=None, help="JSON lines file (default: WORK/results.jsonl)")
    ap.add_argument("--prefix", action="store_true",
                    help="tune-bridge --prefix: the bridge's first kept layer reads the LLM's own hidden state there (the LLM's "
                         "earlier layers with the start adapter on, run once forward only), its token embedding not held")
    ap.add_argument("--cascade", default=None,
                    help="a one-layer bridge (a path, or a directory name in the evidence's task directory: bridge-keep) whose "
                         "kept layer stands, frozen, in place of the same LLM layer of each --bridges bridge: that layer keeps "
                         "the start adapter's change (start from its tune-bridge stage, --inits bridge-scaled), only the others train")
    ap.add_argument("--rank", type=int, default=None,
                    help="tune-bridge --rank: the start's LoRA modules on the bridge's kept layers grow to this rank before "
                         "tuning (the start unchanged); the memory count trains the bridge's LoRA at this rank. Output "
                         "names get -rank<R>")
    ap.add_argument("--fisher-mass", action="store_true",
                    help="only print, per LLM layer, the fisher-mask scores prune-bridge ranks (kv groups, best neurons, layer)")
    ap.add_argument("--memory-only", action="store_true",
                    help="only build each bridge and print its size and training memory beside LoRA on the LLM")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from benchmarks.evidence.memory import training_bytes
    from surgery.pipelines.refine import RefineConfig, refine
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.loop import TrainConfig

    ev = a.evidence
    # evidence-<pair key>[-t<tasks.py key>] (benchmarks/evidence/run.py's work_dir)
    key = re.sub(r"-t[0-9a-f]{6}$", "", os.path.basename(ev).removeprefix("evidence-"))
    pair = a.pair or os.path.join(ROOT, "benchmarks", ".work", "pairs", key)
    llm = os.path.join(pair, "llm")
    train, dev, calib = (os.path.join(ev, "data", f"{a.task}-{x}.jsonl") for x in ("train", "dev", "calib"))
    if a.fisher_mass:
        return fisher_mass(llm, calib)
    os.makedirs(a.work, exist_ok=True)
    out_file = a.out or os.path.join(a.work, "results.jsonl")
    mem_llm = training_bytes(llm, batch=16, seq=64)["total"]

    def log(rec):
        rec["time"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        print(json.dumps(rec), flush=True)
        with open(out_file, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def refine_run(start: str, out: str, seed: int) -> tuple[dict, dict, list]:
        rcfg = RefineConfig(steps=max(a.refine_steps, 1), batch_size=a.refine_batch, seed=seed,
                            eval_every=a.eval_every, keep_best=False, progress=False,
                            **({"lr": a.refine_lr} if a.refine_lr else {}),
                            **({"eps": a.refine_eps} if a.refine_eps else {}))
        rf = refine(start, llm, train, out, eval_data=dev, max_length=64, force=True, cfg=rcfg, layers=a.refine_layers)
        with open(os.path.join(out, "refine.json")) as f:
            curve = [(e["step"], round(100 * e["accuracy"], 1), round(e["loss"], 3))
                     for e in json.load(f)["history"]["evals"]]
        return rf, {"steps": rcfg.steps, "lr": rcfg.lr, "eps": rcfg.eps, "batch": rcfg.batch_size,
                    "layers": rf["layers"], "trainable": rf["trainable"], "adapter_parameters": rf["adapter_parameters"]}, curve

    ltag = f"-L{a.refine_layers}" if a.refine_layers not in (None, "all") else ""
    if a.refine_only:  # the evidence's method stage (surgery refine on its tune-bridge output), --refine-layers aside
        for seed in map(int, a.seeds.split(",")):
            for init in a.inits.split(","):
                sd = os.path.join(ev, a.task, f"s{seed}")
                start = os.path.join(sd, init) if os.path.isdir(os.path.join(sd, init)) else init
                out = os.path.join(a.work, a.task, f"s{seed}", f"refine-{os.path.basename(init)}{ltag}{a.tag}")
                t0 = time.time()
                rf, rec, curve = refine_run(start, out, seed)
                log({"task": a.task, "seed": seed, "bridge": None, "init": init, "tag": a.tag, "refine_only": True,
                     "lifted": round(100 * rf["before"]["accuracy"], 1), "lifted_loss": round(rf["before"]["loss"], 3),
                     "refined": round(100 * rf["after"]["accuracy"], 1), "refined_loss": round(rf["after"]["loss"], 3),
                     "refine": rec, "curve": curve, "seconds": {"refine": round(time.time() - t0)}})
        return
    for spec in a.bridges.split(","):
        bdir = os.path.join(a.work, a.task, f"bridge-{spec}")
        if not os.path.exists(os.path.join(bdir, "bridge.json")):
            prune_keeping(llm, bdir, calib, **bridge_kwargs(spec))
        frozen_dir, swap = None, {}
        if a.cascade:
            frozen_dir = a.cascade if os.path.isdir(a.cascade) else os.path.join(ev, a.task, a.cascade)
            bdir, swap = cascade_bridge(bdir, frozen_dir, bdir + "-cascade")
            spec += "-cascade"
        with open(os.path.join(bdir, "bridge.json")) as f:
            meta = json.load(f)
        # the bridge holds only its kept layers, and tune-bridge --rank grows exactly their LoRA: rank R on every module
        mem = training_bytes(bdir, batch=16, seq=64, prefix=a.prefix, rank=a.rank or 8, **swap_kwargs(frozen_dir, swap))
        if a.memory_only:
            print(json.dumps({"bridge": spec, "rank": a.rank, "sizes": meta["sizes"], "kept_layers": kept_llm_layers(meta),
                              "non_embedding": meta["parameters"]["bridge_non_embedding"], "prefix": a.prefix,
                              "bridge_mem_bytes": mem["total"], "cap_bytes": mem_llm // 5,
                              "bridge_mem_mb": round(mem["total"] / 2**20, 2), "mem_ratio": round(mem_llm / mem["total"], 2),
                              "calibration_loss": round(meta["calibration_loss"]["bridge"], 3)}), flush=True)
            continue
        for seed in map(int, a.seeds.split(",")):
            for init in a.inits.split(","):
                base, _, only = init.partition("-only")
                # transfer, zero, another stage of the evidence's seed directory (transfer-scaled), or a path
                sd = os.path.join(ev, a.task, f"s{seed}")
                start = os.path.join(sd, {"zero": "fresh"}.get(base, base))
                start = start if os.path.isdir(start) else base
                if only:
                    start = layers_only_copy(start, os.path.join(a.work, a.task, f"s{seed}", "inits", f"{base}-only{only}"),
                                             {int(c) for c in only})
                if a.balance_init:
                    start = balanced_copy(start, os.path.join(a.work, a.task, f"s{seed}", "inits", os.path.basename(start) + "-bal"))
                name = (f"{spec}-{os.path.basename(init)}{'-bal' if a.balance_init else ''}"
                        f"{f'-rank{a.rank}' if a.rank else ''}{ltag}{a.tag}")
                tuned = os.path.join(a.work, a.task, f"s{seed}", name)
                t0 = time.time()
                with frozen_layers(bdir, frozen_dir, swap) if swap else contextlib.nullcontext():
                    tb = tune_bridge(start, bdir, train, tuned, eval_data=dev, llm=llm, max_length=64, force=True, prefix=a.prefix,
                                     rank=a.rank, cfg=TrainConfig(epochs=a.tune_epochs, lr=a.tune_lr, batch_size=16, seed=seed, progress=False))
                t_tune = time.time() - t0
                if 12 * tb["trainable"] != mem["lora_state"]:  # the count must train what tune-bridge trained
                    raise SystemExit(f"{name}: tune-bridge trained {tb['trainable']} parameters, the memory count "
                                     f"{mem['lora_state'] // 12}")
                t0 = time.time()
                rf, rec, curve = refine_run(tuned, tuned + "-refined", seed)
                log({"task": a.task, "seed": seed, "bridge": spec, "init": init, "tag": a.tag, "rank": a.rank,
                     "sizes": meta["sizes"], "layers": meta["layers"]["bridge"], "kept_layers": kept_llm_layers(meta),
                     "tune": {"epochs": a.tune_epochs, "lr": a.tune_lr},
                     "non_embedding": meta["parameters"]["bridge_non_embedding"],
                     "llm_non_embedding": meta["parameters"]["llm_non_embedding"],
                     "prefix": a.prefix, "bridge_mem_bytes": mem["total"],
                     "bridge_mem_mb": round(mem["total"] / 2**20, 2), "llm_lora_mem_mb": round(mem_llm / 2**20, 2),
                     "mem_ratio": round(mem_llm / mem["total"], 2),
                     "on_bridge": round(100 * tb["after"]["accuracy"], 1), "bridge_train_loss": final_train_loss(tuned),
                     "lifted": round(100 * rf["before"]["accuracy"], 1), "lifted_loss": round(rf["before"]["loss"], 3),
                     "refined": round(100 * rf["after"]["accuracy"], 1), "refined_loss": round(rf["after"]["loss"], 3),
                     "refine": rec,
                     "curve": curve, "seconds": {"tune": round(t_tune), "refine": round(time.time() - t0)}})


def final_train_loss(tuned: str) -> float:
    """tune-bridge's last recorded training loss (tune_bridge.json history): how well the bridge fits."""
    with open(os.path.join(tuned, "tune_bridge.json")) as f:
        return round(json.load(f)["history"]["train_loss"][-1][1], 3)


def cascade_bridge(bdir: str, frozen_dir: str, out: str) -> tuple[str, dict]:
    """A copy of the bridge `bdir` for --cascade: where the one-layer bridge `frozen_dir` keeps an LLM layer that
    bdir keeps too, bridge.json takes frozen_dir's kept coordinates for it (tune-bridge then restricts the start
    adapter there as frozen_dir's tuning did). Returns (the copy, {position in bdir: position in frozen_dir})."""
    import shutil

    with open(os.path.join(bdir, "bridge.json")) as f:
        meta = json.load(f)
    with open(os.path.join(frozen_dir, "bridge.json")) as f:
        fmeta = json.load(f)
    mine, theirs = kept_llm_layers(meta), kept_llm_layers(fmeta)
    if not set(theirs) <= set(mine) or len(theirs) == len(mine):
        raise SystemExit(f"--cascade: {frozen_dir} keeps LLM layers {theirs}; {bdir} keeps {mine}: it must keep those and more")
    (st, layers), = meta["kept"]["layers"].items()
    for i in theirs:
        layers[i] = fmeta["kept"]["layers"][st][i]
    shutil.copytree(bdir, out, dirs_exist_ok=True)
    with open(os.path.join(out, "bridge.json"), "w") as f:
        json.dump(meta, f)
    return out, {mine.index(i): theirs.index(i) for i in theirs}


def swap_layers(model, frozen_model, swap: dict) -> None:
    """Put frozen_model's decoder layers in place of model's (swap: {position in model: position in frozen_model})."""
    for pos, fpos in swap.items():
        layer = frozen_model.get_decoder().layers[fpos]
        layer.self_attn.layer_idx = pos  # its slot in a key/value cache
        model.get_decoder().layers[pos] = layer


def swap_kwargs(frozen_dir, swap: dict) -> dict:
    """training_bytes' arguments that count a --cascade step: the frozen layers swapped in, their LoRA not trained."""
    if not swap:
        return {}

    def edit(model):
        import torch
        from transformers import AutoModelForCausalLM

        swap_layers(model, AutoModelForCausalLM.from_pretrained(frozen_dir, dtype=torch.float32), swap)

    return {"edit": edit, "frozen": tuple(f".layers.{p}." for p in swap)}


@contextlib.contextmanager
def frozen_layers(bdir: str, frozen_dir: str, swap: dict):
    """While active, tune-bridge on the bridge `bdir` gets frozen_dir's layers in place of its own at the
    positions of `swap` (however it loads it: plainly or, under --prefix, without its embedding), and their
    LoRA (the start adapter restricted to frozen_dir's kept coordinates: cascade_bridge) is not trained, so
    the lift leaves their change as the start had it."""
    from surgery.pipelines import bridge_prefix as bp
    from surgery.pipelines import tune_bridge as tb
    from surgery.train.methods import load_base

    inner_load, inner_load_prefix, inner_place = tb.load_base, bp.load_without_embedding, tb.place
    frozen = tuple(f".layers.{p}." for p in swap)

    def swapped(model, path):
        if os.path.abspath(path) == os.path.abspath(bdir):
            swap_layers(model, load_base(frozen_dir)[0], swap)
        return model

    def load(path, placement=None):
        model, tok, arch = inner_load(path, placement)
        return swapped(model, path), tok, arch

    def load_prefix(path, placement, states, index):
        return swapped(inner_load_prefix(path, placement, states, index), path)

    def place(pm, placement=None):
        for n, p in pm.named_parameters():
            if "lora_" in n and any(f in n for f in frozen):
                p.requires_grad_(False)
        return inner_place(pm, placement)

    tb.load_base, bp.load_without_embedding, tb.place = load, load_prefix, place
    try:
        yield
    finally:
        tb.load_base, bp.load_without_embedding, tb.place = inner_load, inner_load_prefix, inner_place


def kept_llm_layers(meta: dict) -> list[int]:
    """The LLM layers a bridge keeps (bridge.json: its layer count and the dropped ones; one stack)."""
    (st, n), = meta["layers"]["llm"].items()
    return [i for i in range(n) if i not in (meta["layers"].get("dropped") or {}).get(st, [])]


def layers_only_copy(src: str, dst: str, keep: set[int]) -> str:
    """A copy of the PEFT LoRA adapter `src` whose modules outside LLM layers `keep` have B = 0 (no delta)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    t = load_file(os.path.join(src, "adapter_model.safetensors"))
    for k in t:
        m = re.search(r"\.layers\.(\d+)\.", k)
        if "lora_B" in k and m and int(m.group(1)) not in keep:
            t[k] = t[k].zero_()
    save_file(t, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def balanced_copy(src: str, dst: str) -> str:
    """A copy of the PEFT LoRA adapter `src` with every module's (A, B) replaced by balanced factors of B·A."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from surgery.ops.project import balance_factors

    shutil.copytree(src, dst, dirs_exist_ok=True)
    t = load_file(os.path.join(src, "adapter_model.safetensors"))
    for k in [k for k in t if "lora_A" in k]:
        kb = k.replace("lora_A", "lora_B")
        A, B = balance_factors(t[k].to(torch.float64), t[kb].to(torch.float64))
        t[k], t[kb] = A.to(t[k].dtype).contiguous(), B.to(t[kb].dtype).contiguous()
    save_file(t, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def fisher_mass(llm: str, calib: str) -> None:
    """What a Fisher-ranked joint allocation would weigh: prune-bridge's fisher-mask unit scores
    (32 x 32 calibration tokens, as above) per layer -- each kv group, the best 2 / 63 neurons, all
    neurons -- and the layer mask's Fisher and block influence (the --drop-by rankings)."""
    from surgery.arch import arch_of
    from surgery.io.checkpoint import Checkpoint
    from surgery.io.model import load_model
    from surgery.pipelines import importance as imp
    from surgery.pipelines.calibration import token_blocks
    from surgery.pipelines.prune import calibration_stats

    ck = Checkpoint.open(llm)
    arch = arch_of(ck)
    blocks, _ = token_blocks(ck.path, calib, 32, 32, 0, arch.dims.get("positions"))
    model = load_model(ck.path, None, dispatch="gpu", auto_dtype="stored")
    scores = imp.fisher_mask(model, arch, blocks, 8)
    u = imp.units(arch, scores)
    _, sim, _ = calibration_stats(model, arch, blocks, 8, list(range(arch.dims["hidden"])))
    lf = imp.layer_fisher(scores, arch)
    for st, n in arch.stacks.items():
        for i in range(n):
            groups = [round(float(x), 4) for x in u[(st, i, "attn")]]
            m = u[(st, i, "mlp.inner")].sort(descending=True).values
            print(json.dumps({"layer": i, "kv_groups": groups, "neurons_top2": round(float(m[:2].sum()), 4),
                              "neurons_top63": round(float(m[:63].sum()), 4), "neurons_all": round(float(m.sum()), 4),
                              "layer_fisher": round(lf[(st, i)], 4), "block_influence": round(sim[(st, i)], 3)}))


if __name__ == "__main__":
    main()
