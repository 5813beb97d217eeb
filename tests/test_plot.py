"""--plot FILE.png: matplotlib optional (one-line hint when missing), checked before any work, written atomically."""

import json
import sys

import pytest

from .conftest import run_cli
from .test_extract import _tuned


def _pair(fx, tmp_path):
    base = fx.model("llama")
    _tuned(base, str(tmp_path / "t"), ["q_proj", "up_proj"])
    return base, tmp_path / "t"


def test_missing_matplotlib_is_one_line_before_any_work(fx, tmp_path, monkeypatch):
    base, tuned = _pair(fx, tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    code, out, err = run_cli("extract-lora", base, tuned, "-o", tmp_path / "a", "--rank", "2", "--plot", tmp_path / "s.png")
    assert code != 0 and "--plot needs matplotlib, which is not installed; pip install 'surgery[plot]'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a").exists()


def test_extract_lora_draws_the_spectra(fx, tmp_path):
    pytest.importorskip("matplotlib")
    base, tuned = _pair(fx, tmp_path)
    png = tmp_path / "s.png"
    code, out, err = run_cli("extract-lora", base, tuned, "-o", tmp_path / "a", "--rank", "2", "--targets", "q_proj", "--targets", "up_proj",
                             "--plot", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in out.replace("\n", "")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    code, _, err = run_cli("extract-lora", base, tuned, "-o", tmp_path / "b", "--rank", "2", "--plot", png)
    assert code != 0 and "already exists" in err and not (tmp_path / "b").exists()
    code, _, err = run_cli("extract-lora", base, tuned, "-o", tmp_path / "b", "--rank", "2", "--plot", png, "--no-verify")
    assert code != 0 and "--no-verify skips" in err


# ---- the other commands' --plot (prune-bridge, transfer, train, tune-bridge) -------------------------
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from fixtures.corpus import documents

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(documents(32, seed=3)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from fixtures.tasks import write_task

    return write_task("colour", str(tmp_path_factory.mktemp("tasks")), n_train=64, n_dev=32)


def _image(path):
    """The PNG read back: an RGBA array of at least 300 x 300 pixels that is not one flat colour."""
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    a = image.imread(str(path))
    assert a.ndim == 3 and a.shape[0] >= 300 and a.shape[1] >= 300 and float(a.std()) > 0.01
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    return a


def _spy(monkeypatch, name):
    """Record the arguments of surgery.plot.<name> and still draw."""
    import surgery.plot as plots

    calls, real = [], getattr(plots, name)

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(plots, name, spy)
    return calls


@pytest.mark.parametrize("cmd", ["prune-bridge", "transfer", "train", "tune-bridge"])
def test_each_plot_needs_matplotlib_and_says_so_before_any_work(fx, tmp_path, monkeypatch, cmd, calib, task):
    llm = fx.model("llama")
    args = {"prune-bridge": [llm, "--data", calib],
            "transfer": ["--slm", fx.lora("llama", targets=["q_proj"]), "--llm", llm, "--map", "embeddings"],
            "train": [llm, "--data", task[0]],
            "tune-bridge": ["--adapter", fx.lora("llama", targets=["q_proj"]), "--bridge", _bridge(fx, tmp_path), "--data", task[0]]}[cmd]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli(cmd, *args, "-o", tmp_path / "o", "--plot", tmp_path / "p.png")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "--plot needs matplotlib, which is not installed; pip install 'surgery[plot]' (matplotlib), or drop --plot" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.png").exists()


def _bridge(fx, tmp_path):
    from fixtures.bridge import build_bridge

    return build_bridge(fx.model("llama"), str(tmp_path / "bridge"), fraction=0.5, seed=3)


def test_prune_bridge_plots_the_scores_it_selected_with(fx, tmp_path, monkeypatch, calib):
    pytest.importorskip("matplotlib")
    from surgery.plot.importance import kept_share

    calls = _spy(monkeypatch, "importance")
    png = tmp_path / "imp.png"
    code, out, err = run_cli("prune-bridge", fx.model("llama"), "-o", tmp_path / "b", "--data", calib, "--reduction", "4",
                             "--samples", "4", "--seq-len", "32", "--residual", "prune", "--drop-layers", "1", "--plot", png)
    assert code == 0, err
    assert f"plot: {png}" in out
    _image(png)
    man = json.loads((tmp_path / "b" / "bridge.json").read_text())
    (_, panels, _), = calls
    # kept/dropped per unit is bridge.json's `kept`, and the kept share of each row its `retained`
    assert [(p["stack"], p["units"]) for p in panels] == [("all layers", "residual channels"), ("layers", "attn kv groups (2 heads each)"),
                                                          ("layers", "mlp.inner neurons")]
    res = panels[0]
    assert [i for i, k in enumerate(res["kept"][0]) if k] == man["kept"]["residual"]
    assert kept_share(res["scores"][0], res["kept"][0]) == pytest.approx(man["retained"]["residual"], rel=1e-9)
    for p, key, ret_key in ((panels[1], "kv_heads", "heads"), (panels[2], "mlp.inner", "mlp.inner")):
        assert p["dropped"] == [e is None for e in man["kept"]["layers"]["layers"]] and sum(p["dropped"]) == 1
        for row, mask, entry, ret in zip(p["scores"], p["kept"], man["kept"]["layers"]["layers"], man["retained"]["layers"]["layers"]):
            assert [i for i, k in enumerate(mask) if k] == (entry[key] if entry else [])
            assert kept_share(row, mask) == (pytest.approx(ret[ret_key], rel=1e-9) if ret else 0.0)
    code, _, err = run_cli("prune-bridge", fx.model("llama"), "-o", tmp_path / "b2", "--data", calib, "--plot", png)
    assert code != 0 and "already exists" in err and "--force" in err and not (tmp_path / "b2").exists()


def test_transfer_plots_every_fit_residual(fx, tmp_path, monkeypatch, calib):
    pytest.importorskip("matplotlib")
    from fixtures.expand import expand_model
    from surgery.plot.residuals import residual_series

    llm = str(tmp_path / "big")
    expand_model(fx.model("gpt2"), llm, width=2, depth=2, seed=11)
    calls = _spy(monkeypatch, "residuals")
    png = tmp_path / "fit.png"
    code, out, err = run_cli("transfer", "--slm", fx.lora("gpt2"), "--llm", llm, "-o", tmp_path / "o", "--data", calib,
                             "--samples", "8", "--seq-len", "32", "--depth", "first", "--plot", png, "--json")
    assert code == 0, err
    assert json.loads(out)["plot"] == str(png)
    _image(png)
    rec = json.loads((tmp_path / "o" / "transfer.json").read_text())
    (_, fits, used, _), = calls
    assert fits == rec["fits"] and used == rec["layers_used"]["layers"] == [[0], [2]]
    series = residual_series(fits, used)
    assert set(series) == {"to_llm", "to_slm"}
    drawn = {(d, sp, j): (v, u) for d, spaces in series.items() for sp, s in spaces.items()
             for j, v, u in zip(s["layers"], s["values"], s["used"])}
    expected = {(r["direction"], r["space"], r["llm_layer"]): (r["rel_residual"], r["llm_layer"] in (0, 2))
                for r in rec["fits"] if not r["silent"]}
    assert drawn == expected and any(not u for _, u in drawn.values()) and any(r["silent"] for r in rec["fits"])


def test_train_plots_the_logged_and_evaluated_loss(fx, tmp_path, monkeypatch, task):
    pytest.importorskip("matplotlib")
    from surgery.plot.loss import loss_series

    calls = _spy(monkeypatch, "loss_curves")
    train, dev = task
    png = tmp_path / "loss.png"
    code, out, err = run_cli("train", fx.model("llama"), "--data", train, "--eval", dev, "-o", tmp_path / "a", "--epochs", "1",
                             "--lr", "1e-2", "--batch-size", "16", "--rank", "4", "--log-every", "1", "--eval-every", "2", "--plot", png)
    assert code == 0, err
    assert f"plot: {png}" in out
    _image(png)
    log = json.loads((tmp_path / "a" / "training.json").read_text())
    (_, history, before, on, _), = calls
    assert json.loads(json.dumps(history)) == log["history"] and before == log["before"] and on == "eval"
    s = loss_series(history, before, on)
    assert s["train"] == ([1, 2, 3, 4], [v for _, v in log["history"]["train_loss"]])
    assert s["eval"] == ([0, 2, 4], [log["before"]["loss"]] + [e["loss"] for e in log["history"]["evals"]])
    assert s["accuracy"][1][0] == log["before"]["accuracy"] and s["accuracy"][1][-1] == log["after"]["accuracy"]
    code, _, err = run_cli("train", fx.model("llama"), "--data", train, "-o", tmp_path / "b", "--plot", png)
    assert code != 0 and "already exists" in err and not (tmp_path / "b").exists()
    code, _, err = run_cli("train", fx.model("llama"), "--data", train, "-o", tmp_path / "b", "--plot", f"{fx.model('llama')}/x.png")
    assert code != 0 and "would overwrite the input" in err and not (tmp_path / "b").exists()
    small = tmp_path / "small.jsonl"  # one step, no --eval: a training curve only, drawn over the old plot
    small.write_text("".join(open(train).readlines()[:8]))
    code, _, err = run_cli("train", fx.model("llama"), "--data", small, "-o", tmp_path / "b", "--epochs", "1", "--plot", png, "--force")
    assert code == 0, err
    assert loss_series(json.loads((tmp_path / "b" / "training.json").read_text())["history"])["eval"] == ([], [])
    _image(png)


def test_tune_bridge_plots_its_loss_curves(fx, tmp_path, monkeypatch, task):
    pytest.importorskip("matplotlib")
    from surgery.plot.loss import loss_series

    calls = _spy(monkeypatch, "loss_curves")
    train, dev = task
    png = tmp_path / "tb.png"
    code, out, err = run_cli("tune-bridge", "--adapter", fx.lora("llama", targets=["q_proj", "down_proj"], name="tbp"),
                             "--bridge", _bridge(fx, tmp_path), "--data", train, "--eval", dev, "-o", tmp_path / "t",
                             "--epochs", "1", "--batch-size", "16", "--log-every", "1", "--plot", png, "--json")
    assert code == 0, err
    assert json.loads(out)["plot"] == str(png)
    _image(png)
    log = json.loads((tmp_path / "t" / "tune_bridge.json").read_text())
    (_, history, before, on, _), = calls
    assert json.loads(json.dumps(history)) == log["history"] and before == log["bridge_before"]
    s = loss_series(history, before, on)
    assert s["train"][0] == [1, 2, 3, 4] and s["eval"][0] == [0, 4]


def test_loss_series_by_hand():
    from surgery.plot.loss import loss_series

    h = {"train_loss": [[10, 2.0], [13, 1.5]], "evals": [{"step": 13, "loss": 1.7, "accuracy": None}]}
    assert loss_series(h, {"loss": 2.5, "accuracy": None}) == {"train": ([10, 13], [2.0, 1.5]), "eval": ([0, 13], [2.5, 1.7]),
                                                                "accuracy": None}
    assert loss_series(h, {"loss": 2.5}, "train")["eval"] == ([13], [1.7])  # `before` was measured on the training set


def test_importance_helpers_by_hand():
    from surgery.plot.importance import kept_share, normalised

    assert normalised([1.0, 4.0, 2.0]) == [0.25, 1.0, 0.5] and normalised([0.0, 0.0]) == [0.0, 0.0]
    assert kept_share([1.0, 4.0, 3.0], [False, True, True]) == 0.875


def test_matplotlib_is_imported_only_to_draw():
    import subprocess

    code = ("import sys, surgery.plot, surgery.pipelines.prune, surgery.pipelines.transfer, surgery.pipelines.train, "
            "surgery.cli; assert 'matplotlib' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
