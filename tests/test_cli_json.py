"""--json on every command: stdout is one JSON object and nothing else, with an "output" key (the
directory written, or null for eval and inspect, which write nothing), so scripts can chain commands."""

import json
import os

import pytest

from .conftest import run_cli
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)

LORA = dict(targets=["q_proj", "v_proj"], name="json")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from fixtures.corpus import documents

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(documents(16)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def made(fx, tmp_path_factory):
    """Directories some commands read and others write (a merged model, a bias-tuned model, a bridge), built once."""
    from fixtures import build_bias_tuned
    from fixtures.bridge import build_bridge

    root = tmp_path_factory.mktemp("json-inputs")
    llama, lora = fx.model("llama"), fx.lora("llama", **LORA)
    code, _, err = run_cli("merge-lora", llama, lora, "-o", root / "merged")
    assert code == 0, err
    return {"merged": str(root / "merged"), "bridge": build_bridge(llama, str(root / "bridge"), fraction=0.5, seed=3),
            "bias_tuned": build_bias_tuned(fx.model("gpt2"), str(root / "bias"))}


def _cases(fx, made, task, calib, o):
    """(argv, expected "output") for each command; argv may depend on an earlier case's output."""
    train, dev = task
    llama, lora, gpt2 = fx.model("llama"), fx.lora("llama", **LORA), fx.model("gpt2")
    short = ["--epochs", "0.25", "--max-length", "32"]
    return {
        "inspect": (["inspect", llama], None),
        "eval": (["eval", llama, "--data", dev, "--adapter", lora, "--max-length", "32"], None),
        "train": (["train", llama, "--data", train, "--targets", "q_proj", *short], o),
        "transfer": (["transfer", "--slm", lora, "--llm", llama, "--data", calib, "--samples", "4", "--seq-len", "16"], o),
        "prune-bridge": (["prune-bridge", llama, "--data", calib, "--samples", "2", "--seq-len", "16"], o),
        "tune-bridge": (["tune-bridge", "--adapter", lora, "--bridge", made["bridge"], "--data", train, *short], o),
        "refine": (["refine", "--adapter", lora, "--llm", llama, "--data", train, "--steps", "2", "--max-length", "32"], o),
        "merge-lora": (["merge-lora", llama, lora], o),
        "unmerge-lora": (["unmerge-lora", made["merged"], lora], o),
        "extract-lora": (["extract-lora", llama, made["merged"], "--rank", "2"], o),
        "extract-krona": (["extract-krona", llama, lora], o),
        "extract-bitfit": (["extract-bitfit", gpt2, made["bias_tuned"]], o),
        "apply-bitfit": (["apply-bitfit", gpt2, "DELTA"], o),
    }


COMMANDS = ["inspect", "eval", "train", "transfer", "prune-bridge", "tune-bridge", "refine", "merge-lora",
            "unmerge-lora", "extract-lora", "extract-krona", "extract-bitfit", "apply-bitfit"]


def test_every_command_is_covered():
    from surgery.cli import app

    assert sorted(c.name for c in app.registered_commands) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_json_is_all_of_stdout_with_the_output(fx, made, task, calib, tmp_path, command):
    out_dir = str(tmp_path / "out")
    argv, want = _cases(fx, made, task, calib, out_dir)[command]
    if command == "apply-bitfit":  # its input is extract-bitfit's output
        code, _, err = run_cli("extract-bitfit", fx.model("gpt2"), made["bias_tuned"], "-o", tmp_path / "delta")
        assert code == 0, err
        argv = [str(tmp_path / "delta") if a == "DELTA" else a for a in argv]
    if want is not None:
        argv += ["-o", out_dir]
    code, out, err = run_cli(*argv, "--json")
    assert code == 0, err
    info = json.loads(out)  # the whole of stdout, no table or note around it
    assert isinstance(info, dict) and "output" in info
    if want is None:
        assert info["output"] is None
    else:
        assert os.path.realpath(info["output"]) == os.path.realpath(want) and os.path.isdir(want)
