"""The shape of the code (docs/architecture.md): config is the ground, presets apply in one place, and
no two modules import each other at load time. Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mvrec", "tasks", "flows", "storage", "recommender")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(node: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement under `node` names (relative imports resolved)."""
    names: set[str] = set()
    for stmt in ast.walk(node):
        if isinstance(stmt, ast.Import):
            names.update(alias.name for alias in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            base = stmt.module or ""
            if stmt.level:
                parent = module.split(".")[: len(module.split(".")) - stmt.level + is_package]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in stmt.names)
    return names


def load_time_imports(path: Path, module: str) -> set[str]:
    """Imports that run when the module loads: its top level, not function bodies or TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        names |= imported_names(node, module, path.name == "__init__.py")
    return names


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph` (module -> modules it imports), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt, [*path, node]):
                return cycle
        done.add(node)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_config_imports_nothing_from_the_project():
    path = ROOT / "mvrec" / "config.py"
    names = imported_names(ast.parse(path.read_text(encoding="utf-8")), "mvrec.config", False)
    project = sorted(n for n in names if n.split(".")[0] in PACKAGES and n != "mvrec.config")
    assert not project, f"mvrec/config.py is the ground and imports {project}"


def test_one_apply_preset_call_site():
    calls = []
    folders = [d for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".")]  # not .venv
    for path in sorted(p for folder in folders for p in folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            func = node.func if isinstance(node, ast.Call) else None
            if getattr(func, "id", None) == "apply_preset" or getattr(func, "attr", None) == "apply_preset":
                calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls and len(calls) == 1 and calls[0].startswith("mvrec/config.py:"), calls


def test_no_import_cycle_at_load_time():
    modules = project_modules()
    graph = {name: {m for m in load_time_imports(path, name) if m in modules and m != name}
             for name, path in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None
