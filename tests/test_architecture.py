"""docs/architecture.md is true: folders are layers, imports follow the folder table, the tree lists every file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crma_lightning"
DOC = ROOT / "docs" / "architecture.md"
# The one entry point allowed to import the top: `python -m crma_lightning` runs the CLI.
ENTRY_POINTS = {"crma_lightning.__main__"}


def section(title: str) -> str:
    return DOC.read_text().split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def folder_table() -> dict[str, tuple[set[str], bool | set[str]]]:
    """Folder -> (folders it may import, whether it may import Lightning: True, False or the files that may)."""
    rows = {}
    for line in section("Layers").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("folder", "---"):
            continue
        folder, may, lightning, _ = cells
        imports = set() if may == "-" else {m.strip() for m in may.split(",")}
        if lightning.startswith("no"):
            allowed: bool | set[str] = False
        elif "only" in lightning:
            allowed = set(re.findall(r"`([^`]+\.py)`", lightning))
        else:
            allowed = True
        rows[folder] = (imports, allowed)
    return rows


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def folder_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else "root"


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


def test_every_folder_of_the_package_is_a_row_of_the_folder_table():
    table = folder_table()
    assert list(table)[:2] == ["root", "adapters"]
    folders = {folder_of(p) for p in module_files().values()}
    assert folders == set(table), "folders without a row, or rows without a folder"
    for name, (imports, _) in table.items():
        assert imports <= set(table) - {"root"}, f"{name}: may import unknown folders {imports - set(table)}"


def test_imports_follow_the_folder_table():
    table, modules = folder_table(), module_files()
    wrong = []
    for name, path in modules.items():
        if name in ENTRY_POINTS:
            continue
        mine = folder_of(path)
        allowed = table[mine][0] | {mine, "root"}
        for target in sorted(imported_modules(path, modules)):
            if folder_of(modules[target]) not in allowed:
                wrong.append(f"{name} ({mine}) imports {target} ({folder_of(modules[target])})")
    assert wrong == []


def test_the_folder_table_is_a_layering_no_cycle_and_no_upward_import():
    table = folder_table()
    order = list(table)
    upward = [f"{f} -> {g}" for f, (imports, _) in table.items() for g in imports if order.index(g) >= order.index(f)]
    assert upward == [], "a folder may import only folders above it in the table"


def test_lightning_only_where_the_folder_table_says():
    table, modules = folder_table(), module_files()
    wrong = []
    for path in modules.values():
        allowed = table[folder_of(path)][1]
        rel = path.relative_to(PACKAGE).as_posix()
        ok = allowed is True or (isinstance(allowed, set) and rel in allowed)
        if not ok and imports_lightning(path):
            wrong.append(rel)
    assert wrong == []


def test_data_never_imports_routing_model_or_evaluation():
    # The rule the folder table states, named here so that a change to the table must face it.
    data = folder_table()["data"][0]
    assert not data & {"routing", "model", "evaluation", "callbacks", "generation"}


def test_the_tree_lists_every_file_once():
    block = section("The tree").split("```", 2)[1]
    listed, folder = [], ""
    for line in block.splitlines()[2:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        if name.endswith("/"):
            folder = name
        elif indent == 2:
            listed.append(name)
            folder = ""
        else:
            listed.append(folder + name)
    files = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))
    assert sorted(listed) == files


def test_no_package_file_over_the_size_bar_unless_the_doc_names_it_one_concept():
    text = DOC.read_text()
    big = [
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if len(p.read_text().splitlines()) > 420 and f"`{p.relative_to(PACKAGE).as_posix()}`" not in text
    ]
    assert big == [], "files over ~400 lines must be named in docs/architecture.md as one concept"


def test_old_import_paths_resolve_to_the_same_modules():
    import importlib

    from crma_lightning._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(f"crma_lightning.{old}") is importlib.import_module(f"crma_lightning.{new}")
    from crma_lightning.prototype import load_router

    from crma_lightning.routing.prototype import load_router as new_load_router

    assert load_router is new_load_router


def test_tests_mirror_the_package_folders():
    tests = ROOT / "tests"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    package = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders - package == {"helpers", "bench"}, folders - package  # every other test folder is a package folder
    files = sorted(tests.rglob("*.py"))
    assert not [p for p in files if p.name == "__init__.py"], "tests/ has no packages: names are unique instead"
    names = [p.name for p in files if p.name.startswith("test_")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert not [p for p in files if p.parent == tests / "helpers" and p.name.startswith("test_")]
    for path in files:
        nodes = ast.walk(ast.parse(path.read_text()))
        imported = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m.startswith("test_") or m == "conftest"}, (path, imported)
