"""Run one `surgery` CLI stage in a subprocess, measuring its wall time and peak RSS; cache its JSON.

Each stage is a real command line (`python -m surgery ... --json`), so the evidence exercises what
a user runs. Peak RSS comes from os.wait4 on that one child (ru_maxrss), not from the parent.
A stage whose record exists is not re-run: an interrupted evidence run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


class StageFailed(RuntimeError):
    pass


def run_stage(rec_path: str, args: list[str], log=print) -> dict:
    """Run `python -m surgery ARGS --json` once; returns {"out": <its JSON>, "rss_mb", "seconds", "cmd"}."""
    if os.path.exists(rec_path):
        with open(rec_path) as f:
            return json.load(f)
    cmd = [sys.executable, "-m", "surgery", *args, "--json"]
    t0 = time.time()
    # cwd = the repository root, so `-m surgery` is this checkout's package, not an installed one
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True, cwd=ROOT)
    out, err = _communicate_wait4(p)
    secs = time.time() - t0
    if p.returncode != 0:
        raise StageFailed(f"surgery {shlex.join(args)} exited {p.returncode}:\n{err[-3000:]}")
    try:
        payload = json.loads(out[out.index("{"):])
    except ValueError as e:
        raise StageFailed(f"surgery {shlex.join(args)} printed no JSON: {out[-500:]!r}") from e
    rec = {"cmd": "surgery " + shlex.join(args), "out": payload, "rss_mb": p.rss_kb / 1024, "seconds": secs}
    os.makedirs(os.path.dirname(rec_path), exist_ok=True)
    with open(rec_path + ".tmp", "w") as f:
        json.dump(rec, f, indent=1)
    os.rename(rec_path + ".tmp", rec_path)
    log(f"  {secs:6.1f}s {rec['rss_mb']:6.0f} MB  {rec['cmd'][:150]}")
    return rec


def _communicate_wait4(p: subprocess.Popen) -> tuple[str, str]:
    """communicate(), but reap the child ourselves with wait4 so its own rusage is kept."""
    import threading

    bufs = {}

    def drain(name, stream):
        bufs[name] = stream.read()

    ts = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", p.stdout), ("err", p.stderr))]
    for t in ts:
        t.start()
    _, status, ru = os.wait4(p.pid, 0)
    for t in ts:
        t.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    p.rss_kb = ru.ru_maxrss
    return bufs["out"], bufs["err"]
