"""`make mutation` (python tests/mutation.py [MODULE ...]): mutation testing of the numeric and integrity core with
mutmut, module by module, each against the tests that cover it; prints one Markdown row per module for
docs/results.md. Slow (minutes per module on two cores), so not part of `make test` or CI.

Each module runs in a copy of the working tree of its own (mutmut writes its `mutants/` folder and reads its
`[tool.mutmut]` settings from the project folder), so modules never share results.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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
# mutmut's summary line: killed 🎉, no tests 🫥, timeout ⏰, suspicious 🤔, survived 🙁, skipped 🔇
SUMMARY = re.compile(r"(\d+)/(\d+)\s+🎉 (\d+) 🫥 (\d+)\s+⏰ (\d+)\s+🤔 (\d+)\s+🙁 (\d+)\s+🔇 (\d+)")
SKIP = {".git", ".venv", "work", "data", "mutants", ".hypothesis", "__pycache__", ".pytest_cache", ".ruff_cache"}


def settings(module: str, tests: list[str]) -> str:
    listed = lambda items: "[" + ", ".join(f'"{item}"' for item in items) + "]"  # noqa: E731
    # paths_to_mutate and tests_dir: mutmut 3.8 warns that they are deprecated, but with them its stats pass runs the
    # module's tests alone (the whole suite would take 20 minutes per module)
    return (f"\n[tool.mutmut]\npaths_to_mutate = {listed([module])}\ntests_dir = {listed(tests)}\n"
            f"also_copy = {listed(['pipeline/', 'cache/', 'stages/', 'benches/', 'tests/'])}\n")


def mutate(module: str, tests: list[str]) -> dict[str, int]:
    """mutmut on `module` in a copy of the tree: its counts (total, killed, timeout, survived, no tests, ...)."""
    with tempfile.TemporaryDirectory(prefix="hp-pipe-mutation-") as folder:
        copy = Path(folder) / "tree"
        shutil.copytree(ROOT, copy, ignore=lambda _, names: [n for n in names if n in SKIP])
        with (copy / "pyproject.toml").open("a") as f:
            f.write(settings(module, tests))
        mutmut = Path(sys.executable).with_name("mutmut")
        proc = subprocess.run([str(mutmut), "run"], cwd=copy, capture_output=True, text=True,
                              env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
        found = SUMMARY.findall(proc.stdout.replace("\r", "\n"))
        if not found:
            raise SystemExit(f"mutmut gave no summary for {module}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        done, total, killed, untested, timeout, suspicious, survived, skipped = map(int, found[-1])
        names = subprocess.run([str(mutmut), "results"], cwd=copy, capture_output=True, text=True).stdout
        return {"total": total, "killed": killed, "timeout": timeout, "survived": survived, "untested": untested,
                "suspicious": suspicious, "skipped": skipped,
                "survivors": [line.split(":")[0].strip() for line in names.splitlines() if "survived" in line]}


def main(selected: list[str]) -> None:
    print("| module | mutants | killed | timeout | survived | no tests | killed or timed out (%) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for module, tests in MODULES.items():
        if selected and module not in selected:
            continue
        c = mutate(module, tests)
        caught = 100 * (c["killed"] + c["timeout"]) / max(c["total"] - c["skipped"], 1)
        print(f"| `{module}` | {c['total']} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['untested']} "
              f"| {caught:.1f} |", flush=True)
        for name in c["survivors"]:
            print(f"|   survived: `{name}` | | | | | | |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
