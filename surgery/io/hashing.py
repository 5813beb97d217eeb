"""Content hashes recorded in manifests (bridge.json, transfer.json, bitfit.json): one definition."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 1 MB chunks (calibration files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_sha256(model_dir: str) -> str:
    """The identity apply-bitfit checks: the bytes of a model directory's config.json."""
    return file_sha256(os.path.join(model_dir, "config.json"))
