"""Inputs named by a Hugging Face Hub id (`org/name`) instead of a local directory.

Every command reads local directories: file-level surgery needs positioned reads, not a model
object. An input that is not a local path but looks like `org/name` is fetched once into the
Hugging Face cache with `huggingface_hub.snapshot_download` and read from there; a cached copy
is used as is when HF_HUB_OFFLINE=1. Only the files surgery can read are fetched (safetensors,
and .bin only when a repository has no safetensors; never GGUF, ONNX, Flax or TF weights).
When the download cannot happen, one line says so and gives the command that fetches it.
"""

from __future__ import annotations

import os
import re

from ..errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
NEVER = ["*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.gguf", "*.ot", "*.tflite", "*.pth", "*.pt",
         "original/*", "onnx/*", "coreml/*", "openvino/*", "flax_model*", "tf_model*"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def is_hub_id(value: str) -> bool:
    return bool(HUB_ID.match(value)) and not os.path.exists(value) and not value.startswith(("./", "../"))


def local_dir(value: str) -> str:
    """`value` itself when it is a local path (or not a Hub id); else the snapshot directory of the
    Hub repository it names, downloaded if needed."""
    if not isinstance(value, str) or not is_hub_id(value):
        return value
    from huggingface_hub import snapshot_download

    from ..log import note

    cache = os.environ.get("HF_HUB_CACHE") or None
    fix = f"run `hf download {value}` (or pass a local directory)"
    if _offline():
        try:
            return snapshot_download(value, cache_dir=cache, local_files_only=True)
        except Exception:  # LocalEntryNotFoundError and friends: not in the cache
            raise CheckpointError(f"{value} is not a local directory, and HF_HUB_OFFLINE=1 keeps it from being "
                                  "downloaded from the Hugging Face Hub (it is not in the cache)", fix) from None
    note(f"{value} is not a local directory: fetching it from the Hugging Face Hub into the cache")
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(value)
        ignore = NEVER + (["*.bin"] if any(f.endswith(".safetensors") for f in files) else [])
        return snapshot_download(value, cache_dir=cache, ignore_patterns=ignore)
    except Exception as e:  # network, 404, gated repository, disk: the message names which
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{value} is not a local directory and could not be downloaded from the Hugging Face "
                              f"Hub ({type(e).__name__}{': ' + reason[:160] if reason else ''})", fix) from None
