"""Shared fixtures: tiny deterministic checkpoints built once per test session (no downloads)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402


def _family_names(with_bottleneck: bool) -> list[str]:
    """Installed family files (a new family is one file): those with bottleneck sites run every test."""
    from surgery.arch import FAMILY_DIR

    names = []
    for f in sorted(os.listdir(FAMILY_DIR)):
        if f.endswith(".json"):
            with open(os.path.join(FAMILY_DIR, f)) as fh:
                spec = json.load(fh)
            if ("bottleneck" in spec) == with_bottleneck:
                names.append(spec["family"])
    return names


FAMILY_NAMES = _family_names(True)  # gpt2, llama, mistral, qwen2, t5
# families with a map for merge/extract/inspect but no bottleneck sites (and, for gemma, no pruning)
MORE_FAMILIES = _family_names(False)


class FixtureFactory:
    """Builds each (family, options) model once and hands out its directory."""

    def __init__(self, root):
        self.root = root
        self.cache = {}

    def model(self, family: str, **kw) -> str:
        from fixtures import build_model

        key = (family, tuple(sorted(kw.items())))
        if key not in self.cache:
            name = family + "".join(f"-{k}={v}" for k, v in sorted(kw.items()))
            path = os.path.join(self.root, name.replace("/", "_"))
            build_model(family, path, **kw)
            self.cache[key] = path
        return self.cache[key]

    def lora(self, family: str, targets=None, name: str = "lora", model_kw=None, **kw) -> str:
        from fixtures import build_lora

        base = self.model(family, **(model_kw or {}))
        key = ("lora", family, name, str(targets), tuple(sorted((model_kw or {}).items())), tuple(sorted(map(str, kw.items()))))
        if key not in self.cache:
            path = os.path.join(self.root, f"{os.path.basename(base)}-{name}-{len(self.cache)}")
            build_lora(base, path, targets=targets, **kw)
            self.cache[key] = path
        return self.cache[key]


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return FixtureFactory(str(tmp_path_factory.mktemp("fixtures")))


HEAVY = ("torch", "transformers", "peft", "accelerate")  # what `surgery --help` and flag checks must not import


def run_fresh(body: str) -> tuple[str, list[str]]:
    """Run `body` in a fresh interpreter after `from surgery.cli import app, main`; returns its stdout
    and which of HEAVY it imported (a measure of start-up cost that a busy machine cannot make flaky)."""
    import subprocess
    import sys

    code = (f"import sys\nfrom surgery.cli import app, main\n{body}\n"
            f"print('HEAVY', sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import ast

    out, heavy = r.stdout.rsplit("HEAVY", 1)
    return out, ast.literal_eval(heavy.strip())


def run_cli(*args, env=None):
    """Run the CLI in-process like a user would; returns (exit code, stdout, stderr)."""
    import contextlib
    import io
    import sys

    from surgery.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["surgery", *map(str, args)]
    code = 0
    saved_env = {}
    for k, v in (env or {}).items():
        saved_env[k] = os.environ.get(k)
        os.environ[k] = v
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()
