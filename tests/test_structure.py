"""The repository's shape: imports flow one way and analysis/ never loads a deep-learning framework.

The import graph is read from the source (every ``import`` statement, module level or inside a function: a lazy
import is still a dependency), so a cycle fails here even when no test happens to execute both ends of it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

# The shared core first; a package may import only packages listed before it (jobs drives scaling's runs and
# analysis's predictions; scaling and analysis never see each other).
PACKAGE_LAYERS = {"larscale": 0, "models": 1, "scaling": 2, "analysis": 2, "jobs": 3}
FRAMEWORKS = ("torch", "tensorflow", "horovod", "keras", "tf_keras")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the repository modules it imports (absolute imports, resolved to the longest existing module)."""
    sources = {module_name(p): p for package in PACKAGE_LAYERS for p in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in sources.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in sources:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    graph[module].add(name)
                    break
        graph.setdefault(module, set())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one node (Tarjan), as a sorted list of names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules() -> None:
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_packages_import_only_layers_below_them() -> None:
    wrong = sorted(f"{module} imports {target}" for module, targets in import_graph().items() for target in targets
                   if PACKAGE_LAYERS[target.split(".")[0]] >= PACKAGE_LAYERS[module.split(".")[0]]
                   and target.split(".")[0] != module.split(".")[0])
    assert not wrong, "\n".join(wrong)


def test_analysis_and_the_core_import_no_framework_in_their_source() -> None:
    offenders = []
    for package in ("analysis", "larscale"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in FRAMEWORKS]
    assert not offenders, offenders


def test_importing_every_analysis_module_loads_no_framework() -> None:
    """Also what they import indirectly (models, larscale): run in a fresh interpreter and look at sys.modules."""
    modules = sorted(m for m in import_graph() if m.split(".")[0] in ("analysis", "larscale")
                     and not m.endswith("__main__"))
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FRAMEWORKS!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_one_copy_of_the_shared_helpers() -> None:
    """Names that once existed twice are defined once (the run format's statistics and exit statuses)."""
    for name in ("t_quantile_975", "EXIT_RESUMABLE", "EXIT_STALLED", "write_json_atomic", "walltime_seconds"):
        defined = [str(p.relative_to(REPO)) for package in PACKAGE_LAYERS for p in (REPO / package).rglob("*.py")
                   if any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name
                          or isinstance(n, ast.Assign) and any(getattr(t, "id", None) == name for t in n.targets)
                          for n in ast.parse(p.read_text()).body)]
        assert len(defined) == 1, f"{name} defined in {defined}"


# Every Python module of these packages stays readable in one sitting (the project's style rule).
MAX_MODULE_LINES = 600
LINE_CHECKED_PACKAGES = ("larscale", "models", "scaling", "jobs", "analysis", "tools")


def long_modules(root: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    """'path: N lines' for every .py file under the packages of ``root`` longer than ``limit`` lines."""
    found = []
    for package in LINE_CHECKED_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > limit:
                found.append(f"{path.relative_to(root)}: {lines} lines")
    return found


def test_the_length_check_finds_a_long_module(tmp_path: Path) -> None:
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (tmp_path / "tools" / "short.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    assert long_modules(tmp_path) == [f"tools/long.py: {MAX_MODULE_LINES + 1} lines"]


def test_no_module_over_600_lines() -> None:
    assert long_modules(REPO) == []
