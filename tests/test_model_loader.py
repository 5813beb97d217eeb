"""The one model loader (surgery/io/model.py): --dtype / --device / --device-map mean the same on every
command that runs a model, and bad values are refused before torch is imported."""

import json
import subprocess
import sys

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.io.model import Placement, load_model

from .conftest import run_cli
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)


@pytest.mark.parametrize("kw,msg", [({"dtype": "fp8"}, "unknown --dtype 'fp8'"),
                                    ({"device": "cuda", "device_map": "auto"}, "both given"),
                                    ({"device_map": "cpu"}, "unknown --device-map 'cpu'"),
                                    ({"device": "gpu0"}, "unknown --device 'gpu0'")])
def test_bad_flags_are_refused(kw, msg):
    with pytest.raises(SurgeryError, match=msg):
        Placement(**kw).check()


def test_refused_before_torch_is_imported(fx, tmp_path):
    code = ("import sys; from surgery.cli import main; sys.argv = ['surgery', 'eval', 'm', '--data', 'd', '--dtype', 'fp8']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["2", "False"] and "unknown --dtype 'fp8'" in out.stderr


def test_dtype_auto_is_float32_on_cpu_and_explicit_dtypes_load_as_asked(fx):
    bf16 = fx.model("qwen2", dtype="bfloat16")
    assert load_model(bf16).dtype == torch.float32  # no GPU here: auto means float32
    assert load_model(bf16, Placement(dtype="bfloat16")).dtype == torch.bfloat16
    m = load_model(fx.model("t5"), Placement(dtype="float16", device="cpu"))
    assert m.config.is_encoder_decoder and m.dtype == torch.float16 and not m.training


def test_every_command_takes_the_flags(fx, task, tmp_path):
    train, dev = task
    model = fx.model("llama")
    code, out, err = run_cli("eval", model, "--data", dev, "--dtype", "bfloat16", "--device", "cpu", "--json")
    assert code == 0, err
    bf = json.loads(out)["loss"]
    code, out, err = run_cli("eval", model, "--data", dev, "--json")
    assert code == 0, err
    assert bf == pytest.approx(json.loads(out)["loss"], rel=2e-2) and bf != json.loads(out)["loss"]
    code, out, err = run_cli("train", model, "--data", train, "-o", tmp_path / "a", "--epochs", "0.25",
                             "--dtype", "bfloat16", "--json")
    assert code == 0, err
    assert json.loads(out)["device"] == "cpu"
    for cmd in (["prune-bridge", model, "--data", train, "-o", tmp_path / "b"],
                ["tune-bridge", "--adapter", tmp_path / "a", "--bridge", tmp_path / "x", "--data", train, "-o", tmp_path / "d"]):
        code, _, err = run_cli(*cmd, "--device", "cuda:0", "--device-map", "auto")
        assert code == 2 and "--device cuda:0 and --device-map auto both given" in err, (cmd, err)


def test_refine_takes_the_flags(fx, task, tmp_path):
    """refine loads the LLM through the same loader: bfloat16 is what eval measures in bfloat16."""
    train, dev = task
    llm, lora = fx.model("llama"), fx.lora("llama", targets=["q_proj", "v_proj"], name="refine-flags")
    args = ("refine", "--adapter", lora, "--llm", llm, "--data", train, "--eval", dev, "--steps", "1", "--json")
    code, out, err = run_cli(*args, "-o", tmp_path / "bf16", "--dtype", "bfloat16", "--device", "cpu")
    assert code == 0, err
    bf = json.loads(out)["before"]["loss"]
    code, out, err = run_cli(*args, "-o", tmp_path / "f32")
    assert code == 0, err
    f32 = json.loads(out)["before"]["loss"]
    code, out, err = run_cli("eval", llm, "--adapter", lora, "--data", dev, "--dtype", "bfloat16", "--json")
    assert code == 0, err
    assert bf == pytest.approx(json.loads(out)["loss"], rel=2e-2) and bf != f32
    code, _, err = run_cli(*args, "-o", tmp_path / "x", "--device", "cuda:0", "--device-map", "auto")
    assert code == 2 and "both given" in err and not (tmp_path / "x").exists()
