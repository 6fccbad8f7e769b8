"""The evaluation report: one Markdown page with the protocol, the results table and the pictures.

Plain Markdown so it reads on GitHub, in an editor or a terminal; pictures are linked relative to the page so the
run folder can be moved or archived as a whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

RANDOM_INIT_NOTE = ("**Random-initialized backbone: these numbers test the pipeline, they say nothing about the "
                    "method.**")
RESULT_KEYS = ("name", "probe", "features", "crf", "miou", "acc")
HEADER = ("result", "probe", "features", "CRF", "mIoU (%)", "Acc (%)")


def _cell(value: object) -> str:
    """One table cell: booleans as yes/no, floats with 1 decimal, None as a dash, pipes escaped."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | int):
        return f"{value:.1f}"
    return str(value).replace("|", "\\|")


def _spread(result: dict, key: str) -> str:
    """mean ± std where the result has a spread over seeds (overclustering), the plain value otherwise."""
    if result.get(f"{key}_std") is None:
        return _cell(result[key])
    return f"{result[key]:.1f} ± {result[f'{key}_std']:.1f}"


def _row(cells: list[str] | tuple[str, ...]) -> str:
    return "| " + " | ".join(cells) + " |"


def results_table(results: list[dict]) -> list[str]:
    """Markdown table lines, one row per result; a missing key is named in a ValueError."""
    lines = [_row(HEADER), _row(["---"] * 4 + ["---:"] * 2)]
    for i, result in enumerate(results):
        missing = [k for k in RESULT_KEYS if k not in result]
        if missing:
            raise ValueError(f"metrics['results'][{i}] lacks {', '.join(missing)} (needs {', '.join(RESULT_KEYS)})")
        lines.append(_row([_cell(result["name"]), _cell(result["probe"]), _cell(result["features"]),
                           _cell(bool(result["crf"])), _spread(result, "miou"), _spread(result, "acc")]))
    return lines


def relative_link(target: str | Path, folder: Path) -> str:
    """Path of `target` as seen from `folder`, forward slashes, URL-quoted (a space would end a Markdown link)."""
    return quote(Path(os.path.relpath(Path(target).resolve(), folder.resolve())).as_posix(), safe="/")


def write_report(metrics: dict, pictures: dict[str, str], path: Path) -> None:
    """Write the report page to `path`: title, random-init warning, protocol bullets, results table, pictures."""
    path = Path(path)
    lines = [f"# {metrics.get('title', 'hp-pipe evaluation')}", ""]
    if metrics.get("random_init"):
        lines += [RANDOM_INIT_NOTE, ""]
    lines += ["## Protocol", ""]
    lines += [f"- **{key}**: {value}" for key, value in metrics.get("protocol", {}).items()]
    lines += ["", "## Results", ""]
    lines += results_table(metrics.get("results", []))
    for heading, picture in pictures.items():
        lines += ["", f"## {heading}", "", f"![{heading}]({relative_link(picture, path.parent)})"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
