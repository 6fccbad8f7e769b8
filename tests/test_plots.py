"""Evaluation pictures and the report page: colours are exact, cells land where the layout says, links resolve."""

import re
from pathlib import Path
from urllib.parse import unquote

import matplotlib
import numpy as np
import pytest
from PIL import Image

from pipeline.reporting.plots import (
    NA_NOTE,
    blend,
    colorize,
    confusion_figure,
    confusion_png,
    iou_bars,
    iou_figure,
    normalize_rows,
    overlay_grid,
    overlay_layout,
    palette,
)
from pipeline.reporting.report import RANDOM_INIT_NOTE, write_report


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("n", [1, 6, 10, 11, 27, 150])
def test_palette_distinct_deterministic_not_black(n):
    colours = palette(n)
    assert colours.shape == (n, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == n
    assert not (colours == 0).all(1).any()
    np.testing.assert_array_equal(colours, palette(n))
    np.testing.assert_array_equal(palette(n + 5)[:n], colours)  # class i keeps its colour when n grows


def test_colorize_exact_palette_colours_and_black_outside():
    n = 5
    labels = np.array([[0, 1, 2, 3], [4, 255, -1, 5]])
    out = colorize(labels, n)
    colours = palette(n)
    for (i, j), v in np.ndenumerate(labels):
        expected = colours[v] if 0 <= v < n else (0, 0, 0)
        np.testing.assert_array_equal(out[i, j], expected)
    assert out.dtype == np.uint8 and out.shape == (2, 4, 3)


def test_blend_is_half_image_half_colour():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (6, 7))
    labels[0, 0] = 255
    colours = palette(4)
    out = blend(image, labels, 4)
    for (i, j), v in np.ndenumerate(labels):
        colour = colours[v] if v < 4 else np.zeros(3)
        expected = np.floor((image[i, j].astype(float) + colour) / 2)
        np.testing.assert_array_equal(out[i, j], expected)
    with pytest.raises(ValueError):
        blend(image, labels[:5], 4)


def _images(n, h=16, w=24):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_overlay_grid_size_grows_with_rows_and_columns(tmp_path):
    def size(n_rows, n_cols):
        images = _images(n_rows)
        labels = np.zeros(images.shape[:3], np.int64)
        path = tmp_path / f"g{n_rows}_{n_cols}.png"
        overlay_grid(images, {f"c{k}": labels for k in range(n_cols)}, 3, path)
        h, w = _png(path).shape[:2]
        layout = overlay_layout(n_rows, 1 + n_cols, images.shape[1:3], 4)
        assert (w, h) == (layout.width, layout.height)
        return w, h

    w11, h11 = size(1, 1)
    w13, h13 = size(1, 3)
    w31, h31 = size(3, 1)
    assert w13 > w11 and h31 > h11 and w31 == w11


def test_overlay_grid_cell_centres_show_the_blend(tmp_path):
    n_classes, names = 4, ["sky", "road", "car", "tree"]
    colours = np.array([[200, 40, 90], [10, 250, 130]], np.uint8)  # one uniform image per row
    images = np.broadcast_to(colours[:, None, None, :], (2, 20, 30, 3)).copy()
    columns = {"ground truth": [2, 255], "cluster": [0, 3], "linear": [1, 1]}  # uniform label per (row, column)
    maps = {k: np.stack([np.full((20, 30), v) for v in vs]) for k, vs in columns.items()}
    path = tmp_path / "grid.png"
    overlay_grid(images, maps, n_classes, path, class_names=names, title="val")
    png = _png(path)
    layout = overlay_layout(2, 4, (20, 30), n_classes + 1, title="val")
    assert png.shape[:2] == (layout.height, layout.width)
    for row in range(2):
        for col, label in enumerate([None, *(vs[row] for vs in columns.values())]):
            x0, y0, x1, y1 = layout.cell_px(row, col)
            pixel = png[(y0 + y1) // 2, (x0 + x1) // 2]
            colour = colours[row].astype(int)
            overlay = palette(n_classes)[label] if label is not None and label < n_classes else 0
            expected = colour if label is None else (colour + overlay) // 2
            np.testing.assert_array_equal(pixel, expected, err_msg=f"row {row} col {col}")


def test_overlay_grid_rejects_mismatches(tmp_path):
    images = _images(2)
    good = np.zeros(images.shape[:3], np.int64)
    with pytest.raises(ValueError, match="cluster"):
        overlay_grid(images, {"cluster": good[:1]}, 3, tmp_path / "a.png")
    with pytest.raises(ValueError, match="cluster"):
        overlay_grid(images, {"cluster": good[:, :8]}, 3, tmp_path / "a.png")
    with pytest.raises(ValueError, match="class names"):
        overlay_grid(images, {"cluster": good}, 3, tmp_path / "a.png", class_names=["a", "b"])
    with pytest.raises(ValueError, match="uint8"):
        overlay_grid(images[..., 0], {}, 3, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_normalize_rows_against_naive():
    confusion = np.array([[3, 1, 0, 0], [0, 0, 0, 0], [2, 2, 4, 0]])
    out = normalize_rows(confusion)
    for i, row in enumerate(confusion):
        total = sum(row)
        for j, v in enumerate(row):
            assert out[i, j] == pytest.approx(v / total if total else 0.0)


def _informative(png: np.ndarray) -> bool:
    """A drawn picture, not a blank canvas: many distinct colours."""
    return len(np.unique(png.reshape(-1, 3), axis=0)) > 20


@pytest.mark.parametrize("extra", [0, 1])
def test_confusion_png_writes_and_checks_shape(tmp_path, extra):
    names = ["a", "b", "c"]
    confusion = np.arange(3 * (3 + extra)).reshape(3, 3 + extra)
    path = tmp_path / "c.png"
    pixel = confusion_png(confusion, names, path, title="HP cluster")
    png = _png(path)
    assert _informative(png)
    blues = matplotlib.colormaps["Blues"]
    for (i, j), fraction in np.ndenumerate(normalize_rows(confusion)):  # each cell's colour is its row fraction
        r, c = pixel(j - 0.3, i - 0.3)  # a cell corner, away from the number printed at its centre
        expected = np.round(np.asarray(blues(fraction)[:3]) * 255)  # 100 % = the colour map's end
        np.testing.assert_allclose(png[r, c], expected, atol=3, err_msg=f"cell {i},{j}")
    for bad in (np.zeros((3, 2)), np.zeros((2, 3)), np.zeros((3, 5)), np.zeros(9)):
        with pytest.raises(ValueError, match="matrix"):
            confusion_png(bad, names, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_iou_bars_writes_and_checks_lengths(tmp_path):
    names = ["a", "b", "c"]
    path = tmp_path / "iou.png"
    rows = {"ViT-S/16 features (random init) cluster": [10.0, None, 55.5], "HP cluster": [20.0, 5.0, 70.0]}
    pixel = iou_bars(rows, names, path, title="val")
    png = _png(path)
    assert _informative(png)
    for k, (colour, values) in enumerate(zip(palette(len(rows)), rows.values(), strict=True)):
        for cls, value in enumerate(values):
            y = cls - 0.4 + (k + 0.5) * 0.8 / len(rows)
            if value is None:
                continue
            for inside in (value / 2, value - 1.5):  # inside the bar, up to just before its end: its colour
                np.testing.assert_allclose(png[pixel(inside, y)], colour, atol=3)
            assert np.abs(png[pixel(value + 4, y)].astype(int) - colour).max() > 40  # past its end: not
    with pytest.raises(ValueError, match="HP cluster"):
        iou_bars({"HP cluster": [1.0, 2.0]}, names, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="%"):
        iou_bars({"HP cluster": [1.0, 2.0, 150.0]}, names, tmp_path / "bad.png")
    with pytest.raises(ValueError):
        iou_bars({}, names, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def _metrics(random_init: bool) -> dict:
    return {
        "random_init": random_init,
        "protocol": {"dataset": "cocostuff27 val", "resolution": 320, "backbone": "vit_small_patch8_224.dino"},
        "results": [
            {"name": "DINO ViT-S/8 cluster", "probe": "cluster", "features": "raw", "crf": False, "miou": 12.345,
             "acc": 40.06},
            {"name": "HP linear", "probe": "linear", "features": "head", "crf": True, "miou": 45.67, "acc": 78.91},
        ],
    }


def test_report_rows_protocol_links_and_no_note(tmp_path):
    run = tmp_path / "run"
    (run / "pictures").mkdir(parents=True)
    pictures = {"Overlays": run / "pictures" / "overlay grid.png", "Confusion": tmp_path / "elsewhere" / "c.png"}
    for p in pictures.values():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"png")
    report = run / "report" / "report.md"
    write_report(_metrics(False), {k: str(v) for k, v in pictures.items()}, report)
    text = report.read_text()
    assert RANDOM_INIT_NOTE not in text and "Random-initialized" not in text
    for key, value in _metrics(False)["protocol"].items():
        assert f"- **{key}**: {value}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 3  # header + two results
    for result, line in zip(_metrics(False)["results"], rows[1:], strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [result["name"], result["probe"], result["features"], "yes" if result["crf"] else "no",
                         f"{round(result['miou'], 1)}", f"{round(result['acc'], 1)}"]
    links = re.findall(r"!\[(.*?)\]\((.*?)\)", text)
    assert [k for k, _ in links] == list(pictures)
    for (key, link), picture in zip(links, pictures.values(), strict=True):
        assert not Path(unquote(link)).is_absolute()
        assert (report.parent / unquote(link)).resolve() == picture.resolve()
        assert f"## {key}" in text
    assert text.index("## Results") < text.index("## Overlays")


def test_report_random_init_note_only_when_flagged(tmp_path):
    write_report(_metrics(True), {}, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert text.count(RANDOM_INIT_NOTE) == 1
    assert RANDOM_INIT_NOTE == ("**Random-initialized backbone: these numbers test the pipeline, they say nothing "
                                "about the method.**")
    metrics = _metrics(False)
    del metrics["results"][0]["acc"]
    with pytest.raises(ValueError, match="acc"):
        write_report(metrics, {}, tmp_path / "r2.md")


def test_paper_comparison_names_every_departure_from_the_paper():
    from pipeline.config import load_config
    from pipeline.reporting.report import paper_comparison, with_paper_numbers

    faithful = paper_comparison(load_config("cocostuff27"), False, "paper", True)
    assert faithful["numbers"]["head cluster"] == {"miou": 24.6, "acc": 57.2}
    assert faithful["numbers"]["raw linear"] == {"miou": 33.9, "acc": 68.6}
    assert len(faithful["differences"]) == 2  # only the checkpoint choice and the DINO rows' provenance
    assert paper_comparison(load_config("synthetic"), True, "kmeans", False) is None  # no paper numbers

    s16 = paper_comparison(load_config("cocostuff27", {"features.backbone": "vit_small_patch16_224.dino"}),
                           True, "kmeans", False)
    assert s16["numbers"]["head linear"] == {"miou": 39.1, "acc": 74.1}
    text = "\n".join(s16["differences"])
    for expected in ("random-initialized backbone weights", "head width D = 512 (the paper: 256)",
                     "evaluation protocol kmeans", "dense CRF off"):
        assert expected in text, expected
    other = paper_comparison(load_config("cocostuff27", {"features.backbone": "vit_base_patch16_224.dino"}),
                             False, "paper", True)
    assert other["numbers"] == {} and "reports no number with it on cocostuff27" in other["differences"][0]
    assert "30 training epochs (the paper: 20)" in paper_comparison(load_config("cityscapes"), False, "paper", True)[
        "differences"]
    hcl = paper_comparison(load_config("cocostuff27", {"train.method": "hcl"}), False, "kmeans", True)
    assert set(hcl["numbers"]) == {"raw cluster", "raw linear"}  # HP's numbers never sit beside HCL's rows
    rows = with_paper_numbers([{"features": "head", "probe": "cluster"}, {"features": "head", "probe": "overcluster"}],
                              faithful)
    assert [(r["paper_miou"], r["paper_acc"]) for r in rows] == [(24.6, 57.2), (None, None)]


def test_report_puts_the_paper_numbers_beside_the_rows(tmp_path):
    metrics = _metrics(False)
    metrics["paper"] = {"source": "Table 1", "differences": ["60 training epochs (the paper: 3)"], "numbers": {}}
    metrics["results"][1].update(paper_miou=42.7, paper_acc=75.6, protocol="paper")
    write_report(metrics, {}, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "- 60 training epochs (the paper: 3)" in text and "Paper columns: Table 1" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == ["result", "probe", "features", "CRF", "protocol", "mIoU (%)", "Acc (%)", "paper mIoU (%)",
                       "paper Acc (%)"]
    assert rows[2] == ["DINO ViT-S/8 cluster", "cluster", "raw", "no", "–", "12.3", "40.1", "–", "–"]
    assert rows[3] == ["HP linear", "linear", "head", "yes", "paper", "45.7", "78.9", "42.7", "75.6"]
    assert text.index("## Compared with the paper") < text.index("## Results")


def test_console_summary_is_a_short_aligned_table_with_every_file():
    from pipeline.reporting.report import console_summary

    rows = [{"name": "HP cluster", "miou": 19.654, "acc": 40.7}, {"name": "DINO ViT-S/8 linear + CRF", "miou": 8.0,
                                                                  "acc": 100.0}]
    text = console_summary(rows, {"metrics": "runs/hp/eval/metrics.json", "overlays": "runs/hp/eval/overlays.png"},
                           random_init=True)
    lines = text.splitlines()
    assert lines[0].split() == ["result", "mIoU", "Acc"]
    assert lines[1].split()[-2:] == ["19.7", "40.7"] and lines[2].split()[-2:] == ["8.0", "100.0"]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns
    assert max(len(line) for line in lines) < 120
    assert "random-initialized backbone" in text and "overlays: runs/hp/eval/overlays.png" in lines
    assert "random" not in console_summary(rows, {}, random_init=False)


def test_confusion_colour_bar_is_in_the_unit_of_the_cell_numbers():
    """Cells, printed numbers and colour bar in one unit (% of the class's pixels): the bar runs 0..100 and each
    cell's colour value is the number printed on it."""
    confusion = np.array([[6, 2, 0], [1, 1, 2], [0, 0, 0]])
    fig, ax = confusion_figure(confusion, ["a", "b", "c"])
    try:
        image = ax.images[0]
        percent = 100 * normalize_rows(confusion)
        np.testing.assert_allclose(image.get_array(), percent)
        assert image.get_clim() == (0, 100)
        bar = image.colorbar
        assert bar is not None and "%" in bar.ax.get_ylabel()
        assert bar.ax.get_ylim() == pytest.approx((0, 100))
        printed = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
        assert printed == {(i, j): f"{v:.0f}" for (i, j), v in np.ndenumerate(percent)}
        assert printed[(0, 0)] == "75" and printed[(1, 2)] == "50"
    finally:
        matplotlib.pyplot.close(fig)


def test_iou_bars_explain_undefined_values_once_and_no_text_overlaps(tmp_path):
    """Many rows, many undefined values: one "n/a" note (a legend entry), a × on each undefined bar, and no two
    text artists of the figure overlap."""
    names = [f"class {c}" for c in range(8)]
    rows = {f"row {k}": [None if (c + k) % 3 else 10.0 * k for c in range(8)] for k in range(10)}
    fig, ax = iou_figure(rows, names, title="val")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]
        assert sum("n/a" in t.get_text() for t in texts) == 1
        assert any(t.get_text() == NA_NOTE for t in ax.get_legend().get_texts())
        boxes = [t.get_window_extent(renderer) for t in texts]
        overlapping = [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes))
                       for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
        assert overlapping == []
        marks = [line for line in ax.get_lines() if line.get_marker() == "x"]
        assert len(marks) == 1
        height = 0.8 / len(rows)
        expected = sorted(c - 0.4 + (k + 0.5) * height for k, values in enumerate(rows.values())
                          for c, v in enumerate(values) if v is None)
        np.testing.assert_allclose(sorted(marks[0].get_ydata()), expected)
    finally:
        matplotlib.pyplot.close(fig)
    fig, ax = iou_figure({"HP cluster": [1.0, 2.0]}, ["a", "b"])
    try:  # nothing undefined: no note, no marks
        assert not [t for t in fig.findobj(matplotlib.text.Text) if "n/a" in t.get_text()]
        assert not [line for line in ax.get_lines() if line.get_marker() == "x"]
    finally:
        matplotlib.pyplot.close(fig)
