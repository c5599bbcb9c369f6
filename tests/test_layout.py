"""The layout's rules, checked on the source: no import cycles, `worker` never imports `api` or the
web framework, modules and functions stay small, no private name crosses a module boundary, and
docstrings cite only files that exist in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("worker", "api")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return found


def imports_of(name: str, path: Path, tree: ast.Module, known: set[str]) -> list[tuple[str, int, list[str]]]:
    """(imported module, line, names taken) for every import, module-level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:  # `from worker.sql import models`: the module itself
                    out.append((full, node.lineno, []))
                else:
                    out.append((base, node.lineno, [alias.name]))
    return out


def graph() -> dict[str, set[str]]:
    mods = sources()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, tree) in mods.items():
        for target, _line, _names in imports_of(name, path, tree, known):
            if target in known and target != name:
                edges[name].add(target)
    return edges


def test_no_import_cycles() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert cycles == []


def test_worker_never_imports_api_or_the_web_framework() -> None:
    mods = sources()
    known = set(mods)
    bad = [
        f"{name}: {target}"
        for name, (path, tree) in mods.items()
        if name.startswith("worker")
        for target, _line, _names in imports_of(name, path, tree, known)
        if target.split(".")[0] in ("api", "fastapi", "starlette", "uvicorn")
    ]
    assert bad == []


def test_modules_and_functions_stay_small() -> None:
    long_modules, long_functions = [], []
    for name, (path, tree) in sources().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {lines}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length}")
    assert long_modules == []
    assert long_functions == []


def test_no_private_name_crosses_a_module() -> None:
    mods = sources()
    known = set(mods)
    bad = [
        f"{name}:{line} takes {n} from {target}"
        for name, (path, tree) in mods.items()
        for target, line, names in imports_of(name, path, tree, known)
        for n in names
        if n.startswith("_") and not n.startswith("__") and target.split(".")[0] in PACKAGES
    ]
    assert bad == []


def test_docstrings_cite_files_of_the_repository() -> None:
    cited = re.compile(r"\b((?:worker|api|tests|bench|migrations|deploy)/[\w/.-]+\.(?:py|md|toml|json|yml))")
    missing = []
    for name, (_path, tree) in sources().items():
        text = ast.get_docstring(tree) or ""
        if re.search(r"DESIGN|shared/|research/|spec/dashscope", text):
            missing.append(f"{name}: cites a document outside the repository")
        missing += [f"{name}: {ref}" for ref in cited.findall(text) if not (ROOT / ref).exists()]
    assert missing == []
