"""The package's shape: imports form a DAG between stages, every module has its test file.

Stages, lowest first (docs/ARCHITECTURE.md): a module may import only from stages below its own,
and within its own stage group (llm/, analysis/, workflow/) without a cycle. The walk reads every
import statement with ast, inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "helpers"
TESTS = Path(__file__).resolve().parent

# Stage of each top-level module or group. Groups of the same stage may not import each other.
STAGES = {
    "config": 0, "contract": 0,
    "data": 1, "metrics": 1, "tracking": 1,
    "llm": 2, "baselines": 2,
    "analysis": 3, "serving": 3,
    "workflow": 4,
    "cli": 5,
}
# `helpers/__init__` loads the BLAS (helpers.llm.blas) before anything imports mlx;
# `__main__` runs the command line.
ROOT_FILES = {"__init__", "__main__"}


def modules() -> dict[str, Path]:
    """'llm.scoring' -> its file, for every module of the package (no __init__ files)."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        if rel.name in ROOT_FILES:
            continue
        out[".".join(rel.parts)] = path
    return out


def group(module: str) -> str:
    return module.split(".")[0]


def imports(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports (`from helpers.llm import scoring` -> llm.scoring)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith("helpers."):
                continue
            mod = name.removeprefix("helpers.")
            # `from helpers.config import Params` -> config; `from helpers import data` -> data
            while mod and mod not in known:
                mod = mod.rpartition(".")[0]
            if mod:
                found.add(mod)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_every_module_belongs_to_a_stage():
    unknown = sorted({group(m) for m in modules()} - set(STAGES))
    assert not unknown, f"give these a stage in STAGES and docs/ARCHITECTURE.md: {unknown}"


def test_no_import_goes_up_or_sideways_between_stages():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            a, b = group(mod), group(dep)
            if a != b and STAGES[b] >= STAGES[a]:
                bad.append(f"{mod} (stage {STAGES[a]}) imports {dep} (stage {STAGES[b]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_the_walk_sees_lazy_imports(tmp_path):
    """A regression guard for the test itself: an import inside a function counts."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from helpers.analysis import figures\n    import helpers.data\n")
    assert imports(f, {"analysis.figures", "data"}) == {"analysis.figures", "data"}


def test_command_line_code_lives_in_cli():
    """Only cli.py parses arguments: no `cli_*` functions and no argparse anywhere else."""
    bad = []
    for mod, path in modules().items():
        if mod == "cli":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("cli_"):
                bad.append(f"{mod}.{node.name}")
        if "import argparse" in path.read_text():
            bad.append(f"{mod} imports argparse")
    assert not bad, bad


def test_every_module_has_a_test_file():
    """tests/ mirrors the package: test_<module>.py for every module."""
    missing = [m for m in modules() if not (TESTS / f"test_{m.split('.')[-1]}.py").is_file()]
    assert not missing, f"no tests/test_<name>.py for {missing}"
