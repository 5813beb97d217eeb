"""Stream tensors into a checkpoint directory: planned shards, correct index, atomic finish.

Rules every command inherits from here:
  * never write into an existing output unless force=True, and never over an input;
  * everything goes to a sibling temporary directory that is renamed into place at the end,
    so a failure leaves no partial output;
  * NaN/inf are refused with the tensor's name.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile

from ..errors import NumericsError, OutputError
from ..log import note
from .jsonfile import dumps
from .paths import member
from .safetensors_file import SafetensorsWriter, dtype_tag, itemsize

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers uses); '300MiB' is binary."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or int(float(m.group(1)) * _UNITS[m.group(2).upper()]) < 1:
        raise OutputError(f"cannot read size {str(text)[:40]!r}", "write a positive size like 5GB, 300MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output(out: str, inputs: list[str], force: bool) -> None:
    """Refuse outputs that would clobber an input, the working directory or an existing output without --force.

    --force replaces a whole directory, so the paths it could never be meant for are refused with or
    without it: "" (which abspath turns into the working directory), ".", "/", and any ancestor of
    the working directory or of an input."""
    if not str(out).strip():
        raise OutputError("the output path is empty", "pass -o with a new directory name")
    out = os.path.abspath(out)
    if os.path.realpath(out) == os.path.realpath(os.sep):
        raise OutputError("refusing to write the output over /", "pass -o with a new directory name")
    if _inside(os.getcwd(), out):
        raise OutputError(f"output {out} is the working directory or one of its parents",
                          "pass -o with a new directory name (replacing it would delete what you are working in)")
    for src in inputs:
        if src and (_inside(out, src) or _inside(src, out)):
            raise OutputError(f"output {out} overlaps input {src}", "choose an output path outside every input")
    if (os.path.exists(out) or os.path.islink(out)) and not force:
        raise OutputError(f"output {out} already exists", "choose a new path or pass --force to replace it")


def nonfinite_count(t) -> int:
    """Number of NaN/inf elements. Fast path: a sum is finite iff every element is (NaN and inf propagate,
    inf − inf is NaN), and a reduction is ~10× faster than isfinite on bf16; only a non-finite sum (or an
    overflowing one) pays for the element-wise count."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return 0
    if bool(torch.isfinite(t.sum())):  # accumulates in float32 even for bf16/fp16; overflow -> exact count
        return 0
    return int((~torch.isfinite(t)).sum())


def check_finite(name: str, t) -> None:
    bad = nonfinite_count(t)
    if bad:
        raise NumericsError(f"{name} has {bad} NaN/inf values", "check the inputs (adapter weights, scaling) for overflow; nothing was written")


# ---- temporary directories -------------------------------------------------------------------
# An output OUT is built in the sibling `.OUT.tmp-PID-XXXXXXXX` (PID: the writing process) and renamed
# to OUT at the end. A process killed with SIGKILL cannot clean up, so every new OutputDir for OUT
# first removes the temps of OUT whose PID is no longer running, and says so on stderr.
_STEM = 100  # characters of OUT kept in temp names: a 250-character OUT must still leave room for the suffix
_LIVE: set = set()  # OutputDirs not yet committed or aborted (main() aborts them on any exit)


def temp_prefix(out: str) -> str:
    return "." + os.path.basename(out)[:_STEM] + ".tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a number we cannot ask about: leave its temp alone
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_stale_temps(out: str) -> list[str]:
    """Delete temps of `out` left by processes that no longer run; returns what was removed."""
    parent, prefix = os.path.dirname(out), temp_prefix(out)
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = re.fullmatch(re.escape(prefix) + r"(\d+)-.*", name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(os.path.join(parent, name))
            removed.append(name)
            note(f"removed {os.path.join(parent, name)}, left by an interrupted run (process {m.group(1)})")
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class OutputDir:
    """A temporary sibling directory that becomes `out` on commit() and vanishes on failure."""

    def __init__(self, out: str, inputs: list[str] = (), force: bool = False):
        check_output(out, [os.path.abspath(i) for i in inputs if i], force)
        self.out = os.path.abspath(out)
        parent = os.path.dirname(self.out)
        fix = "choose an output path in a directory you can write to"
        try:
            os.makedirs(parent, exist_ok=True)
            remove_stale_temps(self.out)
            self.tmp = tempfile.mkdtemp(prefix=f"{temp_prefix(self.out)}{os.getpid()}-", dir=parent)
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output gets the user's umask
        except OSError as e:
            raise OutputError(f"cannot create the output {self.out} ({e.strerror or type(e).__name__}"
                              f"{': ' + str(e.filename) if e.filename else ''})", fix) from None
        self.force = force
        self.done = False
        _LIVE.add(self)

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def write_json(self, name: str, obj) -> None:
        text = dumps(obj, name=name, indent=2, sort_keys=False)  # before opening: NaN leaves no file behind
        with open(self.path(name), "w", encoding="utf-8") as f:
            f.write(text + "\n")

    def copy_from(self, src_dir: str, names: list[str]) -> None:
        for n in names:
            s = os.path.join(src_dir, n)
            if (os.path.exists(s) or os.path.islink(s)) and not os.path.exists(self.path(n)):
                shutil.copyfile(member(src_dir, n), self.path(n))

    def commit(self) -> str:
        """Rename the temp to `out`. With force, whatever is at `out` (directory, file or link) is moved
        aside to a name of our own and deleted; if another writer moves or replaces it between our two
        renames we simply try again, so concurrent --force writers never fail (the last one wins)."""
        for _ in range(100):
            if (os.path.exists(self.out) or os.path.islink(self.out)) and not self.force:
                raise OutputError(f"output {self.out} already exists", "choose a new path or pass --force")
            try:
                if not os.path.lexists(self.out):
                    os.rename(self.tmp, self.out)  # fails if a non-empty directory appeared meanwhile
                    break
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
                continue
            old = self.tmp + ".old"
            try:
                os.rename(self.out, old)
            except FileNotFoundError:
                continue  # another writer moved it first
            _remove(old)
        else:
            raise OutputError(f"could not replace {self.out}: other processes keep writing it", "run one writer at a time")
        self.done = True
        _LIVE.discard(self)
        return self.out

    def abort(self) -> None:
        if not self.done:
            shutil.rmtree(self.tmp, ignore_errors=True)
            _remove(self.tmp + ".old")
        _LIVE.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def abort_all() -> None:
    """Remove the temps of every OutputDir not committed (main() calls this when a command fails)."""
    for od in list(_LIVE):
        od.abort()


class ShardedWriter:
    """Write planned tensors into shards of at most `max_shard_size` bytes plus an index.

    `specs` is [(name, torch dtype, shape)] in output order. A tensor larger than the limit gets a
    shard of its own, as transformers does. One shard -> model.safetensors with no index.
    """

    def __init__(self, outdir: OutputDir, specs, max_shard_size="5GB", prefix: str = "model",
                 metadata: dict | None = None):
        limit = parse_size(max_shard_size)
        groups, cur, cur_bytes = [], [], 0
        for name, dtype, shape in specs:
            tag = dtype_tag(dtype)
            n = itemsize(tag)
            for s in shape:
                n *= s
            if cur and cur_bytes + n > limit:
                groups.append(cur)
                cur, cur_bytes = [], 0
            cur.append((name, tag, tuple(shape)))
            cur_bytes += n
        if cur or not groups:
            groups.append(cur)
        self.outdir = outdir
        self.prefix = prefix
        n = len(groups)
        self.files = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where = {}
        self.writers = []
        for fname, g in zip(self.files, groups):
            self.writers.append(SafetensorsWriter(outdir.path(fname), g, metadata))
            for name, _, _ in g:
                self.where[name] = len(self.writers) - 1
        self.total = sum(w.total for w in self.writers)
        self.written_bytes = 0

    def write(self, name: str, tensor) -> None:
        check_finite(name, tensor)
        self.writers[self.where[name]].write(name, tensor)
        self.written_bytes += tensor.numel() * tensor.element_size()

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if len(self.files) > 1:
            wmap = {name: self.files[i] for name, i in self.where.items()}
            self.outdir.write_json(f"{self.prefix}.safetensors.index.json",
                                   {"metadata": {"total_size": self.total}, "weight_map": wmap})
