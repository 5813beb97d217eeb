"""What commands write on stderr: their own progress lines, and nothing leaked from the libraries
they call (transformers' loading bars, peft's warnings, FutureWarnings)."""

import json
import re
import subprocess
import sys

import pytest

from .conftest import run_cli
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)

# What transformers, peft and tqdm print when left alone
LEAKS = ("Loading weights", "Writing model shards", "Warning", "warnings.warn", "base_model_name_or_path", "it/s]")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from fixtures.corpus import documents

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(documents(16)) + "\n")
    return str(path)


# One fresh interpreter for all (importing torch, transformers and peft again costs seconds): the
# fixture builders, then each command, each one's stderr kept apart. Fresh, because pytest and
# conftest already silenced transformers and caught warnings in this one, which would hide exactly
# the leaks under test.
SCRIPT = """
import contextlib, io, json, sys
from surgery.cli import main
from fixtures import build_model, build_lora, build_bias_tuned
root, runs = sys.argv[1], json.loads(sys.argv[2])
errs = {}
with contextlib.redirect_stderr(io.StringIO()) as err:
    build_model("llama", root + "/m"); build_lora(root + "/m", root + "/l"); build_bias_tuned(root + "/m", root + "/b")
errs["fixtures"] = err.getvalue()
for name, argv in runs.items():
    sys.argv = ["surgery", *argv]
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main()
        except SystemExit as e:
            assert not e.code, err.getvalue()
    errs[name] = err.getvalue()
    assert json.loads(out.getvalue())["output"]
print(json.dumps(errs))
"""


def test_commands_and_fixtures_leak_nothing_from_libraries(fx, task, calib, tmp_path):
    import os

    from fixtures.bridge import build_bridge

    llama, lora = fx.model("llama"), fx.lora("llama", targets=["q_proj", "v_proj"], name="quiet")
    runs = {"transfer": ["transfer", "--slm", lora, "--llm", llama, "--data", calib, "--samples", "4", "--seq-len", "16",
                         "-o", str(tmp_path / "t"), "--json"],
            "tune-bridge": ["tune-bridge", "--adapter", lora, "--data", task[0], "--epochs", "0.25", "--max-length", "32",
                            "--bridge", build_bridge(llama, str(tmp_path / "bridge"), fraction=0.5, seed=3),
                            "-o", str(tmp_path / "tb"), "--json"]}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(runs)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "SURGERY_PROGRESS_SECONDS": "3600"})
    assert r.returncode == 0, r.stderr
    errs = json.loads(r.stdout)
    assert set(errs) == {"fixtures", "transfer", "tune-bridge"}
    for name, err in errs.items():
        assert not [leak for leak in LEAKS if leak in err], (name, err)
    assert errs["fixtures"] == ""


def test_transfer_logs_its_calibration_passes_without_a_terminal(fx, calib, tmp_path):
    llama, lora = fx.model("llama"), fx.lora("llama", targets=["q_proj", "v_proj"], name="quiet")
    code, out, err = run_cli("transfer", "--slm", lora, "--llm", llama, "--data", calib, "--samples", "4",
                             "--seq-len", "16", "-o", tmp_path / "o", "--json", env={"SURGERY_PROGRESS_SECONDS": "0"})
    assert code == 0, err
    assert json.loads(out)["output"]  # the lines go to stderr; stdout stays the JSON
    lines = [line for line in err.splitlines() if line.startswith("surgery: transfer: calibration passes: ")]
    assert lines and "(100%)" in lines[-1] and "elapsed" in lines[-1], err
    assert any("ETA" in line for line in lines[:-1]) or len(lines) == 1
    done, total = re.match(r"surgery: transfer: calibration passes: (\d+)/(\d+) batches \(100%\)", lines[-1]).groups()
    assert done == total and int(total) >= 1
    code, _, err = run_cli("-q", "transfer", "--slm", lora, "--llm", llama, "--data", calib, "--samples", "4",
                           "--seq-len", "16", "-o", tmp_path / "q", "--json", env={"SURGERY_PROGRESS_SECONDS": "0"})
    assert code == 0 and "calibration passes" not in err
