"""One progress mechanism: a bar on a terminal, periodic log lines without one, nothing when quiet."""

import pytest

from surgery import log
from surgery.io.progress import progress

from .conftest import run_cli


def _run(capsys, total=4, **kw):
    with progress(total, "job", unit="modules", **kw) as advance:
        for i in range(total):
            advance(1, f"m{i}")
    return capsys.readouterr()


def test_without_a_terminal_it_logs_lines_with_an_eta(capsys, monkeypatch):
    monkeypatch.setenv("SURGERY_PROGRESS_SECONDS", "0")  # every step is "long enough"
    cap = _run(capsys)
    lines = cap.err.splitlines()
    assert cap.out == "" and len(lines) == 4
    assert lines[0].startswith("surgery: job: 1/4 modules (25%), 0:00 elapsed, ETA ") and lines[0].endswith("— m0")
    assert lines[-1] == "surgery: job: 4/4 modules (100%), 0:00 elapsed — m3"


def test_every_n_steps_and_short_jobs_stay_silent(capsys):
    assert _run(capsys).err == ""  # default: a line at most every 30 s
    assert len(_run(capsys, total=6, log_every=2).err.splitlines()) == 3


def test_quiet(capsys, monkeypatch):
    monkeypatch.setenv("SURGERY_PROGRESS_SECONDS", "0")
    assert _run(capsys, enabled=False).err == ""
    monkeypatch.setattr(log, "level", log.QUIET)
    assert _run(capsys).err == ""


def test_extract_lora_reports_each_module(fx, tmp_path):
    from .test_extract import _tuned

    base = fx.model("llama")
    _tuned(base, str(tmp_path / "t"), ["q_proj"])
    code, out, err = run_cli("extract-lora", base, tmp_path / "t", "-o", tmp_path / "a", "--rank", "2", "--targets", "q_proj",
                             env={"SURGERY_PROGRESS_SECONDS": "0"})
    assert code == 0, err
    assert "surgery: extract-lora: 1/2 modules (50%)" in err and err.rstrip().endswith("— model.layers.1.self_attn.q_proj")


def test_a_pass_inside_another_stays_silent(capsys, monkeypatch):
    monkeypatch.setenv("SURGERY_PROGRESS_SECONDS", "0")
    with progress(2, "outer") as outer:
        with progress(3, "inner") as inner:
            inner(1)
        outer(1)
    err = capsys.readouterr().err
    assert "outer: 1/2" in err and "inner" not in err


def test_calibration_batches_report_progress(capsys, monkeypatch):
    import torch

    from surgery.pipelines.calibration import batches

    monkeypatch.setenv("SURGERY_PROGRESS_SECONDS", "0")
    assert len(list(batches(torch.zeros(5, 4, dtype=torch.long), 2, False, "Fisher scores"))) == 3
    assert capsys.readouterr().err.splitlines()[-1].startswith("surgery: Fisher scores: 3/3 batches (100%)")
    list(batches(torch.zeros(5, 4, dtype=torch.long), 2, False))
    assert capsys.readouterr().err == ""
