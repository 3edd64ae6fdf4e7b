"""The layering is the law: models/ imports neither studio/ nor lab/; studio/ (the product) never
imports lab/ (trainers, eval, metrics, benchmarks). Every import counts, lazy ones inside functions
included, because a lazy import still runs in the product's process."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"models": ("studio", "lab"), "studio": ("lab",)}


def imported_packages(path: Path):
    """(line, top-level package) of every import statement in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def violations(package: str):
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, top in imported_packages(path):
            if top in FORBIDDEN[package]:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(package):
    assert violations(package) == []


def test_the_checker_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from lab import metrics\n    import lab.train\n")
    assert [top for _, top in imported_packages(f)] == ["lab", "lab"]
