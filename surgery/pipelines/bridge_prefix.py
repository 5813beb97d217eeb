"""tune-bridge --prefix: the bridge's kept layers read the LLM's own hidden state.

A bridge that drops the LLM's first L layers (`prune-bridge --drop-by first`) feeds its first kept
layer the token embedding, not what the LLM's layers 0..L-1 write there, so what it learns lifts
badly. With --prefix, tune-bridge first runs the LLM (the adapter as given on) over the training and
evaluation records, forward only under torch.inference_mode, and stores each record's hidden state at
layer L's input in safetensors shards beside the output (a shard is written and dropped every SHARD_BYTES,
so the pass holds the LLM and one shard, not every record's states); training then feeds the bridge those states in
place of its token embedding (the prefix's layers are frozen: no gradient reaches them, nothing of
them is tuned or lifted). The LLM is freed before training and the states are read from the
memory-mapped file a batch at a time, so the training step holds what it holds without the prefix:
the bridge without its token embedding (released as soon as the bridge is loaded: nothing reads it), its
saved activations and the adapter's state (docs/method-experiments.md §7, §8). The bridge is loaded only
after the pass, so the pass does not hold it too.
"""

from __future__ import annotations

import gc
import os

from ..errors import CheckpointError
from ..train.data import collate

SHARD_BYTES = 256 * 2**20  # states held before a shard is written (at 2,048 wide, ~130k tokens in bf16)


def prefix_layers(meta: dict, arch=None) -> int:
    """L, the LLM layer the bridge's first kept layer is (the prefix is the LLM's layers 0..L-1, which the
    bridge dropped); 0 when the bridge kept layer 0: the LLM's hidden state there is the embedding output,
    which a bridge with the LLM's whole residual computes with the LLM's own weights, so the prefix is empty
    and the tune is a plain one. `arch` (the LLM's map) lets a family whose embedding output is more than
    the token embedding (GPT-2's learned positions) be refused when L > 0."""
    stacks = meta["layers"]["llm"]
    dropped = (meta["layers"].get("dropped") or {})
    if len(stacks) != 1:
        raise CheckpointError("tune-bridge --prefix needs a decoder-only bridge (one stack of layers), this one has "
                              f"{len(stacks)}: {', '.join(stacks)}", "drop --prefix")
    sizes, llm_sizes = meta.get("sizes", {}), meta.get("llm_sizes", {})
    if sizes.get("hidden") != llm_sizes.get("hidden"):
        raise CheckpointError(f"tune-bridge --prefix: the bridge's residual is {sizes.get('hidden')} wide, the LLM's "
                              f"{llm_sizes.get('hidden')}: the LLM's hidden state does not fit it",
                              "use a bridge that keeps the residual (`prune-bridge --residual keep`, the default)")
    (st, n), = stacks.items()
    gone = set(dropped.get(st, []))
    first = next((i for i in range(n) if i not in gone), n)
    if first == n:
        raise CheckpointError(f"tune-bridge --prefix: the bridge dropped every layer of the LLM's {n}",
                              "re-create it with fewer `prune-bridge --drop-layers`")
    if first and arch is not None and (extra := extra_embedding(arch)):
        # the stored state already holds it; the bridge would add it a second time
        raise CheckpointError(f"tune-bridge --prefix: {arch.family} adds {extra} to the token embedding, and "
                              "the bridge would add it again to the LLM's stored hidden state",
                              "drop --prefix, or use a bridge that keeps the LLM's layer 0")
    return first


def extra_embedding(arch) -> str | None:
    """An embedding the family adds to the token embedding (GPT-2's learned positions, wpe), if any: its
    hidden state at a layer's input then already holds it, so a bridge fed that state would add it twice."""
    return next((t.name for t in arch.tensors() if t.role == "embedding" and t.dims[0] != ("vocab",)), None)


def prefix_default(meta: dict, arch) -> tuple[bool, str]:
    """tune-bridge without --prefix / --no-prefix: (on, why). On when the bridge dropped exactly a leading run
    of the LLM's layers, 0..L-1 (what prune-bridge --drop-by first makes, --memory-reduction's bridges
    included): its first kept layer then expects the LLM's state after layer L-1, not the embedding output.
    Off otherwise, and off, with the reason, for a bridge that tune-bridge --prefix would refuse."""
    layers = meta.get("layers") or {}  # a bridge.json without "layers" dropped none
    stacks = layers.get("llm", {})
    if len(stacks) > 1:
        return False, "the bridge has more than one stack of layers"
    dropped = sorted(next(iter((layers.get("dropped") or {}).values()), []))
    if not dropped:
        return False, "the bridge keeps the LLM's layer 0"
    if dropped != list(range(len(dropped))):
        return False, f"the bridge dropped layers {', '.join(map(str, dropped))}, not only the LLM's first ones"
    first = f"the bridge dropped the LLM's first {len(dropped)} layer{'s' if len(dropped) > 1 else ''}"
    try:
        prefix_layers(meta, arch)
    except CheckpointError as e:
        return False, f"{first}, but {e.what.removeprefix('tune-bridge --prefix: ')}"
    return True, first


def write_states(llm_dir: str, adapter_dir: str, kind, example_sets, n_layers: int, path: str, *,
                 pad_id: int, batch_size: int, placement=None) -> dict:
    """Run the LLM with `adapter_dir` on over every example of `example_sets` (lists of Examples) and save
    each one's hidden state at layer n_layers' input under the directory `path`, in shards of about
    SHARD_BYTES (one tensor [tokens, hidden] per distinct input); returns {input ids tuple: (shard, tensor
    name)}. The LLM is released before returning."""
    import torch
    from safetensors.torch import save_file

    from ..train.methods import load_base

    model, _, arch = load_base(llm_dir, placement)
    model.requires_grad_(False)
    model, _ = kind.tunable(model, adapter_dir, arch)
    model.eval()
    device = next(model.parameters()).device
    os.makedirs(path, exist_ok=True)
    index, tensors, held, shards = {}, {}, 0, 0

    def flush():
        nonlocal tensors, held, shards
        if tensors:
            save_file(tensors, shard_path(path, shards))
            tensors, held, shards = {}, 0, shards + 1

    todo = list({tuple(e.input_ids): e for es in example_sets for e in es}.values())
    with torch.inference_mode():
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            batch = collate(chunk, pad_id, False)
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        output_hidden_states=True)
            h = out.hidden_states[n_layers]
            del out
            for r, e in enumerate(chunk):
                name = str(len(index))
                index[tuple(e.input_ids)] = (shards, name)
                tensors[name] = h[r, :len(e.input_ids)].to("cpu", copy=True).contiguous()
                held += tensors[name].nbytes
            del h
            if held >= SHARD_BYTES:
                flush()
    del model
    gc.collect()
    flush()
    return index


def shard_path(path: str, k: int) -> str:
    return os.path.join(path, f"{k:05d}.safetensors")


def cached_prefix(path: str, index: dict, dtype):
    """A module standing in for the bridge's token embedding: each row of input ids gets its stored hidden
    state (the longest stored input the row starts with: padding follows the real tokens, and under causal
    attention a prefix's states are the first positions of any longer input's), zeros on the padding."""
    import torch
    from safetensors import safe_open

    handles = [safe_open(shard_path(path, k), "pt") for k in range(1 + max((k for k, _ in index.values()), default=-1))]
    lengths = sorted({len(k) for k in index}, reverse=True)

    class CachedPrefix(torch.nn.Module):
        def forward(self, ids):
            rows = []
            for row in ids.tolist():
                at = next((index[k] for n in lengths if n <= len(row) and (k := tuple(row[:n])) in index), None)
                if at is None:
                    raise CheckpointError("tune-bridge --prefix met an input it has no stored state for",
                                          "this is a bug: report it with SURGERY_DEBUG=1")
                h = handles[at[0]].get_tensor(at[1])
                rows.append(torch.cat([h, h.new_zeros(len(row) - h.shape[0], h.shape[1])]))
            return torch.stack(rows).to(device=ids.device, dtype=dtype)

    return CachedPrefix()


def load_without_embedding(bdir: str, placement, path: str, index: dict):
    """The bridge, its token embedding replaced by the stored states (cached_prefix) as soon as it is loaded, and
    released: under --prefix the bridge never reads its embedding, so training does not hold it (vocab x hidden,
    often the bridge's largest tensor). A head tied to the embedding keeps the shared weight (the head reads it)."""
    from ..train.methods import load_base

    model, _, _ = load_base(bdir, placement)
    dtype = model.get_input_embeddings().weight.dtype
    model.set_input_embeddings(cached_prefix(path, index, dtype))
    gc.collect()
    return model


def state_dir(out: str) -> str:
    """Where the state shards go: a directory beside the output (not inside it, nor in /tmp, which may be small)."""
    parent = os.path.dirname(os.path.abspath(out))
    return os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.prefix-{os.getpid()}")
