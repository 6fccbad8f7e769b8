"""PNG pictures of results: training curves, feature previews, segmentation overlays, confusion, per-class IoU.

Matplotlib without a display. Every public function takes arrays and writes one PNG; nothing else is read or written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.files import atomic_write  # noqa: E402

CURVES = (("loss", "ghp", "lhp"), ("consistency",), ("lambda",), ("positives",))  # HP (docs/hp.md §5)
HCL_CURVES = (("loss", "fg", "bg", "pred"), ("lr",))  # HCL (docs/hcl.md §4)


def training_curves(records: list[dict[str, Any]], path: Path, title: str = "",
                    curves: tuple[tuple[str, ...], ...] = CURVES) -> None:
    """One panel per group of logged terms (HP: loss terms, consistency, λ, positives) against the iteration."""
    if not records:
        return
    it = [r["iteration"] for r in records]
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, keys in zip(axes[0], curves, strict=True):
        for key in keys:
            if key in records[0]:
                ax.plot(it, [r[key] for r in records], label=key)
        ax.set_xlabel("iteration")
        ax.set_title(", ".join(keys))
        if len(keys) > 1:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pca_rgb(feat: np.ndarray) -> np.ndarray:
    """(N, h, w, C) features -> (N, h, w, 3) in [0, 1]: the first three principal components."""
    x = feat.reshape(-1, feat.shape[-1]).astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    y = x @ vt[:3].T
    y = (y - y.min(0)) / np.maximum(y.max(0) - y.min(0), 1e-12)
    return y.reshape(*feat.shape[:-1], 3)


def feature_preview(images: np.ndarray, feat: np.ndarray, cls_attn: np.ndarray, path: Path, title: str = "") -> None:
    """Rows of image | PCA of the patch features | mean CLS attention, for a first look at a store."""
    rgb = pca_rgb(feat)
    attn = cls_attn.astype(np.float32).mean(1)
    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.5 * len(images)), squeeze=False)
    for row, (image, pca, att) in enumerate(zip(images, rgb, attn, strict=True)):
        for ax, picture, name in zip(axes[row], (image, pca, att), ("image", "features (PCA)", "CLS attention"),
                                     strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation pictures

TAB10 = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
         (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 class colours, all distinct and never black (black means ignore).

    Tableau's ten first (readable for small label sets), then greedy farthest-point picks from an RGB grid, so
    colour i is the same for every n and later colours stay as far as possible from the earlier ones.
    """
    if n < 0:
        raise ValueError(f"palette needs n >= 0, got {n}")
    chosen = [np.array(c, np.float64) for c in TAB10[:n]]
    if n > len(TAB10):
        k = max(8, math.ceil((n + 1) ** (1 / 3)) + 1)
        levels = np.linspace(0, 255, k).round()
        grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
        grid = grid[grid.max(1) >= 64]  # keep away from black (ignore)
        dist = np.min([((grid - c) ** 2).sum(1) for c in chosen], axis=0)
        while len(chosen) < n:
            pick = grid[int(np.argmax(dist))]
            chosen.append(pick)
            dist = np.minimum(dist, ((grid - pick) ** 2).sum(1))
    return np.array(chosen, np.uint8).reshape(n, 3)


def save_label_png(labels: np.ndarray, n_classes: int, path: Path) -> None:
    """Class ids as a palette PNG: the pixel values stay the ids (0..n-1, 255 = ignore) and every viewer shows
    them in the class colours of the overlays (ignore in black)."""
    table = np.zeros((256, 3), np.uint8)
    table[:n_classes] = palette(n_classes)

    def write(tmp: Path) -> None:
        image = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
        image.putpalette(table.flatten().tolist())
        image.save(tmp, format="PNG")

    atomic_write(path, write)


def colorize(labels: np.ndarray, n: int) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 palette colours; ids outside 0..n-1 (255 = ignore, -1 = unmatched) black."""
    labels = np.asarray(labels).astype(np.int64)
    out = np.zeros((*labels.shape, 3), np.uint8)
    valid = (labels >= 0) & (labels < n)
    out[valid] = palette(n)[labels[valid]]
    return out


def blend(image: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """50/50 mix of an (H, W, 3) uint8 image and the colour map of its (H, W) labels: floor((image + colour) / 2)."""
    if image.shape[:2] != np.shape(labels) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"blend needs image (H, W, 3) and labels (H, W); got {image.shape} and {np.shape(labels)}")
    return ((image.astype(np.uint16) + colorize(labels, n)) // 2).astype(np.uint8)


CELL_PX, GAP_PX, MARGIN_PX, HEADER_PX, TITLE_PX, LEGEND_ROW_PX, LEGEND_ENTRY_PX, DPI = 200, 4, 8, 24, 30, 20, 150, 100


@dataclass(frozen=True)
class GridLayout:
    """Where overlay_grid draws, in whole pixels, so a cell's pixels in the saved PNG can be found exactly."""

    n_rows: int
    n_cols: int
    cell_w: int
    cell_h: int
    top: int  # title + column headers
    legend_rows: int
    legend_cols: int

    @property
    def width(self) -> int:
        return 2 * MARGIN_PX + self.n_cols * self.cell_w + (self.n_cols - 1) * GAP_PX

    @property
    def legend_px(self) -> int:
        return self.legend_rows * LEGEND_ROW_PX + MARGIN_PX if self.legend_rows else 0

    @property
    def height(self) -> int:
        return self.top + self.n_rows * self.cell_h + (self.n_rows - 1) * GAP_PX + self.legend_px + MARGIN_PX

    def cell_px(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a cell in PNG pixels, origin top-left, x1/y1 exclusive."""
        x0 = MARGIN_PX + col * (self.cell_w + GAP_PX)
        y0 = self.top + row * (self.cell_h + GAP_PX)
        return x0, y0, x0 + self.cell_w, y0 + self.cell_h

    def cell_fraction(self, row: int, col: int) -> list[float]:
        """[left, bottom, width, height] of a cell in figure fractions (matplotlib's add_axes)."""
        x0, y0, x1, y1 = self.cell_px(row, col)
        return [x0 / self.width, 1 - y1 / self.height, (x1 - x0) / self.width, (y1 - y0) / self.height]


def overlay_layout(n_rows: int, n_cols: int, image_hw: tuple[int, int], n_legend: int, title: str = "") -> GridLayout:
    """Layout of an overlay grid: cells CELL_PX wide keeping the image aspect, legend rows under the grid."""
    h, w = image_hw
    cell_h = max(1, round(CELL_PX * h / w))
    width = 2 * MARGIN_PX + n_cols * CELL_PX + (n_cols - 1) * GAP_PX
    legend_cols = max(1, min(n_legend, width // LEGEND_ENTRY_PX))
    legend_rows = math.ceil(n_legend / legend_cols) if n_legend else 0
    return GridLayout(n_rows, n_cols, CELL_PX, cell_h, HEADER_PX + (TITLE_PX if title else 0), legend_rows, legend_cols)


def _legend_entries(n_classes: int, class_names: list[str] | None) -> list[Patch]:
    names = class_names if class_names is not None else [str(i) for i in range(n_classes)]
    colours = palette(n_classes) / 255
    return [Patch(color=c, label=name) for c, name in zip(colours, names, strict=True)] + [
        Patch(color="black", label="ignore / unmatched")]


def overlay_grid(images: np.ndarray, columns: dict[str, np.ndarray], n_classes: int, path: Path,
                 class_names: list[str] | None = None, title: str = "") -> None:
    """Rows of image | each label map of `columns` blended 50/50 over the image, with a class-colour legend below."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"overlay_grid needs images (N, H, W, 3) uint8 with N >= 1, got {images.shape} {images.dtype}")
    for name, labels in columns.items():
        if np.shape(labels) != images.shape[:3]:
            raise ValueError(f"overlay_grid column {name!r} has shape {np.shape(labels)}, expected {images.shape[:3]}")
    if class_names is not None and len(class_names) != n_classes:
        raise ValueError(f"overlay_grid got {len(class_names)} class names for {n_classes} classes")
    entries = _legend_entries(n_classes, class_names)
    layout = overlay_layout(len(images), 1 + len(columns), images.shape[1:3], len(entries), title)
    fig = plt.figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI)
    headers = ["image", *columns]
    for row, image in enumerate(images):
        pictures = [image] + [blend(image, labels[row], n_classes) for labels in columns.values()]
        for col, picture in enumerate(pictures):
            ax = fig.add_axes(layout.cell_fraction(row, col))
            ax.imshow(picture, interpolation="nearest", aspect="auto")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(headers[col], fontsize=10, pad=4)
    if title:
        fig.suptitle(title, y=1 - 4 / layout.height, va="top", fontsize=12)
    legend_top = (layout.legend_px + MARGIN_PX) / layout.height
    fig.legend(handles=entries, loc="upper center", bbox_to_anchor=(0.5, legend_top), ncol=layout.legend_cols,
               frameon=False, fontsize=8, handlelength=1.2, columnspacing=1.0, borderaxespad=0)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def normalize_rows(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the fraction of a class's pixels per prediction); empty rows stay 0."""
    confusion = np.asarray(confusion, np.float64)
    total = confusion.sum(1, keepdims=True)
    return np.divide(confusion, total, out=np.zeros_like(confusion), where=total > 0)


def _pixel_mapper(fig, ax, bbox=None):
    """Data coordinates of `ax` -> (row, col) pixels of the PNG `fig` is saved to (at DPI, cropped to `bbox`,
    in inches, when given): lets tests read back what a picture shows at a known data position."""
    fig.canvas.draw()
    x0, top = (0.0, fig.bbox.height) if bbox is None else (bbox.x0 * DPI, bbox.y1 * DPI)

    def pixel(x: float, y: float) -> tuple[int, int]:
        dx, dy = ax.transData.transform((x, y))
        return int(round(top - dy)), int(round(dx - x0))

    return pixel


def confusion_figure(confusion: np.ndarray, class_names: list[str], title: str = ""):
    """The heat map of `confusion_png` as an open figure: cells, printed numbers and colour bar all in % of the
    class's pixels (row-normalized), so the bar reads in the unit of the numbers. The caller closes it."""
    confusion = np.asarray(confusion)
    n = len(class_names)
    if confusion.ndim != 2 or confusion.shape[0] != n or confusion.shape[1] not in (n, n + 1):
        raise ValueError(f"confusion_png needs a ({n}, {n}) or ({n}, {n + 1}) matrix for {n} class names, "
                         f"got shape {confusion.shape}")
    percent = 100 * normalize_rows(confusion)
    predicted = list(class_names) + (["unmatched"] if confusion.shape[1] == n + 1 else [])
    side = max(4.5, 0.3 * len(predicted) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), dpi=DPI)
    im = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    ax.set_xticks(range(len(predicted)), predicted, rotation=90, fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted (after matching)")
    ax.set_ylabel("ground truth")
    if len(predicted) <= 15:
        for (i, j), v in np.ndenumerate(percent):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v > 50 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the class's pixels")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig, ax


def confusion_png(confusion: np.ndarray, class_names: list[str], path: Path, title: str = ""):
    """Row-normalized classes x matched predictions heat map in % (cells, numbers and colour bar alike); a last
    extra column is drawn as 'unmatched'.

    Returns a function (x, y) in cell coordinates (column, row) -> (row, col) pixel of the PNG."""
    fig, ax = confusion_figure(confusion, class_names, title)
    pixel = _pixel_mapper(fig, ax)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return pixel


NA_NOTE = "× n/a: IoU undefined (class in neither the labels nor the prediction)"


def iou_figure(rows: dict[str, list[float | None]], class_names: list[str], title: str = ""):
    """The bar chart of `iou_bars` as an open figure. An undefined IoU (None) gets a small × at the start of its
    bar slot, and one legend entry says what × means: one note, never a text per bar that would overlap its
    neighbours when the slots are thinner than a line of text. The caller closes it."""
    n = len(class_names)
    if not rows:
        raise ValueError("iou_bars needs at least one result row")
    for name, values in rows.items():
        if len(values) != n:
            raise ValueError(f"iou_bars row {name!r} has {len(values)} values for {n} class names")
        if any(v is not None and not 0 <= v <= 100 for v in values):
            raise ValueError(f"iou_bars row {name!r} has values outside 0..100 (IoU must be given in %)")
    height = 0.8 / len(rows)
    fig_height = 1.0 + n * (0.07 * len(rows) + 0.12)
    fig, ax = plt.subplots(figsize=(7.5, fig_height), dpi=DPI)
    slot_pt = 72 * (fig_height - 1.0) * height / n  # about one bar's thickness in points
    marker_pt = max(2.0, min(6.0, 0.8 * slot_pt))
    colours = palette(len(rows)) / 255
    undefined_y = []
    for k, ((name, values), colour) in enumerate(zip(rows.items(), colours, strict=True)):
        y = np.arange(n) - 0.4 + (k + 0.5) * height
        defined = [v for v in values if v is not None]
        mean = f" (mean {np.mean(defined):.1f})" if defined else ""
        ax.barh(y, [0.0 if v is None else v for v in values], height=height, color=colour, label=name + mean)
        undefined_y += [yi for yi, v in zip(y, values, strict=True) if v is None]
    if undefined_y:
        ax.plot([1.5] * len(undefined_y), undefined_y, linestyle="none", marker="x", markersize=marker_pt,
                color="dimgrey", label=NA_NOTE)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)  # first class on top, no empty margins
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(3, len(rows)), frameon=False,
              title=title or None, title_fontsize=10)  # above the bars, under the title, never over a bar
    return fig, ax


def iou_bars(rows: dict[str, list[float | None]], class_names: list[str], path: Path, title: str = ""):
    """Grouped horizontal bars of per-class IoU in % (0..100) per result row; None (undefined) is marked × and
    explained once in the legend.

    Returns a function (IoU, bar y) -> (row, col) pixel of the PNG; bar k of class c is centred at
    y = c - 0.4 + (k + 0.5) * 0.8 / len(rows)."""
    fig, ax = iou_figure(rows, class_names, title)
    fig.canvas.draw()
    bbox = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.1)  # what bbox_inches="tight" crops to
    pixel = _pixel_mapper(fig, ax, bbox)
    fig.savefig(path, dpi=DPI, bbox_inches=bbox)
    plt.close(fig)
    return pixel


def cluster_examples(table: list[dict[str, Any]], best: dict[int, list[tuple[int, int, np.ndarray, np.ndarray]]],
                     path: Path, title: str = "", examples: int = 4) -> None:
    """The cluster report on unlabelled images: a row per cluster with its palette colour, its pixel share and the
    images it appears in, then its example crops (the cluster's pixels as they are, the rest dimmed to a third).

    `table`: ClusterTally.table() rows; `best`: ClusterTally.best (cluster -> [(pixels, image, crop, mask)])."""
    if not table:
        raise ValueError("cluster_examples needs at least one cluster")
    colours = palette(len(table)) / 255
    n_cols = 1 + examples
    fig = plt.figure(figsize=(1.6 * n_cols + 1.0, 1.5 * len(table) + (0.5 if title else 0.2)), dpi=DPI)
    grid = fig.add_gridspec(len(table), n_cols, width_ratios=[1.6] + [1] * examples, wspace=0.05, hspace=0.15)
    for row, cluster in enumerate(table):
        ax = fig.add_subplot(grid[row, 0])
        ax.add_patch(plt.Rectangle((0.02, 0.55), 0.3, 0.35, color=colours[row]))
        ax.text(0.38, 0.72, f"cluster {cluster['id']}", va="center", fontsize=9, weight="bold")
        ax.text(0.02, 0.35, f"{cluster['pixel_share']:.1f}% of pixels", va="center", fontsize=8)
        ax.text(0.02, 0.12, f"in {cluster['images']} image" + ("s" if cluster["images"] != 1 else ""), va="center",
                fontsize=8)
        ax.set_axis_off()
        for col, (_, _, crop, mask) in enumerate(best.get(int(cluster["id"]), [])[:examples]):
            ax = fig.add_subplot(grid[row, 1 + col])
            shown = np.where(mask[..., None], crop, crop // 3).astype(np.uint8)
            ax.imshow(shown, interpolation="nearest")
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def contact_sheet(overlays: list[np.ndarray], names: list[str], path: Path, columns: int = 4,
                  cell: int = 240) -> None:
    """Overlays side by side on one page: `columns` per row, each scaled to fit a `cell`-pixel square (aspect
    kept), its file name under it. Drawn with PIL, so a page of many pictures costs what their pixels cost."""
    from PIL import ImageDraw

    if not overlays or len(overlays) != len(names):
        raise ValueError(f"contact_sheet needs pictures and as many names, got {len(overlays)} and {len(names)}")
    columns = max(1, min(columns, len(overlays)))
    rows, caption = math.ceil(len(overlays) / columns), 16
    sheet = Image.new("RGB", (columns * (cell + GAP_PX) + GAP_PX, rows * (cell + caption + GAP_PX) + GAP_PX),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for i, (picture, name) in enumerate(zip(overlays, names, strict=True)):
        thumb = Image.fromarray(np.asarray(picture, np.uint8))
        scale = cell / max(thumb.width, thumb.height)  # small pictures are enlarged too: every cell is filled
        thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                             Image.Resampling.BILINEAR)
        x = GAP_PX + (i % columns) * (cell + GAP_PX)
        y = GAP_PX + (i // columns) * (cell + caption + GAP_PX)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        draw.text((x + 2, y + cell + 2), name[:40], fill="black")
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
