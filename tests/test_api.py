"""`import surgery`: the documented functions, on fixtures, and cheap to import."""

import inspect
import json
import os
import subprocess
import sys

import torch

import surgery
from surgery.io.checkpoint import Checkpoint


def test_import_is_cheap_and_exports_documented_keyword_functions():
    code = "import sys, surgery; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print(len(surgery.__all__))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "12", r.stderr
    for name in surgery.__all__:
        fn = getattr(surgery, name)
        assert callable(fn) and (fn.__doc__ or "").strip(), name
        params = inspect.signature(fn).parameters.values()
        assert not any(p.kind == p.VAR_KEYWORD for p in params), f"{name} takes **kwargs"
    __import__("surgery.train.loop")  # the subpackage of the same name stays callable
    assert inspect.signature(surgery.train).parameters["epochs"].default == 3.0


def test_api_on_fixtures(fx, tmp_path):
    base = fx.model("llama")
    ad = fx.lora("llama", targets=["q_proj", "down_proj"], name="api")
    info = surgery.inspect(base)
    assert info["family"] == "llama"
    m = surgery.merge_lora(base, [ad], str(tmp_path / "m"), weights=[0.5])
    assert m["output"] == str(tmp_path / "m") and m["modules"] == 4
    u = surgery.unmerge_lora(m["output"], ad, str(tmp_path / "u"), weight=0.5)
    a, b = Checkpoint.open(base), Checkpoint.open(u["output"])
    assert max((a.read(k) - b.read(k)).abs().max().item() for k in a.keys()) < 1e-6
    x = surgery.extract_lora(base, m["output"], str(tmp_path / "x"), rank=4, targets="q_proj,down_proj")
    assert {r["module"].rsplit(".", 1)[-1] for r in x["modules"]} == {"q_proj", "down_proj"}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"colour {i}:", "completion": " blue"}) + "\n" for i in range(8)))
    t = surgery.train(base, str(data), str(tmp_path / "t"), rank=2, epochs=0.5, batch_size=4, targets="q_proj")
    assert os.path.exists(tmp_path / "t" / "adapter_config.json") and t["steps"] == 1
    e = surgery.evaluate(base, str(data), adapter=str(tmp_path / "t"))
    assert e["examples"] == 8 and torch.isfinite(torch.tensor(e["loss"]))


def test_one_targets_syntax_on_the_cli(fx, tmp_path):
    from .conftest import run_cli

    base = fx.model("llama")
    merged = surgery.merge_lora(base, [fx.lora("llama", targets=["q_proj", "down_proj"], name="api")],
                                str(tmp_path / "m"))["output"]
    seen = []
    for i, flags in enumerate((["--targets", "q_proj,down_proj"], ["--targets", "q_proj", "--targets", "down_proj"])):
        code, out, err = run_cli("extract-lora", base, merged, "-o", tmp_path / f"x{i}", "--rank", "4", "--json", *flags)
        assert code == 0, err
        seen.append(sorted(r["module"] for r in json.loads(out)["modules"]))
    assert seen[0] == seen[1] and len(seen[0]) == 4


def test_merge_and_unmerge_print_json_with_the_output(fx, tmp_path):
    from .conftest import run_cli

    base, ad = fx.model("llama"), fx.lora("llama", targets=["q_proj"], name="j")
    code, out, err = run_cli("merge-lora", base, ad, "-o", tmp_path / "m", "--json")
    assert code == 0 and json.loads(out)["output"] == str(tmp_path / "m"), err
    code, out, err = run_cli("unmerge-lora", tmp_path / "m", ad, "-o", tmp_path / "u", "--json")
    assert code == 0 and json.loads(out)["output"] == str(tmp_path / "u"), err


def test_keyword_defaults_are_the_configs():
    """api.train and api.tune_bridge spell TrainConfig's settings as keywords (so `import surgery` stays
    cheap); their defaults must be the config's and the CLI's, or the API and the CLI train differently."""
    import inspect

    import surgery
    from surgery.train.data import MAX_LENGTH
    from surgery.train.loop import TrainConfig

    cfg = TrainConfig()
    for fn in (surgery.train, surgery.tune_bridge):
        p = inspect.signature(fn).parameters
        for name in ("epochs", "lr", "batch_size", "seed", "eval_every", "log_every"):
            assert p[name].default == getattr(cfg, name), (fn.__name__, name)
        assert p["max_length"].default == MAX_LENGTH, fn.__name__
