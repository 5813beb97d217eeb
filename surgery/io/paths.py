"""Which file a name inside a model or adapter directory may resolve to.

Directories come from strangers: an index may name "../other/model.safetensors" or "/etc/passwd",
a shard may be a symlink out of the directory or a FIFO that hangs the first read. `member` allows
only a plain file name whose real path is a regular file in the directory itself. One exception:
the Hugging Face cache stores snapshots/<rev>/<file> as a symlink to ../../blobs/<hash>, so a link
from a `snapshots/<rev>` directory into its repository's `blobs/` is followed.
"""

from __future__ import annotations

import os
import stat

from ..errors import CheckpointError

FIX = "every weights file must be a regular file inside the model directory; re-download the checkpoint"


def _allowed_target(real: str, root: str) -> bool:
    if os.path.dirname(real) == root:
        return True
    snapshots = os.path.dirname(root)  # <repo>/snapshots/<rev> -> <repo>/blobs/<hash>
    return os.path.basename(snapshots) == "snapshots" and \
        os.path.dirname(real) == os.path.join(os.path.dirname(snapshots), "blobs")


def member(directory: str, name: str, named_by: str | None = None, error=CheckpointError) -> str:
    """os.path.join(directory, name), or `error` naming the entry when it may not be read.

    named_by: the file that named `name` (an index), quoted in the message."""
    src = f"{named_by} names {name!r}, which" if named_by else f"{os.path.join(directory, name)}"
    if not name or name != os.path.basename(name) or name in (".", "..") or "\0" in name:
        raise error(f"{src} is not a file name inside {directory}" if named_by else f"{src} is not a plain file name", FIX)
    full = os.path.join(directory, name)
    real, root = os.path.realpath(full), os.path.realpath(directory)
    if not _allowed_target(real, root):
        raise error(f"{src} is a link to {real}, outside {directory}", FIX)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise error(f"{src} is missing", "copy every file the index lists" if named_by else FIX) from None
    except OSError as e:
        raise error(f"cannot read {full} ({e.strerror})", "check the file's permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{src} is not a regular file", FIX)
    return full
