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


def test_architecture_lists_every_module():
    """docs/architecture.md's tree names every module of the package, under its own package."""
    import re

    text = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    tree = text[text.index("```\nsurgery/"):]
    tree = tree[: tree.index("```", 4)]
    listed, pkg = set(), ""
    for line in tree.splitlines()[2:]:
        m = re.match(r"^  (\w+)/", line)
        if m:
            pkg = m.group(1)
        elif re.match(r"^  \w+\.py", line):
            pkg = ""
        for name in re.findall(r"\b(\w+\.py)\b", line):
            listed.add(f"{pkg}/{name}" if pkg else name)
    have = set()
    for d, _, files in os.walk(os.path.join(ROOT, "surgery")):
        rel = os.path.relpath(d, os.path.join(ROOT, "surgery"))
        for f in files:
            if f.endswith(".py") and f != "__init__.py":  # a subpackage's modules are listed under its package
                have.add(f if rel == "." else f"{rel.split(os.sep)[0]}/{f}")
    missing = sorted(have - listed)
    assert not missing, f"docs/architecture.md does not list {missing}: add them to the module tree"
