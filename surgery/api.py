"""The Python API: `import surgery` and call the same functions the CLI commands call.

Most are the pipeline functions themselves (surgery.merge_lora is surgery.pipelines.merge.merge_lora);
`train` and `tune_bridge` spell their training settings as keyword arguments and build the
TrainConfig the CLI builds. Every function takes local directories, writes its output atomically
(an existing output only with force=True, never over an input) and returns the report the CLI
prints as --json. Errors are surgery.errors.SurgeryError with the one-line message the CLI shows.
"""

from __future__ import annotations


def _config(epochs, lr, batch_size, seed, eval_every, log_every):
    from .train.loop import TrainConfig

    return TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, eval_every=eval_every, log_every=log_every)


def train(model: str, data: str, output: str, *, method: str = "lora", eval_data: str | None = None,
          epochs: float = 3.0, lr: float = 1e-3, batch_size: int = 8, rank: int = 8, alpha: float | None = None,
          targets=None, virtual_tokens: int = 8, adapter_config: str = "houlsby",
          reduction_factor: float | None = None, max_length: int = 512, eval_every: int = 0, log_every: int = 10,
          seed: int = 0, force: bool = False, placement=None, plot: str | None = None) -> dict:
    """Tune an adapter of kind `method` (lora, prompt, prefix, lokr, bitfit, adapter, ...) on `model`
    with the JSONL `data`, write it to `output`, and return the summary (before/after metrics, steps).

    targets: module-name suffixes, as a list or "q_proj,v_proj" (default: every linear layer in the
    blocks). eval_data: a JSONL scored every `eval_every` steps (0: each epoch) and at the end.
    log_every: steps per training-loss record in training.json's history.
    placement: the model's dtype and device (surgery.io.model.Placement; default auto).
    plot: also draw the loss curves to this PNG (needs matplotlib)."""
    from .io.adapter import split_targets
    from .pipelines.train import train_adapter

    rf = int(reduction_factor) if reduction_factor is not None and float(reduction_factor).is_integer() else reduction_factor
    return train_adapter(model, data, output, method=method, eval_data=eval_data, rank=rank, alpha=alpha,
                         targets=split_targets(targets), virtual_tokens=virtual_tokens, max_length=max_length, force=force,
                         cfg=_config(epochs, lr, batch_size, seed, eval_every, log_every), adapter_config=adapter_config,
                         reduction_factor=rf, placement=placement, plot=plot)


def tune_bridge(adapter: str, bridge: str, data: str, output: str, *, eval_data: str | None = None,
                llm: str | None = None, epochs: float = 3.0, lr: float = 1e-3, batch_size: int = 8,
                max_length: int = 512, eval_every: int = 0, log_every: int = 10, seed: int = 0, force: bool = False,
                placement=None, plot: str | None = None, prefix: bool | None = None, rank: int | None = None) -> dict:
    """Tune the LLM's `adapter` through `bridge` (from prune_bridge) on `data`, lift the update back and
    write an adapter for the LLM to `output`; returns the summary measured on the bridge. prefix: the
    bridge dropped the LLM's first layers (prune_bridge drop_by="first") and its kept layers read the
    LLM's own hidden state there, computed once, forward only; None: on when the bridge dropped exactly the
    LLM's first layers. rank: a LoRA adapter's modules in the bridge's kept layers grow to this rank first
    (the start's delta unchanged); None keeps its rank."""
    from .pipelines.tune_bridge import tune_bridge as run

    return run(adapter, bridge, data, output, eval_data=eval_data, llm=llm, max_length=max_length, force=force,
               cfg=_config(epochs, lr, batch_size, seed, eval_every, log_every), placement=placement, plot=plot,
               prefix=prefix, rank=rank)


# name -> (module, attribute) of every exported function; imported on first use, so `import surgery`
# stays free of torch and `surgery --help` stays fast
EXPORTS = {
    "inspect": ("surgery.pipelines.inspect", "describe"),
    "merge_lora": ("surgery.pipelines.merge", "merge_lora"),
    "unmerge_lora": ("surgery.pipelines.merge", "unmerge_lora"),
    "extract_lora": ("surgery.pipelines.extract", "extract_lora"),
    "extract_krona": ("surgery.pipelines.krona", "extract_krona"),
    "extract_bitfit": ("surgery.pipelines.bitfit", "extract_bitfit"),
    "apply_bitfit": ("surgery.pipelines.bitfit", "apply_bitfit"),
    "prune_bridge": ("surgery.pipelines.prune", "prune_bridge"),
    "transfer": ("surgery.pipelines.transfer", "transfer"),
    "train": ("surgery.api", "train"),
    "tune_bridge": ("surgery.api", "tune_bridge"),
    "evaluate": ("surgery.pipelines.evaluate", "evaluate"),
}


def resolve(name: str):
    import importlib

    module, attr = EXPORTS[name]
    return getattr(importlib.import_module(module), attr)
