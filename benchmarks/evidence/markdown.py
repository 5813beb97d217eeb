"""docs/results.md from results.json + summary.json (report.py). Every number here is computed;
the hand-written discussion is benchmarks/evidence/discussion.md, included verbatim."""

from __future__ import annotations

import os

from benchmarks.evidence.report import ROWS, acc, fmt


def _task_table(sm: dict) -> list[str]:
    tasks = list(sm["tasks"])
    out = ["| | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    out.append("| SLM zero-shot | " + " | ".join(fmt(sm["tasks"][t]["rows"]["zero-shot-slm"]) for t in tasks) + " |")
    for k, label in ROWS:
        out.append(f"| {label} | " + " | ".join(fmt(sm["tasks"][t]["rows"][k]) for t in tasks) + " |")
    for k, label in GAPS:
        out.append(f"| gap closed: {label} | " + " | ".join(fmt(sm["tasks"][t]["gap"][k]) for t in tasks) + " |")
    return out


GAPS = (("transfer", "transfer only"), ("method", "**the method**"), ("bridge_only", "bridge alone"),
        ("slm_lora", "SLM + LoRA"))


def _loss_table(sm: dict) -> list[str]:
    tasks = list(sm["tasks"])
    out = ["| | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    out.append("| SLM zero-shot | " + " | ".join(fmt(sm["tasks"][t]["loss"]["zero-shot-slm"], digits=3) for t in tasks) + " |")
    for k, label in ROWS:
        out.append(f"| {label} | " + " | ".join(fmt(sm["tasks"][t]["loss"][k], digits=3) for t in tasks) + " |")
    for k, label in GAPS:
        out.append(f"| loss gap closed: {label} | " + " | ".join(fmt(sm["tasks"][t]["loss_gap"][k]) for t in tasks) + " |")
    return out


def _ablation_tables(sm: dict) -> list[str]:
    tasks = [t for t in sm["tasks"] if sm["tasks"][t]["ablations"]]
    if not tasks:
        return ["(no ablations in this run)"]
    head = "| | " + " | ".join(f"{t}: accuracy | gap closed | dev loss | loss gap closed" for t in tasks) + " |"
    rule = "|---|" + "---:|---:|---:|---:|" * len(tasks)

    def row(label, key):
        cells = []
        for t in tasks:
            a = sm["tasks"][t]
            if key == "method":
                cells += [fmt(a["rows"]["method"]), fmt(a["gap"]["method"])]
            elif key == "transfer":
                cells += [fmt(a["rows"]["transfer"]), fmt(a["gap"]["transfer"])]
            elif key in a["ablations"]:
                cells += [fmt(a["ablations"][key]["acc"]), fmt(a["ablations"][key]["gap"])]
            else:
                cells += ["-", "-"]
            cells += [fmt(a["loss"][key] if key in ("method", "transfer") else a["ablations"].get(key, {}).get("loss"),
                          digits=3),
                      fmt(a["loss_gap"][key] if key in ("method", "transfer") else
                          a["ablations"].get(key, {}).get("loss_gap"))]
        return f"| {label} | " + " | ".join(cells) + " |"

    br = sm["tasks"][tasks[0]]["bridges"]
    size = lambda k: (f" ({br[k]:,} parameters)" if isinstance(br.get(k), int) else "")  # noqa: E731
    out = ["### Bridge size (fisher-mask)", "", head, rule]
    out += [row(f"r = 4{size('fisher-mask-r4')}", "method-fisher-mask-r4"),
            row(f"r = 16{size('fisher-mask-r16')}", "method"),
            row(f"r = 64{size('fisher-mask-r64')}", "method-fisher-mask-r64")]
    out += ["", "### Importance score (r = 16)", "", head, rule, row("fisher-mask (Kwon et al. 2022)", "method"),
            row("fisher-param (LST)", "method-fisher-param-r16"), row("magnitude", "method-magnitude-r16"),
            row("random (control)", "method-random-r16")]
    out += ["", "### W_plug fitted on activations vs embeddings", "", head, rule,
            row("transfer only, --map activations", "transfer"),
            row("transfer only, --map embeddings", "transfer-embeddings"),
            row("method, --map activations", "method"), row("method, --map embeddings", "method-embeddings")]
    return out


def render(results: dict, sm: dict, plots: list[str]) -> str:
    pre, s = results["pretrain"], results["settings"]
    p = sm["params"]
    learn = [t for t in sm["tasks"] if sm["tasks"][t]["learnable"]]
    gaps = [sm["tasks"][t]["gap"]["method"] for t in learn if sm["tasks"][t]["gap"]["method"]]
    mean_gap = sum(g[0] for g in gaps) / len(gaps) if gaps else float("nan")
    lgaps = [sm["tasks"][t]["loss_gap"]["method"] for t in learn if sm["tasks"][t]["loss_gap"]["method"]]
    mean_lgap = sum(g[0] for g in lgaps) / len(lgaps) if lgaps else float("nan")
    mr = sm["memory_ratio"]
    L = ["# Results: the paper's table in miniature", "",
         "Jin, Zhang & Zong (EMNLP 2023), *Parameter-efficient Tuning for Large Language Model without Calculating "
         "Its Gradients*, reproduced end to end through the real `surgery` CLI on a model pair pretrained here "
         "(no hub weights reach these machines). See [method.md](method.md) for the method itself.", "",
         f"- command: `{results['command']}` (about {results['seconds'] / 60:.0f} min with `--jobs {results['jobs']}`; "
         "pretraining the pair once adds its own time, cached afterwards)",
         f"- machine: {results['machine']}; date: {results['date']}",
         f"- pair: SLM {pre['slm']['layers']} layers x {pre['slm']['hidden']} wide, {pre['slm']['parameters']:,} parameters; "
         f"LLM {pre['llm']['layers']} x {pre['llm']['hidden']}, {pre['llm']['parameters']:,} parameters "
         f"({pre['llm']['parameters'] / pre['slm']['parameters']:.1f}x); one BPE tokenizer; llama family",
         f"- pretraining: {pre['tokens']:,} tokens of fixtures/world.py, {pre['slm']['steps']} steps each; held-out LM loss "
         f"SLM {pre['slm']['heldout_loss']:.3f} (ppl {pre['slm']['heldout_ppl']:.2f}), "
         f"LLM {pre['llm']['heldout_loss']:.3f} (ppl {pre['llm']['heldout_ppl']:.2f})",
         (f"- knowledge of fixtures/world.py's facts (6-way cloze on where a person lives, chance 16.7 %; "
          f"benchmarks/evidence/knowledge.py): SLM {100 * results['home_cloze']['slm']['dev_people']:.1f} %, "
          f"LLM {100 * results['home_cloze']['llm']['dev_people']:.1f} % on the `home` task's dev people"
          if "home_cloze" in results else None),
         f"- tasks: {', '.join(sm['tasks'])} (fixtures/tasks.py), {s['n_train']} train / {s['n_dev']} dev examples; "
         f"{s['seeds']} seeds; LoRA rank 8 on every linear layer, {s['epochs']} epochs, lr {s['lr']}, batch {s['batch']}",
         f"- bridge: `prune-bridge --reduction 16 --importance fisher-mask` on {s['calib']} task texts: "
         f"{p['bridge_r16']:,} parameters ({p['llm'] / p['bridge_r16']:.1f}x fewer than the LLM)" if p["bridge_r16"] else "",
         "", "## Headline", "",
         f"- the method closes **{100 * mean_gap:.0f} %** of the (LLM+LoRA - zero-shot) gap on average over the tasks "
         f"where LoRA on the LLM learns more than chance ({', '.join(learn)}; goal: 90 %: "
         f"{'met' if mean_gap >= 0.9 else 'not met'}); of their dev-loss gap it closes {100 * mean_lgap:.0f} %.",
         f"- training memory (weights + saved activations + LoRA gradients and Adam moments, counted tensor by "
         f"tensor): LoRA on the LLM / the method's largest training stage = **{mr['tensors']:.1f}x** (goal: 5x); "
         f"whole-process peak RSS: {mr['rss']:.2f}x (at this size the Python/torch runtime is most of every process).",
         f"- parameters back-propagated through: LLM {p['llm']:,} vs bridge {p['bridge_r16'] or 0:,} "
         f"({p['llm'] / max(1, p['bridge_r16'] or 1):.1f}x); trainable LoRA: SLM {p['lora_slm']:,}, "
         f"LLM {p['lora_llm']:,}, on the bridge {p['lora_bridge'] or 0:,}.", ""]
    L += ["## The table", "", "Dev exact-match accuracy (%, greedy = teacher-forced argmax over the completion), "
          "mean over seeds ± 95 % t-interval. *Gap closed* = (row - LLM zero-shot) / (LLM+LoRA - LLM zero-shot), "
          "per seed, then averaged (n/a where LLM+LoRA is within 5 points of zero-shot).", ""]
    L += _task_table(sm)
    L += ["", "The same conditions by dev loss (mean negative log-likelihood per completion token; lower is better). "
          "Accuracy needs the right token to win the argmax; the loss shows movement that has not got there yet. "
          "*Loss gap closed* = (zero-shot loss - row) / (zero-shot loss - LLM+LoRA loss) (100 % = as good as LoRA on "
          "the LLM, negative = worse than not tuning at all).", ""]
    L += _loss_table(sm)
    L += [""] + [f"![{x}]({x})" for x in plots if "table" in x] + [""]
    L += ["## Peak training memory", "", "Peak RSS of each stage's own process (os.wait4), mean ± 95 % over tasks and "
          "seeds. An `eval` process, which trains nothing, already peaks near 380 MB: at this size the runtime "
          "(Python, torch, transformers) is most of every process, so RSS cannot show the method's saving; the "
          "tensor count below can.", "", "| stage | peak RSS (MB) |", "|---|---:|"]
    for k, (m, h) in sm["memory"].items():
        L.append(f"| {k} | {fmt((m, h), pct=False)} |")
    tm = sm["train_memory"]
    L += ["", f"Training memory of one step at the training shape ({tm['llm']['batch']} x {tm['llm']['seq']} tokens), "
          "counted tensor by tensor (benchmarks/evidence/memory.py): weights of the model back-propagated through, "
          "tensors autograd saves for backward, and the LoRA's gradients + AdamW moments (3x its parameters).", "",
          "| model trained | weights (MB) | activations (MB) | LoRA state (MB) | total (MB) | LLM / this |",
          "|---|---:|---:|---:|---:|---:|"]
    for k, v in tm.items():
        L.append(f"| {k} | {v['weights'] / 2**20:.2f} | {v['activations'] / 2**20:.2f} | {v['lora_state'] / 2**20:.2f} "
                 f"| {v['total'] / 2**20:.2f} | {tm['llm']['total'] / v['total']:.1f}x |")
    L += [""] + [f"![{x}]({x})" for x in plots if "memory" in x] + [""]
    L += ["## Ablations", "", "On the tasks " + ", ".join(results["ablate_tasks"]) + " (same seeds; the SLM adapter "
          "and its transfer are shared, only the bridge or the map changes).", ""]
    L += _ablation_tables(sm)
    L += [""] + [f"![{x}]({x})" for x in plots if "ablation" in x] + [""]
    disc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "discussion.md")
    if os.path.exists(disc):
        with open(disc) as f:
            L += [f.read()]
    L += ["## Per-stage commands", "", "Every number above comes from these commands (seed 0 of the first task shown; "
          "the full list is in the run's `stages/*.json`):", "", "```"]
    first = next(iter(results["tasks"].values()))
    start = len(L)
    L += [first["zero_shot"]["cmd"], first["bridges"]["fisher-mask-r16"]["cmd"]]
    sd = first["seeds"][0]
    L += [sd[k]["cmd"] for k in ("slm_lora", "llm_lora")] + [sd["transfer"]["transfer"]["cmd"],
                                                             sd["method"]["train"]["cmd"], sd["method"]["eval"]["cmd"],
                                                             sd["fresh"]["cmd"], sd["bridge_only"]["train"]["cmd"]]
    short = lambda c: c.replace(results["work"], "$WORK").replace(results["pair"], "$PAIR")  # noqa: E731
    L[start:] = [short(x) for x in L[start:]]
    L += ["```", "", f"`$PAIR` = the pretrained pair (`python -m benchmarks.evidence.pretrain --print-dir`), "
          "`$WORK` = benchmarks/.work/evidence-<pair key>/.", ""]
    return "\n".join(x for x in L if x is not None) + "\n"


__all__ = ["render", "acc"]
