"""The import graph: the library (pipeline/, cache/) never imports a stage (the command line, pipeline/cli.py, is
the one entry point that dispatches to them), and stage modules form no import cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_the_library_never_imports_a_stage():
    offenders = {module_name(p): sorted(m for m in imported_modules(p) if m == "stages" or m.startswith("stages."))
                 for folder in ("pipeline", "cache") for p in (ROOT / folder).rglob("*.py")
                 if p.name != "cli.py"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_stage_modules_form_no_import_cycle():
    stages = {module_name(p): p for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py"}
    graph = {name: {m for m in imported_modules(p) if m in stages and m != name} for name, p in stages.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*trail, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
    assert "stages.train" not in graph["stages.train_hcl"]  # the former cycle: shared parts live in pipeline.trainer
