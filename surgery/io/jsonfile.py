"""Every JSON file a user hands us is read here, and every JSON file we write is written here.

Reading turns each way a file can be bad (missing, unreadable, not UTF-8, not JSON, not an object)
into the caller's one-line error naming the file; parse errors quote a position, never the bytes.
Writing refuses NaN and inf (`allow_nan=False`): Python would otherwise write the non-JSON tokens
`NaN`/`Infinity`, which other readers reject.
"""

from __future__ import annotations

import json
import math

from ..errors import NumericsError


def load_json(path: str, error, fix: str, expect: type | None = dict):
    """The parsed contents of `path`; `error(what, fix)` is raised for a file we cannot use.

    expect: the type the top level must have (dict by default; None accepts anything)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start})", fix) from None
    except ValueError as e:  # json.JSONDecodeError: message plus line/column, no file bytes
        raise error(f"{path} is not valid JSON ({getattr(e, 'msg', 'parse error')} at line "
                    f"{getattr(e, 'lineno', '?')} column {getattr(e, 'colno', '?')})", fix) from None
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror or type(e).__name__})", fix) from None
    if expect is not None and not isinstance(obj, expect):
        raise error(f"{path} holds a JSON {_json_type(obj)}, not an {_json_type(expect())}", fix)
    return obj


def _json_type(obj) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(obj), type(obj).__name__)


def dumps(obj, name: str = "JSON", **kw) -> str:
    """json.dumps that refuses NaN/inf with a NumericsError naming the file and the value's key path."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        raise NumericsError(f"{name} would hold NaN or infinity at {_nonfinite_path(obj) or 'a value'}",
                            "check the options and inputs that produced it; nothing was written") from None


def _nonfinite_path(obj, where: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the top level"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        hit = _nonfinite_path(v, f"{where}.{k}" if where else str(k))
        if hit:
            return hit
    return None
