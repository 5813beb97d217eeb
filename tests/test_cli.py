"""The CLI: fast help, inspect on every fixture, one-line errors."""

import json
import os
import subprocess
import sys
import time

import pytest

from .conftest import FAMILY_NAMES, MORE_FAMILIES, run_cli


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys,time; t=time.time(); sys.argv=['surgery','--help']\n"
            "from surgery.cli import main\n"
            "try: main()\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import at start-up'\n"
            "print('ELAPSED', time.time()-t)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "inspect" in r.stdout
    elapsed = float(r.stdout.rsplit("ELAPSED", 1)[1])
    assert elapsed < 1.0


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
