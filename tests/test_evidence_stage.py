"""benchmarks/evidence/stage.py's cache: a stage record is reused only while its command line, the code
that runs and builds it, and the content of its inputs are unchanged (a changed default or a changed
upstream output must re-run it, never silently reuse a stale record)."""

import json
import os

import pytest

from benchmarks.evidence import stage
from benchmarks.evidence.stage import StageFailed, run_stage, stage_key


def _root(tmp_path):
    root = tmp_path / "repo"
    for rel in stage.CODE:
        path = root / (rel if rel.endswith(".py") else os.path.join(rel, "__init__.py"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    (root / "data.jsonl").write_text('{"text": "a"}\n')
    (root / "adapter").mkdir()
    (root / "adapter" / "w.bin").write_bytes(b"\0\1")
    return root


def test_key_follows_command_line_code_and_input_contents_but_not_the_output(tmp_path):
    root = _root(tmp_path)
    r = str(root)
    args = ["tune-bridge", "--adapter", f"{r}/adapter", "--data", f"{r}/data.jsonl", "-o", f"{r}/out", "--lr", "0.003"]
    key = stage_key(args, r)
    assert stage_key(args, r) == key
    assert stage_key(args[:-1] + ["0.001"], r) != key  # a changed setting
    os.makedirs(f"{r}/out")
    with open(f"{r}/out/result.bin", "wb") as f:
        f.write(b"written by the stage itself")
    assert stage_key(args, r) == key  # the stage's own output is not an input
    (root / "adapter" / "w.bin").write_bytes(b"\0\2")  # an upstream stage re-ran and wrote another adapter
    changed_input = stage_key(args, r)
    assert changed_input != key
    stage.code_hash.cache_clear()
    (root / "surgery" / "__init__.py").write_text("x = 2  # a changed default\n")
    assert stage_key(args, r) != changed_input
    stage.code_hash.cache_clear()


def test_key_does_not_depend_on_where_the_checkout_lives(tmp_path):
    a, b = _root(tmp_path / "a"), _root(tmp_path / "b")
    key = lambda root: stage_key(["eval", f"{root}/adapter", "--data", f"{root}/data.jsonl"], str(root))  # noqa: E731
    assert key(a) == key(b)
    stage.code_hash.cache_clear()


def test_a_record_is_reused_only_while_its_key_matches(tmp_path):
    rec_path = tmp_path / "stages" / "x.json"
    rec_path.parent.mkdir()
    args = ["no-such-command", "--seed", "0"]  # fails fast if it is ever run
    rec = {"cmd": "surgery " + " ".join(args), "out": {"accuracy": 0.5}, "rss_mb": 1.0, "seconds": 1.0, "key": stage_key(args)}
    rec_path.write_text(json.dumps(rec))
    assert run_stage(str(rec_path), args, log=lambda *a: None) == rec
    logged = []
    rec_path.write_text(json.dumps({**rec, "key": "made by older code"}))
    with pytest.raises(StageFailed):
        run_stage(str(rec_path), args, log=logged.append)
    assert any("stale" in line for line in logged)
    without_key = {k: v for k, v in rec.items() if k != "key"}  # records from before keys existed
    rec_path.write_text(json.dumps(without_key))
    with pytest.raises(StageFailed):
        run_stage(str(rec_path), args, log=lambda *a: None)
