"""docs/results.md from results.json + summary.json (report.py). Every number here is computed;
the hand-written discussion is benchmarks/evidence/discussion.md, included verbatim."""

from __future__ import annotations

import math
import os

from benchmarks.evidence.report import GAP_ROWS, ROWS, fmt

LABEL = dict(ROWS)


def _with_reduction(args: list[str], s: dict) -> list[str]:
    """A bridge's prune-bridge arguments as the run passed them: --reduction unless it was planned by memory
    (run.Bench.reduction; runs from before --memory-reduction passed --reduction to every bridge)."""
    return args if "--memory-reduction" in args else ["--reduction", f"{s.get('reduction', 16):g}", *args]


def _table(sm: dict, key: str, metric: str, gap_key: str, label_prefix: str, **kw) -> list[str]:
    tasks = list(sm["tasks"])
    out = ["| | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    zs = "zero-shot-slm"
    out.append("| SLM zero-shot | " + " | ".join(fmt(sm["tasks"][t][key].get(zs), **kw) for t in tasks) + " |")
    for k, label in ROWS:
        out.append(f"| {label} | " + " | ".join(fmt(sm["tasks"][t][key].get(k), **kw) for t in tasks) + " |")
    for k in GAP_ROWS:
        out.append(f"| {label_prefix}: {LABEL[k]} | " + " | ".join(fmt(sm["tasks"][t][gap_key][k]) for t in tasks) + " |")
    return out


def _bridges(sm: dict) -> list[str]:
    t = next(iter(sm["tasks"].values()))
    out = []
    for k, p in t["bridges"].items():
        ne = p.get("bridge_non_embedding")
        out.append(f"{k}: {p['bridge']:,} parameters" + (f" ({ne:,} non-embedding, of the LLM's "
                                                           f"{p['llm_non_embedding']:,})" if ne else ""))
    return out


def _kinds(tm: dict) -> list[str]:
    """The training rows' saved activations by what they are (surgery.train.memory.KINDS)."""
    from surgery.train.memory import KINDS

    rows = {k: v["kinds"] for k, v in tm.items() if "kinds" in v}
    if not rows:
        return []
    kinds = [(k, label) for k, label, _ in KINDS if any(k in r for r in rows.values())]
    out = ["", "The training rows' saved activations by kind (MB; the kind is the module that saved the tensor; "
           "`lora` holds the inputs of the adapted linear layers: the normed hidden states, the attention output and "
           "the MLP's gate x up product, which LoRA's A needs for its gradient, and A x, of the LoRA's rank, for B):", "",
           "| kind | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
    for k, label in kinds:
        out.append(f"| {label} | " + " | ".join(f"{r.get(k, 0) / 2**20:.2f}" for r in rows.values()) + " |")
    return out


def _rule_lines(sm: dict) -> list[str]:
    """Issue 16's task rule, per task: the mean gap, each seed's, and whether it holds (report.task_rule)."""
    from benchmarks.evidence.report import RULE_POINTS

    def one(n, r):
        seeds = " / ".join(f"{x:+.1f}" for x in r["gaps"])
        return (f"`{n}` {r['mean']:+.1f} (per seed {seeds}; {r['seeds_at_10']} of {len(r['gaps'])} seeds ≥ "
                f"{RULE_POINTS:g}): **{'holds' if r['holds'] else 'does not hold'}**")

    return [f"- task rule (issue 16: LLM + LoRA beats SLM + LoRA by ≥ {RULE_POINTS:g} accuracy points; read as the "
            f"mean gap over seeds ≥ {RULE_POINTS:g} and the gap > 0 on every seed, pre-registered in "
            "docs/method-experiments.md section 6): " + "; ".join(one(n, t["rule"]) for n, t in sm["tasks"].items())]


def _pct(x: float) -> str:
    """A fraction as a percentage to one decimal: whole numbers would show 89.5 % as a "90 %" that misses
    a 90 % goal."""
    return f"{100 * x:.1f}"


def _goal_lines(g: dict, scope: str) -> list[str]:
    """The method's two accuracy goals over one set of tasks (report._goal)."""
    return [f"- {scope}:",
            f"  - the method (transfer + [pre-refine] + tune-bridge + refine) closes **{_pct(g['gap'])} %** of the "
            f"(LLM+LoRA - LLM zero-shot) accuracy gap, averaged over {', '.join(g['tasks'])} "
            f"(goal ≥ 90 %: **{'met' if g['gap'] >= 0.9 else 'not met'}**)",
            "  - method minus SLM + LoRA, accuracy points per task (mean ± 95 %): " + "; ".join(
                f"{n} {fmt(v)}" for n, v in g["beats_slm"].items() if v) + " (goal > 0: **" + (
                "met" if all(v and v[0] > 0 for v in g["beats_slm"].values()) else "not met") + "**)"]


def render(results: dict, sm: dict) -> str:
    pre, s = results["pretrain"], results["settings"]
    slm, llm = pre["slm"], pre["llm"]
    g, mr = sm["goal"], sm["memory_ratio"]
    tm = sm["train_memory"]
    L = ["# Results: the paper's table in miniature", "",
         "Jin, Zhang & Zong (EMNLP 2023), *Parameter-efficient Tuning for Large Language Model without Calculating "
         "Its Gradients*, reproduced end to end through the real `surgery` CLI on a model pair pretrained here on "
         "real text (no hub weights reach these machines). See [method.md](method.md) for the method itself.", "",
         f"- command: `{results['command']}` or `make evidence` ({results['seconds'] / 60:.0f} min with "
         f"`--jobs {results['jobs']}` on a shared machine; pretraining the pair adds its own time once, cached in "
         "benchmarks/.work/pairs/ under a hash of its recipe)",
         f"- machine: {results['machine']}; date: {results['date']}",
         *_corpus_lines(pre, slm, llm)]
    if "cloze" in results:
        L.append("- what each model memorised, before any tuning (8-way cloze on each task's dev entries in the "
                 "corpus's own wording, chance 12.5 %; benchmarks/evidence/knowledge.py): " + "; ".join(
                     f"`{t}` SLM {100 * c['slm']:.1f} %, LLM {100 * c['llm']:.1f} %" for t, c in results["cloze"].items()))
    bridge_args = results.get("bridge_args") or {}
    L += [f"- tasks (benchmarks/evidence/tasks.py): " + "; ".join(
              f"`{n}` ({results['task_sizes'][n][0]} train / {results['task_sizes'][n][1]} dev)" for n in sm["tasks"])
          + f"; {s['seeds']} seeds; LoRA rank 8 on every linear layer (SLM + LoRA, LLM + LoRA, the transfer; a bridge's tune may grow it: below), {s['epochs']} epochs, lr {s['lr']}, batch "
          f"{s['batch']} (train and tune-bridge alike); refine {s['refine_steps']} MeZO steps"
          + (f", lr {s['refine_lr']:g}" if s.get("refine_lr") else "") + " at `surgery refine`'s defaults otherwise"
          + (f"; [pre-refine]: before tune-bridge, `surgery refine --layers L --lr {results['pre_refine_lr']:g}` "
             f"({s['refine_steps']} steps) on the layers L the residual-preserving bridge drops, from the transferred "
             "start (and from the zero-init one for the Table-8 rows); tune-bridge starts from its output "
             "(docs/method-experiments.md section 11)" if results.get("pre_refine_lr") and any(
                 "pre" in sd for t in results["tasks"].values() for sd in t["seeds"]) else ""),
          f"- bridges (`prune-bridge`, on the task's first {s['calib']} training texts): " + "; ".join(_bridges(sm))
          + "".join(f"; {k}: `{' '.join(_with_reduction(a, s))}`" for k, a in bridge_args.items())
          + ("; the kept bridge is tuned with `tune-bridge --prefix`" if "--drop-by" in bridge_args.get("keep", []) else "")
          + "".join(f"; the {k} bridge's tune adds `{' '.join(a)}` (its kept layer's LoRA grows to that rank first)"
                    for k, a in (results.get("tune_args") or {}).items() if a),
          ""]
    L += ["## Against the goal (issue 16)", ""] + _rule_lines(sm)
    if g["gap"] is None and not any("method" in t["rows"] for t in sm["tasks"].values()):
        L.append("- the method's row is missing (no `surgery refine` in this checkout at run time): not measurable")
    elif g["gap"] is None:  # --quick: too few steps for LoRA on the LLM to move off zero-shot
        L.append("- gap closed: not measurable (on every task LLM + LoRA is within 5 points of LLM zero-shot, "
                 "so there is no gap to close)")
    else:
        L += _goal_lines(g, f"over all tasks ({', '.join(sm['tasks'])})")
        rule_tasks = [n for n, t in sm["tasks"].items() if t["rule"]["holds"]]
        if not rule_tasks:
            L.append("- over the tasks that meet the task rule: none does")
        elif sm["goal_rule"]["gap"] is None:
            L.append(f"- over the tasks that meet the task rule ({', '.join(rule_tasks)}): gap closed not measurable")
        else:
            L += _goal_lines(sm["goal_rule"], f"over the tasks that meet the task rule ({', '.join(rule_tasks)})")
    readings = (("method", "the method's stages only (transfer, prune-bridge, tune-bridge, refine)"),
                ("with_slm", "counting also the SLM adapter's training, the input Algorithm 1 starts from"))
    for key, what in readings:
        r = mr[key]
        L.append(f"- training memory, LoRA on the LLM / the most expensive stage, {what}: **{r['tensors']:.1f}x** "
                 f"({r['stage']}) counted tensor by tensor (goal ≥ 5x: **{'met' if r['tensors'] >= 5 else 'not met'}**); "
                 f"by whole-process peak RSS {r['rss']:.2f}x ({r['rss_stage']}; the Python/torch runtime is most of "
                 "every process at this size)")
    L += ["", "## The table", "", "Dev exact-match accuracy (%; teacher-forced argmax over the whole completion), mean "
          "over seeds with its 95 % t-interval clipped to [0, 100]. *Gap closed* = (row - LLM zero-shot) / "
          "(LLM+LoRA - LLM zero-shot), per seed, then mean ± 95 % (n/a where LLM+LoRA is within 5 points of "
          "zero-shot). Every row except SLM + LoRA is the LLM with the named adapter.", ""]
    L += _table(sm, "rows", "acc", "gap", "gap closed", clip=True)
    L.append("| task rule: LLM + LoRA - SLM + LoRA (points; per seed) | " + " | ".join(
        f"{t['rule']['mean']:+.1f} ({' / '.join(f'{x:+.1f}' for x in t['rule']['gaps'])}): "
        f"{'holds' if t['rule']['holds'] else 'does not hold'}" for t in sm["tasks"].values()) + " |")
    L += ["", "Accuracy of the tuned adapter on the bridge itself (tune-bridge's own dev evaluation), before the lift "
          "back into the LLM:", "", "| | " + " | ".join(sm["tasks"]) + " |", "|---|" + "---:|" * len(sm["tasks"])]
    for k in ("zero_init", "bridge", "narrow"):
        L.append(f"| {LABEL[k]} | " + " | ".join(fmt(sm["tasks"][t]["on_bridge"][k], clip=True) for t in sm["tasks"]) + " |")
    L += ["", "The same conditions by dev loss (mean negative log-likelihood per completion token; lower is better). "
          "*Loss gap closed* = (zero-shot loss - row) / (zero-shot loss - LLM+LoRA loss).", ""]
    L += _table(sm, "loss", "loss", "loss_gap", "loss gap closed", digits=3)
    L += ["", "## Memory of each stage", "", "Peak RSS of each stage's own process (os.wait4), mean ± 95 % over "
          "tasks and seeds:", "", "| stage | peak RSS (MB) |", "|---|---:|"]
    for v in sm["rss"].values():
        L.append(f"| {v['label']} | {fmt(v['mb'], pct=False)} |")
    L += ["", f"Memory of every stage at the training shape ({tm['llm']['batch']} x {tm['llm']['seq']} tokens a step), "
          "counted tensor by tensor (benchmarks/evidence/memory.py, MB = 2^20 bytes). Training rows (slm, llm, "
          "bridge): the weights of the model the step runs through, the tensors autograd saves for backward, and the "
          "adapter's state (LoRA gradients + AdamW moments = 3x its parameters). refine: the LLM's weights and one "
          "regenerated direction tensor (MeZO keeps no gradient or moment, its forwards save nothing; the "
          "pre-refine perturbs only some layers' tensors, so the refine row bounds it too). "
          "prune-bridge: its Fisher pass at its own micro-batch (the LLM's weights, every block's checkpointed input, "
          "one block's recomputed activations). transfer: from its own cost model (surgery/pipelines/transfer/"
          "memory.py), forward only: the window of layers it streams (both models' weights) and what it holds for "
          "them (float64 moments, one batch's paired SLM activations, the LLM's a chunk at a time, the map being "
          "fitted and the residual prior), plus both models' hidden states, or the priming pass's LLM embedding "
          "if that is more; with its default (one layer a window) and with --max-memory 4GB (as many layers as "
          "that fits). Transients (one layer's activations, a fit's eigendecomposition) are counted on no side. "
          "The slm row is the SLM adapter's training, the method's input.", "",
          "| stage | weights (MB) | saved activations / held tensors (MB) | adapter state (MB) | total (MB) | LoRA on the LLM / this |",
          "|---|---:|---:|---:|---:|---:|"]
    for k, v in tm.items():
        L.append(f"| {k} | {v['weights'] / 2**20:.2f} | {v['activations'] / 2**20:.2f} | {v['lora_state'] / 2**20:.2f} "
                 f"| {v['total'] / 2**20:.2f} | {tm['llm']['total'] / v['total']:.1f}x |")
    L += _kinds(tm)
    L.append("")
    disc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "discussion.md")
    if os.path.exists(disc):
        with open(disc) as f:
            L += [f.read()]
    L += ["## Per-stage commands", "", "Every number above comes from these commands (seed 0 of the first task shown; "
          "the full list is in the run's `stages/*.json`):", "", "```"]
    first = next(iter(results["tasks"].values()))
    sd = first["seeds"][0]
    cmds = [first["zero_shot"]["cmd"]] + [b["cmd"] for b in first["bridges"].values()]
    cmds += [sd[k]["cmd"] for k in ("slm_lora", "llm_lora")] + [sd["transfer"]["transfer"]["cmd"], sd["fresh"]["cmd"]]
    cmds += [x for k in ("pre", "zero_pre", "zero_init", "bridge", "narrow", "method", "zero_refined") if k in sd
             for x in (sd[k]["train"]["cmd"], sd[k]["eval"].get("cmd")) if x]
    L += [c.replace(results["work"], "$WORK").replace(results["pair"], "$PAIR") for c in cmds]
    L += ["```", "", "`$PAIR` = the pretrained pair (`python -m benchmarks.evidence.pretrain --print-dir`), "
          "`$WORK` = benchmarks/.work/evidence-<pair key>/.", ""]
    return "\n".join(L) + "\n"


def _corpus_lines(pre: dict, slm: dict, llm: dict) -> list[str]:
    ps = pre["settings"]
    passes = slm["tokens_seen"] / pre["tokens"]
    repeats = ps.get("index_repeats", 1)
    extra = (f", repeated {repeats} times per pass, plus once per pass {pre['extra_texts']:,} texts of the same kind "
             "(the remaining paragraphs of those docstrings, and the index entries of the Python packages Debian "
             "installed in /usr/lib/python3/dist-packages: pip, setuptools, pygments, cryptography, apt, ...)"
             if "extra_texts" in pre else "")
    index = f" (the stdlib index's {pre['index_tokens']:,} tokens {repeats} times)" if "index_tokens" in pre else ""
    valid = (f"; {pre['valid_tokens']:,} validation tokens (another 5 %, never seen either) choose the checkpoint each "
             "model keeps" if "valid_tokens" in pre else "")
    kept = (f"; each model keeps its checkpoint of best validation loss (SLM step {slm['kept_step']}, LLM step "
            f"{llm['kept_step']}; at the last step the held-out perplexities were SLM "
            f"{math.exp(slm['final_heldout_loss']):.1f}, LLM {math.exp(llm['final_heldout_loss']):.1f})"
            if "kept_step" in llm else "")
    return [f"- corpus: the docstrings of Debian's Python 3.11 standard library (/usr/lib/python3.11, packages "
            f"libpython3.11-minimal/-stdlib), one index entry per public function, class and method "
            f"(`name(args) in module: first paragraph`; benchmarks/evidence/corpus.py){extra}; {pre['tokens']:,} "
            f"training tokens per pass{index}, {pre['heldout_tokens']:,} held-out tokens (5 % of the stdlib entries, "
            f"never seen in pretraining){valid}",
            f"- pair (llama family, one BPE tokenizer of {s_vocab(pre)} tokens): SLM {slm['layers']} layers x "
            f"{slm['hidden']} wide, {slm['non_embedding']:,} non-embedding parameters ({slm['parameters']:,} in all); "
            f"LLM {llm['layers']} x {llm['hidden']}, {llm['non_embedding']:,} non-embedding "
            f"({llm['non_embedding'] / slm['non_embedding']:.1f}x; {llm['parameters']:,} in all)",
            f"- pretraining: {slm['steps']} steps of {ps['batch']} x {ps['seq_len']} tokens each (~{passes:.1f} "
            f"passes{f', each stdlib entry seen ~{passes * repeats:.0f} times' if repeats > 1 else ''}){kept}; "
            f"held-out perplexity SLM **{slm['heldout_ppl']:.1f}**, LLM **{llm['heldout_ppl']:.1f}** "
            f"(loss {slm['heldout_loss']:.3f} vs {llm['heldout_loss']:.3f})"]


def s_vocab(pre: dict) -> str:
    return f"{pre['settings']['llm']['vocab_size']:,}"


__all__ = ["render"]
