"""Models without a family map: the generic linear-layer map, --family files and SURGERY_FAMILIES."""

import json
import os
import shutil

import torch

from surgery.io.checkpoint import Checkpoint

from .conftest import run_cli
from .test_merge import _load, _logits, _peft

UNMAPPED = "olmo2"  # a transformers architecture with no file in surgery/arch/families
FAMILY_DIR = os.path.join(os.path.dirname(__file__), "..", "surgery", "arch", "families")


def _renamed(src: str, dst, model_type: str) -> str:
    """A copy of a fixture whose config.json names a model_type no installed family covers."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def _notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if "generic linear-layer map" in line]


def test_generic_map_merges_unmerges_extracts_like_peft(fx, tmp_path):
    base = fx.model(UNMAPPED)
    ad = fx.lora(UNMAPPED, name="g")
    code, out, err = run_cli("merge-lora", base, ad, "-o", tmp_path / "m")
    assert code == 0, err
    assert len(_notes(err)) == 1 and err.startswith("surgery: note: model_type 'olmo2' has no family map")
    pm = _peft(base, ad)
    ours = _load(str(tmp_path / "m"))
    assert torch.allclose(_logits(ours, UNMAPPED), _logits(pm, UNMAPPED), atol=1e-4)
    ref = pm.merge_and_unload().state_dict()
    assert max((ours.state_dict()[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5

    code, _, err = run_cli("unmerge-lora", tmp_path / "m", ad, "-o", tmp_path / "u")
    assert code == 0 and len(_notes(err)) == 1, err
    back, orig = _load(str(tmp_path / "u")).state_dict(), _load(base).state_dict()
    assert max((back[k] - orig[k]).abs().max().item() for k in orig) <= 1e-5

    # extract: the default targets are the 2-D weights inside the layers, exactly peft's all-linear here
    code, out, err = run_cli("extract-lora", base, tmp_path / "m", "-o", tmp_path / "x", "--rank", "4", "--json")
    assert code == 0 and len(_notes(err)) == 1, err  # one note for the pair, not one per model
    info = json.loads(out)
    assert sorted(r["module"] for r in info["modules"]) == sorted(
        n for n, m in _load(base).named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert max(r["rel_error"] for r in info["modules"]) < 1e-4  # the delta has rank 4: recovered exactly
    px = _peft(base, str(tmp_path / "x"))
    assert torch.allclose(_logits(px, UNMAPPED), _logits(ours, UNMAPPED), atol=1e-4)

    code, out, err = run_cli("inspect", base, "--json")
    assert code == 0 and len(_notes(err)) == 1
    info = json.loads(out)
    assert info["family"] == "generic" and info["layer_linears"] == 14 and info["linear_modules"] == 16  # + embeddings and head


def test_generic_map_gives_the_family_maps_bytes(fx, tmp_path):
    """On a llama checkpoint whose model_type nobody knows, the generic map merges bit for bit alike."""
    ad = fx.lora("llama", targets=["q_proj", "o_proj", "down_proj"], name="gm")
    renamed = _renamed(fx.model("llama"), tmp_path / "b", "llama-renamed")
    code, _, err = run_cli("merge-lora", fx.model("llama"), ad, "-o", tmp_path / "fam")
    assert code == 0 and not _notes(err), err
    code, _, err = run_cli("merge-lora", renamed, ad, "-o", tmp_path / "gen")
    assert code == 0 and len(_notes(err)) == 1, err
    a, b = Checkpoint.open(str(tmp_path / "fam")), Checkpoint.open(str(tmp_path / "gen"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a.read(k), b.read(k)) for k in a.keys())


def test_generic_map_refuses_conv1d_and_names_missing_modules(fx, tmp_path):
    ad = fx.lora("gpt2", targets=["c_attn", "c_fc"], name="gc")
    renamed = _renamed(fx.model("gpt2"), tmp_path / "b", "gpt2-renamed")
    code, _, err = run_cli("merge-lora", renamed, ad, "-o", tmp_path / "m")
    assert code == 2 and "fan_in_fan_out" in err and "--family" in err and not (tmp_path / "m").exists()
    llama_ad = fx.lora("llama", targets=["q_proj"], name="gq")
    code, _, err = run_cli("merge-lora", renamed, llama_ad, "-o", tmp_path / "m")
    assert code == 2 and "model.layers.0.self_attn.q_proj.weight" in err and "Traceback" not in err


def test_user_family_file_and_directory(fx, tmp_path):
    renamed = _renamed(fx.model("llama"), tmp_path / "b", "my-llama")
    spec = json.load(open(os.path.join(FAMILY_DIR, "llama.json")))
    spec.update(family="mine", model_types=["my-llama"])
    (tmp_path / "fams").mkdir()
    (tmp_path / "fams" / "mine.json").write_text(json.dumps(spec))
    fam = str(tmp_path / "fams" / "mine.json")

    code, out, err = run_cli("inspect", renamed, "--json", "--family", fam)
    assert code == 0 and not _notes(err), err
    info = json.loads(out)
    assert info["family"] == "mine" and info["missing"] == [] and info["hidden"] == 64
    # --family applies to that command only
    code, out, err = run_cli("inspect", renamed, "--json")
    assert json.loads(out)["family"] == "generic" and len(_notes(err)) == 1
    code, out, err = run_cli("inspect", renamed, "--json", env={"SURGERY_FAMILIES": str(tmp_path / "fams")})
    assert code == 0 and json.loads(out)["family"] == "mine" and not _notes(err)

    (tmp_path / "bad.json").write_text(json.dumps({"family": "x", "model_types": ["y"]}))
    code, _, err = run_cli("inspect", renamed, "--family", tmp_path / "bad.json")
    assert code == 2 and err.count("\n") == 1 and "lacks dims" in err and "docs/arch.md" in err
    code, _, err = run_cli("inspect", renamed, env={"SURGERY_FAMILIES": str(tmp_path / "nowhere")})
    assert code == 2 and "SURGERY_FAMILIES" in err and "not a directory" in err
