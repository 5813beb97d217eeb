"""Run one `surgery` CLI stage in a subprocess, measuring its wall time and peak RSS; cache its JSON.

Each stage is a real command line (`python -m surgery ... --json`), so the evidence exercises what
a user runs. Peak RSS comes from os.wait4 on that one child (ru_maxrss), not from the parent.
A stage whose record exists is not re-run (an interrupted evidence run resumes where it stopped)
as long as its key still matches: the key hashes the command line (paths relative to the checkout),
the source of the `surgery` package and of the benchmark code that builds the stage (run.py, this
file), and the content of every input file or directory the command line names (not its -o output).
Changed code, defaults or upstream outputs therefore re-run the stage; a stale record is replaced.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from functools import lru_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


# what builds a stage besides its command line: the package it runs and the code that writes that line
CODE = ("surgery", os.path.join("benchmarks", "evidence", "run.py"), os.path.join("benchmarks", "evidence", "stage.py"))
OUTPUT_FLAGS = ("-o", "--output")


class StageFailed(RuntimeError):
    pass


def _hash_path(h, path: str) -> None:
    """File bytes, or every file under a directory (relative names and bytes, sorted; caches skipped)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return
    for d, dirs, files in os.walk(path):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for name in sorted(files):
            if name.endswith(".pyc"):
                continue
            full = os.path.join(d, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            _hash_path(h, full)


@lru_cache(maxsize=None)
def code_hash(root: str = ROOT) -> str:
    import hashlib

    h = hashlib.sha256()
    for rel in CODE:
        h.update(rel.encode() + b"\0")
        _hash_path(h, os.path.join(root, rel))
    return h.hexdigest()


def stage_key(args: list[str], root: str = ROOT) -> str:
    """sha256 of (command line, code hash, the content of each input path it names). Paths are written
    relative to the checkout so a stage cache copied between checkouts stays valid."""
    import hashlib

    rel = [os.path.relpath(a, root) if os.path.isabs(a) and a.startswith(root + os.sep) else a for a in args]
    inputs = {}
    for i, a in enumerate(args):
        if os.path.exists(a) and not (i and args[i - 1] in OUTPUT_FLAGS):
            h = hashlib.sha256()
            _hash_path(h, a)
            inputs[rel[i]] = h.hexdigest()
    payload = json.dumps({"args": rel, "code": code_hash(root), "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def run_stage(rec_path: str, args: list[str], log=print) -> dict:
    """Run `python -m surgery ARGS --json` once per key; returns {"out": <its JSON>, "rss_mb", "seconds", "cmd", "key"}."""
    key = stage_key(args)
    if os.path.exists(rec_path):
        with open(rec_path) as f:
            rec = json.load(f)
        if rec.get("key") == key:
            return rec
        log(f"  stale (code, settings or inputs changed): {os.path.relpath(rec_path, ROOT)}")
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
    rec = {"cmd": "surgery " + shlex.join(args), "out": payload, "rss_mb": p.rss_kb / 1024, "seconds": secs, "key": key}
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
