"""The import graph (issue 11): no stage module imports another (the stage graph, pipeline/orchestration/graph.py,
runs their upstream); no import cycle among the project's modules; the library (pipeline/, cache/) never imports a
stage (the command line, pipeline/cli.py, is the one entry point that dispatches to them), and no stage is named by
a string: the stage modules register their functions (pipeline/orchestration/stage.py `implement`)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "cache", "stages")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imported_modules(path: Path, known: set[str] | None = None, name: str | None = None) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included); `from a import b` counts as
    `a.b` when that is a module of `known`, else as `a`. Relative imports are resolved against the file (whose
    module name is `name`, default: its path in the repository)."""
    out: set[str] = set()
    name = name or module_name(path)
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names
                       if known is None or f"{base}.{alias.name}" in known)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a module importing `a.b.c` depends on `a.b.c`, not on `a`)."""
    modules = project_modules()
    known = set(modules)
    return {name: {m for m in imported_modules(path, known) if m in known and m != name and m not in PACKAGES}
            for name, path in modules.items()}


def stage_strings(path: Path) -> list[str]:
    """String constants naming a stage module ("stages.x:body", "stages.x")."""
    return [node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.startswith("stages.") and " " not in node.value]


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path (first node repeated last), None when there is none."""
    state: dict[str, int] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        trail.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*trail[trail.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        trail.pop()
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def stage_offenders(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Stage modules that import a stage module, with what they import."""
    offenders = {name: sorted(m for m in deps if m == "stages" or m.startswith("stages."))
                 for name, deps in graph.items() if name.startswith("stages.")}
    return {k: v for k, v in offenders.items() if v}


def test_no_stage_module_imports_another():
    assert stage_offenders(import_graph()) == {}


def test_the_library_never_imports_a_stage():
    offenders = {module_name(p): sorted(m for m in imported_modules(p) if m == "stages" or m.startswith("stages."))
                 for folder in ("pipeline", "cache") for p in (ROOT / folder).rglob("*.py")
                 if p != ROOT / "pipeline" / "cli.py"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycle_among_the_project_modules():
    assert cycle_in(import_graph()) is None
    assert "stages.train_hcl" not in project_modules()  # the former cycle: both loops are the library's


def test_no_stage_is_named_by_a_string():
    """Stage functions are callables, never "stages.<module>:<function>" names: the library declares a stage of
    stages/ without functions and the stage module registers them (pipeline/orchestration/stage.py `implement`);
    importlib is used by the method registry (entry-point style) and by the stages package to find its modules."""
    named = {module_name(p): stage_strings(p)
             for folder in ("pipeline", "cache") for p in (ROOT / folder).rglob("*.py")}
    assert {k: v for k, v in named.items() if v} == {}
    importers = {module_name(p) for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")
                 if "importlib" in imported_modules(p) and "import_module" in p.read_text()}
    # the method registry (entry-point style) and the stages package finding its own modules (plug-in style)
    assert importers <= {"pipeline.methods.registry", "stages"}, importers


def test_every_stage_of_every_method_is_implemented_by_one_function():
    """Once `stages` is imported, each stage of each method's graph has a callable body (and its hooks are
    callables), from a module of stages/ or the method's own package."""
    import stages  # noqa: F401
    from pipeline.methods.registry import methods
    from pipeline.orchestration.graph import method_stages
    from pipeline.orchestration.stage import implemented

    for method in methods().values():
        for name, declared in method_stages(method).items():
            stage = implemented(name, declared)
            assert callable(stage.body), (method.name, name)
            assert stage.body.__module__.startswith(("stages.", f"pipeline.methods.{method.name}.")), stage.body
            for hook in (stage.check, stage.preflight, stage.then):
                assert hook is None or callable(hook), (name, hook)


def test_the_checks_catch_what_they_forbid(tmp_path):
    """The checks are not vacuous: a stage importing a stage (even inside a function), and a cycle, are found."""
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None
    source = (ROOT / "stages" / "features.py").read_text()
    fake = tmp_path / "features.py"
    fake.write_text(source + "\n\ndef late():\n    from stages import prepare\n    return prepare\n")
    known = set(project_modules())
    deps = {m for m in imported_modules(fake, known, "stages.features") if m in known and m not in PACKAGES}
    assert stage_offenders({"stages.features": deps}) == {"stages.features": ["stages.prepare"]}
    assert stage_offenders({"stages.features": {m for m in imported_modules(ROOT / "stages" / "features.py", known)
                                                if m in known}}) == {}


def test_the_library_never_imports_the_benches():
    """Bench code lives in its own package (benches/): only the CLI's bench commands import it, lazily, and
    importing the library or a stage pulls none of it. A method's own bench (pipeline/methods/<name>/bench.py, found
    by benches/__init__.py) is bench code kept beside its method: nothing in the library imports it."""
    import subprocess
    import sys

    offenders = {module_name(p): sorted(m for m in imported_modules(p) if m == "benches" or m.startswith("benches."))
                 for folder in ("pipeline", "cache", "stages") for p in (ROOT / folder).rglob("*.py")
                 if p != ROOT / "pipeline" / "cli.py" and not (p.name == "bench.py"
                                                                and p.parent.parent.name == "methods")}
    assert {k: v for k, v in offenders.items() if v} == {}
    method_benches = {module_name(p) for p in (ROOT / "pipeline" / "methods").glob("*/bench.py")}
    importers = {module_name(p) for folder in ("pipeline", "cache", "stages") for p in (ROOT / folder).rglob("*.py")
                 if method_benches & set(imported_modules(p))}
    assert importers == set(), importers  # a method's bench is imported by benches/ alone
    probe = ("import sys, pipeline.cli, pipeline.orchestration.graph, stages.train, stages.evaluate, stages.features\n"
             "from pipeline.methods.registry import methods\nmethods()\n"
             "print(sorted(m for m in sys.modules if m == 'benches' or m.startswith('benches.')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"
