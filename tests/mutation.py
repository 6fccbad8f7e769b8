"""`make mutation` (python tests/mutation.py [MODULE ...]): mutation testing of the numeric and integrity core with
mutmut, module by module, each against the tests that cover it; prints one Markdown row per module for
docs/results.md. Slow (minutes per module on two cores), so not part of `make test` or CI.

Each module runs in a copy of the working tree of its own (mutmut writes its `mutants/` folder and reads its
`[tool.mutmut]` settings from the project folder), so modules never share results.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# module -> the tests that cover it (only these run against each mutant)
MODULES = {
    "pipeline/evaluation/metrics.py": ["tests/test_metrics.py", "tests/test_properties.py"],
    "pipeline/extraction/lhp.py": ["tests/test_lhp.py", "tests/test_properties.py"],
    "pipeline/methods/hp/loss.py": ["tests/test_hp_loss.py"],
    "pipeline/methods/hcl/loss.py": ["tests/test_hcl_loss.py"],
    "pipeline/methods/hcl/mogo.py": ["tests/test_hcl_loss.py"],
    "pipeline/methods/stego/loss.py": ["tests/test_stego_loss.py"],
    "cache/integrity.py": ["tests/test_cache.py", "tests/test_properties.py"],
    "cache/quant.py": ["tests/test_quant.py", "tests/test_int8_cache.py", "tests/test_properties.py"],
}
SKIP = {".git", ".venv", "work", "data", "mutants", ".hypothesis", "__pycache__", ".pytest_cache", ".ruff_cache"}
# out of scope: a mutant whose only change is the text of a message (a string inside `raise`, an assert's message,
# or a call of one of these), which no numeric or integrity test should pin down
MESSAGE_CALLS = {"print", "log", "warn", "warning", "info", "debug", "error", "echo", "UserError"}
MUTANT = re.compile(r"^(?P<function>.+)__mutmut_(?P<n>\d+|orig)$")
SURVIVORS = ROOT / "work" / "mutation"  # each module's surviving mutants, as diffs (for docs/results.md)


def settings(module: str, tests: list[str]) -> str:
    listed = lambda items: "[" + ", ".join(f'"{item}"' for item in items) + "]"  # noqa: E731
    # paths_to_mutate and tests_dir: mutmut 3.8 warns that they are deprecated, but with them its stats pass runs the
    # module's tests alone (the whole suite would take 20 minutes per module)
    return (f"\n[tool.mutmut]\npaths_to_mutate = {listed([module])}\ntests_dir = {listed(tests)}\n"
            f"also_copy = {listed(['pipeline/', 'cache/', 'stages/', 'benches/', 'tests/'])}\n"
            # a mutant that makes the tests run 4x longer than unmutated is caught as timed out (mutmut's default
            # 15x spent most of a module's time waiting on such mutants)
            "timeout_multiplier = 4.0\n")


def _message_context(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether `node` lies in a message: under a `raise`, an assert's message, or a call of MESSAGE_CALLS."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Raise) or (isinstance(parent, ast.Assert) and node is parent.msg):
            return True
        if isinstance(parent, ast.Call) and node is not parent.func:
            func = parent.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) in MESSAGE_CALLS:
                return True
        node = parent
    return False


def message_only(original: ast.AST, mutant: ast.AST) -> bool:
    """Whether `mutant` differs from `original` only in the text of messages (same tree, string constants changed
    only where _message_context says a message is)."""
    parents = {child: node for node in ast.walk(mutant) for child in ast.iter_child_nodes(node)}
    pairs = list(zip(ast.walk(original), ast.walk(mutant), strict=False))
    if len(pairs) != sum(1 for _ in ast.walk(original)) or len(pairs) != sum(1 for _ in ast.walk(mutant)):
        return False
    changed = False
    for old, new in pairs:
        if type(old) is not type(new):
            return False
        if isinstance(old, ast.Constant) and old.value != new.value:
            if not (isinstance(old.value, str) and _message_context(new, parents)):
                return False
            changed = True
        elif not isinstance(old, ast.Constant):
            plain = [f for f in old._fields if not isinstance(getattr(old, f), ast.AST | list)]
            if any(getattr(old, f) != getattr(new, f) for f in plain if f not in ("ctx", "type_comment")):
                return False
    return changed


def message_mutants(mutated_file: Path, module_name: str) -> set[str]:
    """The mutants of one mutated file (mutmut's copy, holding each function's original and its mutants) that change
    only a message's text, by mutmut's names (`pipeline.x.y.x_f__mutmut_3`)."""
    tree = ast.parse(mutated_file.read_text())
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    out = set()
    for name, node in functions.items():
        match = MUTANT.match(name)
        if match and match["n"] != "orig":
            original = functions.get(f"{match['function']}__mutmut_orig")
            if original is not None:
                node.name = original.name  # the names differ by construction
                if message_only(original, node):
                    out.add(f"{module_name}.{name}")
                node.name = name
    return out


def mutate(module: str, tests: list[str]) -> dict[str, Any]:
    """mutmut on `module` in a copy of the tree: its counts by status (message-only mutants counted apart), and
    the survivors' diffs written to work/mutation/."""
    with tempfile.TemporaryDirectory(prefix="hp-pipe-mutation-") as folder:
        copy = Path(folder) / "tree"
        shutil.copytree(ROOT, copy, ignore=lambda _, names: [n for n in names if n in SKIP])
        with (copy / "pyproject.toml").open("a") as f:
            f.write(settings(module, tests))
        mutmut = Path(sys.executable).with_name("mutmut")
        # one thread: the time limit is CPU time, and idle OpenMP threads spinning on a busy machine would use up a
        # correct mutant's allowance (it would count as timed out, i.e. caught, without any test failing)
        env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HP_PIPE_MUTATION": "1",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.run([str(mutmut), "run"], cwd=copy, capture_output=True, text=True, env=env)
        listing = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=copy, capture_output=True,
                                 text=True, env=env).stdout
        status = dict(line.strip().rsplit(": ", 1) for line in listing.splitlines() if ": " in line)
        if not status:
            raise SystemExit(f"mutmut gave no results for {module}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        messages = message_mutants(copy / "mutants" / module, module.removesuffix(".py").replace("/", "."))
        counts = Counter(state for name, state in status.items() if name not in messages)
        survivors = sorted(name for name, state in status.items() if state == "survived" and name not in messages)
        SURVIVORS.mkdir(parents=True, exist_ok=True)
        diffs = [subprocess.run([str(mutmut), "show", name], cwd=copy, capture_output=True, text=True,
                                env=env).stdout for name in survivors]
        (SURVIVORS / (module.removesuffix(".py").replace("/", ".") + ".diff")).write_text("\n".join(diffs))
        return {"total": sum(counts.values()), "messages": len(messages & set(status)), "counts": counts,
                "survivors": survivors}


def main(selected: list[str]) -> None:
    print("| module | mutants | killed | timeout | survived | other | caught (%) | message-only (excluded) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for module, tests in MODULES.items():
        if selected and module not in selected:
            continue
        r = mutate(module, tests)
        c = r["counts"]
        caught = c["killed"] + c["timeout"]
        other = r["total"] - caught - c["survived"]
        print(f"| `{module}` | {r['total']} | {c['killed']} | {c['timeout']} | {c['survived']} | {other} "
              f"| {100 * caught / max(r['total'], 1):.1f} | {r['messages']} |", flush=True)
        for name in r["survivors"]:
            print(f"|   survived: `{name}` | | | | | | | |", flush=True)
        if other:
            print(f"|   other: {dict((k, v) for k, v in c.items() if k not in ('killed', 'timeout', 'survived'))} "
                  "| | | | | | | |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
