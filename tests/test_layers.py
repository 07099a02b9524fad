"""Imports run down the pipeline: no module of src/moescope imports a folder listed above its own in
docs/ARCHITECTURE.md ("What each folder may import"), and no two folders import each other; the CLI is argument
parsing over the one Python API (api.py), which nothing below reaches through the package's attributes."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "moescope"


def layers() -> dict[str, int]:
    """Folder or module name -> its row in the architecture page's list (0 = top)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"## What each folder may import.*?```text\n(.*?)```", text, re.S).group(1)
    rows = {}
    for row, line in enumerate(block.splitlines()):
        names = re.findall(r"([a-z_]+)(?:/|\.py)", line.split("  ")[0])
        rows.update({name: row for name in names})
    return rows


def imports() -> set[tuple[str, str, str]]:
    """(file, its top-level part, the top-level part it imports) for every moescope import, at any depth."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        part = rel[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                bits = name.split(".")
                if bits[0] == "moescope" and len(bits) > 1 and bits[1] != part:
                    found.add((str(path.relative_to(ROOT)), part, bits[1]))
    return found


def test_every_part_of_the_package_has_a_row():
    rows = layers()
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.endswith(".egg-info")}
    assert parts - {"__init__"} <= set(rows), sorted(parts - {"__init__"} - set(rows))


def test_no_import_runs_up():
    rows = layers()
    up = sorted(f"{file} imports moescope.{target}" for file, part, target in imports()
                if target in rows and part in rows and rows[target] < rows[part])
    assert up == []


def test_no_two_parts_import_each_other():
    edges = {(part, target) for _, part, target in imports()}
    cycles = sorted(f"{a} <-> {b}" for a, b in itertools.combinations(sorted({p for e in edges for p in e}), 2)
                    if (a, b) in edges and (b, a) in edges)
    assert cycles == []


CLI_MAY_IMPORT = {"api", "errors", "cli", "trace.storage"}  # trace.storage: --storage-option is parsed for every command


def test_the_cli_calls_only_the_python_api():
    found = []
    for path in (PACKAGE / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                if name.startswith("moescope.") and not any(name == f"moescope.{ok}" or name.startswith(f"moescope.{ok}.")
                                                            for ok in CLI_MAY_IMPORT):
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    assert found == []


def test_nothing_below_the_api_reaches_it_through_the_package():
    """`import moescope; moescope.capture(...)` inside the package is an import of api.py in disguise."""
    public = set(ast.literal_eval(re.search(r"_PUBLIC = (\(.*?\))", (PACKAGE / "__init__.py").read_text(), re.S).group(1)))
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE or path.parent.name == "cli" or path.name == "api.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "moescope" \
                    and node.attr in public:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses moescope.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "moescope" and any(a.name in public for a in node.names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {[a.name for a in node.names]} from moescope")
    assert found == []
