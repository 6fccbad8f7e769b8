"""`hp-pipe report --html`: one self-contained page, checked as text and in a real headless browser (Debian's
chromium: `apt-get install -y chromium`; .ci/run installs it)."""

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.reporting.html_report import write_html_report
from pipeline.reporting.plots import blend
from tests.fixtures import TINY_EVALUATE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NO_BROWSER = ("no chromium browser (/usr/bin/chromium): the page is not opened in a browser; install Debian's package "
              "with `apt-get update && apt-get install -y chromium` (.ci/run does)")


def require_chromium() -> None:
    """A browser test without a browser: a failure in CI (CI is set: the page must have been opened), a skip that
    says why elsewhere. Never a silent pass."""
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{NO_BROWSER}; CI is set, so the browser test is required")
    pytest.skip(NO_BROWSER)


@pytest.fixture
def chromium() -> str:
    require_chromium()
    return CHROMIUM
CLASSES = ["sky", "water", "road"]
RESULTS = [
    {"name": "DINO ViT-S/16 cluster", "probe": "cluster", "features": "raw", "crf": False, "protocol": "kmeans",
     "miou": 12.345, "acc": 40.06, "iou": [10.0, None, 27.03], "paper_miou": 30.0, "paper_acc": 60.5},
    {"name": "HP cluster", "probe": "cluster", "features": "head", "crf": False, "protocol": "kmeans", "miou": 45.67,
     "acc": 78.91, "iou": [50.0, 40.25, 46.75], "paper_miou": None, "paper_acc": None},
    {"name": "HP cluster + CRF", "probe": "cluster", "features": "head", "crf": True, "protocol": "kmeans",
     "miou": 47.0, "acc": 80.0, "iou": [51.0, 42.0, 48.0], "paper_miou": 48.5, "paper_acc": 81.0},
    {"name": "HP overcluster K=48 <b>", "probe": "overcluster", "features": "head", "crf": False, "miou": 20.0,
     "miou_std": 1.5, "acc": 50.0, "acc_std": 0.5, "acc_ref": 12.5, "acc_ref_std": 0.25, "iou": [1.0, 2.0, 3.0]},
]
TINY = {**TINY_EVALUATE, "evaluate.overcluster": "false"}  # test_evaluate's tiny run, no overclustering
COMPARISON = {"source": "Table 1 (a test's numbers)", "dataset": "synthetic", "numbers": {},
              "differences": ["random-initialized backbone weights", "2 training epochs (the paper: 30)"]}


def png(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def evaluation(tmp_path):
    """A run folder as `evaluate` leaves it (metrics.json, pictures, predictions.npz, the run's curves.png)."""
    rng = np.random.default_rng(0)
    run = tmp_path / "work" / "synthetic" / "runs" / "hp"
    out = run / "eval"
    pictures = {name: png(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8), out / f"{name}.png")
                for i, name in enumerate(("overlays", "confusion", "iou"))}
    curves = png(rng.integers(0, 256, (10, 40, 3), dtype=np.uint8), run / "curves.png")
    images = rng.integers(0, 256, (2, 12, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (2, 12, 16)).astype(np.uint8)
    labels[0, 0, 0] = 255
    preds = {name: rng.integers(0, 3, (2, 12, 16)).astype(np.uint8)
             for name in ("cluster", "cluster + CRF", "linear")}
    np.savez_compressed(out / "predictions.npz", image=images, label=labels,
                        **{f"pred/{k}": v for k, v in preds.items()})
    metrics = {"dataset": "synthetic", "run": "hp", "method": "hp", "random_init": True, "class_names": CLASSES,
               "protocol": {"name": "kmeans (probes fitted after training)", "val_images": 2},
               "paper": COMPARISON, "results": RESULTS,
               "pictures": {"confusion": "confusion.png", "iou": str(pictures["iou"]), "overlays": "overlays.png"}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    page = write_html_report(metrics, out, out / "report.html", tmp_path / "work",
                             {"train": {"head_dim": 32, "epochs": 2}, "run": "hp"})
    return {"page": page, "metrics": metrics, "pictures": pictures, "curves": curves, "images": images,
            "labels": labels, "preds": preds}


class Tables(HTMLParser):
    """Every table by id: rows of (cell text, [img src]); and every src / href of the page."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, list[str]]]]] = {}
        self.links: list[str] = []
        self.pictures: dict[str, str] = {}  # alt -> src of the pictures outside tables
        self.table = None
        self.row = None
        self.cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag == "table":
            self.table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        elif tag == "tr" and self.table is not None:
            self.row = []
            self.table.append(self.row)
        elif tag in ("td", "th") and self.row is not None:
            self.cell = ["", []]
            self.row.append(self.cell)
        elif tag == "img":
            if self.cell is not None:
                self.cell[1].append(attrs["src"])
            else:
                self.pictures[attrs["alt"]] = attrs["src"]

    def handle_endtag(self, tag):
        if tag == "table":
            self.table = None
        elif tag in ("td", "th"):
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[0] += data


def decode(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return base64.b64decode(src[len(prefix):])


def test_the_page_holds_everything_and_loads_nothing(evaluation):
    text = evaluation["page"].read_text()
    page = Tables(text)
    # self-contained: every picture a data URI, every link an anchor in the page; nothing may load from elsewhere
    assert page.links and all(link.startswith(("data:image/png;base64,", "#")) for link in page.links)
    assert "http://" not in text and "https://" not in text and "file:" not in text
    assert "default-src 'none'; img-src data:" in text
    # the results table, cell by cell from the metrics themselves (an oracle of its own, not the function that
    # draws the table): one decimal, "±" where a spread over seeds exists, "–" for none, the paper's columns last
    results = [[cell for cell, _ in row] for row in page.tables["results"]]
    header = results[0]
    assert header[:7] == ["result", "probe", "features", "CRF", "protocol", "mIoU (%)", "Acc (%)"]
    assert header[-2:] == ["paper mIoU (%)", "paper Acc (%)"] and len(results) == 1 + len(RESULTS)
    for shown, result in zip(results[1:], RESULTS, strict=True):
        cells = dict(zip(header, shown, strict=True))
        spread = f" ± {result['miou_std']:.1f}" if "miou_std" in result else ""
        assert (cells["result"], cells["probe"], cells["features"]) == (result["name"], result["probe"],
                                                                        result["features"])
        assert cells["CRF"] == ("yes" if result["crf"] else "no") and cells["protocol"] == result.get("protocol", "–")
        assert cells["mIoU (%)"] == f"{result['miou']:.1f}{spread}"
        assert cells["Acc (%)"].split(" ± ")[0] == f"{result['acc']:.1f}"
        for key, column in (("paper_miou", "paper mIoU (%)"), ("paper_acc", "paper Acc (%)")):
            assert cells[column] == (f"{result[key]:.1f}" if result.get(key) is not None else "–")
    assert results[4][0] == "HP overcluster K=48 <b>"  # escaped, not markup
    assert results[4][5] == "20.0 ± 1.5" and results[1][-2:] == ["30.0", "60.5"] and results[2][-2:] == ["–", "–"]
    # per-class IoU: one row per class, one column per result
    iou = [[cell for cell, _ in row] for row in page.tables["iou"]]
    assert iou[0] == ["class", *(r["name"] for r in RESULTS)]
    assert iou[2] == ["water", "–", f"{40.25:.1f}", "42.0", "2.0"]  # None (undefined) as a dash
    assert [row[0] for row in iou[1:]] == CLASSES
    # the pictures, byte for byte; overlays.png gives way to the grid, which shows the same predictions and more
    assert set(page.pictures) == {"Confusion matrix (head, cluster probe)", "Per-class IoU", "Training curves"}
    assert decode(page.pictures["Confusion matrix (head, cluster probe)"]) == evaluation["pictures"]["confusion"] \
        .read_bytes()
    assert decode(page.pictures["Per-class IoU"]) == evaluation["pictures"]["iou"].read_bytes()
    assert decode(page.pictures["Training curves"]) == evaluation["curves"].read_bytes()
    for key in ("Compared with the paper", "Table 1 (a test's numbers)", "2 training epochs (the paper: 30)",
                "Random-initialized backbone", "head_dim"):
        assert key in text.replace("&#x27;", "'")


def test_the_grid_shows_image_truth_and_each_probe_with_and_without_crf(evaluation):
    grid = Tables(evaluation["page"].read_text()).tables["predictions"]
    assert [cell for cell, _ in grid[0]] == ["#", "image", "ground truth", "HP cluster", "HP cluster + CRF",
                                             "HP linear"]
    images, labels, preds = evaluation["images"], evaluation["labels"], evaluation["preds"]
    assert len(grid) == 1 + len(images)
    for i, row in enumerate(grid[1:]):
        shown = [np.asarray(Image.open(io.BytesIO(decode(src[0])))) for _, src in row[1:]]
        expected = [images[i], blend(images[i], labels[i], 3),
                    *(blend(images[i], preds[name][i], 3) for name in ("cluster", "cluster + CRF", "linear"))]
        for got, want in zip(shown, expected, strict=True):
            assert np.array_equal(got, want)


def test_a_picture_outside_the_work_folder_is_refused(evaluation, tmp_path):
    outside = png(np.zeros((4, 4, 3), np.uint8), tmp_path / "elsewhere" / "secret.png")
    metrics = {**evaluation["metrics"], "pictures": {"confusion": str(outside)}}
    out = evaluation["page"].parent
    with pytest.raises(UserError, match="outside the work folder"):
        write_html_report(metrics, out, out / "r.html", tmp_path / "work")


def open_in_chromium(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless chromium on the file, with nothing that could reach the network or need a display."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
            "--no-first-run", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *extra, page.as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def rendered(page: Path, tmp_path: Path) -> tuple[dict[str, str], Tables, list[str]]:
    """What the browser made of the page: <body>'s check attributes, the DOM's tables, the console lines."""
    proc = open_in_chromium(page, tmp_path, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = Tables(proc.stdout)
    attrs = {}

    class Body(HTMLParser):
        def handle_starttag(self, tag, tag_attrs):
            if tag == "body":
                attrs.update(dict(tag_attrs))

    Body().feed(proc.stdout)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return attrs, body, console


def test_the_page_renders_in_a_real_browser(evaluation, tmp_path, chromium):
    attrs, dom, console = rendered(evaluation["page"], tmp_path)
    n_images = 3 + len(evaluation["images"]) * (2 + len(evaluation["preds"]))
    assert attrs["data-images"] == str(n_images)
    assert attrs["data-images-loaded"] == str(n_images)  # every picture decoded: naturalWidth > 0
    assert attrs["data-errors"] == "0", attrs["data-error-text"]
    assert console == []  # no console message at all (a blocked load or a script error would print one)
    assert len(dom.tables["results"]) == 1 + len(RESULTS)
    assert len(dom.tables["predictions"]) == 1 + len(evaluation["images"])
    shot = tmp_path / "shot.png"
    proc = open_in_chromium(evaluation["page"], tmp_path, f"--screenshot={shot}", "--window-size=1000,800")
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (800, 1000, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables and pictures, not a blank page


def test_the_browser_check_catches_a_broken_picture(evaluation, tmp_path, chromium):
    """The same check on a page with a picture that cannot decode and one from the network: both are caught."""
    broken = tmp_path / "broken.html"
    text = evaluation["page"].read_text()
    broken.write_text(text.replace("</body>", '<img alt="x" src="data:image/png;base64,AAAA">'
                                   '<img alt="y" src="https://example.com/y.png"></body>'))
    attrs, dom, console = rendered(broken, tmp_path)
    assert int(attrs["data-images"]) == int(attrs["data-images-loaded"]) + 2
    assert int(attrs["data-errors"]) >= 2 and "blocked https://example.com/y.png" in attrs["data-error-text"]
    assert any("Content Security Policy" in line for line in console)
    assert dom.tables["results"]  # the rest still renders


def test_report_html_command_on_an_evaluated_run(tmp_path):
    """evaluate on a tiny run (CRF on), then `hp-pipe report --html`: the grid has each probe with and without CRF,
    and the evaluation's TensorBoard scalars are metrics.json's rows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.config import load_config
    from pipeline.orchestration import paths
    from pipeline.reporting.tensorboard import result_tag
    from stages import evaluate

    config = load_config("synthetic", TINY)
    evaluate.run(config, tmp_path, "hp")
    result = CliRunner().invoke(app, ["report", "--dataset", "synthetic", "--workdir", str(tmp_path), "--html"])
    assert result.exit_code == 0, result.output
    out = paths.eval_dir(config, tmp_path, "hp")
    metrics = json.loads((out / "metrics.json").read_text())
    grid = Tables((out / "report.html").read_text()).tables["predictions"]
    assert [cell for cell, _ in grid[0]][3:] == ["HP cluster", "HP cluster + CRF", "HP linear", "HP linear + CRF"]
    assert len(grid) == 1 + int(TINY["evaluate.pictures"])
    events = EventAccumulator(str(out))
    events.Reload()
    iterations = json.loads((paths.run_dir(config, tmp_path, "hp") / "metrics.jsonl").read_text().splitlines()[-1])
    for row in metrics["results"]:
        for key in ("miou", "acc"):
            assert [(e.step, e.value) for e in events.Scalars(f"{result_tag(row)}/{key}")] == [
                (iterations["iteration"], np.float32(row[key]))]
    require_chromium()  # the page of a real evaluation, in the browser too (after the checks above have passed)
    attrs, _, console = rendered(out / "report.html", tmp_path)
    assert attrs["data-images-loaded"] == attrs["data-images"] and attrs["data-errors"] == "0" and not console


def test_a_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch):
    """CI (CI set, as .ci/run sets it) must open the page: no browser is a failure naming the install command;
    elsewhere a skip that says why. Either way never a silent pass."""
    import tests.test_html_report as module

    monkeypatch.setattr(module, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get update && apt-get install -y chromium"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no chromium browser"):
        require_chromium()
