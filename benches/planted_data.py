"""Planted features: a feature store with a known answer, made without a backbone (issue 9 §4).

The label maps are the synthetic dataset's scenes (`pipeline.datasets.synthetic.render_scene`, rendered at
the store's resolution). Each patch's feature is

    f_p = Σ_c frac_{p,c} · μ_c   +   U · a_image   +   ε_p

- `μ_c`: one unit prototype per class in C dims (boundary patches mix the prototypes of the classes they
  cover, by pixel fraction); the class is what unsupervised segmentation should recover.
- `U · a_image`: the image's "style", a nuisance offset shared by every patch of one image whatever its
  class, living in a `style_rank`-dimensional subspace (a colour cast or lighting moves DINO features
  along a few directions). It makes the patches of one image cluster together, so k-means on raw
  features partly clusters images instead of classes. A per-patch head can remove it only by learning
  to ignore those directions, which it can learn only from positives that share a class across images.
- `ε_p`: spatially smooth noise (white noise blurred over the grid), so neighbouring patches err together.

The K photometric views (`feat_aug`) of an image re-draw a small part of its style and add a little
fresh noise. The attention logits of every image are planted: `attn_same` for two patches of the same
segment (8-connected region of one patch label) plus unit Gaussian noise, and the cached `lhp` array is
computed from them by the project's own LHP function (`pipeline.extraction.lhp.lhp_weights`, docs/hp.md §1).

Everything is a function of (settings, seed, split, image index); only `write_store` does I/O, through
the cache's own writer, so the result is an ordinary train/val store for the trainer and the probes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from cache import writer
from cache.schema import HCL_SCHEMA, HCLLayout, Layout
from pipeline.config import fingerprint
from pipeline.datasets.synthetic import CLASS_NAMES, SPLIT_CODES, render_scene
from pipeline.extraction.lhp import lhp_weights

N_CLASSES = len(CLASS_NAMES)
WORLD = 7  # seed-sequence tag of the draws shared by both splits (prototypes, style subspace)


@dataclass(frozen=True)
class PlantedSettings:
    """The generator's settings. Chosen once from the raw-feature cluster mIoU alone (see the README), then kept."""

    dim: int = 64  # C, the feature width
    patch: int = 8  # pixels per patch side
    grid: int = 14  # patches per side: the store's resolution is grid * patch
    style: float = 1.1  # norm of an image's style offset (prototypes have norm 1); set from raw mIoU alone
    style_rank: int = 8  # dimensions of the style subspace
    noise: float = 0.5  # norm of a patch's smooth noise
    noise_smooth: float = 1.0  # Gaussian blur of the noise over the grid, in patches
    view_style: float = 0.25  # a photometric view re-draws this share of the style offset
    view_noise: float = 0.1  # and adds fresh white noise of this norm
    attn_same: float = 2.0  # attention logit bonus for two patches of one segment
    lhp_sigma: float = 28.0  # docs/hp.md §1
    scene_seed: int = 0  # the synthetic dataset's seed: which scenes the label maps come from

    @property
    def resolution(self) -> int:
        return self.grid * self.patch


@dataclass
class PlantedImages:
    """Arrays of a run of images, as a store holds them (store dtypes applied by `write_store`)."""

    image: np.ndarray  # (B, R, R, 3) uint8, the rendered scenes
    label: np.ndarray  # (B, R, R) uint8
    patch_label: np.ndarray  # (B, h, w) int64, majority pixel label per patch
    feat: np.ndarray  # (B, h, w, C) float32
    style: np.ndarray  # (B, C) float32, the image's nuisance offset U·a
    feat_aug: np.ndarray | None = None  # (B, K, h, w, C)
    attn_logits: np.ndarray | None = None  # (B, n, n) float32
    lhp: np.ndarray | None = None  # (B, h, w, 9) float32


def world(settings: PlantedSettings, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_classes, C) unit prototypes and (C, style_rank) orthonormal style basis, shared by both splits."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, WORLD]))
    protos = rng.standard_normal((N_CLASSES, settings.dim))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    basis, _ = np.linalg.qr(rng.standard_normal((settings.dim, settings.style_rank)))
    return protos.astype(np.float32), basis.astype(np.float32)


def label_fractions(label: np.ndarray, grid: int, n_classes: int = N_CLASSES) -> np.ndarray:
    """(R, R) pixel labels -> (grid, grid, n_classes) share of each class's pixels in each patch (ignore dropped)."""
    patch = label.shape[0] // grid
    votes = np.zeros((grid, grid, n_classes), np.float64)
    blocks = label[: grid * patch, : grid * patch].reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3)
    for c in range(n_classes):
        votes[..., c] = (blocks == c).sum((2, 3))
    return votes / (patch * patch)


def patch_labels(fractions: np.ndarray) -> np.ndarray:
    """The majority pixel label of every patch; -1 where no pixel has a class."""
    return np.where(fractions.sum(-1) > 0, fractions.argmax(-1), -1)


def segments(patch_label: np.ndarray) -> np.ndarray:
    """(h, w) segment ids: 8-connected regions of one patch label (-1 patches are one segment each)."""
    out = np.zeros(patch_label.shape, np.int64)
    next_id = 0
    for c in np.unique(patch_label):
        regions, count = ndimage.label(patch_label == c, structure=np.ones((3, 3)))
        if c < 0:  # unlabelled patches: no segment shares them
            regions[regions > 0] = np.arange(1, int((patch_label == c).sum()) + 1)
            count = int((patch_label == c).sum())
        out[regions > 0] = regions[regions > 0] + next_id - 1
        next_id += count
    return out


def planted_logits(patch_label: np.ndarray, same: float, rng: np.random.Generator) -> np.ndarray:
    """(n, n) attention logits: `same` between patches of one segment, plus unit Gaussian noise."""
    seg = segments(patch_label).reshape(-1)
    n = seg.size
    return (same * (seg[:, None] == seg[None, :]) + rng.standard_normal((n, n))).astype(np.float32)


def smooth_noise(rng: np.random.Generator, grid: int, dim: int, smooth: float, norm: float) -> np.ndarray:
    """(grid, grid, dim) Gaussian noise blurred over the grid, scaled so a patch's noise has expected norm `norm`."""
    white = rng.standard_normal((grid, grid, dim))
    if smooth > 0:
        white = ndimage.gaussian_filter(white, sigma=(smooth, smooth, 0), mode="reflect")
        white /= white.std()
    return (white * norm / np.sqrt(dim)).astype(np.float32)


def generate(settings: PlantedSettings, seed: int, split: str, indices: range | list[int], n_views: int = 0,
             with_lhp: bool = False) -> PlantedImages:
    """The planted arrays of images `indices` of `split`; image i depends only on (settings, seed, split, i)."""
    s = settings
    protos, basis = world(s, seed)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "label", "patch_label", "feat", "style",
                                                        "feat_aug", "attn_logits")}
    for i in indices:
        scene = np.random.default_rng(np.random.SeedSequence([s.scene_seed, SPLIT_CODES[split], i]))
        image, label = render_scene(scene, s.resolution)
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], i, 1]))
        fractions = label_fractions(label, s.grid)
        style = basis @ rng.standard_normal(s.style_rank).astype(np.float32) * (s.style / np.sqrt(s.style_rank))
        feat = (fractions @ protos).astype(np.float32) + style + smooth_noise(rng, s.grid, s.dim, s.noise_smooth,
                                                                                s.noise)
        pl = patch_labels(fractions)
        out["image"].append(image)
        out["label"].append(label)
        out["patch_label"].append(pl)
        out["feat"].append(feat)
        out["style"].append(style)
        if n_views:
            views = []
            for _ in range(n_views):  # a photometric view: part of the style re-drawn, a little fresh noise
                jitter = basis @ rng.standard_normal(s.style_rank).astype(np.float32)
                jitter *= s.view_style * s.style / np.sqrt(s.style_rank)
                fresh = rng.standard_normal(feat.shape).astype(np.float32) * (s.view_noise / np.sqrt(s.dim))
                views.append(feat + jitter + fresh)
            out["feat_aug"].append(np.stack(views))
        if with_lhp:
            out["attn_logits"].append(planted_logits(pl, s.attn_same, rng))
    arrays = {k: np.stack(v) if v else None for k, v in out.items()}
    result = PlantedImages(**arrays)
    if with_lhp:
        logits = torch.from_numpy(result.attn_logits)
        result.lhp = lhp_weights(logits, s.grid, s.grid, s.lhp_sigma).numpy()  # docs/hp.md §1
    return result


def store_attrs(settings: PlantedSettings, seed: int, split: str, n: int, n_views: int) -> dict[str, Any]:
    """A store's attributes: its identity says 'planted', with the generator's settings and seed."""
    params = {**dataclasses.asdict(settings), "seed": seed}
    return {
        "dataset": "planted", "split": split, "backbone": "planted", "patch_size": settings.patch,
        "resolution": settings.resolution, "weights": "planted (no backbone)", "weights_hash": fingerprint(params),
        "random_init": False, "n_views": n_views, "fingerprint": fingerprint(params, split, n, n_views),
        "n_classes": N_CLASSES, "class_names": list(CLASS_NAMES), "planted": params,
        "samples": [f"{split}_{i:05d}" for i in range(n)],
    }


def write_store(url: str, settings: PlantedSettings, seed: int, split: str, n: int, n_views: int = 2,
                chunk_size: int = 16) -> str:
    """A complete planted store at `url` (train: with `feat_aug` and `lhp`; val: without), rewritten from scratch.

    `cls_attn` is required by the layout but means nothing here: one head of zeros.
    """
    train = split == "train"
    views = n_views if train else 0
    layout = Layout(n, settings.resolution, settings.patch, settings.dim, 1, views, train, True)
    group = writer.create_store(url, layout, chunk_size, store_attrs(settings, seed, split, n, views), fresh=True)
    for chunk in range(-(-n // chunk_size)):
        start, stop = writer.chunk_range(group, chunk)
        p = generate(settings, seed, split, range(start, stop), views, train)
        ids = np.arange(start, stop, dtype=np.int32)  # one sample per scene, scenes drawn independently (i.i.d.)
        data = {"feat": p.feat.astype(np.float16), "image": p.image, "label": p.label,
                "cls_attn": np.zeros((stop - start, 1, settings.grid, settings.grid), np.float16),
                "crop_order": ids, "source_image": ids}
        if train:
            data["feat_aug"] = p.feat_aug.astype(np.float16)
            data["lhp"] = p.lhp.astype(np.float16)
        writer.write_chunk(group, chunk, data)
    writer.mark_complete(group)
    return url


# ---------------------------------------------------------------- HCL's multi-level stores (docs/hcl.md §1, §4)
# HCL reads one ViT at several patch sizes (16/32/56 px for a /16 backbone, docs/hcl.md §1). The planted analogue:
# the same scene, prototypes, style and noise settings at the coarser grids (patch sizes ×1, ×2, ×3.5).
HCL_LEVELS = (1.0, 2.0, 3.5)
# HCL's foreground mask comes from the CLS attention (salient objects); planted: the objects set on the scene's
# stuff (building, tree, car, person), by majority label at the finest grid.
HCL_THINGS = ("building", "tree", "car", "person")


def hcl_patch_sizes(settings: PlantedSettings) -> tuple[int, ...]:
    """Branch patch sizes, finest first: (8, 16, 28) for 8 px patches."""
    return tuple(int(round(settings.patch * k)) for k in HCL_LEVELS)


@dataclass
class PlantedHCL:
    """Arrays of an HCL store's samples (sample s = image j, crop r at s = j·crops + r), store dtypes not applied."""

    image: np.ndarray  # (S, R, R, 3) uint8
    label: np.ndarray  # (S, R, R) uint8
    source_image: np.ndarray  # (S,) int32
    levels: dict[int, np.ndarray]  # patch size -> (S, g, g, C): the plain crop's branches
    cls: np.ndarray  # (S, C)
    fg_mask: np.ndarray  # (S, g, g) bool at the finest grid
    aug: dict[int, np.ndarray] | None = None  # patch size -> (S, V, g, g, C)
    aug_cls: np.ndarray | None = None  # (S, V, C)


def _white(rng: np.random.Generator, shape: tuple[int, ...], norm: float) -> np.ndarray:
    """White Gaussian noise whose vectors (last axis) have expected norm `norm`."""
    return rng.standard_normal(shape).astype(np.float32) * np.float32(norm / np.sqrt(shape[-1]))


def generate_hcl(settings: PlantedSettings, seed: int, split: str, images: range | list[int], crops: int = 1,
                 n_views: int = 0) -> PlantedHCL:
    """HCL's planted samples of `images`: every branch is the prototype mix of its own grid plus the image's style
    (the very offset `generate` gives the image) plus smooth noise drawn on that grid; the CLS token is the image's
    class mix plus the style plus white noise. The planted scene has no geometry to crop, so the R "crops" of an
    image are the whole scene with their own noise draws (crop box = the whole image); a variant re-draws part of the
    style and adds fresh noise on every branch, as `generate`'s views do."""
    s = settings
    protos, basis = world(s, seed)
    sizes = hcl_patch_sizes(s)
    things = [CLASS_NAMES.index(name) for name in HCL_THINGS]
    out: dict[str, list[Any]] = {"image": [], "label": [], "source_image": [], "cls": [], "fg_mask": [], "aug_cls": []}
    levels: dict[int, list[np.ndarray]] = {p: [] for p in sizes}
    aug: dict[int, list[np.ndarray]] = {p: [] for p in sizes}
    for i in images:
        scene = np.random.default_rng(np.random.SeedSequence([s.scene_seed, SPLIT_CODES[split], i]))
        image, label = render_scene(scene, s.resolution)
        style_rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], i, 1]))
        style = basis @ style_rng.standard_normal(s.style_rank).astype(np.float32) * (s.style / np.sqrt(s.style_rank))
        mixes = {p: (label_fractions(label, round(s.resolution / p)) @ protos).astype(np.float32) for p in sizes}
        whole = label_fractions(label, 1)[0, 0]
        finest = patch_labels(label_fractions(label, s.grid))
        for r in range(crops):
            rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], i, 2, r]))
            plain = {p: mixes[p] + style + smooth_noise(rng, mixes[p].shape[0], s.dim, s.noise_smooth, s.noise)
                     for p in sizes}
            cls = (whole @ protos).astype(np.float32) + style + _white(rng, (s.dim,), s.noise)
            for p in sizes:
                levels[p].append(plain[p])
            out["image"].append(image)
            out["label"].append(label)
            out["source_image"].append(i)
            out["cls"].append(cls)
            out["fg_mask"].append(np.isin(finest, things))
            if n_views:
                views: dict[int, list[np.ndarray]] = {p: [] for p in sizes}
                view_cls = []
                for _ in range(n_views):  # a photometric variant: part of the style re-drawn, fresh noise everywhere
                    jitter = basis @ rng.standard_normal(s.style_rank).astype(np.float32)
                    jitter *= s.view_style * s.style / np.sqrt(s.style_rank)
                    for p in sizes:
                        views[p].append(plain[p] + jitter + _white(rng, plain[p].shape, s.view_noise))
                    view_cls.append(cls + jitter + _white(rng, cls.shape, s.view_noise))
                for p in sizes:
                    aug[p].append(np.stack(views[p]))
                out["aug_cls"].append(np.stack(view_cls))
    return PlantedHCL(
        image=np.stack(out["image"]), label=np.stack(out["label"]),
        source_image=np.asarray(out["source_image"], np.int32), levels={p: np.stack(v) for p, v in levels.items()},
        cls=np.stack(out["cls"]), fg_mask=np.stack(out["fg_mask"]),
        aug={p: np.stack(v) for p, v in aug.items()} if n_views else None,
        aug_cls=np.stack(out["aug_cls"]) if n_views else None)


def write_hcl_store(url: str, settings: PlantedSettings, seed: int, split: str, n_images: int, crops: int = 2,
                    n_views: int = 2, chunk_size: int = 16) -> str:
    """A complete planted HCL store at `url` (train: R crops with V variants each and the foreground mask; val: one
    plain sample per image), readable by HCL's trainer and encoder like the features stage's own stores."""
    train = split == "train"
    crops, views = (crops, n_views) if train else (1, 0)
    sizes = hcl_patch_sizes(settings)
    layout = HCLLayout(n_images * crops, settings.resolution, sizes, settings.dim, views, True, train)
    attrs = store_attrs(settings, seed, split, n_images, views)
    attrs.update({"kind": "hcl", "hcl_schema": HCL_SCHEMA, "patch_sizes": list(sizes), "images": n_images,
                  "crops": crops, "views": views, "samples": [f"{split}_{i:05d}" for i in range(n_images)],
                  "fingerprint": fingerprint(attrs["planted"], "hcl", split, n_images, crops, views)})
    group = writer.create_store(url, layout, chunk_size, attrs, fresh=True)
    for chunk in range(-(-layout.n_samples // chunk_size)):
        start, stop = writer.chunk_range(group, chunk)
        first, last = start // crops, -(-stop // crops)  # the images whose samples the chunk holds
        p = generate_hcl(settings, seed, split, range(first, last), crops, views)
        rows = slice(start - first * crops, stop - first * crops)
        data = {"feat": p.levels[sizes[0]][rows], "hcl_cls": p.cls[rows], "image": p.image[rows],
                "label": p.label[rows], "source_image": p.source_image[rows]}
        data.update({f"hcl_p{q}": p.levels[q][rows] for q in sizes[1:]})
        if train:
            data["fg_mask"] = p.fg_mask[rows]
            data.update({f"hcl_aug_p{q}": p.aug[q][rows] for q in sizes})
            data["hcl_aug_cls"] = p.aug_cls[rows]
            data["crop_box"] = np.tile(np.array([0, 0, settings.resolution], np.int32), (stop - start, 1))
        writer.write_chunk(group, chunk, data)
    writer.mark_complete(group)
    return url
