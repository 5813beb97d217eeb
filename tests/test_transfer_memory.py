"""transfer under a memory budget: windows of layers give the same result, running out is one clear line."""

import shutil
from pathlib import Path

import pytest

from .conftest import run_cli
from .test_transfer import ALL, calib, expanded, ids, logits  # noqa: F401  (fixtures)


def test_windows_follow_the_budget():
    from surgery.errors import ResourceError
    from surgery.pipelines.transfer.memory import plan_windows

    costs = [(10, 5), (10, 5), (10, 20), (10, 5)]
    assert plan_windows(costs, 1000, 2000) == [(0, 4)]
    assert plan_windows(costs, 30, 2000) == [(0, 2), (2, 3), (3, 4)]  # 10+10+5 fits; +layer 2's fit of 20 does not
    with pytest.raises(ResourceError, match="--max-memory"):
        plan_windows(costs, 25, 2000)  # layer 2 alone needs 30


def test_one_layer_windows_give_the_same_adapter(fx, tmp_path, calib, expanded, monkeypatch):  # noqa: F811
    """Capture-fit-free per window changes nothing: single-layer windows = one window over the whole LLM."""
    import torch
    from safetensors.torch import load_file

    import surgery.pipelines.transfer.memory as tm
    from surgery.pipelines.transfer import transfer

    ad, llm = fx.lora("llama", targets=ALL, name="all"), expanded("llama", 2, 2)
    kw = dict(data=calib, samples=8, seq_len=32)
    transfer(ad, llm, str(tmp_path / "whole"), max_memory="20GB", **kw)
    seen = []

    def single(costs, left, budget):
        seen.append(len(costs))
        return [(j, j + 1) for j in range(len(costs))]

    monkeypatch.setattr(tm, "plan_windows", single)  # what budget_windows plans with
    transfer(ad, llm, str(tmp_path / "single"), max_memory="20GB", **kw)
    assert seen == [4]
    for f in ("adapter_model.safetensors", "projections.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / f)), load_file(str(tmp_path / "single" / f))
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_bf16_llm_is_run_in_bf16(fx, tmp_path, calib, ids, expanded, monkeypatch):  # noqa: F811
    """The LLM runs in its checkpoint's dtype (bf16 here), not a float32 copy, and the port still works."""
    import torch
    from transformers import AutoModelForCausalLM

    import surgery.pipelines.transfer.stream as ts
    from surgery.pipelines.transfer import transfer

    src = expanded("llama", 2, 2)
    llm = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(llm)
    for f in Path(src).glob("*token*"):
        shutil.copy(f, llm / f.name)
    dtypes = []
    real = ts.LayerStream.prime

    def spy(self, batches):
        dtypes.append(self.dtype)
        return real(self, batches)

    monkeypatch.setattr(ts.LayerStream, "prime", spy)
    ad = fx.lora("llama")
    transfer(ad, str(llm), str(tmp_path / "o"), data=calib, samples=32, seq_len=64, scale="none")
    assert dtypes == [torch.float32, torch.bfloat16]
    slm = fx.model("llama")
    base, want = logits(slm, ids), logits(slm, ids, ad)
    got = logits(str(llm), ids, str(tmp_path / "o")) - logits(str(llm), ids)  # the effect on the bf16 LLM
    err = float((got - (want - base)).norm() / (want - base).norm())
    print("bf16 effect error", err)
    assert err < 0.05


def test_out_of_memory_is_one_line_naming_the_budget(fx, tmp_path, calib, expanded, monkeypatch):  # noqa: F811
    import surgery.pipelines.transfer.stream as ts

    ad, llm = fx.lora("llama"), expanded("llama", 2, 2)
    code, _, err = run_cli("transfer", "--slm", ad, "--llm", llm, "-o", tmp_path / "o", "--data", calib,
                           "--max-memory", "1MB")
    assert code != 0 and "--max-memory" in err and "internal error" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()

    def oom(self, batches):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(ts.LayerStream, "prime", oom)
    code, _, err = run_cli("transfer", "--slm", ad, "--llm", llm, "-o", tmp_path / "o", "--data", calib)
    assert code != 0 and "ran out of memory" in err and "--max-memory" in err and "internal error" not in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
    code, _, err = run_cli("transfer", "--slm", ad, "--llm", llm, "-o", tmp_path / "o", "--data", calib,
                           "--max-memory", "lots")
    assert code != 0 and "--max-memory" in err


def test_chunked_moments_equal_one_chunk():
    """Moments added a few rows at a time (the float64 copies bounded by the chunk) equal one add of
    every row, and so do the maps fitted from them."""
    import torch

    from surgery.ops.project import Moments, fit_to_llm, fit_to_slm

    g = torch.Generator().manual_seed(0)
    xs = torch.randn(101, 6, generator=g)
    xl = torch.cat([xs @ torch.randn(6, 9, generator=g), torch.randn(101, 2, generator=g)], 1)  # a partly linear relation
    whole, chunked = Moments(6, 11), Moments(6, 11)
    whole.add(xs, xl)
    chunked.add(xs, xl, chunk=7)
    assert chunked.count == whole.count == 101
    for name in ("ss", "ll", "ls", "sq_l"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-12, atol=1e-12)
    assert abs(chunked.tr_ss - whole.tr_ss) < 1e-9 * whole.tr_ss and abs(chunked.tr_ll - whole.tr_ll) < 1e-9 * whole.tr_ll
    for fit in (fit_to_llm, fit_to_slm):
        (a, ra, ka), (b, rb, kb) = fit(whole, 1e-9), fit(chunked, 1e-9)
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        assert ka == kb and abs(ra - rb) < 1e-8


def test_default_holds_one_layer_and_a_chunk(fx, tmp_path, calib, expanded, monkeypatch):  # noqa: F811
    """Without --max-memory: one LLM layer a window; only that layer's moments exist when it is fitted;
    the LLM's activations go into the moments inside the hook (never stored), float64 copies at most a
    chunk of rows; each map is spilled alone. And the port equals one window over the whole LLM."""
    import torch
    from safetensors.torch import load_file

    import surgery.pipelines.transfer.capture as tc
    import surgery.pipelines.transfer.fit as tf
    from surgery.ops.project import Moments
    from surgery.pipelines.transfer import transfer
    from surgery.pipelines.transfer.maps import MapStore

    ad, llm = fx.lora("llama", targets=ALL, name="all"), expanded("llama", 2, 2)
    kw = dict(data=calib, samples=8, seq_len=32, scale="none")
    transfer(ad, llm, str(tmp_path / "whole"), max_memory="20GB", **kw)
    seen = {"windows": [], "rows": [], "stored": [], "spilled": [], "kept": []}
    monkeypatch.setattr(tc, "CHUNK_TOKENS", 5)
    real_acc, real_add, real_spill, real_hook = tc.accumulate, Moments._add, MapStore.spill, tc.Recorder._hook

    def acc(streams, stack, windows, batches, pairing, wanted, needs, on_window):
        seen["windows"] = windows

        def fit(a, b, moments):
            seen["stored"].append({j for j, _ in moments})
            return on_window(a, b, moments)
        return real_acc(streams, stack, windows, batches, pairing, wanted, needs, fit)

    def add(self, xs, xl):
        seen["rows"].append(xs.shape[0])
        return real_add(self, xs, xl)

    def spill(self, maps):
        seen["spilled"].append(len(maps))
        return real_spill(self, maps)

    def hook(self, where, side, start, stop):
        inner = real_hook(self, where, side, start, stop)

        def h(module, args, output):
            inner(module, args, output)
            seen["kept"].append((self.sink is None, len(self.store)))  # the LLM's recorder keeps nothing
        return h

    monkeypatch.setattr(tf, "accumulate", acc)
    monkeypatch.setattr(tc.Recorder, "_hook", hook)
    monkeypatch.setattr(Moments, "_add", add)
    monkeypatch.setattr(MapStore, "spill", spill)
    transfer(ad, llm, str(tmp_path / "default"), **kw)
    assert seen["windows"] == [(j, j + 1) for j in range(4)]
    assert seen["stored"] == [{0}, {1}, {2}, {3}]  # a window's moments are one layer's
    assert seen["rows"] and max(seen["rows"]) <= 5 and sum(seen["rows"]) > 5 * len(seen["windows"])
    assert seen["spilled"] and set(seen["spilled"]) == {1}
    assert {n for slm, n in seen["kept"] if not slm} == {0} and any(n for slm, n in seen["kept"] if slm)
    for f in ("adapter_model.safetensors", "projections.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / f)), load_file(str(tmp_path / "default" / f))
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)  # the chunks change only the rounding


FREED_BLOCK = """
import sys, torch
from surgery.pipelines.transfer.memory import map_large_allocations, rss_bytes
if sys.argv[1] == "map" and not map_large_allocations():
    print("no-glibc"); raise SystemExit
a = torch.ones(6 << 20)  # 24 MB: glibc maps it; freeing it raises its dynamic threshold to 24 MB
del a
before = rss_bytes()
b = torch.ones(5 << 20)  # 20 MB: under the raised threshold it comes from the heap
c = torch.ones(1024)  # a small block after it keeps b off the top of the heap, which trim() could return
del b
print((rss_bytes() - before) / 2**20)
"""


def test_freed_tensors_leave_the_process():
    """transfer maps every large block (memory.map_large_allocations), so a freed tensor's pages leave RSS
    and the cost model bounds the peak; under glibc's dynamic threshold the same 20 MB stay resident."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FREED_BLOCK, "map"], capture_output=True, text=True, check=True)
    mapped = out.stdout.strip()  # (without the call, glibc 2.36 keeps ~20 MB)
    if mapped == "no-glibc":
        pytest.skip("not glibc: nothing to set")
    assert float(mapped) < 4, f"{mapped} MB of a freed 20 MB tensor still resident"
