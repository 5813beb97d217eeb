"""The generated CLI reference must match the CLI."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_reference_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_reference", os.path.join(ROOT, "scripts", "cli_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open(os.path.join(ROOT, "docs", "cli.md")) as f:
        current = f.read()
    assert current == mod.render(), "docs/cli.md is stale: run `python scripts/cli_reference.py > docs/cli.md`"
