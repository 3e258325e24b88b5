"""The package's shape: small modules, imports that form no cycle, no function-local imports
of refusaldir modules, no cross-module use of private names, no global side effects.

The stage layering itself is checked by import-linter (``lint-imports``, contracts in
pyproject.toml), which scripts/test.sh runs before pytest.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "refusaldir"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """``(module, names, inside_function)`` for every refusaldir import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[str, list[str], bool]] = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.split(".")[0] == "refusaldir":
                    out.append((child.module, [a.name for a in child.names], func))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "refusaldir":
                        out.append((a.name, [], func))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # annotations only: not a runtime dependency
            visit(child, func)

    visit(tree, False)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, names, _ in _imports(path):
            for name in names or [""]:
                sub = f"{target}.{name}" if name else target
                dest = sub if sub in MODULES else target
                if dest in MODULES and dest != mod:
                    graph[mod].add(dest)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_is_too_long():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_function_local_imports_of_refusaldir():
    local = [(m, target) for m, p in MODULES.items() for target, _, in_func in _imports(p) if in_func]
    assert not local, f"imports inside functions (move them to the top): {local}"


def test_no_private_names_across_modules():
    bad = []
    for mod, path in MODULES.items():
        for target, names, _ in _imports(path):
            for name in names:
                if name.startswith("_") and not name.startswith("__") and target != mod:
                    bad.append((mod, f"{target}.{name}"))
            if any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
                bad.append((mod, target))
    assert not bad, f"private names imported from another module: {bad}"


def test_importing_refusaldir_changes_no_global_state():
    code = (
        "import warnings, torch\n"
        "before = (list(warnings.filters), torch.random.get_rng_state().clone())\n"
        "import refusaldir, refusaldir.cli\n"
        "after = (list(warnings.filters), torch.random.get_rng_state())\n"
        "assert before[0] == after[0], 'warning filters changed'\n"
        "assert torch.equal(before[1], after[1]), 'global RNG changed'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_every_package_has_an_all():
    missing = [m for m, p in MODULES.items() if p.name == "__init__.py" and "__all__" not in p.read_text()]
    assert not missing, f"packages without __all__: {missing}"


def test_layer_contracts():
    """import-linter's layers contract (pyproject.toml) holds."""
    exe = Path(sys.executable).parent / "lint-imports"
    res = subprocess.run([str(exe)], cwd=PKG.parent, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def test_top_level_names_do_not_shadow_subpackages():
    import refusaldir

    subpackages = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    clash = sorted(set(refusaldir.__all__) & subpackages)
    assert not clash, f"refusaldir.{clash} would hide the subpackage of the same name"
