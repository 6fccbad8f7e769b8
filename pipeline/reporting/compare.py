"""`hp-pipe compare`: every finished run on a dataset in one table, whatever its method (docs/evaluation.md,
"Comparing methods"). What one cache makes cheap: every method on the same features, side by side.

A row per evaluated run (a run folder with eval/metrics.json): its method, backbone, the store's dtype, the
evaluation protocol, the head's cluster and linear mIoU / Acc (after dense CRF where the evaluation ran it, as the
papers report), the paper's figure for that row where the method's paper has one, the training time and rate. Runs
on a random-initialized backbone are marked in every row. Reading only: nothing here trains or evaluates.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

COLUMNS = (("run", "run"), ("method", "method"), ("backbone", "backbone"), ("dtype", "store"),
           ("protocol", "protocol"), ("crf", "CRF"), ("cluster_miou", "cluster mIoU"), ("cluster_acc", "cluster Acc"),
           ("paper_cluster_miou", "paper cluster mIoU"), ("linear_miou", "linear mIoU"), ("linear_acc", "linear Acc"),
           ("paper_linear_miou", "paper linear mIoU"), ("train_seconds", "train s"), ("iterations_per_s", "it/s"))
RANDOM_INIT_MARK = " [random-init]"


def _head_row(results: list[dict[str, Any]], probe: str) -> dict[str, Any] | None:
    """The head's row of `probe`: after CRF when the evaluation has one (the papers' numbers are), else without."""
    rows = [r for r in results if r.get("features") == "head" and r.get("probe") == probe]
    return next((r for r in rows if r.get("crf")), None) or next(iter(rows), None)


def run_row(run_folder: Path, train_manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """One run's row, None when the run has no evaluation yet."""
    metrics_path = run_folder / "eval" / "metrics.json"
    if not metrics_path.exists():
        return None
    metrics = json.loads(metrics_path.read_text())
    record = run_folder / "config.toml"
    config = tomllib.loads(record.read_text()) if record.exists() else {}
    features = config.get("features", {})
    outputs = (train_manifest or {}).get("outputs", {})
    # the runner keeps a stage's timings beside its outputs, at the manifest's top level
    seconds = ((train_manifest or {}).get("timings") or outputs.get("timings") or {}).get("train_seconds")
    iterations = outputs.get("iterations")
    mark = RANDOM_INIT_MARK if metrics.get("random_init") else ""
    row: dict[str, Any] = {
        "run": run_folder.name, "method": str(metrics.get("method", "")) + mark,
        "backbone": features.get("backbone", "?") + mark, "dtype": features.get("dtype", "float16"),
        "protocol": (metrics.get("protocol_settings") or {}).get("name") or config.get("evaluate", {}).get("protocol"),
        "random_init": bool(metrics.get("random_init")), "crf": False,
        "train_seconds": seconds, "iterations_per_s": (iterations / seconds) if iterations and seconds else None,
    }
    if metrics.get("labelled") is False:  # clusters on unlabelled images: nothing to score, said in the row
        row["protocol"] = f"{row['protocol']} (no labels)"
    for probe in ("cluster", "linear"):
        result = _head_row(metrics.get("results", []), probe)
        if result is not None:
            row.update({f"{probe}_miou": result.get("miou"), f"{probe}_acc": result.get("acc"),
                        f"paper_{probe}_miou": result.get("paper_miou"), f"paper_{probe}_acc": result.get("paper_acc")})
            row["crf"] = row["crf"] or bool(result.get("crf"))
    return row


def compare_rows(stage_folder: Path) -> list[dict[str, Any]]:
    """A row per evaluated run of a dataset's folder (`<workdir>/<dataset>`), by method then run name."""
    rows = []
    for folder in sorted((stage_folder / "runs").glob("*/")):
        manifest_path = stage_folder / "stages" / f"train-{folder.name}.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        row = run_row(folder, manifest)
        if row is not None:
            rows.append(row)
    return sorted(rows, key=lambda r: (r["method"], r["run"]))


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}" if key == "iterations_per_s" else f"{value:.1f}"
    return str(value)


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, one list of cell texts per row)."""
    return [title for _, title in COLUMNS], [[_cell(key, row.get(key)) for key, _ in COLUMNS] for row in rows]


def to_markdown(rows: list[dict[str, Any]], dataset: str) -> str:
    header, cells = table_cells(rows)
    lines = [f"# Methods compared on {dataset}", "",
             "One row per evaluated run, all read from the same feature cache. mIoU and Acc in %: the head's cluster "
             "probe (Hungarian matching) and linear probe, after dense CRF where the evaluation ran it (the papers' "
             "numbers are after CRF). `paper` columns: the method's own paper, for the same dataset and backbone.",
             ""]
    if any(r["random_init"] for r in rows):
        lines += ["**Rows marked [random-init] ran on a random-initialized backbone: they test the pipeline, not the "
                  "method.**", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def to_text(rows: list[dict[str, Any]]) -> str:
    """The terminal's table: columns padded to their widest cell."""
    header, cells = table_cells(rows)
    widths = [max(len(c) for c in column) for column in zip(header, *cells, strict=True)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *cells])
