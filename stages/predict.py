"""`predict`: segment new images with a trained, evaluated run (the backbone runs live here).

Resize policy: each image is resized (bilinear) so that its shorter side is `prepare.val_resolution`
(the evaluation resolution, 320 px by default), then centre-cropped by at most patch-1 pixels per side
so both sides are multiples of the patch size; the logits are upsampled bilinearly back to the
original image size, so the label PNG has the input's size. HCL runs see their evaluation geometry instead: the
whole image resized (bilinear) to `hcl_features.val_resolution` square. Clusters are mapped to classes with the
Hungarian matching found at evaluation (raw cluster ids where there was none).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cache.reader import FeatureStore
from pipeline.config import Config
from pipeline.datasets.base import read_rgb
from pipeline.datasets.geometry import model_size  # noqa: F401  (re-exported: the resize policy)
from pipeline.errors import UserError
from pipeline.evaluation.encoders import load_encoder
from pipeline.evaluation.probes import LinearProbe, cosine_scores
from pipeline.extraction.backbone import normalize
from pipeline.extraction.workers import resolve_backbone
from pipeline.files import atomic_write_text
from pipeline.log import log
from pipeline.methods.contract import Method
from pipeline.methods.registry import method_named, method_of
from pipeline.orchestration import paths
from pipeline.reporting.plots import blend, palette, save_label_png
from pipeline.training.checkpoints import load_checkpoint

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            return images
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
    raise UserError(f"{path} does not exist: pass an image file or a folder of images")


def read_image(path: Path) -> np.ndarray:
    """The image as a viewer shows it (EXIF rotation, grey and 16-bit as RGB): the datasets' own reader."""
    return read_rgb(path)


def run(config: Config, workdir: Path, run: str | None, source: Path, out: Path | None, probe: str,
        crf: bool) -> dict[str, Any]:
    run = run or method_of(config).name
    images = list_images(Path(source))  # a wrong path is named before any model is loaded
    metrics_path = paths.eval_dir(config, workdir, run) / "metrics.json"
    if not metrics_path.exists():
        raise UserError(f"no {metrics_path}: run `hp-pipe evaluate --dataset {config['dataset']['name']} "
                        f"--run {run}` first (predict uses its fitted probes)")
    metrics = json.loads(metrics_path.read_text())
    row = next((r for r in metrics["results"] if r["features"] == "head" and r["probe"] == probe and not r["crf"]),
               None)
    if row is None:
        raise UserError(f"run {run} has no {probe} probe; evaluate it with --probe {probe} (or all)")
    model = load_model(config, workdir, run, probe, row)
    n_classes = config["dataset"]["n_classes"]
    out = Path(out or paths.eval_dir(config, workdir, run) / "predictions")
    out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(images, desc="predict", unit="img"):
        image = read_image(path)
        labels = segment(config, model, image, crf)
        save_label_png(labels, n_classes, out / f"{path.stem}.png")
        Image.fromarray(blend(image, labels, n_classes)).save(out / f"{path.stem}_overlay.png")
    names = metrics.get("class_names") or [f"class {c}" for c in range(n_classes)]
    legend = {"classes": [{"id": c, "name": name, "rgb": rgb.tolist()}
                          for c, (name, rgb) in enumerate(zip(names, palette(n_classes), strict=True))],
              "ignore": {"id": 255, "rgb": [0, 0, 0]}, "probe": probe, "crf": crf, "run": run,
              "random_init_backbone": model.backbone.random_init}
    atomic_write_text(out / "legend.json", json.dumps(legend, indent=2))
    note = " [RANDOM-INIT backbone]" if model.backbone.random_init else ""
    log.info(f"[predict] {len(images)} images -> {out} (palette label PNGs, overlays, legend.json){note}")
    return {"out": str(out), "images": len(images)}


@dataclass
class Model:
    """A run's head, the backbone it was trained on, its probe's scores and the cluster -> class mapping."""

    encoder: Any
    backbone: Any
    method: Method
    score: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]
    mapping: np.ndarray


def load_model(config: Config, workdir: Path, run: str, probe: str, row: dict[str, Any]) -> Model:
    """The run's head and probe, read from the run layout (never a path read from a file); the backbone must be the
    one the run was trained on."""
    rdir = paths.run_dir(config, workdir, run)
    checkpoint = paths.checkpoint_path(rdir)
    encoder = load_encoder(str(checkpoint))
    backbone = resolve_backbone(config)
    state = load_checkpoint(checkpoint)
    trained_on = state.get("backbone") or FeatureStore.open(state["store"]).attrs
    if trained_on["weights_hash"] != backbone.weights_hash or trained_on["backbone"] != backbone.name:
        raise UserError(f"run {run} was trained on {trained_on['backbone']} features ({trained_on['weights']}), "
                        f"but this backbone is {backbone.name} ({backbone.weights}); pass the same --backbone and "
                        "--weights as for training")
    n_classes = config["dataset"]["n_classes"]
    if probe == "cluster":
        centroids = torch.from_numpy(np.load(paths.probe_dir(rdir, "head") / "centroids.npy"))
        return Model(encoder, backbone, method_named(state.get("method", "hp"), "the checkpoint's method"),
                     lambda codes, size: 2 * cosine_scores(codes, centroids, size),  # §8: 2·cos
                     np.asarray(row["cluster_to_class"]))
    linear = LinearProbe(encoder.dim, n_classes)
    linear.load_state_dict(load_checkpoint(paths.probe_dir(rdir, "head") / "linear.pt")["probe"])
    return Model(encoder, backbone, method_named(state.get("method", "hp"), "the checkpoint's method"),
                 lambda codes, size: linear(codes, size),
                 np.arange(n_classes))


def segment(config: Config, model: Model, image: np.ndarray, crf: bool) -> np.ndarray:
    """One image's class ids at its own size (255: a cluster matched to no class)."""
    # the method's evaluation geometry (HP: shorter side, patch multiples; HCL: the whole image, square)
    resized, cropped = model.method.geometry(config, image.shape[:2], model.backbone.patch_size)
    x = F.interpolate(normalize(torch.from_numpy(image[None].copy())), size=resized, mode="bilinear",
                      align_corners=False)
    top, left = (resized[0] - cropped[0]) // 2, (resized[1] - cropped[1]) // 2
    x = x[..., top:top + cropped[0], left:left + cropped[1]]
    with torch.no_grad():
        codes = model.encoder.from_backbone(model.backbone, x)
        logits = model.score(codes, image.shape[:2])
    if crf:
        from pipeline.evaluation.crf import crf_labels

        pred = crf_labels(image[None], logits.numpy().astype(np.float32))[0]
    else:
        pred = logits.argmax(1)[0].numpy()
    return np.where(model.mapping[pred] >= 0, model.mapping[pred], 255).astype(np.uint8)
