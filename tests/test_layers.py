"""The package's layering (docs/architecture.md): no module imports a layer above its own."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "surgery")
# each layer may import the ones listed (errors.py, log.py and plot/ are leaves everyone may use: plot
# imports only errors; the package's __version__ is a constant)
ALLOWED = {
    "ops": set(),
    "io": set(),  # io reads and writes files: no tensor math, no family maps
    "arch": {"io"},
    "train": {"arch", "io", "ops"},
    "kinds": {"train", "arch", "io", "ops"},
    "pipelines": {"kinds", "train", "arch", "io", "ops"},
    "cli": {"api", "pipelines", "kinds", "train", "arch", "io", "ops"},
}
# the one sanctioned exception: surgery.train is callable as surgery.api.train (see its __init__)
EXCEPTIONS = {("train/__init__.py", "api")}
LEAVES = {"errors", "log", "plot", "__version__"}


def _imports(path: str) -> set[str]:
    """Top-level surgery subpackages a module imports (relative or absolute, lazy ones included)."""
    pkg = ["surgery", *os.path.relpath(os.path.dirname(path), ROOT).split(os.sep)]
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                targets = [base + node.module.split(".")] if node.module else [base + [a.name] for a in node.names]
            elif node.module and node.module.startswith("surgery."):
                targets = [node.module.split(".")]
            else:
                continue
            out.update(t[1] for t in targets if len(t) > 1)
    return out - {pkg[1]} - LEAVES


def test_no_upward_imports():
    bad = []
    for package, allowed in ALLOWED.items():
        for d, _, files in os.walk(os.path.join(ROOT, package)):
            for f in sorted(files):
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), ROOT)
                    extra = {m for m in _imports(os.path.join(d, f)) - allowed if (rel, m) not in EXCEPTIONS}
                    if extra:
                        bad.append(f"{os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))} imports {sorted(extra)}")
    assert not bad, bad
