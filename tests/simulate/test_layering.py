"""simulate/ sits above analysis/: the cache simulator uses the analysis kernels, and nothing in analysis/ (the
placement algorithms included) imports simulate/ — the cycle analysis/placement.py <-> simulate/ is gone."""

import ast
from pathlib import Path

import moescope

PACKAGE = Path(moescope.__file__).parent


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_nothing_in_analysis_imports_simulate():
    offenders = {str(path.relative_to(PACKAGE)): sorted(m for m in imported_modules(path) if m.startswith("moescope.simulate"))
                 for path in (PACKAGE / "analysis").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_simulate_uses_the_analysis_kernels():
    """The direction is real (so the rule above is the one that matters)."""
    used = set().union(*(imported_modules(p) for p in (PACKAGE / "simulate").rglob("*.py")))
    assert any(m.startswith("moescope.analysis") for m in used)
