"""What commands write on stderr: their own progress lines, and nothing leaked from the libraries
they call (transformers' loading bars, peft's warnings, FutureWarnings)."""

import contextlib
import io
import json
import re
import warnings

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


@contextlib.contextmanager
def as_a_user():
    """Undo what pytest and conftest do to keep test logs clean, so the libraries print as they would
    for a user: transformers' progress bars on, and warnings shown as a plain interpreter shows them
    (all but the deprecation, import and resource warnings Python hides by default), here recorded."""
    from transformers.utils import logging

    with warnings.catch_warnings():  # huggingface_hub's own bars stay off under conftest's HF_HUB_DISABLE_PROGRESS_BARS
        warnings.simplefilter("ignore")
        logging.enable_progress_bar()  # transformers' bars ("Loading weights") are on again
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            warnings.simplefilter("always")
            for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=hidden)
            yield caught
    finally:
        logging.disable_progress_bar()


def test_commands_leak_nothing_from_libraries(fx, task, calib, tmp_path):
    from fixtures.bridge import build_bridge

    llama, lora = fx.model("llama"), fx.lora("llama", targets=["q_proj", "v_proj"], name="quiet")
    bridge = build_bridge(llama, str(tmp_path / "bridge"), fraction=0.5, seed=3)
    runs = {"transfer": ["transfer", "--slm", lora, "--llm", llama, "--data", calib, "--samples", "4", "--seq-len", "16"],
            "tune-bridge": ["tune-bridge", "--adapter", lora, "--bridge", bridge, "--data", task[0], "--epochs", "0.25",
                            "--max-length", "32"]}
    for name, argv in runs.items():
        with as_a_user() as caught:
            code, out, err = run_cli(*argv, "-o", tmp_path / name, "--json", env={"SURGERY_PROGRESS_SECONDS": "3600"})
        assert code == 0, err
        assert json.loads(out)["output"]
        assert not [leak for leak in LEAKS if leak in err], (name, err)
        assert not caught, (name, [f"{w.category.__name__}: {w.message}" for w in caught])


def test_fixture_builders_leak_nothing(tmp_path):
    from fixtures import build_bias_tuned, build_lora, build_model

    with as_a_user() as caught, contextlib.redirect_stderr(io.StringIO()) as err:
        build_model("llama", str(tmp_path / "m"))
        build_lora(str(tmp_path / "m"), str(tmp_path / "l"))
        build_bias_tuned(str(tmp_path / "m"), str(tmp_path / "b"))
    assert err.getvalue() == ""
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]


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
