"""What a feature store holds: one zarr v3 group per (dataset, split, backbone, resolution, views).

The first axis of every array is the sample; every array is chunked along it with the same
`chunk_size`, so chunk `c` of every array covers samples `[c*chunk_size, (c+1)*chunk_size)` and
one worker writing chunk `c` of all arrays is that chunk's only writer.

Sample order (schema 2): a training store holds its crops in a seeded random permutation of all prepared crops
(cache/order.py, docs/hp.md §7), evaluation stores in the dataset's order; `crop_order` (sample -> prepared
crop index) and `source_image` (sample -> source image index) say which crop each sample is. Every array,
`image` and `label` included, follows that order.

HCL has stores of its own (`HCLLayout`, attribute kind = "hcl"), with its own geometry (docs/hcl.md §4-§5): they
are written from the source images, never from HP's prepared crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# 3: a crc32c checksum codec on every array and a record (stored size, digest) per chunk (cache/integrity.py);
# 2: crops in a random permutation (train), crop_order and source_image arrays
SCHEMA_VERSION = 3
DONE = "_done"  # one flag per chunk, set after all of that chunk's arrays are written
RECORDS = "_records"  # per chunk and array: (stored bytes, crc32c of the values), written just before the flag
# Version of HCL's stores, in their attributes and the features-<split>-hcl fingerprint; a store of another version
# is refused. 4: checksummed chunks with per-chunk records (schema 3); 3: HCL's own stores (its crops, views and
# evaluation geometry, docs/hcl.md §4-§5), no longer arrays
# added to HP's five-crop stores; 2: those arrays with bicubic antialiased patch kernels (§1); 1: bilinear kernels.
HCL_SCHEMA = 4
# Attributes that say what a store *is*; a store whose identity differs is a different store.
# `kind` ("hcl", "codes"; absent for HP's stores) keeps HCL's stores and HP's apart even at one URL.
IDENTITY_KEYS = ("schema_version", "dataset", "split", "backbone", "patch_size", "resolution", "weights_hash", "kind")
# `features.dtype` (docs/cache.md, "Compact cache"): how HP's float feature arrays are held. With "int8" each of
# QUANTIZED is stored as int8 beside `<name>_scale`, one float16 scale per patch vector (cache/quant.py); the
# store's `feature_dtype` attribute says which (absent: float16), and the reader hands back float16 either way.
# HCL's stores and head-code stores stay float16.
FEATURE_DTYPES = ("float16", "int8")
QUANTIZED = ("feat", "feat_aug")


def scale_array(name: str) -> str:
    """The array holding the per-patch scales of the int8 array `name`."""
    return f"{name}_scale"


@dataclass(frozen=True)
class Layout:
    """Per-sample shapes of a store's arrays."""

    n_samples: int
    resolution: int  # image side in pixels
    patch_size: int
    embed_dim: int
    num_heads: int
    n_views: int  # photometric views (0 for evaluation splits)
    with_lhp: bool
    labelled: bool
    dtype: str = "float16"  # of `feat` and `feat_aug`: "float16" or "int8" (+ a float16 scale per patch)

    @property
    def grid(self) -> int:
        return self.resolution // self.patch_size

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (per-sample shape, dtype); see docs/cache.md."""
        g, c = self.grid, self.embed_dim
        arrays = {
            "feat": ((g, g, c), "float16"),
            "cls_attn": ((self.num_heads, g, g), "float16"),
            "image": ((self.resolution, self.resolution, 3), "uint8"),
            "crop_order": ((), "int32"),  # sample -> its crop's index in prepared/<split>/samples.txt
            "source_image": ((), "int32"),  # sample -> index of the image it was cropped from
        }
        if self.n_views:
            arrays["feat_aug"] = ((self.n_views, g, g, c), "float16")
        if self.with_lhp:
            arrays["lhp"] = ((g, g, 9), "float16")
        if self.labelled:
            arrays["label"] = ((self.resolution, self.resolution), "uint8")
        if self.dtype == "int8":
            for name in QUANTIZED:
                if name in arrays:
                    shape = arrays[name][0]
                    arrays[name] = (shape, "int8")
                    arrays[scale_array(name)] = (shape[:-1], "float16")
        elif self.dtype != "float16":
            raise ValueError(f"feature dtype {self.dtype!r}: expected one of {', '.join(FEATURE_DTYPES)}")
        return arrays

    def raw_fp16_bytes_per_sample(self) -> int:
        """Bytes of one sample's backbone outputs held as plain fp16 (the benchmark's yardstick, whatever the
        store's own dtype)."""
        return fp16_bytes(replace(self, dtype="float16").arrays())


def fp16_bytes(arrays: dict[str, tuple[tuple[int, ...], str]]) -> int:
    """Uncompressed bytes per sample of the float16 arrays among `arrays` (name -> (shape, dtype))."""
    return sum(2 * math.prod(shape) for shape, dtype in arrays.values() if dtype == "float16")


def patch_grid(resolution: int, patch: int) -> int:
    """Grid side of a branch: the image is resized to the nearest multiple of the patch (docs/hcl.md §1)."""
    return max(1, round(resolution / patch))


@dataclass(frozen=True)
class HCLLayout:
    """An HCL store (docs/hcl.md §1, §4, §5): every branch at its native grid, the CLS token, and the pixels.

    Training (`train`): sample s = (image slot j, crop r) with s = j·R + r, the plain crop at `resolution` with its
    foreground mask, `n_views` photometric variants through every branch, and where the crop lies in its source
    image. Evaluation: one sample per image, the whole image at `resolution`, no mask, no variants.
    """

    n_samples: int
    resolution: int
    patch_sizes: tuple[int, ...]  # finest first
    embed_dim: int
    n_views: int  # photometric variants per crop (0 for evaluation stores)
    labelled: bool
    train: bool

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        c, finest = self.embed_dim, self.patch_sizes[0]
        grids = {p: patch_grid(self.resolution, p) for p in self.patch_sizes}
        arrays = {"feat": ((grids[finest], grids[finest], c), "float16")}  # the finest branch of the plain crop
        arrays.update({f"hcl_p{p}": ((grids[p], grids[p], c), "float16") for p in self.patch_sizes[1:]})
        arrays["hcl_cls"] = ((c,), "float16")
        if self.train:
            arrays["fg_mask"] = ((grids[finest], grids[finest]), "bool")
        for p in self.patch_sizes if self.n_views else ():
            arrays[f"hcl_aug_p{p}"] = ((self.n_views, grids[p], grids[p], c), "float16")
        if self.n_views:
            arrays["hcl_aug_cls"] = ((self.n_views, c), "float16")
        arrays["image"] = ((self.resolution, self.resolution, 3), "uint8")
        if self.labelled:
            arrays["label"] = ((self.resolution, self.resolution), "uint8")
        arrays["source_image"] = ((), "int32")  # sample -> index of its image in the dataset's split
        if self.train:
            arrays["crop_box"] = ((3,), "int32")  # [top, left, side] of the square crop, in source pixels
        return arrays

    def native_fp16_bytes_per_sample(self) -> int:
        """Every branch at its native grid (plain crop and variants), as stored."""
        return fp16_bytes(self.arrays())

    def concatenated_fp16_bytes_per_sample(self) -> int:
        """The same crops (plain + variants) cached as the head's concatenated (levels + 1)·C input instead."""
        g = patch_grid(self.resolution, self.patch_sizes[0])
        return 2 * (1 + self.n_views) * g * g * (len(self.patch_sizes) + 1) * self.embed_dim


@dataclass(frozen=True)
class CodesLayout:
    """A store of head codes: the same reader and writer as a feature store, `feat` holding S(f)."""

    n_samples: int
    grid: int
    dim: int
    label_size: int = 0  # > 0: the source's labels are copied beside the codes

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        arrays = {"feat": ((self.grid, self.grid, self.dim), "float16")}
        if self.label_size:
            arrays["label"] = ((self.label_size, self.label_size), "uint8")
        return arrays
