"""A trained head's codes S(f) (docs/hp.md §8): computed from a feature store, and written once as a store of their
own (shared by both probes, docs/evaluation.md), resumable per chunk."""

from __future__ import annotations

import torch
from tqdm import tqdm

from cache import writer
from cache.reader import FeatureStore
from cache.schema import CodesLayout
from pipeline.evaluation.encoders import Encoder


def encode_range(encoder: Encoder, source: FeatureStore, start: int, stop: int, batch: int,
                 extra: dict[str, tuple[FeatureStore, str]] | None = None) -> torch.Tensor:
    """The head's codes (n, D, h, w) of samples [start, stop) of `source`, `batch` samples per forward. `extra`:
    arrays the encoder reads from other stores of the same samples ({name: (store, its array)}: STEGO's mirrored
    val features); an array found in neither is left out (the encoder does without it)."""
    extra = extra or {}
    arrays = {name: torch.from_numpy(source.read(name, start, stop)).float() for name in encoder.arrays
              if name in source.names() and name not in extra}
    arrays.update({name: torch.from_numpy(store.read(array, start, stop)).float()
                   for name, (store, array) in extra.items() if name in encoder.arrays})
    with torch.no_grad():
        return torch.cat([encoder.from_arrays({k: v[i:i + batch] for k, v in arrays.items()})
                          for i in range(0, stop - start, batch)])


def write_codes(encoder: Encoder, source: FeatureStore, url: str, fresh: bool, batch: int, fp: str,
                extra: dict[str, tuple[FeatureStore, str]] | None = None) -> FeatureStore:
    """The head's codes of every sample of `source` into a store (labels copied), resumable per chunk."""
    n, h, _, _ = source.array("feat").shape
    label_size = source.array("label").shape[1] if "label" in source.names() else 0
    layout = CodesLayout(n, h, encoder.dim, label_size)
    attrs = {"dataset": source.attrs["dataset"], "split": source.attrs["split"], "backbone": source.attrs["backbone"],
             "resolution": source.attrs["resolution"], "fingerprint": fp, "random_init": source.random_init,
             "kind": "codes", "source": source.url}
    group = writer.create_store(url, layout, source.chunk_size, attrs, fresh)

    def compute(pending: list[int], finished: int) -> None:
        for chunk in tqdm(pending, desc=f"codes {source.attrs['split']}", unit="chunk", leave=False):
            start, stop = writer.chunk_range(group, chunk)
            codes = encode_range(encoder, source, start, stop, batch, extra)
            data = {"feat": codes.permute(0, 2, 3, 1).to(torch.float16).numpy()}
            if label_size:
                data["label"] = source.read("label", start, stop)
            writer.write_chunk(group, chunk, data)

    writer.fill_store(group, url, compute)
    return FeatureStore.open(url)
