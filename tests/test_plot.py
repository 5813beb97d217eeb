"""--plot FILE.png: matplotlib optional (one-line hint when missing), checked before any work, written atomically."""

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
