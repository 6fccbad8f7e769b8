"""What STEGO adds to the HP cache, as two stages of its own (docs/stego.md §1, §6, §8), each cached and resumable:

  knn-train          the image-level neighbour table: every training crop's global feature (a store, resumable per
                     chunk), then its `stego_cache.knn_size` nearest crops by cosine (faiss, exact) as a store of
                     its own (checksummed chunks); training reads it only through a complete manifest
  features-val-flip  the val images mirrored left-right through the backbone (a store beside the val store, same
                     sample order), for the reference's flip averaging; `stego_cache.flip_tta = false` writes none

Both read HP's stores, never the source images: the knn table from the stored `f`, the mirrored features from the
val store's `image` array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cache import writer
from cache.reader import FeatureStore
from pipeline.errors import UserError
from pipeline.methods.stego.knn import global_features, nearest_neighbours
from pipeline.orchestration import paths
from pipeline.orchestration.stage import Stage


@dataclass(frozen=True)
class GlobalLayout:
    """The knn stage's store: one unit global feature per training crop."""

    n_samples: int
    dim: int

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"feat": ((self.dim,), "float32")}


@dataclass(frozen=True)
class TableLayout:
    """The neighbour table: each training crop's `knn_size` nearest crops, best first (itself at rank 0)."""

    n_samples: int
    k: int

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"feat": ((self.k,), "int32")}


@dataclass(frozen=True)
class FlipLayout:
    """The mirrored val features: the val store's `feat` grid, of the mirrored images."""

    n_samples: int
    grid: tuple[int, int]
    dim: int

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"feat": ((*self.grid, self.dim), "float16")}


def knn_url(config: dict, workdir: Path) -> str:
    f, res = config["features"], config["prepare"]["resolution"]
    return str(paths.stage_dir(config, workdir) / "features" / f"stego-knn-train-{f['backbone']}-{res}.zarr")


def flip_url(config: dict, workdir: Path) -> str:
    f, res = config["features"], config["prepare"]["val_resolution"]
    return str(paths.stage_dir(config, workdir) / "features" / f"stego-flip-val-{f['backbone']}-{res}.zarr")


def _source(job, step, stage: str, split: str) -> FeatureStore:
    manifest = job.upstream(step, stage)
    return FeatureStore.open(manifest["outputs"]["store"], expect={"split": split,
                                                                    "fingerprint": manifest["fingerprint"]})


# ---------------------------------------------------------------- the neighbour table (§1)
def knn_body(job, step, ctx) -> dict[str, Any]:
    """Global features chunk by chunk into a store of their own (a killed run keeps every finished chunk), then the
    table at once (exact search: the same features give the same table) into the table store, chunk by chunk."""
    cfg, source = job.config["stego_cache"], _source(job, step, "features-train", "train")
    n, dim, k = len(source), source.array("feat").shape[-1], cfg["knn_size"]
    if n < k:
        raise UserError(f"stego_cache.knn_size = {k} neighbours need at least as many training crops, but "
                        f"{source.url} holds {n}; lower it with --set stego_cache.knn_size=N")
    url = step.config["store"]
    global_url = url.replace("stego-knn-", "stego-global-")
    attrs = {k: source.attrs[k] for k in ("dataset", "split", "backbone", "patch_size", "resolution", "weights_hash")}
    attrs.update(fingerprint=ctx.fingerprint, random_init=source.random_init, source=source.url)
    group = writer.create_store(global_url, GlobalLayout(n, dim), source.chunk_size, {**attrs, "kind": "stego-global"},
                                ctx.fresh)

    def pool(pending: list[int], finished: int) -> None:
        for chunk in tqdm(pending, desc="stego knn: global features", unit="chunk", leave=False):
            start, stop = writer.chunk_range(group, chunk)
            # one generator per chunk: a resumed run draws the same dropout masks for the same crops
            generator = torch.Generator().manual_seed(cfg["knn_seed"] * 1_000_003 + chunk)
            writer.write_chunk(group, chunk, {"feat": global_features(source.read("feat", start, stop),
                                                                      cfg["knn_dropout"], generator)})

    writer.fill_store(group, global_url, pool, ctx.log)
    table_group = writer.create_store(url, TableLayout(n, k), source.chunk_size, {**attrs, "kind": "stego-knn"},
                                      ctx.fresh)
    table: list[np.ndarray] = []

    def search(pending: list[int], finished: int) -> None:
        if pending and not table:
            table.append(nearest_neighbours(FeatureStore.open(global_url).read("feat", 0, n), k))
        for chunk in pending:
            start, stop = writer.chunk_range(table_group, chunk)
            writer.write_chunk(table_group, chunk, {"feat": table[0][start:stop]})

    writer.fill_store(table_group, url, search, ctx.log)
    return {"store": url, "global": global_url, "neighbours": k, "random_init": source.random_init,
            "summary": f"{n} training crops, {k} nearest crops each -> {url}"}


def read_table(manifest: dict[str, Any], n_samples: int) -> np.ndarray:
    """The neighbour table a complete knn manifest names (every chunk checked as it is read), (N, knn_size)."""
    table = FeatureStore.open(manifest["outputs"]["store"]).read("feat", 0, n_samples)
    if len(table) != n_samples:
        raise UserError(f"the STEGO neighbour table {manifest['outputs']['store']} holds {len(table)} rows for a "
                        f"store of {n_samples} crops; rebuild it with --force")
    return table.astype(np.int64)


def knn_extras(config: dict, workdir: Path, stores: dict[str, str], listing) -> dict[str, Any]:
    c = config["stego_cache"]
    return {"store": stores.get("stego-knn") or knn_url(config, workdir),
            "knn": {k: c[k] for k in ("knn_size", "knn_dropout", "knn_seed")}}


# ---------------------------------------------------------------- mirrored val features (§6)
def flip_body(job, step, ctx) -> dict[str, Any]:
    """The backbone on each val image mirrored left-right (the val store's own `image`), chunk by chunk."""
    if not job.config["stego_cache"]["flip_tta"]:
        return {"store": None, "summary": "flip averaging off (stego_cache.flip_tta = false): nothing to write"}
    from pipeline.extraction.backbone import normalize
    from pipeline.extraction.workers import resolve_backbone

    source = _source(job, step, "features-val", "val")
    backbone = resolve_backbone(job.config)
    if backbone.weights_hash != source.attrs.get("weights_hash"):
        raise UserError(f"the val store {source.url} was written by another backbone than {backbone.name} "
                        f"({backbone.weights}); pass the --backbone and --weights it was made with")
    n, h, w, dim = source.array("feat").shape
    url = step.config["store"]
    attrs = {k: source.attrs[k] for k in ("dataset", "split", "backbone", "patch_size", "resolution", "weights_hash")}
    attrs.update(kind="stego-flip", fingerprint=ctx.fingerprint, random_init=source.random_init, source=source.url)
    group = writer.create_store(url, FlipLayout(n, (h, w), dim), source.chunk_size, attrs, ctx.fresh)

    def compute(pending: list[int], finished: int) -> None:
        for chunk in tqdm(pending, desc="stego mirrored val features", unit="chunk", leave=False):
            start, stop = writer.chunk_range(group, chunk)
            images = torch.from_numpy(np.ascontiguousarray(source.read("image", start, stop)[:, :, ::-1]))
            with torch.no_grad():
                feat = backbone(normalize(images)).feat
            writer.write_chunk(group, chunk, {"feat": feat.float().numpy().astype(np.float16)})

    writer.fill_store(group, url, compute, ctx.log)
    return {"store": url, "arrays": {"feat_flip": "feat"}, "random_init": source.random_init,
            "summary": f"{n} mirrored val images -> {url}"}


def flip_extras(config: dict, workdir: Path, stores: dict[str, str], listing) -> dict[str, Any]:
    on = config["stego_cache"]["flip_tta"]  # off: no store, so none is checked or named
    return {"store": (stores.get("stego-flip") or flip_url(config, workdir)) if on else None, "flip_tta": on}


STAGES = {
    "knn-train": Stage(knn_body, inputs=("features-train",), extras=knn_extras),
    "features-val-flip": Stage(flip_body, inputs=("features-val",), extras=flip_extras),
}
