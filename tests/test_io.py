"""Checkpoint reading and the streaming writer: byte-exact round trips and refusals."""

import json
import os

import pytest
import torch

from surgery.errors import CheckpointError, NumericsError, OutputError
from surgery.io.checkpoint import Checkpoint
from surgery.io.writer import OutputDir, ShardedWriter, parse_size
from surgery.pipelines.stream import copy_checkpoint

from .conftest import FAMILY_NAMES


def tensors_equal_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("shard", [None, "60KB"])
def test_round_trip_byte_exact(fx, tmp_path, family, shard):
    src = fx.model(family, dtype="bfloat16")
    dst = tmp_path / "copy"
    copy_checkpoint(src, str(dst), max_shard_size=shard or "5GB")
    a, b = Checkpoint.open(src), Checkpoint.open(str(dst))
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        assert tensors_equal_bytes(a.read(k), b.read(k)), k
    if shard:
        idx = json.load(open(dst / "model.safetensors.index.json"))
        assert len(set(idx["weight_map"].values())) > 1
        assert idx["metadata"]["total_size"] == sum(b.nbytes(k) for k in b.keys())
        for f in set(idx["weight_map"].values()):
            assert os.path.getsize(dst / f) < 60_000 + 70_000  # one oversize tensor may get its own shard
    assert "tokenizer.json" in os.listdir(dst)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_copied_checkpoint_loads_in_transformers_identically(fx, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    src = fx.model(family)
    dst = str(tmp_path / "copy")
    copy_checkpoint(src, dst, max_shard_size="100KB")
    cls = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    m1 = cls.from_pretrained(src)
    m2, info = cls.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    kw = {"decoder_input_ids": ids} if family == "t5" else {}
    assert torch.equal(m1(ids, **kw).logits, m2(ids, **kw).logits)


def test_reads_transformers_sharded_and_bin(fx, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fx.model("llama"))
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    ck = Checkpoint.open(str(sharded))
    assert len(ck.shards) > 1
    sd = model.state_dict()
    for k in ck.keys():
        assert torch.equal(ck.read(k), sd[k])
    binned = tmp_path / "bin"
    binned.mkdir()
    (binned / "config.json").write_text((sharded / "config.json").read_text())
    torch.save({k: v.clone() for k, v in sd.items()}, binned / "pytorch_model.bin")
    ck2 = Checkpoint.open(str(binned))
    assert not ck2.is_safetensors
    for k in ck2.keys():
        assert torch.equal(ck2.read(k), sd[k])


def test_truncated_shard_is_named(fx, tmp_path):
    dst = tmp_path / "trunc"
    copy_checkpoint(fx.model("gpt2"), str(dst))
    f = dst / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(str(dst))


def test_missing_dir_and_adapter_as_model(fx, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="adapter directory, not a model"):
        Checkpoint.open(fx.lora("llama"))


def test_output_rules(fx, tmp_path):
    src = fx.model("llama")
    with pytest.raises(OutputError, match="overlaps input"):
        copy_checkpoint(src, src, force=True)
    with pytest.raises(OutputError, match="overlaps input"):
        copy_checkpoint(src, os.path.join(src, "sub"), force=True)
    dst = tmp_path / "out"
    copy_checkpoint(src, str(dst))
    with pytest.raises(OutputError, match="--force"):
        copy_checkpoint(src, str(dst))
    copy_checkpoint(src, str(dst), force=True)
    assert Checkpoint.open(str(dst)).keys()


def test_failure_leaves_no_partial_output(tmp_path):
    out = tmp_path / "o"
    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]
    with pytest.raises(NumericsError, match="b has 1 NaN"):
        with OutputDir(str(out)) as od:
            w = ShardedWriter(od, specs)
            w.write("a", torch.ones(2))
            w.write("b", torch.tensor([1.0, float("nan")]))
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".o")]  # temp dir removed


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("300MB") == 3 * 10**8 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(OutputError, match="5GB"):
        parse_size("lots")
