"""TensorBoard event files beside metrics.jsonl, so that `tensorboard --logdir <workdir>/<dataset>/runs` compares runs.

Written with torch's own `torch.utils.tensorboard`; hp-pipe never starts a server. What goes in (docs/evaluation.md,
"TensorBoard"):

  runs/<run>/          train/<key>: every number of every metrics.jsonl line, at the line's iteration (the same
                       values, as float32); train/iteration_seconds: wall seconds per iteration since the
                       previous line (from `seconds`, which counts from the process's start); val/overlays: at each
                       checkpoint, a few validation images | ground truth | the head's clusters on them (k-means on
                       those images' codes, Hungarian-matched)
  runs/<run>/eval/     eval/<features>_<probe>[_crf]/{miou,acc}: the evaluation's rows at the trained iteration,
                       with the probe and protocol settings as hparams (the HPARAMS tab lists every run's)

A run resumed from its checkpoint at iteration s opens its writer with purge_step = s: TensorBoard's readers then
drop every event the killed run wrote at s or later, and the resumed run writes step s again (metrics.jsonl's line
at s, the images of the checkpoint): the rule metrics.jsonl follows, so no step is read twice or lost (a kill
between a checkpoint and its images would otherwise lose them).
`--set run.tensorboard=false` writes none of this.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.orchestration import coverage

EVENTS = "events.out.tfevents.*"  # the file names SummaryWriter writes
PREVIEW_IMAGES = 4  # validation images per checkpoint
PREVIEW_PX = 128  # images and labels shrunk (every k-th pixel) to at most this side: a checkpoint's image stays small


ITERATION_SECONDS = "train/iteration_seconds"


def iteration_seconds(record: dict[str, Any], last_iteration: int, last_seconds: float) -> float:
    """Wall seconds per iteration between the previous line of this process and `record`."""
    return (record["seconds"] - last_seconds) / (record["iteration"] - last_iteration)


def enabled(config: dict[str, dict[str, Any]]) -> bool:
    """run.tensorboard (true unless a config without the key says otherwise)."""
    return bool(config.get("run", {}).get("tensorboard", True))


def _writer(folder: Path, purge_step: int | None = None):
    from torch.utils.tensorboard import SummaryWriter  # imported on use: tensorboard is not needed to read a run

    return SummaryWriter(str(folder), purge_step=purge_step)


class TrainingBoard:
    """The training side: scalars per metrics line, overlay images per checkpoint."""

    def __init__(self, folder: Path, resume_from: int, preview: ValPreview | None = None):
        self.writer = _writer(folder, purge_step=resume_from)
        self.preview = preview
        self.imaged: set[int] = set()
        self.last = (resume_from, 0.0)  # (iteration, seconds) of this process's previous line

    def scalars(self, record: dict[str, Any], timed: bool = True) -> None:
        """Every number of a metrics.jsonl line as `train/<key>` at its iteration, and (`timed`: a line of this
        process) `train/iteration_seconds`; flushed at once, so that a kill loses no line metrics.jsonl kept."""
        step = int(record["iteration"])
        for key, value in record.items():
            if key != "iteration" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{key}", value, step)
        if timed and "seconds" in record and step > self.last[0]:
            self.writer.add_scalar(ITERATION_SECONDS, iteration_seconds(record, *self.last), step)
            self.last = (step, record["seconds"])
        self.writer.flush()

    def checkpointed(self, iteration: int, checkpoint: Path) -> None:
        """Overlay images of the checkpoint just written, once per iteration (HCL checkpoints twice at an epoch's
        start)."""
        if self.preview is None or iteration in self.imaged:
            return
        self.imaged.add(iteration)
        grid = self.preview.grid(checkpoint)
        if grid is not None:
            self.writer.add_image("val/overlays", grid, iteration, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class ValPreview:
    """A few validation images, labels and the features the head reads, kept in memory for the checkpoint images."""

    def __init__(self, arrays: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray, n_classes: int):
        self.arrays, self.images, self.labels, self.n_classes = arrays, images, labels, n_classes

    @classmethod
    def open(cls, url: str, n_classes: int, log) -> ValPreview | None:
        """The first PREVIEW_IMAGES samples of the val store at `url`; None (said once) when it cannot be read yet:
        the images are a preview, they never stop a run."""
        from cache.reader import FeatureStore

        if not Path(url).exists():
            log(f"TensorBoard: no validation store at {url} yet, so no overlay images (run `hp-pipe features "
                "--split val` first to get them)")
            return None
        try:
            store = FeatureStore.open(url)
            if "label" not in store.names() or n_classes < 1:
                log(f"TensorBoard: {url} has no labels, so no overlay images")
                return None
            n = min(PREVIEW_IMAGES, len(store))
            names = [name for name in store.names() if name not in ("image", "label")]
            images, labels = store.read("image", 0, n), store.read("label", 0, n)
            step = max(1, math.ceil(max(images.shape[1:3]) / PREVIEW_PX))  # shrunk once, so is all the work
            return cls({name: store.read(name, 0, n) for name in names}, images[:, ::step, ::step],
                       labels[:, ::step, ::step], n_classes)
        except Exception as exc:  # a half-written or foreign store: no preview, and the training goes on
            log(f"TensorBoard: {url} cannot be read ({exc}), so no overlay images")
            return None

    def grid(self, checkpoint: Path) -> np.ndarray | None:
        """(H, W, 3) uint8: one row per image, image | ground truth | the head's clusters on it."""
        from pipeline.evaluation.encoders import load_encoder

        with torch.random.fork_rng(devices=[]):  # building the head draws from torch's RNG: the run must not see it
            encoder = load_encoder(str(checkpoint))
            if any(name not in self.arrays for name in encoder.arrays):
                return None
            with torch.no_grad():
                codes = encoder.from_arrays({k: torch.from_numpy(self.arrays[k]) for k in encoder.arrays}).float()
        clusters = matched_clusters(codes, self.labels, self.n_classes)
        return overlay_rows(self.images, self.labels, clusters, self.n_classes)


def matched_clusters(codes: torch.Tensor, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(B, H, W) class ids: spherical k-means (n_classes clusters, seed 0, 20 iterations) on these codes'
    patches, each patch's cluster spread over its pixels (nearest: a preview, not the evaluation's bilinear
    upsampling, which costs seconds per checkpoint), then renamed to the class Hungarian matching gives it on these
    labels (unmatched: 255, drawn black)."""
    from pipeline.evaluation.metrics import confusion_matrix, hungarian_match
    from pipeline.evaluation.probes import assign, spherical_kmeans

    patches = codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1]).numpy()
    k = max(1, min(n_classes, len(patches)))
    centroids = torch.from_numpy(spherical_kmeans(patches, k, seed=0, iterations=20))
    grid = assign(codes, centroids).numpy()  # (B, h, w)
    (h, w), (height, width) = grid.shape[1:], labels.shape[-2:]
    pred = grid[:, (np.arange(height) * h) // height][:, :, (np.arange(width) * w) // width]
    mapping = hungarian_match(confusion_matrix(pred, labels, k, n_classes))
    return np.where(mapping[pred] >= 0, mapping[pred], 255)


def overlay_rows(images: np.ndarray, labels: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows of image | ground truth blended | prediction blended."""
    from pipeline.reporting.plots import blend

    rows = [np.concatenate([img, blend(img, lab, n_classes), blend(img, p, n_classes)], axis=1)
            for img, lab, p in zip(images, labels, pred, strict=True)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def open_training_board(config: dict[str, dict[str, Any]], run_folder: Path, resume_from: int,
                        log, preview: str | None = None) -> TrainingBoard | None:
    """The run's board (None under run.tensorboard = false), with the images of the val store `preview` (the train
    stage names its method's own; a bench's run has none)."""
    if not enabled(config):
        return None
    if preview is None:
        return TrainingBoard(run_folder, resume_from)
    return TrainingBoard(run_folder, resume_from, ValPreview.open(preview, config["dataset"]["n_classes"], log))


# ---------------------------------------------------------------- evaluation
def result_tag(result: dict[str, Any]) -> str:
    """eval/<features>_<probe>[_crf]: a tag per result row that reads the same for every run."""
    return f"eval/{result['features']}_{result['probe']}" + ("_crf" if result.get("crf") else "")


def hparams_of(config: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """The run's settings as flat hparams: method, backbone, the method's training keys, the evaluation's keys.
    Booleans as "true" / "false": torch's writer would store them as the numbers 1.0 / 0.0."""
    from pipeline.methods.registry import method_of

    method = config["train"]["method"]
    section = method_of(config).section
    flat: dict[str, Any] = {"method": method, "dataset": config["dataset"]["name"],
                            "backbone": config["features"]["backbone"], "weights": config["features"]["weights"],
                            "random_init": bool(metrics.get("random_init")),
                            "protocol": str(metrics.get("protocol_settings", {}).get("name", ""))}
    for prefix, values in ((section, config[section]), ("evaluate", config["evaluate"])):
        for key, value in values.items():
            if isinstance(value, bool | int | float | str):
                flat[f"{prefix}.{key}"] = value
    return {k: ("true" if v else "false") if isinstance(v, bool) else v for k, v in flat.items()}


def write_evaluation(config: dict[str, dict[str, Any]], metrics: dict[str, Any], folder: Path, step: int) -> None:
    """The evaluation's rows as scalars at `step` (the trained iterations) and the settings as hparams, into
    `folder` (the run's eval/ folder). A re-evaluation replaces the folder's earlier event files: one value per
    tag and step."""
    if not enabled(config):
        return
    from torch.utils.tensorboard.summary import hparams

    folder = Path(folder)
    for old in folder.glob(EVENTS):
        old.unlink()
    values = {}
    for result in metrics.get("results", []):
        for key in ("miou", "acc", "acc_ref"):
            if isinstance(result.get(key), int | float):
                values[f"{result_tag(result)}/{key}"] = float(result[key])
    writer = _writer(folder)
    try:
        experiment, start, end = hparams(hparams_of(coverage.whole(config), metrics), values)  # a record
        for summary in (experiment, start, end):
            writer.file_writer.add_summary(summary)
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
