"""`hp-pipe report --html`: the evaluation as one self-contained HTML page (docs/evaluation.md, "HTML report").

Everything is inside the one file: pictures as base64 data URIs, styles and a few lines of script inline, and a
Content-Security-Policy that lets the page load nothing else, so it opens offline, from an archive or as a mail
attachment, and never reaches the network. The page draws the same data as report.md (pipeline/reporting/report.py: the
results table, the paper's numbers and every difference from the paper's setting) and adds what Markdown cannot
show well: the settings as tables, per-class IoU as numbers, and a grid of validation predictions (image | ground
truth | each probe of the head, with and without CRF) drawn from eval/predictions.npz, with the class legend.

The inline script only checks the page itself: on load it writes on <body> how many pictures decoded
(naturalWidth > 0) and which errors were raised, and shows a line when a picture failed; tests read these back
from a real browser.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.reporting.report import NO_LABELS_NOTE, RANDOM_INIT_NOTE, clusters_cells, paper_section, results_cells

PICTURE_TITLES = {"overlays": "Validation overlays", "confusion": "Confusion matrix (head, cluster probe)",
                  "iou": "Per-class IoU", "curves": "Training curves"}
CELL_PX = 160  # width the prediction grid shows each cell at (the PNG keeps the evaluation's resolution)

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.crf td { background: #f8fbff; }
.warn { background: #fff3cd; border: 1px solid #e0c36c; padding: 8px 12px; font-weight: 600; }
.legend span { display: inline-block; margin: 2px 10px 2px 0; white-space: nowrap; }
.legend i { display: inline-block; width: 14px; height: 14px; vertical-align: -2px; margin-right: 4px;
            border: 1px solid #888; }
.grid td { padding: 2px; } .grid img { width: %dpx; image-rendering: pixelated; display: block; }
.grid img:hover { width: %dpx; }
img.picture { max-width: 100%%; border: 1px solid #eee; }
""" % (CELL_PX, 2 * CELL_PX)  # noqa: UP031 (the CSS is full of braces)

CHECK_SCRIPT = """
window.reportErrors = [];
window.addEventListener("error", function (e) {
  window.reportErrors.push(e.message || ("could not load " + ((e.target && e.target.tagName) || "a resource")));
}, true);
document.addEventListener("securitypolicyviolation", function (e) {
  window.reportErrors.push("blocked " + e.blockedURI);
});
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) loaded++; }
  var body = document.body;
  body.setAttribute("data-images", images.length);
  body.setAttribute("data-images-loaded", loaded);
  body.setAttribute("data-errors", window.reportErrors.length);
  body.setAttribute("data-error-text", window.reportErrors.join(" | "));
  if (loaded < images.length) {
    var note = document.getElementById("broken");
    note.textContent = (images.length - loaded) + " of " + images.length + " pictures did not load";
    note.hidden = false;
  }
});
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]], numeric_from: int, attrs: str = "",
           row_classes: list[str] | None = None) -> list[str]:
    """An HTML table of plain texts (escaped here); columns from `numeric_from` on are right-aligned numbers."""
    out = [f"<table{attrs}>", "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for i, cells in enumerate(rows):
        css = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{css}>" + "".join(f'<td class="num">{_e(c)}</td>' if j >= numeric_from else f"<td>{_e(c)}</td>"
                                          for j, c in enumerate(cells)) + "</tr>")
    return out + ["</tbody></table>"]


def _settings_table(values: dict[str, Any], table_id: str) -> list[str]:
    """key | value rows; nested dicts as `outer.inner` keys, other values as compact JSON where not plain."""
    rows: list[list[str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            rows.append([prefix, text])

    walk("", values)
    return _table(["setting", "value"], rows, numeric_from=2, attrs=f' id="{table_id}"')


def iou_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per-class IoU (%) as a table: one row per class, one column per result row; '–' where undefined."""
    results = [r for r in metrics.get("results", []) if r.get("iou")]
    names = metrics.get("class_names") or [str(c) for c in range(max((len(r["iou"]) for r in results), default=0))]
    rows = [[name] + ["–" if r["iou"][c] is None else f"{r['iou'][c]:.1f}" for r in results]
            for c, name in enumerate(names)]
    return ["class", *(r["name"] for r in results)], rows


def legend(class_names: list[str]) -> str:
    """The class colours of every overlay (pipeline/reporting/plots.palette), and black for ignore / unmatched."""
    from pipeline.reporting.plots import palette

    colours = palette(len(class_names))
    spans = [f'<span><i style="background: rgb({r},{g},{b})"></i>{_e(name)}</span>'
             for (r, g, b), name in zip(colours.tolist(), class_names, strict=True)]
    spans.append('<span><i style="background: #000"></i>ignore / unmatched</span>')
    return '<div class="legend">' + "".join(spans) + "</div>"


def prediction_grid(predictions: dict[str, np.ndarray], n_classes: int, head_label: str) -> list[str]:
    """One table row per validation image: image | ground truth | each prediction, blended over the image."""
    from pipeline.reporting.plots import blend

    images, labels = predictions["image"], predictions.get("label")  # no labels: no ground-truth column
    columns = {name.removeprefix("pred/"): pred for name, pred in predictions.items() if name.startswith("pred/")}
    columns = dict(sorted(columns.items(), key=lambda kv: (kv[0].replace(" + CRF", ""), "+ CRF" in kv[0])))
    truth = ["ground truth"] if labels is not None else []
    header = ["#", "image", *truth, *(f"{head_label} {name}" for name in columns)]
    out = ['<table class="grid" id="predictions">',
           "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for i, image in enumerate(images):
        cells = [image, *([blend(image, labels[i], n_classes)] if truth else []),
                 *(blend(image, pred[i], n_classes) for pred in columns.values())]
        alts = ["image", *truth, *columns]
        out.append(f"<tr><td>{i}</td>" + "".join(f'<td><img alt="{_e(alt)} {i}" src="{data_uri(png_bytes(c))}"></td>'
                                                   for alt, c in zip(alts, cells, strict=True)) + "</tr>")
    return out + ["</tbody></table>"]


def read_predictions(path: Path) -> dict[str, np.ndarray] | None:
    """eval/predictions.npz (never unpickled), or None when evaluate drew no pictures."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


SECTIONS = (("results-section", "Results"), ("paper", "Compared with the paper"), ("grid", "Validation predictions"),
            ("iou-section", "Per-class IoU"), ("pictures", "Pictures"), ("settings", "Settings"))


def render(metrics: dict[str, Any], pictures: dict[str, Path], predictions: dict[str, np.ndarray] | None,
           run_settings: dict[str, Any] | None = None, compared: list[dict[str, Any]] | None = None) -> str:
    """The page as a string. `pictures`: title key -> PNG file to embed; `predictions`: read_predictions();
    `compared`: the dataset's runs as `hp-pipe compare` lists them (pipeline/reporting/compare.py)."""
    title = metrics.get("title") or (f"hp-pipe evaluation: {metrics.get('dataset', '')} run "
                                     f"{metrics.get('run', '')} ({str(metrics.get('method', '')).upper()})")
    class_names = metrics.get("class_names") or []
    comparison = metrics.get("paper")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title>", f"<style>{STYLE}</style>", f"<script>{CHECK_SCRIPT}</script>",
           "</head><body>", f"<h1>{_e(title)}</h1>", '<p class="warn" id="broken" hidden></p>']
    if metrics.get("random_init"):
        out.append(f'<p class="warn">{_e(RANDOM_INIT_NOTE.strip("*"))}</p>')
    sections = SECTIONS + ((("compare", "Methods on this dataset"),) if compared else ())
    out.append("<p>" + " · ".join(f'<a href="#{anchor}">{name}</a>' for anchor, name in sections) + "</p>")

    out.append('<h2 id="results-section">Results</h2>')
    if "clusters" in metrics:  # a val split without labels: the clusters, nothing scored
        out.append(f"<p>{_e(NO_LABELS_NOTE)}</p>")
        out += _table(*clusters_cells(metrics["clusters"]), 2, ' id="clusters"')
    else:
        header, rows, text_columns = results_cells(metrics.get("results", []), paper=bool(comparison))
        out += _table(header, rows, text_columns, ' id="results"',
                      ["crf" if r.get("crf") else "" for r in metrics.get("results", [])])

    out.append('<h2 id="paper">Compared with the paper</h2>')
    if comparison:  # report.md's section (pipeline/reporting/report.py): prose as paragraphs, differences as items
        lines = [line.replace("`", "") for line in paper_section(comparison) if line and not line.startswith("#")]
        out += [f"<p>{_e(line)}</p>" for line in lines if not line.startswith("- ")] + ["<ul>"]
        out += [f"<li>{_e(d)}</li>" for d in comparison["differences"]] + ["</ul>"]
    else:
        out.append("<p>The preset holds no paper numbers for this dataset.</p>")
    if compared:  # every evaluated run of the dataset, whatever its method: `hp-pipe compare`
        from pipeline.reporting.compare import table_cells

        header, cells = table_cells(compared)
        out.append('<h2 id="compare">Methods on this dataset</h2>')
        out.append("<p>Every evaluated run of this dataset, from the same feature cache (hp-pipe compare): the "
                   "head's probes, after CRF where the evaluation ran it.</p>")
        out += _table(header, cells, 5, ' id="compare-table"')

    out.append('<h2 id="grid">Validation predictions</h2>')
    if predictions is not None:
        out += ["<p>Each map is blended 50/50 over the image in the class colours below (hover a picture to "
                "enlarge it); " + ("cluster predictions after Hungarian matching." if "clusters" not in metrics
                                 else "each cluster in its own colour (no labels: no matching).") + "</p>",
                legend(class_names)]
        out += prediction_grid(predictions, len(class_names), str(metrics.get("method", "head")).upper())
    else:
        out.append("<p>No predictions were kept (evaluate.pictures = 0).</p>")

    iou_header, iou_table = iou_rows(metrics)
    out.append('<h2 id="iou-section">Per-class IoU (%)</h2>')
    out += _table(iou_header, iou_table, 1, ' id="iou"')

    out.append('<h2 id="pictures">Pictures</h2>')
    for key, path in pictures.items():
        name = PICTURE_TITLES.get(key, key)
        out += [f"<h3>{_e(name)}</h3>",
                f'<img class="picture" alt="{_e(name)}" src="{data_uri(Path(path).read_bytes())}">']

    out += ['<h2 id="settings">Settings</h2>', "<h3>Evaluation protocol</h3>"]
    out += _settings_table(metrics.get("protocol", {}), "protocol")
    if run_settings:
        out += ["<h3>Training</h3>"] + _settings_table(run_settings, "training")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_html_report(metrics: dict[str, Any], eval_folder: Path, path: Path, root: Path,
                      run_settings: dict[str, Any] | None = None, compared: list[dict[str, Any]] | None = None) -> Path:
    """Write the page for the evaluation in `eval_folder` to `path`. Pictures come from metrics.json (relative to
    `eval_folder`, or absolute) and the run's curves.png; each is refused unless it lies inside `root` (the work
    folder: a path read from a file never makes hp-pipe read elsewhere, pipeline/orchestration/paths.py)."""
    from pipeline.files import atomic_write_text
    from pipeline.orchestration.paths import inside

    eval_folder = Path(eval_folder)
    source = eval_folder / "metrics.json"
    pictures: dict[str, Path] = {}
    named = dict(metrics.get("pictures", {}))
    curves = eval_folder.parent / "curves.png"
    if curves.exists():
        named["curves"] = str(curves)
    predictions = read_predictions(eval_folder / "predictions.npz")
    for key, value in named.items():
        if key == "overlays" and predictions is not None:
            continue  # the grid shows the same predictions, larger and with CRF
        picture = Path(value) if Path(value).is_absolute() else eval_folder / value
        picture = inside(picture, root, source)
        if picture.exists():
            pictures[key] = picture
    atomic_write_text(Path(path), render(metrics, pictures, predictions, run_settings, compared))
    return Path(path)
