"""docs/architecture.md is true: the layer table (every file in one layer, imports only go up) and the test map."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crma_lightning"


def layer_table() -> list[tuple[str, list[str], bool]]:
    """``(layer, paths, imports_lightning)`` per row of the table, in order (paths relative to the package)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("layer", "---"):
            continue
        # The files cell: the backticked .py files and directories (trailing /) outside parentheses, which
        # only name what a directory holds.
        files = re.sub(r"\([^)]*\)", "", cells[1])
        paths = [p for p in re.findall(r"`([^`]+)`", files) if p.endswith((".py", "/"))]
        rows.append((cells[0], paths, not cells[3].startswith("no")))
    return rows


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(path: Path, table: list[tuple[str, list[str], bool]]) -> list[int]:
    """Rows whose paths cover ``path``: a file named exactly, else the deepest directory holding it."""
    rel = path.relative_to(PACKAGE).as_posix()
    exact = [i for i, (_, paths, _) in enumerate(table) if rel in paths]
    if exact:
        return exact
    holding = [
        (len(p), i) for i, (_, paths, _) in enumerate(table) for p in paths if p.endswith("/") and rel.startswith(p)
    ]
    return [max(holding)[1]] if holding else []


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules ``path`` imports, at any level (``from pkg import module`` counts the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found |= subs or {node.module}
    return found


def imports_lightning(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "lightning" or n.startswith(("lightning.", "pytorch_lightning")) for n in names):
            return True
    return False


def test_every_file_is_in_exactly_one_layer():
    table = layer_table()
    assert [name for name, _, _ in table][:2] == ["root", "adapters"]
    placement = {path.relative_to(PACKAGE).as_posix(): layer_of(path, table) for path in module_files().values()}
    assert {f: rows for f, rows in placement.items() if len(rows) != 1} == {}
    listed = {p for _, paths, _ in table for p in paths}
    assert {p for p in listed if not (PACKAGE / p).exists()} == set(), "the table names files that do not exist"


def test_imports_only_go_up_the_layer_table_and_no_lightning_where_the_table_says_no():
    table, modules = layer_table(), module_files()
    layer = {name: layer_of(path, table)[0] for name, path in modules.items()}
    upward = []
    for name, path in modules.items():
        for target in sorted(imported_modules(path, modules)):
            if layer[target] > layer[name]:
                upward.append(f"{name} ({table[layer[name]][0]}) imports {target} ({table[layer[target]][0]})")
    assert upward == []
    lightning = [n for n, p in modules.items() if not table[layer[n]][2] and imports_lightning(p)]
    assert lightning == []


def test_the_test_map_covers_every_file_and_names_existing_tests():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Where the tests are", 1)[1].split("\n## ", 1)[0]
    covered, named_tests = set(), set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("source", "---"):
            continue
        covered |= {p for p in re.findall(r"`([^`]+)`", cells[0]) if p.endswith((".py", "/"))}
        named_tests |= set(re.findall(r"`([^`]+\.py)`", cells[1]))
    files = {path.relative_to(PACKAGE).as_posix() for path in module_files().values()}
    dirs = {p for p in covered if p.endswith("/")}
    missing = {f for f in files if f not in covered and not any(f.startswith(d) for d in dirs)}
    assert missing == set(), "files with no row in docs/architecture.md's test map"
    assert {t for t in named_tests if not (ROOT / "tests" / t).is_file()} == set()
