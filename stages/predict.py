"""`predict`: segment new images with a trained, evaluated run (the backbone runs live here).

Resize policy: each image is resized (bilinear) so that its shorter side is `prepare.val_resolution`
(the evaluation resolution, 320 px by default), then centre-cropped by at most patch-1 pixels per side
so both sides are multiples of the patch size; the logits are upsampled bilinearly back to the
original image size, so the label PNG has the input's size. HCL runs see their evaluation geometry instead: the
whole image resized (bilinear) to `hcl_features.val_resolution` square. Clusters are mapped to classes with the
Hungarian matching found at evaluation; a run evaluated without labels has no matching, and each cluster is its own
segment, numbered and coloured by the palette (legend.json names them).
"""

from __future__ import annotations

import hashlib
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
from pipeline.config import Config, fingerprint
from pipeline.datasets.base import read_rgb
from pipeline.datasets.geometry import model_size  # noqa: F401  (re-exported: the resize policy)
from pipeline.errors import UserError
from pipeline.evaluation.encoders import load_encoder
from pipeline.evaluation.probes import LinearProbe, cosine_scores
from pipeline.extraction.backbone import normalize
from pipeline.extraction.workers import resolve_backbone
from pipeline.files import atomic_write, atomic_write_text
from pipeline.log import log
from pipeline.methods.contract import Method
from pipeline.methods.registry import method_named, method_of
from pipeline.orchestration import paths
from pipeline.reporting.plots import blend, contact_sheet, palette, save_label_png
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


def run(config: Config, workdir: Path, run: str | None, source: Path | list[Path], out: Path | None, probe: str,
        crf: bool) -> dict[str, Any]:
    """Segment `source` (an image, a folder, or a list of either) with run `run`'s head and fitted probe: a label
    PNG and an overlay per image, a contact sheet and legend.json in `out` (default: <run>/eval/predictions).

    Resumes: an image whose two outputs exist from the same run, metrics and options is not computed again."""
    run = run or method_of(config).name
    images = [image for part in ([source] if isinstance(source, str | Path) else source)
              for image in list_images(Path(part))]  # a wrong path is named before any model is loaded
    metrics_path = paths.eval_dir(config, workdir, run) / "metrics.json"
    if not metrics_path.exists():
        raise UserError(f"no {metrics_path}: run `hp-pipe evaluate --dataset {config['dataset']['name']} "
                        f"--run {run}` first (predict uses its fitted probes)")
    metrics = json.loads(metrics_path.read_text())
    labelled = metrics.get("labelled", True)  # without labels: the cluster probe's own ids, numbered
    row = next((r for r in metrics["results"] if r["features"] == "head" and r["probe"] == probe and not r["crf"]),
               None)
    if row is None and (labelled or probe != "cluster"):
        why = "its val split has no labels, so only the cluster probe was fitted" if not labelled else \
            f"evaluate it with --probe {probe} (or all)"
        raise UserError(f"run {run} has no {probe} probe: {why}")
    model = load_model(config, workdir, run, probe, row)
    names = metrics.get("class_names") or [f"class {c}" for c in range(len(model.mapping))]
    n_colours = len(names)
    out = Path(out or paths.eval_dir(config, workdir, run) / "predictions")
    out.mkdir(parents=True, exist_ok=True)
    identity = fingerprint(hashlib.sha256(metrics_path.read_bytes()).hexdigest(), file_digest(model.checkpoint),
                           probe, crf)
    legend = {"classes": [{"id": c, "name": name, "rgb": rgb.tolist()}
                          for c, (name, rgb) in enumerate(zip(names, palette(n_colours), strict=True))],
              "ignore": {"id": 255, "rgb": [0, 0, 0]}, "probe": probe, "crf": crf, "run": run,
              "labelled": labelled, "random_init_backbone": model.backbone.random_init, "identity": identity}
    done = _done_before(out, identity)
    atomic_write_text(out / "legend.json", json.dumps(legend, indent=2))  # first: a resumed predict checks it
    stems = output_stems(images)
    todo = [(path, stem) for path, stem in zip(images, stems, strict=True)
            if not (done and (out / f"{stem}.png").exists() and (out / f"{stem}_overlay.png").exists())]
    if len(todo) < len(images):
        log.info(f"[predict] {len(images) - len(todo)} of {len(images)} images done before: not computed again")
    for path, stem in tqdm(todo, desc="predict", unit="img"):
        image = read_image(path)
        labels = segment(config, model, image, crf)
        save_label_png(labels, n_colours, out / f"{stem}.png")
        overlay = Image.fromarray(blend(image, labels, n_colours))
        atomic_write(out / f"{stem}_overlay.png", lambda tmp, picture=overlay: picture.save(tmp, format="PNG"))
    sheets = write_contact_sheets(out, stems)
    note = " [RANDOM-INIT backbone]" if model.backbone.random_init else ""
    what = "class" if labelled else "cluster"
    log.info(f"[predict] {len(images)} images -> {out} (palette {what} PNGs, overlays, "
             f"{', '.join(p.name for p in sheets)}, legend.json){note}")
    return {"out": str(out), "images": len(images), "contact_sheets": [str(p) for p in sheets]}


SHEET = 48  # overlays per contact sheet page


def output_stems(images: list[Path]) -> list[str]:
    """A file stem per image, unique: two images with one stem (a.jpg and a.png, or the same name in two folders)
    get their extension and then a counter added, so no prediction overwrites another."""
    stems: list[str] = []
    taken: set[str] = set()
    for path in images:
        stem = path.stem
        if stem in taken:
            stem = f"{path.stem}_{path.suffix.lstrip('.')}"
        base, n = stem, 1
        while stem in taken:
            n += 1
            stem = f"{base}_{n}"
        taken.add(stem)
        stems.append(stem)
    return stems


def _done_before(out: Path, identity: str) -> bool:
    """Whether `out` holds predictions of this very run, metrics and options (then existing images are kept)."""
    try:
        return json.loads((out / "legend.json").read_text()).get("identity") == identity
    except (OSError, ValueError):
        return False


def write_contact_sheets(out: Path, stems: list[str]) -> list[Path]:
    """contact_sheet.png (contact_sheet_2.png, ... past SHEET images): every overlay of this predict, in order."""
    pages = [stems[i:i + SHEET] for i in range(0, len(stems), SHEET)]
    written = []
    for number, page in enumerate(pages, 1):
        path = out / ("contact_sheet.png" if number == 1 else f"contact_sheet_{number}.png")
        overlays = [np.asarray(Image.open(out / f"{stem}_overlay.png").convert("RGB")) for stem in page]
        contact_sheet(overlays, page, path)
        written.append(path)
    for stale in out.glob("contact_sheet_*.png"):  # pages of an earlier, longer predict
        if stale not in written:
            stale.unlink()
    return written


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Model:
    """A run's head, the backbone it was trained on, its probe's scores and the cluster -> class mapping."""

    encoder: Any
    backbone: Any
    method: Method
    score: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]
    mapping: np.ndarray  # cluster (or linear class) -> class id; -1: matched to no class
    checkpoint: Path


def load_model(config: Config, workdir: Path, run: str, probe: str, row: dict[str, Any] | None) -> Model:
    """The run's head and probe, read from the run layout (never a path read from a file); the backbone must be the
    one the run was trained on. `row`: the probe's result row (its Hungarian mapping), None without labels (each
    cluster is its own segment)."""
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
        mapping = np.asarray(row["cluster_to_class"]) if row is not None else np.arange(len(centroids))
        return Model(encoder, backbone, method_named(state.get("method", "hp"), "the checkpoint's method"),
                     lambda codes, size: 2 * cosine_scores(codes, centroids, size),  # §8: 2·cos
                     mapping, checkpoint)
    linear = LinearProbe(encoder.dim, n_classes)
    linear.load_state_dict(load_checkpoint(paths.probe_dir(rdir, "head") / "linear.pt")["probe"])
    return Model(encoder, backbone, method_named(state.get("method", "hp"), "the checkpoint's method"),
                 lambda codes, size: linear(codes, size),
                 np.arange(n_classes), checkpoint)


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
