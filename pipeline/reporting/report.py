"""The evaluation report: one Markdown page with the protocol, the results table and the pictures.

Plain Markdown so it reads on GitHub, in an editor or a terminal; pictures are linked relative to the page so the
run folder can be moved or archived as a whole. Where the preset holds the paper's numbers for the dataset
(`[paper]`, docs/hp.md §8), each row shows the paper's number for the same backbone and probe beside it, and the
page lists every way the run departs from the paper's setting, so that the distance to the paper reads at a glance.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

RANDOM_INIT_NOTE = ("**Random-initialized backbone: these numbers test the pipeline, they say nothing about the "
                    "method.**")
RESULT_KEYS = ("name", "probe", "features", "crf", "miou", "acc")
HEADER = ("result", "probe", "features", "CRF", "mIoU (%)", "Acc (%)")
# overclustering rows also carry the HCL reference's "Acc" (docs/hcl.md §5); "Acc (%)" is pixel accuracy everywhere
ACC_REF_HEADER = "HCL ref. Acc = Σtp/Σ(tp+fp+fn) (%)"


def _cell(value: object) -> str:
    """One table cell's text: booleans as yes/no, floats with 1 decimal, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | int):
        return f"{value:.1f}"
    return str(value)


def _spread(result: dict, key: str) -> str:
    """mean ± std where the result has a spread over seeds (overclustering), the plain value otherwise."""
    if result.get(f"{key}_std") is None:
        return _cell(result[key])
    return f"{result[key]:.1f} ± {result[f'{key}_std']:.1f}"


def _row(cells: list[str] | tuple[str, ...]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def results_table(results: list[dict], paper: bool = False) -> list[str]:
    """Markdown table lines of `results_cells`."""
    header, rows, text_columns = results_cells(results, paper)
    lines = [_row(header), _row(["---"] * text_columns + ["---:"] * (len(header) - text_columns))]
    return lines + [_row(cells) for cells in rows]


def results_cells(results: list[dict], paper: bool = False) -> tuple[list[str], list[list[str]], int]:
    """(header, one row of cell texts per result, how many leading columns are text: the rest are numbers); the
    Markdown report and the HTML one (pipeline/reporting/html_report.py) both draw this. A missing key is named in a
    ValueError. A protocol column when the rows name theirs; an `acc_ref` column when a row has one
    (overclustering: the HCL reference's "Acc"); with `paper`, the paper's mIoU and Acc for the same features
    and probe."""
    with_protocol = any("protocol" in r for r in results)
    with_acc_ref = any("acc_ref" in r for r in results)
    header = list(HEADER[:4]) + (["protocol"] if with_protocol else []) + list(HEADER[4:])
    header += [ACC_REF_HEADER] if with_acc_ref else []
    header += list(PAPER_HEADER) if paper else []
    rows = []
    for i, result in enumerate(results):
        missing = [k for k in RESULT_KEYS if k not in result]
        if missing:
            raise ValueError(f"metrics['results'][{i}] lacks {', '.join(missing)} (needs {', '.join(RESULT_KEYS)})")
        cells = [_cell(result["name"]), _cell(result["probe"]), _cell(result["features"]), _cell(bool(result["crf"]))]
        cells += [_cell(result.get("protocol"))] if with_protocol else []
        cells += [_spread(result, "miou"), _spread(result, "acc")]
        cells += [_spread(result, "acc_ref") if "acc_ref" in result else _cell(None)] if with_acc_ref else []
        cells += [_cell(result.get("paper_miou")), _cell(result.get("paper_acc"))] if paper else []
        rows.append(cells)
    return header, rows, 4 + with_protocol


# ---------------------------------------------------------------- the paper's numbers (docs/hp.md §8)
PAPER_HEADER = ("paper mIoU (%)", "paper Acc (%)")


def console_summary(results: list[dict], files: dict[str, str | Path], random_init: bool) -> str:
    """What `evaluate` prints at the end: a short aligned table of the rows and where every output is."""
    width = max([len("result"), *(len(r["name"]) for r in results)])
    lines = [f"{'result':{width}}  {'mIoU':>6}  {'Acc':>6}"]
    lines += [f"{r['name']:{width}}  {r['miou']:6.1f}  {r['acc']:6.1f}" for r in results]
    if random_init:
        lines.append("random-initialized backbone: these numbers test the pipeline, not the method "
                     "(README: 'Quality with a known answer')")
    lines += [f"{name}: {path}" for name, path in files.items()]
    return "\n".join(lines)


NO_LABELS_NOTE = ("No scores: the val split has no labels, so there is nothing to score against and no Hungarian "
                  "matching; each segment is a cluster of the head's cluster probe (k-means on its codes), numbered "
                  "and coloured by the palette.")


def clusters_cells(clusters: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, a row of cell texts per cluster: its id, colour, pixel share (%) and the images it appears in); the
    Markdown report and the HTML one both draw this."""
    return ["cluster", "colour", "pixels (%)", "images"], [
        [str(c["id"]), "#{:02x}{:02x}{:02x}".format(*c["rgb"]), f"{c['pixel_share']:.2f}", str(c["images"])]
        for c in clusters]


def clusters_table(clusters: list[dict]) -> list[str]:
    """Markdown lines of `clusters_cells`."""
    header, rows = clusters_cells(clusters)
    return [_row(header), _row(["---", "---", "---:", "---:"])] + [_row(cells) for cells in rows]


def clusters_console(clusters: list[dict], images: int, files: dict[str, str | Path], random_init: bool) -> str:
    """What `evaluate` prints on a split without labels: the one-line reason there are no scores, a line per cluster
    and where every output is."""
    lines = [f"no scores: the val split has no labels ({images} images); the cluster probe's {len(clusters)} "
             "clusters:", f"{'cluster':>7}  {'pixels':>7}  images"]
    lines += [f"{c['id']:>7}  {c['pixel_share']:6.1f}%  {c['images']}/{images}" for c in clusters]
    if random_init:
        lines.append("random-initialized backbone: these clusters test the pipeline, not the method")
    lines += [f"{name}: {path}" for name, path in files.items()]
    return "\n".join(lines)


def backbone_family(name: str) -> str | None:
    """DINO, DINOv2 or DINOv3 from a timm name (its tag or its model name), None for any other ViT."""
    for family, mark in (("DINOv3", "dinov3"), ("DINOv2", "dinov2")):
        if mark in name:
            return family
    return "DINO" if name.endswith(".dino") else None


def backbone_label(name: str) -> str:
    """timm's name as papers write it: vit_small_patch8_224.dino -> ViT-S/8 (DINO),
    vit_small_patch14_reg4_dinov2.lvd142m -> ViT-S/14 reg4 (DINOv2)."""
    m = re.match(r"vit_(tiny|small|base|large)_patch(\d+)(?:_224)?(?:_(reg\d+))?", name)
    if not m:
        return name
    size = {"tiny": "Ti", "small": "S", "base": "B", "large": "L"}[m.group(1)]
    family = backbone_family(name)
    return f"ViT-{size}/{m.group(2)}" + (f" {m.group(3)}" if m.group(3) else "") + (f" ({family})" if family else "")


def raw_features_label(backbone: str, random_init: bool) -> str:
    """The raw-feature rows' name, saying what the features are: "ViT-S/16 features (random init)" for an
    untrained backbone, "DINO ViT-S/16" for DINO's weights (the papers' "DINO" rows), "DINOv2 ViT-S/14 reg4"."""
    family = backbone_family(backbone)
    arch = backbone_label(backbone).removesuffix(f" ({family})")
    if random_init:
        return f"{arch} features (random init)"
    return f"{family} {arch}" if family else f"{arch} features"


def paper_comparison(config: dict[str, dict[str, Any]], random_init: bool, protocol: str,
                     crf: bool) -> dict[str, Any] | None:
    """The paper's numbers for this run's dataset and backbone, and every way the run's settings differ from the
    paper's (weights, backbone, head width, epochs, batch, protocol, CRF, checkpoint choice); None when the
    preset holds no paper numbers for the dataset."""
    from pipeline.methods.registry import method_of

    method = method_of(config)  # its paper's numbers, and how its settings differ from its paper's
    dataset, backbone = config["dataset"]["name"], config["features"]["backbone"]
    reported = method.paper_rows(config)
    if not reported:
        return None
    same = [r for r in reported if r["backbone"] == backbone]
    differences = [method.paper_note] if method.paper_note else []
    if random_init:
        differences.append("random-initialized backbone weights (the paper: DINO's pretrained weights): the rows "
                           "test the pipeline and are not comparable with the paper's")
    elif config["features"]["weights"] not in ("pretrained", "auto"):
        differences.append(f"backbone weights from {config['features']['weights']} (the paper: DINO's released "
                           "weights)")
    if not same:
        others = sorted({backbone_label(r["backbone"]) for r in reported})
        differences.append(f"backbone {backbone_label(backbone)}: the paper reports no number with it on {dataset} "
                           f"(it reports {', '.join(others)}), so the paper columns are empty")
    differences += method.paper_differences(config, protocol)
    if not crf:
        differences.append("dense CRF off: the paper's numbers are after CRF (--set evaluate.crf=true)")
    differences.append("checkpoint: hp-pipe evaluates the last one; the reference reports the one with the best "
                       "validation metrics, chosen on the labels it reports on")
    if any(r["features"] == "raw" for r in same):
        differences.append("raw-feature rows: the paper's come from STEGO's evaluation of raw DINO features; hp-pipe's "
                           "rows use k-means and a linear probe fitted after training")
    return {
        "source": method.paper_source(config), "dataset": dataset, "backbone": backbone,
        "epochs": (config.get("paper") or {}).get("epochs"),
        "after_crf": True,
        "numbers": {f"{r['features']} {r['probe']}": {"miou": r.get("miou"), "acc": r.get("acc")} for r in same},
        "differences": differences,
    }


def with_paper_numbers(results: list[dict], comparison: dict[str, Any] | None) -> list[dict]:
    """Each result row with `paper_miou` / `paper_acc`: the paper's number for its features and probe, or None."""
    numbers = (comparison or {}).get("numbers", {})
    out = []
    for result in results:
        number = numbers.get(f"{result['features']} {result['probe']}", {})
        out.append({**result, "paper_miou": number.get("miou"), "paper_acc": number.get("acc")})
    return out


def paper_section(comparison: dict[str, Any]) -> list[str]:
    """The report's "Compared with the paper" lines: the source and every difference of setting."""
    lines = ["## Compared with the paper", "", f"Paper columns: {comparison['source']}. The paper's numbers are "
             "after dense CRF: compare them with the `+ CRF` rows.", "", "Where this run differs from the paper:", ""]
    return lines + [f"- {d}" for d in comparison["differences"]]


def relative_link(target: str | Path, folder: Path) -> str:
    """Path of `target` as seen from `folder`, forward slashes, URL-quoted (a space would end a Markdown link)."""
    return quote(Path(os.path.relpath(Path(target).resolve(), folder.resolve())).as_posix(), safe="/")


def relative_path(target: str | Path, folder: str | Path) -> str:
    """`target` as seen from `folder`, forward slashes: metrics.json records its paths relative to its own folder
    (docs/evaluation.md), so a run folder can be moved, archived or shared without naming this machine's paths."""
    return Path(os.path.relpath(Path(target).resolve(), Path(folder).resolve())).as_posix()


def write_report(metrics: dict, pictures: dict[str, str], path: Path) -> None:
    """Write the report page to `path`: title, random-init warning, protocol bullets, results table, pictures.
    A relative picture path is taken from the page's folder (metrics.json's paths are relative to it)."""
    path = Path(path)
    pictures = {k: v if Path(v).is_absolute() else path.parent / v for k, v in pictures.items()}
    lines = [f"# {metrics.get('title', 'hp-pipe evaluation')}", ""]
    if metrics.get("random_init"):
        lines += [RANDOM_INIT_NOTE, ""]
    lines += ["## Protocol", ""]
    lines += [f"- **{key}**: {value}" for key, value in metrics.get("protocol", {}).items()]
    comparison = metrics.get("paper")
    if comparison:
        lines += [""] + paper_section(comparison)
    if "clusters" in metrics:  # a val split without labels: what the cluster probe found, nothing scored
        lines += ["", "## Clusters", "", NO_LABELS_NOTE, ""] + clusters_table(metrics["clusters"])
    else:
        lines += ["", "## Results", ""]
        lines += results_table(metrics.get("results", []), paper=bool(comparison))
    for heading, picture in pictures.items():
        lines += ["", f"## {heading}", "", f"![{heading}]({relative_link(picture, path.parent)})"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
