"""Hostile and broken inputs (issue 13): each gets one line naming what and where, never a traceback,
never a read outside the checkpoint, never the file's bytes in a message, never a partial output."""

import json
import os
import shutil
import struct

import pytest

from surgery.errors import CheckpointError, DataError
from surgery.io.checkpoint import Checkpoint
from surgery.io.safetensors_file import read_header

from .conftest import run_cli

SECRET = "root:x:0:0:do-not-echo-me"  # content of a file outside the checkpoint; must never be printed


def one_line_error(code, err, *needles):
    assert code != 0, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.count("\n") == 1 and err.startswith("surgery: error:"), err
    for n in needles:
        assert n in err, (n, err)


# ---- safetensors headers: the same verdict as the safetensors library ----------------------------
def _craft(header=None, data=b"", raw=None):
    blob = raw if raw is not None else json.dumps(header).encode()
    if raw is None:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def _t(dtype, shape, offs):
    return {"dtype": dtype, "shape": shape, "data_offsets": offs}


HEADERS = {
    "ok": _craft({"a": _t("F32", [2], [0, 8])}, b"\0" * 8),
    "empty": _craft({}),
    "metadata": _craft({"__metadata__": {"format": "pt"}}),
    "metadata_null": _craft({"__metadata__": None}),
    "metadata_not_strings": _craft({"__metadata__": {"x": 1}}),
    "metadata_is_tensor": _craft({"__metadata__": _t("U8", [1], [0, 1])}, b"\0"),
    "scalar": _craft({"a": _t("F32", [], [0, 4])}, b"\0" * 4),
    "U16": _craft({"a": _t("U16", [2], [0, 4])}, b"\0" * 4),
    "U32": _craft({"a": _t("U32", [2], [0, 8])}, b"\0" * 8),
    "U64": _craft({"a": _t("U64", [1], [0, 8])}, b"\0" * 8),
    "F8_E4M3": _craft({"a": _t("F8_E4M3", [2], [0, 2])}, b"\0" * 2),
    "F8_E8M0": _craft({"a": _t("F8_E8M0", [2], [0, 2])}, b"\0" * 2),
    "F4": _craft({"a": _t("F4", [2], [0, 1])}, b"\0"),
    "F4_half_byte": _craft({"a": _t("F4", [3], [0, 2])}, b"\0" * 2),
    "F6": _craft({"a": _t("F6_E2M3", [4], [0, 3])}, b"\0" * 3),
    "C64": _craft({"a": _t("C64", [1], [0, 8])}, b"\0" * 8),
    "unknown_dtype": _craft({"a": _t("Q7", [1], [0, 1])}, b"\0"),
    "negative_offset": _craft({"a": _t("U8", [1], [-1, 0])}, b"\0"),
    "reversed_offsets": _craft({"a": _t("U8", [0], [1, 0])}, b"\0"),
    "three_offsets": _craft({"a": _t("U8", [1], [0, 1, 2])}, b"\0"),
    "string_offsets": _craft({"a": _t("U8", [1], ["0", "1"])}, b"\0"),
    "offset_past_u64": _craft({"a": _t("U8", [1], [0, 2**64])}, b"\0"),
    "overlap": _craft({"a": _t("U8", [2], [0, 2]), "b": _t("U8", [2], [1, 3])}, b"\0" * 3),
    "gap": _craft({"a": _t("U8", [1], [0, 1]), "b": _t("U8", [1], [2, 3])}, b"\0" * 3),
    "trailing_bytes": _craft({"a": _t("U8", [1], [0, 1])}, b"\0" * 2),
    "truncated": _craft({"a": _t("U8", [2], [0, 2])}, b"\0"),
    "4TB_tensor": _craft({"a": _t("F32", [2**40], [0, 4 * 2**40])}, b"\0" * 8),
    "size_mismatch": _craft({"a": _t("F32", [3], [0, 8])}, b"\0" * 8),
    "negative_shape": _craft({"a": _t("U8", [-1], [0, 0])}),
    "float_shape": _craft({"a": _t("U8", [1.0], [0, 1])}, b"\0"),
    "bool_shape": _craft({"a": _t("U8", [True], [0, 1])}, b"\0"),
    "shape_past_u64": _craft({"a": _t("U8", [2**64], [0, 1])}, b"\0"),
    "shape_overflow": _craft({"a": _t("U8", [2**32, 2**32], [0, 0])}),
    "shape_overflow_then_zero": _craft({"a": _t("U8", [2**32, 2**32, 0], [0, 0])}),
    "missing_shape": _craft({"a": {"dtype": "U8", "data_offsets": [0, 1]}}, b"\0"),
    "extra_field": _craft({"a": {**_t("U8", [1], [0, 1]), "x": 1}}, b"\0"),
    "entry_not_object": _craft({"a": 5}),
    "header_is_array": _craft(raw=b"[]      "),
    "leading_whitespace": _craft(raw=b"  {}    "),
    "nul_padding": _craft(raw=b"{}\0\0\0\0\0\0"),
    "not_utf8": _craft(raw=b'{"\xff":1}'),
    "no_header": b"\x01\x02",
    "header_length_huge": struct.pack("<Q", 2**63) + b"{}",
    "zero_size_tensors_share_offset": _craft({"a": _t("U8", [0], [0, 0]), "b": _t("U8", [0], [0, 0])}),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_header_verdict_matches_the_safetensors_library(tmp_path, case):
    from safetensors import safe_open

    path = tmp_path / "x.safetensors"
    path.write_bytes(HEADERS[case])
    try:
        with safe_open(str(path), "pt") as f:
            lib_keys = sorted(f.keys())
        lib_ok = True
    except Exception:  # noqa: BLE001 - the library raises SafetensorError / others
        lib_ok = False
    try:
        infos, _, _ = read_header(str(path))
        ours_ok = True
    except CheckpointError as e:
        ours_ok = False
        assert str(path) in str(e) and "\xff" not in str(e)
    assert ours_ok == lib_ok, case
    if ours_ok:
        assert sorted(infos) == lib_keys


def test_unsigned_and_fp8_tensors_read_back_like_safetensors(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {"u16": torch.arange(5).to(torch.uint16), "u32": torch.arange(6).to(torch.uint32),
               "u64": torch.arange(7).to(torch.uint64),
               "f8": torch.linspace(-2, 2, 8).to(torch.float8_e4m3fn)}
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path)
    from surgery.io.safetensors_file import read_tensor

    infos, _, _ = read_header(path)
    ref = load_file(path)
    for k, info in infos.items():
        t = read_tensor(info)
        assert t.dtype == ref[k].dtype and torch.equal(t.view(torch.uint8), ref[k].view(torch.uint8)), k


def test_a_4tb_header_is_refused_before_any_output(fx, tmp_path):
    ck = _model_dir(fx, tmp_path)
    (ck / "model.safetensors").write_bytes(HEADERS["4TB_tensor"])
    code, _, err = run_cli("merge-lora", ck, fx.lora("llama"), "-o", tmp_path / "out")
    one_line_error(code, err, "model.safetensors", "cover")
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# ---- index containment ------------------------------------------------------------------------
def _model_dir(fx, tmp_path, sharded=False, name="ck"):
    src = fx.model("llama", max_shard_size="60KB") if sharded else fx.model("llama")
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _rewrite_index(ck, fn, index="model.safetensors.index.json"):
    idx = json.loads((ck / index).read_text())
    fn(idx["weight_map"])
    (ck / index).write_text(json.dumps(idx))


@pytest.fixture()
def secret_file(tmp_path):
    p = tmp_path / "outside" / "passwd"
    p.parent.mkdir()
    p.write_text(SECRET + "\n")
    return p


@pytest.mark.parametrize("how", ["dotdot", "absolute", "subdir", "symlink_out", "fifo", "directory", "not_string"])
def test_index_entries_must_stay_inside_the_checkpoint(fx, tmp_path, secret_file, how):
    ck = _model_dir(fx, tmp_path, sharded=True)
    other = _model_dir(fx, tmp_path, sharded=True, name="other")
    first = sorted(set(json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"].values()))[0]
    target = {"dotdot": f"../other/{first}", "absolute": str(secret_file), "subdir": f"sub/{first}",
              "symlink_out": first, "fifo": first, "directory": first, "not_string": 7}[how]
    if how == "symlink_out":
        os.unlink(ck / first)
        os.symlink(other / first, ck / first)
    elif how == "fifo":
        os.unlink(ck / first)
        os.mkfifo(ck / first)
    elif how == "directory":
        os.unlink(ck / first)
        os.mkdir(ck / first)
    _rewrite_index(ck, lambda w: w.update({k: target for k, v in w.items() if v == first}))
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(str(ck))
    assert "model.safetensors.index.json" in str(e.value)
    assert (repr(target) in str(e.value)) or how == "not_string"
    for cmd in (["inspect", ck], ["merge-lora", ck, fx.lora("llama"), "-o", tmp_path / "out"]):
        code, out, err = run_cli(*cmd)
        one_line_error(code, err)
        assert SECRET not in err + out and not (tmp_path / "out").exists()


def test_bin_index_naming_a_system_file_never_echoes_it(fx, tmp_path, secret_file):
    ck = tmp_path / "bin"
    ck.mkdir()
    shutil.copy(os.path.join(fx.model("llama"), "config.json"), ck)
    (ck / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": str(secret_file)}}))
    code, out, err = run_cli("inspect", ck)
    one_line_error(code, err, "pytorch_model.bin.index.json", repr(str(secret_file)))
    assert SECRET not in out + err
    # a non-pickle named correctly: torch's "invalid load key" would quote the file's bytes
    shutil.copy(secret_file, ck / "pytorch_model-00001.bin")
    (ck / "pytorch_model.bin.index.json").unlink()
    os.rename(ck / "pytorch_model-00001.bin", ck / "pytorch_model.bin")
    code, out, err = run_cli("inspect", ck)
    one_line_error(code, err, "pytorch_model.bin")
    assert "do-not-echo" not in out + err and "root:x" not in out + err


def test_huggingface_cache_symlinks_into_blobs_are_followed(fx, tmp_path):
    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in os.listdir(fx.model("llama")):
        shutil.copy(os.path.join(fx.model("llama"), f), blobs / f"h-{f}")
        os.symlink(f"../../blobs/h-{f}", snap / f)
    ck = Checkpoint.open(str(snap))
    assert ck.keys() and ck.read(ck.keys()[0]).numel() > 0


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_blocked_pickle_is_one_line(fx, tmp_path, writer):
    import pickle

    import torch

    ck = tmp_path / "pkl"
    ck.mkdir()
    shutil.copy(os.path.join(fx.model("llama"), "config.json"), ck)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(ck / "pytorch_model.bin", "wb") as f:
        (torch.save if writer == "torch.save" else pickle.dump)({"w": Evil()}, f)
    code, _, err = run_cli("inspect", ck)
    one_line_error(code, err, "needs code execution", "convert it to safetensors")
    assert "weights_only" not in err and not (tmp_path / "pwned").exists()


# ---- user JSON --------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\"text\"", b"\xff\xfe{}"])
def test_malformed_config_and_index_are_one_line(fx, tmp_path, content):
    for name in ("config.json", "model.safetensors.index.json"):
        ck = _model_dir(fx, tmp_path, sharded=True, name=f"ck-{name}")
        (ck / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        code, _, err = run_cli("inspect", ck)
        one_line_error(code, err, name)


def test_malformed_bridge_json_is_one_line(fx, tmp_path):
    bridge = tmp_path / "bridge"
    bridge.mkdir()
    for content in ("{oops", "[]"):
        (bridge / "bridge.json").write_text(content)
        code, _, err = run_cli("tune-bridge", "--adapter", fx.lora("llama"), "--bridge", bridge,
                               "--data", tmp_path / "d.jsonl", "-o", tmp_path / "o")
        one_line_error(code, err, "bridge.json")


def test_json_is_written_without_nan(tmp_path):
    from surgery.errors import NumericsError
    from surgery.io.writer import OutputDir

    od = OutputDir(str(tmp_path / "o"))
    with pytest.raises(NumericsError, match=r"bridge.json would hold NaN or infinity at kept.reduction"):
        od.write_json("bridge.json", {"kept": {"reduction": float("nan")}})
    assert not os.path.exists(od.path("bridge.json"))
    od.abort()


# ---- --data files: one reader ------------------------------------------------------------------
TRICKY = '  leading spaces stay\n\n   \nthe end\twith a tab  \r\n{"text": "not JSON in a .txt"}\n'


def test_prune_bridge_and_transfer_read_the_same_documents(fx, tmp_path, monkeypatch):
    """Both commands' calibration readers, spied on while the real commands run, see the same list."""
    import surgery.pipelines.calibration as calibration
    import surgery.pipelines.transfer.fit as transfer_fit
    from surgery.io.data import documents

    seen = {}

    def spy(name, real):
        def f(path, *a, **kw):
            seen[name] = real(path, *a, **kw)
            return seen[name]
        return f

    for suffix, text in ((".txt", TRICKY * 3),
                         (".jsonl", '{"text": " a b "}\n{"prompt": "the cat is", "completion": " red"}\n' * 3)):
        data = tmp_path / f"calib{suffix}"
        data.write_text(text)
        monkeypatch.setattr(calibration, "documents", spy("prune", calibration.documents))
        monkeypatch.setattr(transfer_fit, "documents", spy("transfer", transfer_fit.documents))
        code, _, err = run_cli("prune-bridge", fx.model("llama"), "-o", tmp_path / f"b{suffix}", "--data", data,
                               "--samples", "2", "--seq-len", "8")
        assert code == 0, err
        code, _, err = run_cli("transfer", "--slm", fx.lora("llama"), "--llm", fx.model("llama"),
                               "-o", tmp_path / f"t{suffix}", "--data", data, "--samples", "100")
        assert code == 0, err
        assert seen["prune"] == seen["transfer"] == documents(str(data))
    assert documents(str(tmp_path / "calib.txt"))[:3] == ["  leading spaces stay", "the end\twith a tab  ",
                                                          '{"text": "not JSON in a .txt"}']
    assert documents(str(tmp_path / "calib.jsonl"))[:2] == [" a b ", "the cat is red"]


@pytest.mark.parametrize("bad, message", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "d.jsonl:2: not UTF-8"),
    (b'{"text": "ok"}\n{"text": 5}\n', "d.jsonl:2: \"text\" is a number, not a string"),
    (b'{"prompt": "a", "completion": null}\n', "d.jsonl:1: \"completion\" is a null, not a string"),
    (b'{"text": "ok"}\n[1]\n', "d.jsonl:2: a JSON array, not an object"),
])
@pytest.mark.parametrize("command", ["transfer", "train", "eval", "prune-bridge"])
def test_bad_data_is_one_line_naming_file_and_line(fx, tmp_path, bad, message, command):
    data = tmp_path / "d.jsonl"
    data.write_bytes(bad)
    args = {"transfer": ["transfer", "--slm", fx.lora("llama"), "--llm", fx.model("llama"), "--data", data],
            "train": ["train", fx.model("llama"), "--data", data],
            "eval": ["eval", fx.model("llama"), "--data", data],
            "prune-bridge": ["prune-bridge", fx.model("llama"), "--data", data]}[command]
    out = [] if command == "eval" else ["-o", tmp_path / "o"]
    code, _, err = run_cli(*args, *out)
    one_line_error(code, err, message)
    assert not (tmp_path / "o").exists()


def test_data_that_is_not_a_regular_file(tmp_path):
    from surgery.io.data import documents

    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(DataError, match="not a regular file"):
        documents(str(tmp_path / "fifo.txt"))
    with pytest.raises(DataError, match="does not exist"):
        documents(str(tmp_path / "nope.txt"))


# ---- tokenizer ids beyond the model's vocabulary ------------------------------------------------
def _with_added_token(fx, tmp_path, as_eos=False):
    """The llama fixture whose tokenizer knows one token more than the model has embeddings."""
    from transformers import AutoTokenizer

    ck = _model_dir(fx, tmp_path, name="addtok")
    tok = AutoTokenizer.from_pretrained(ck)
    vocab = json.loads((ck / "config.json").read_text())["vocab_size"]
    assert len(tok) == vocab
    tok.add_special_tokens({"eos_token": "<|endoftext|>"} if as_eos else {"additional_special_tokens": ["<|endoftext|>"]})
    tok.save_pretrained(ck)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == vocab
    return ck


@pytest.mark.parametrize("command", ["prune-bridge", "train", "eval"])
def test_token_ids_outside_the_vocabulary_are_named(fx, tmp_path, command):
    ck = _with_added_token(fx, tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat <|endoftext|> sat on the mat"}\n' * 4)
    args = {"prune-bridge": ["prune-bridge", ck, "-o", tmp_path / "o"], "train": ["train", ck, "-o", tmp_path / "o"],
            "eval": ["eval", ck]}[command]
    code, _, err = run_cli(*args, "--data", data)
    one_line_error(code, err, "'<|endoftext|>'", "vocab_size", "d.jsonl")


def test_an_eos_outside_the_vocabulary_is_refused_when_the_tokenizer_loads(fx, tmp_path):
    ck = _with_added_token(fx, tmp_path, as_eos=True)
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat\n" * 4)
    code, _, err = run_cli("prune-bridge", ck, "-o", tmp_path / "o", "--data", data)
    one_line_error(code, err, "eos token '<|endoftext|>'", "vocab_size")


def test_missing_tokenizer_is_one_checkpoint_error(fx, tmp_path):
    from surgery.io.tokenizer import load_tokenizer

    ck = _model_dir(fx, tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (ck / f).exists():
            (ck / f).unlink()
    with pytest.raises(CheckpointError, match="has no usable tokenizer"):
        load_tokenizer(str(ck))


# ---- output paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("where", ["empty", "dot", "cwd", "parent_of_cwd", "root", "parent_of_input"])
def test_outputs_that_would_delete_what_you_work_in_are_refused(fx, tmp_path, monkeypatch, where, force):
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("precious")
    monkeypatch.chdir(work)
    base = _model_dir(fx, tmp_path / "work", name="base")
    out = {"empty": "", "dot": ".", "cwd": str(work), "parent_of_cwd": str(work.parent), "root": "/",
           "parent_of_input": str(base.parent)}[where]
    code, _, err = run_cli("merge-lora", base, fx.lora("llama"), "-o", out, *(["--force"] if force else []))
    one_line_error(code, err)
    assert (work / "keep.txt").read_text() == "precious" and (base / "config.json").exists()


def test_force_over_a_file_or_symlink_leaves_nothing_behind(fx, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "x").write_text("untouched")
    for kind in ("file", "symlink", "directory"):
        out = tmp_path / f"out-{kind}"
        if kind == "file":
            out.write_text("old")
        elif kind == "symlink":
            os.symlink(target, out)
        else:
            out.mkdir()
            (out / "stale").write_text("old")
        code, _, err = run_cli("merge-lora", fx.model("llama"), fx.lora("llama"), "-o", out, "--force")
        assert code == 0, err
        assert out.is_dir() and not out.is_symlink() and (out / "config.json").exists() and not (out / "stale").exists()
    assert (target / "x").read_text() == "untouched"  # --force replaced the link, not what it points to
    assert sorted(p for p in os.listdir(tmp_path) if "tmp" in p or "old" in p) == []


def test_concurrent_force_writers_never_fail(tmp_path):
    """4 writers x 15 commits to one output: every commit succeeds, the survivor is whole, no leftovers."""
    from concurrent.futures import ThreadPoolExecutor

    from surgery.io.writer import OutputDir

    out = str(tmp_path / "out")

    def writer(w):
        for i in range(15):
            od = OutputDir(out, force=True)
            for n in range(3):
                with open(od.path(f"f{n}"), "w") as f:
                    f.write(f"{w}-{i}")
            od.commit()
        return w

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(writer, range(4))) == [0, 1, 2, 3]
    contents = {open(os.path.join(out, f"f{n}")).read() for n in range(3)}
    assert len(contents) == 1  # one writer's complete output, not a mixture
    assert os.listdir(tmp_path) == ["out"]


def test_outputs_get_the_users_umask(fx, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, err = run_cli("merge-lora", fx.model("llama"), fx.lora("llama"), "-o", tmp_path / "a")
        assert code == 0, err
        assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
        os.umask(0o027)
        code, _, err = run_cli("merge-lora", fx.model("llama"), fx.lora("llama"), "-o", tmp_path / "b")
        assert (tmp_path / "b").stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


def test_a_250_character_output_name_works(fx, tmp_path):
    out = tmp_path / ("m" * 250)
    code, _, err = run_cli("merge-lora", fx.model("llama"), fx.lora("llama"), "-o", out)
    assert code == 0, err
    assert (out / "model.safetensors").exists() and os.listdir(tmp_path) == [out.name]


# ---- signals and temps left by killed runs ------------------------------------------------------
# Real `surgery merge-lora` runs, each its own process with its own pid, forked from one parent that has
# imported torch and surgery once (four fresh interpreters cost ~2 s of CPU each just for that). A run is
# held once its first tensor is in the output's temp: its main thread waits, before reading the next
# tensor, for the test's signal, whose handler raises out of the wait, so the signal lands mid-write
# every time, with no race against the merge finishing. (Holding the helper thread that writes would
# hold the exit too: the unwinding waits for the write in flight.) The parent reports each run's pid,
# "writing PID" once it is held, and "exit PID CODE" when it ends; a run's stderr goes to its own file.
HELD_MERGES = """
import os, sys, threading, time
import safetensors.torch, torch
import surgery.cli, surgery.pipelines.merge
import surgery.io.checkpoint as c
import surgery.io.writer as w
first = threading.Event()
write, read = w.ShardedWriter.write, c.Checkpoint.read
def wrote(self, *a, **k):
    write(self, *a, **k)
    if not first.is_set():
        first.set()
        os.write(1, f"writing {os.getpid()}\\n".encode())  # one write: the runs share this pipe
def held(self, *a, **k):
    if first.is_set():
        time.sleep(120)
    return read(self, *a, **k)
w.ShardedWriter.write, c.Checkpoint.read = wrote, held
for line in sys.stdin:
    if line.strip() == "wait":
        pid, status = os.wait()
        print("exit", pid, os.waitstatus_to_exitcode(status), flush=True)
        continue
    err, *args = line.split()
    pid = os.fork()
    if pid:
        print("run", pid, flush=True)
        continue
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    sys.argv, code = ["surgery", *args], 0
    try:
        surgery.cli.main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
"""
HELD = ("SIGINT", "SIGTERM", "SIGHUP", "SIGKILL")


class HeldRuns:
    def __init__(self, proc):
        self.proc = proc

    def say(self, line: str) -> list[str]:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().split()

    def end(self, pid: int, sig) -> int:
        """Send `sig` to run `pid` and return its exit code (-N when killed by signal N)."""
        os.kill(pid, sig)
        _, got, code = self.say("wait")
        assert int(got) == pid
        return int(code)


@pytest.fixture(scope="module")
def held_merges(fx, tmp_path_factory):
    """{signal name: (pid of a held merge-lora run writing DIR/out, DIR, its stderr file)}, one per test."""
    import subprocess
    import sys

    logs = tmp_path_factory.mktemp("stderr")
    proc = subprocess.Popen([sys.executable, "-c", HELD_MERGES], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "SURGERY_DEBUG": "0"})
    runs, held = HeldRuns(proc), {}
    try:
        for sig in HELD:
            d = tmp_path_factory.mktemp(sig.lower())
            word, pid = runs.say(f"{logs / sig} merge-lora {fx.model('llama')} {fx.lora('llama')} -o {d / 'out'}")
            assert word == "run", word
            held[int(pid)] = (sig, d)
        for _ in HELD:
            word, pid = proc.stdout.readline().split()
            assert word == "writing" and int(pid) in held, (word, pid, [p.read_text() for p in logs.iterdir()])
            sig, d = held[int(pid)]
            assert [n for n in os.listdir(d) if n.startswith(f".out.tmp-{pid}-")]  # the temp names its owner
        yield runs, {sig: (pid, d, logs / sig) for pid, (sig, d) in held.items()}
    finally:
        for pid in held:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_signals_all_take_the_abort_path(held_merges, sig):
    import signal

    runs, held = held_merges
    pid, d, err = held[sig]
    assert runs.end(pid, getattr(signal, sig)) == 128 + getattr(signal, sig)
    assert err.read_text() == f"surgery: interrupted ({sig}); no output was written\n"
    assert os.listdir(d) == []


def test_a_killed_runs_temp_is_removed_by_the_next_run(fx, held_merges):
    import signal

    runs, held = held_merges
    pid, d, _ = held["SIGKILL"]
    assert runs.end(pid, signal.SIGKILL) == -signal.SIGKILL
    (left,) = os.listdir(d)
    assert left.startswith(f".out.tmp-{pid}-")
    code, _, err = run_cli("merge-lora", fx.model("llama"), fx.lora("llama"), "-o", d / "out")
    assert code == 0 and f"removed {d / left}, left by an interrupted run (process {pid})" in err
    assert os.listdir(d) == ["out"]


# ---- one line instead of "internal error" --------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_reduction_must_be_a_number_at_least_one(fx, tmp_path, value):
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat\n" * 8)
    code, _, err = run_cli("prune-bridge", fx.model("llama"), "-o", tmp_path / "o", "--data", data, "--reduction", value)
    one_line_error(code, err, f"--reduction {float(value)}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["1.2.3", "-5GB", "0", "5XB", ""])
def test_bad_max_shard_size_is_one_line(fx, tmp_path, value):
    code, _, err = run_cli("merge-lora", fx.model("llama"), fx.lora("llama"), "-o", tmp_path / "o",
                           "--max-shard-size", value)
    one_line_error(code, err, "cannot read size")
    assert not (tmp_path / "o").exists()


def test_a_full_disk_is_one_line_and_leaves_no_temp(fx, tmp_path, monkeypatch):
    import errno

    import surgery.io.safetensors_file as st

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", self.path)

    monkeypatch.setattr(st.SafetensorsWriter, "write", full)
    code, _, err = run_cli("merge-lora", fx.model("llama"), fx.lora("llama"), "-o", tmp_path / "o")
    one_line_error(code, err, "no space left on the device", "model.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("out", ["/proc/x", "/proc/self/nope/x"])
def test_an_output_whose_parent_cannot_be_created(fx, out):
    code, _, err = run_cli("merge-lora", fx.model("llama"), fx.lora("llama"), "-o", out)
    one_line_error(code, err, f"cannot create the output {out}")


@pytest.mark.parametrize("kind", ["peft", "adapterhub"])
def test_adapter_weights_blocked_pickle_symlink_and_garbage_are_one_line(fx, tmp_path, secret_file, kind):
    import torch

    from fixtures import build_bottleneck

    if kind == "peft":
        src, weights, cmd = fx.lora("llama"), "adapter_model.safetensors", "merge-lora"
    else:
        src = str(tmp_path / "hub-src")
        build_bottleneck(fx.model("llama"), src)
        weights, cmd = next(f for f in os.listdir(src) if f.startswith("pytorch_adapter") or f.endswith(".safetensors")), "eval"
    ad = tmp_path / "ad"
    shutil.copytree(src, ad)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bin_name = "adapter_model.bin" if kind == "peft" else "pytorch_adapter.bin"
    for setup, needle in (("pickle", "needs code execution"), ("symlink", "outside"), ("garbage", "cannot read")):
        for f in os.listdir(ad):
            if f in (weights, bin_name):
                os.unlink(ad / f)
        if setup == "pickle":
            torch.save({"w": Evil()}, ad / bin_name)
        elif setup == "symlink":
            os.symlink(secret_file, ad / weights)
        else:
            (ad / bin_name).write_text(SECRET)
        args = [cmd, fx.model("llama"), ad, "-o", tmp_path / "o"] if cmd == "merge-lora" else \
            ["eval", fx.model("llama"), "--adapter", ad, "--data", tmp_path / "d.txt"]
        (tmp_path / "d.txt").write_text("the cat sat\n")
        code, out, err = run_cli(*args)
        one_line_error(code, err, needle)
        assert "do-not-echo" not in out + err and not (tmp_path / "pwned").exists()
