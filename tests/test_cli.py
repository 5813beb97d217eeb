"""The CLI: fast help, inspect on every fixture, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import FAMILY_NAMES, MORE_FAMILIES, run_cli, run_fresh


def test_help_imports_no_heavy_library():
    """`surgery --help` (and each command's) stays fast by importing no torch/transformers/peft; measured
    by what is imported, not by a wall clock that a busy machine makes flaky."""
    out, heavy = run_fresh(
        "for argv in [['--help']] + [[c.name or c.callback.__name__, '--help'] for c in app.registered_commands]:\n"
        "    sys.argv = ['surgery', *argv]\n"
        "    try: main()\n"
        "    except SystemExit: pass")
    assert "inspect" in out and "--max-shard-size" in out  # the top-level and the commands' help ran
    assert heavy == []


@pytest.mark.parametrize("family", FAMILY_NAMES + MORE_FAMILIES)
def test_inspect_every_fixture(fx, family):
    code, out, err = run_cli("inspect", fx.model(family), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["family"] == family and info["missing"] == [] and info["unexpected"] == []
    assert info["parameters"] > 0 and info["hidden"] == 64
    code, out, _ = run_cli("inspect", fx.model(family))
    assert code == 0 and "hidden" in out


def test_inspect_adapter(fx):
    code, out, _ = run_cli("inspect", fx.lora("llama", targets=["q_proj", "v_proj"], name="i"), "--json")
    info = json.loads(out)
    assert info["peft_type"] == "LORA" and info["r"] == 4 and info["module_types"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert info["layers"] == [0, 1]


def test_errors_are_one_line_without_traceback(tmp_path):
    code, out, err = run_cli("inspect", tmp_path / "missing")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("surgery: error:") and "does not exist" in err
    assert "Traceback" not in err


def test_debug_shows_traceback(tmp_path):
    env = dict(os.environ, SURGERY_DEBUG="1")
    r = subprocess.run([sys.executable, "-m", "surgery", "inspect", str(tmp_path / "missing")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr
