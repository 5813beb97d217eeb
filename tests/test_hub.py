"""Hub ids (`org/name`) as inputs: resolved through the Hugging Face cache, offline here."""

import json
import os
import shutil

from .conftest import run_cli

REV = "0123456789abcdef0123456789abcdef01234567"


def _cache_with(tmp_path, repo: str, src: str) -> str:
    """A Hugging Face cache holding `src` as the main revision of `repo` (what `hf download` leaves)."""
    cache = tmp_path / "hub"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REV)
    shutil.copytree(src, root / "snapshots" / REV)
    return str(cache)


def test_offline_hub_id_not_in_cache_says_how_to_get_it(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    code, out, err = run_cli("inspect", "some-org/some-model", env=env)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "HF_HUB_OFFLINE=1" in err and "`hf download some-org/some-model`" in err and "Traceback" not in err
    code, _, err = run_cli("merge-lora", "some-org/some-model", tmp_path / "missing-adapter", "-o", tmp_path / "o", env=env)
    assert code == 2 and "hf download some-org/some-model" in err and not (tmp_path / "o").exists()


def test_cached_hub_ids_resolve_offline_for_models_and_adapters(fx, tmp_path):
    base, ad = fx.model("llama"), fx.lora("llama", targets=["q_proj"], name="hub")
    cache = _cache_with(tmp_path, "tiny/llama", base)
    shutil.copytree(os.path.join(cache, "models--tiny--llama"), os.path.join(cache, "models--tiny--llama-lora"))
    shutil.rmtree(os.path.join(cache, "models--tiny--llama-lora", "snapshots", REV))
    shutil.copytree(ad, os.path.join(cache, "models--tiny--llama-lora", "snapshots", REV))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache}
    code, out, err = run_cli("inspect", "tiny/llama", "--json", env=env)
    assert code == 0, err
    info = json.loads(out)
    assert info["family"] == "llama" and info["path"].endswith(os.path.join("snapshots", REV))
    code, _, err = run_cli("merge-lora", "tiny/llama", "tiny/llama-lora", "-o", tmp_path / "m", env=env)
    assert code == 0, err
    code, _, err = run_cli("merge-lora", base, ad, "-o", tmp_path / "local")
    assert code == 0, err
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "m" / f).read_bytes() == (tmp_path / "local" / f).read_bytes()


def test_every_input_parameter_resolves_hub_ids():
    """A command whose model/adapter argument is not in INPUTS would say 'does not exist' for org/name."""
    import click
    import typer.main

    from surgery.cli import INPUTS, app

    for name, cmd in typer.main.get_command(app).commands.items():
        for p in cmd.params:
            text = (getattr(p, "help", None) or "").lower()
            names_input = isinstance(p, click.Argument) or ("directory" in text and p.name != "output")
            if names_input and p.name not in INPUTS:
                raise AssertionError(f"{name} --{p.name} ({text!r}) is not in surgery.cli.INPUTS")
