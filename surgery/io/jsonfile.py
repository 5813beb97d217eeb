"""Read a JSON file the user handed us, turning a parse error into the caller's one-line error."""

from __future__ import annotations

import json


def load_json(path: str, error, fix: str):
    """json.load(path); on malformed JSON raise `error(f"{path} is not valid JSON (...)", fix)`."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise error(f"{path} is not valid JSON ({e})", fix) from e
