"""Real text for the evidence pair: the docstrings of the Python standard library on this machine.

Source: /usr/lib/python3.11 (Debian's libpython3.11-minimal / libpython3.11-stdlib), read with `ast`
(never imported or executed). Each public function, class and method with a docstring becomes one
entry, written as the library reference's index writes it, then the docstring's first paragraph:

    urlopen(url, data, timeout, ...) in urllib.request: Open the URL url, which can be either a string or ...

The name comes before its module (as in "urlopen() (in module urllib.request)" in the Python docs'
index), so "which module has urlopen?" is a fact a model can read off what it memorised in the
forward direction. The tasks (tasks.py) ask such facts about entries the pretraining saw; held-out
perplexity is measured on entries it did not see. Sorted walk, fixed seeds: the same entries on
every machine with the same package version; the corpus hash goes into the pair's cache key.

The index alone is small (~136k tokens): a model 8x the SLM overfits it within a few passes. So the
pretraining stream adds more text of the same kind, each piece once (`extra_texts`): the remaining
paragraphs of the same docstrings (for pretraining entries only: never a held-out entry's), and the
index entries of the Python packages Debian installed on this machine (/usr/lib/python3/dist-packages:
pip, setuptools, pygments, cryptography, apt, ...). The venv's packages are left out: their versions
are pip's choice, not the machine's.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import random
import re

STDLIB = "/usr/lib/python3.11"
DIST = "/usr/lib/python3/dist-packages"
SKIP = {"test", "tests", "idle_test", "lib2to3", "__pycache__", "config-3.11-x86_64-linux-gnu", "site-packages",
        "dist-packages", "ensurepip", "pydoc_data", "encodings", "distutils"}
MAX_SUMMARY = 240  # characters of the docstring's first paragraph
MAX_REST = 1200  # characters of the remaining paragraphs (long doctests and tables add little)


def _module_name(path: str, base: str) -> str:
    rel = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _summary(doc: str) -> str | None:
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(para.split())
    if len(text) < 12 or not text[0].isalpha():
        return None
    return text[:MAX_SUMMARY]


def _rest(doc: str) -> str:
    """The docstring after its first paragraph, paragraphs kept (one newline between them)."""
    parts = re.split(r"\n\s*\n", doc.strip())[1:]
    return "\n".join(" ".join(p.split()) for p in parts if p.strip())[:MAX_REST]


def _args(node) -> str:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return ", ".join(names)


def _entries_of(path: str, base: str = STDLIB) -> list[dict]:
    with open(path, encoding="utf-8", errors="replace") as f:
        try:
            tree = ast.parse(f.read())
        except SyntaxError:
            return []
    mod = _module_name(path, base)
    out = []

    def visit(body, owner: str | None):
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            s = _summary(doc) if doc else None
            if isinstance(node, ast.ClassDef):
                if s:
                    out.append(dict(name=node.name, qual=node.name, kind="class", module=mod, args="", summary=s,
                                    rest=_rest(doc)))
                if owner is None:
                    visit(node.body, node.name)
            elif s:
                qual = f"{owner}.{node.name}" if owner else node.name
                out.append(dict(name=node.name, qual=qual, kind="method" if owner else "function", module=mod,
                                args=_args(node), summary=s, rest=_rest(doc)))

    visit(tree.body, None)
    return out


def _walk(base: str) -> tuple:
    paths = []
    for root, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in SKIP)
        paths += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    return tuple(e for p in sorted(paths) for e in _entries_of(p, base))


@functools.lru_cache(maxsize=1)
def entries() -> tuple:
    """Every standard-library entry, in a fixed order (sorted files, source order within a file)."""
    if not os.path.isdir(STDLIB):
        raise SystemExit(f"error: {STDLIB} not found: the evidence corpus is the Debian python3.11 standard "
                         "library (apt-get install libpython3.11-stdlib)")
    return _walk(STDLIB)


@functools.lru_cache(maxsize=1)
def extra_texts() -> tuple:
    """More text of the same kind, each once, none about a held-out or validation entry: the remaining
    paragraphs of the pretraining entries' docstrings, then the index entries of Debian's Python packages
    (an entry already in the stdlib index, as vendored copies are, is dropped)."""
    seen = split()[0]
    texts = [f"{e['qual']} in {e['module']}, more: {e['rest']}" for e in seen if len(e["rest"]) >= 40]
    known = {render(e) for e in entries()}
    if os.path.isdir(DIST):
        for e in _walk(DIST):
            t = render(e)
            if t not in known:
                known.add(t)
                texts.append(t)
    return tuple(texts)


def render(e: dict) -> str:
    return f"{e['qual']}({e['args']}) in {e['module']}: {e['summary']}"


def _parts(heldout_share: float = 0.05, seed: int = 0, valid_share: float = 0.05):
    es = list(entries())
    rng = random.Random(seed)
    held = set(rng.sample(range(len(es)), int(len(es) * heldout_share)))
    rest = [i for i in range(len(es)) if i not in held]
    valid = set(random.Random(f"valid:{seed}").sample(rest, int(len(es) * valid_share)))
    return ([e for i, e in enumerate(es) if i not in held and i not in valid],
            [e for i, e in enumerate(es) if i in held], [e for i, e in enumerate(es) if i in valid])


def split(heldout_share: float = 0.05, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(pretraining entries, held-out entries): a seeded random share is never seen in pretraining and
    measures perplexity; another share (`validation`) is never seen either and picks the checkpoint."""
    seen, held, _ = _parts(heldout_share, seed)
    return seen, held


def validation(heldout_share: float = 0.05, seed: int = 0) -> list[dict]:
    """The entries that choose the kept checkpoint (early stopping): neither pretrained on nor evaluated."""
    return _parts(heldout_share, seed)[2]


def corpus_hash() -> str:
    h = hashlib.sha256()
    for e in entries():
        h.update(render(e).encode() + b"\n")
    for t in extra_texts():
        h.update(t.encode() + b"\n")
    return h.hexdigest()[:12]
