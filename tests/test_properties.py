"""Property-based tests (hypothesis): laws the library states, each checked against a naive computation written here.

- Hungarian matching (pipeline/evaluation/metrics.py `hungarian_match`, `remap_confusion`): for any confusion matrix
  with up to 6 classes and up to 7 clusters (empty classes and clusters, more or fewer clusters than classes), the
  matched total equals the best one-to-one assignment found by brute force over every permutation; the mapping is
  one-to-one and `remap_confusion` keeps every pixel. A greedy matcher fails this (see
  `test_brute_force_oracle_tells_greedy_from_optimal`).
- mIoU / Acc (`confusion_matrix`, `scores`, as `pipeline/evaluation/scoring.py evaluate_kind` chains them, summed over
  images): equal to a per-pixel recount. Labels outside 0..n_classes-1 (255, n_classes.., -1) are ignored; pixels of
  a cluster matched to no class are wrong; IoU_c = |pred = c and label = c| / |pred = c or label = c| over kept
  pixels, None where that union is empty; mIoU the mean of the defined IoUs (0.0 when none is); Acc = correct / kept
  (0.0 when nothing is kept) (docs/hp.md §8, docs/evaluation.md).
- LHP weights (pipeline/extraction/lhp.py `lhp_weights`, docs/hp.md §1): equal to a float64 loop over anchors and the
  3x3 window (slots outside the grid 0), grids 1..6 x 1..6, logits with many ties; an entry whose naive value is
  within float rounding of its row mean may be either 0 or kept. Exact ties at the mean (a row constant after the
  clip) are checked on their own (`test_lhp_constant_row_keeps_its_window`).
- int8 codec (cache/quant.py): for finite float32 vectors (zeros, constant vectors, tiny and large values) the scale
  is the smallest float16 s with 127·s >= max|x| (nothing clips), |x - q·s| <= s/2 = `error_bound` exactly, the
  cosine bound of the docstring holds, and a vector beyond float16's range is refused with ValueError.
- Config (pipeline/config.py): for every preset and typed overrides drawn from valid values,
  `tomllib.loads(to_toml(c)) == c` and `fingerprint` of the reloaded config equals the original's.
- Digests (cache/integrity.py): `digest` (crc32c of a chunk's values) changes when any single byte of the values
  changes and `check_values` refuses them; equal bytes (a strided view, a copy) give equal digests; a single changed
  byte of a stored chunk object (the writer's codec chain, crc32c codec last) fails `read_chunk`'s checksum.

Every test is derandomized (same examples on every run) and small: the file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import tomllib

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cache.integrity import PRESENT, ChunkError, check_values, chunk_key, digest, read_chunk
from cache.quant import QMAX, dequantize, error_bound, quantize
from cache.writer import _create_array
from pipeline.config import fingerprint, load_config, preset_names, to_toml
from pipeline.evaluation.metrics import confusion_matrix, hungarian_match, remap_confusion, scores
from pipeline.extraction.lhp import WINDOW_OFFSETS, lhp_weights
from pipeline.methods.registry import names as method_names

# under `make mutation` (tests/mutation.py sets it) a failing example is reported as found, not shrunk: shrinking
# would only make the reported example smaller, and it cost a killed mutant minutes
SHRINK = () if os.environ.get("HP_PIPE_MUTATION") else (Phase.shrink,)


def props(max_examples: int):
    """Reproducible settings: the same examples on every run, no example database written, no deadline."""
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    phases=(Phase.explicit, Phase.reuse, Phase.generate, *SHRINK),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- (a) Hungarian matching


@st.composite
def confusions(draw, max_classes: int = 6, max_clusters: int = 7) -> np.ndarray:
    """(classes, clusters) counts: small values (many ties) or large ones, some classes and clusters empty."""
    k = draw(st.integers(1, max_classes))
    p = draw(st.integers(1, max_clusters))
    top = draw(st.sampled_from([1, 3, 20, 10**6]))
    conf = draw(hnp.arrays(np.int64, (k, p), elements=st.integers(0, top)))
    empty_rows = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    empty_cols = draw(st.lists(st.booleans(), min_size=p, max_size=p))
    conf[np.array(empty_rows)] = 0
    conf[:, np.array(empty_cols)] = 0
    return conf


def brute_force_best(conf: np.ndarray) -> int:
    """The largest total of a one-to-one class <-> cluster assignment, trying every one of them."""
    k, p = conf.shape
    if p >= k:  # class i -> cluster chosen[i]
        return max(sum(int(conf[i, c]) for i, c in enumerate(chosen)) for chosen in itertools.permutations(range(p), k))
    return max(sum(int(conf[c, j]) for j, c in enumerate(chosen)) for chosen in itertools.permutations(range(k), p))


def matched_total(conf: np.ndarray, mapping: np.ndarray) -> int:
    """Pixels on the matched diagonal: cluster j counts conf[mapping[j], j]; unmatched clusters (-1) count nothing."""
    return sum(int(conf[cls, j]) for j, cls in enumerate(mapping) if cls >= 0)


def greedy_match(conf: np.ndarray) -> np.ndarray:
    """A wrong matcher, kept only to show the oracle tells it apart: take the largest cell, drop its row and column."""
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    rows, cols = set(range(conf.shape[0])), set(range(conf.shape[1]))
    while rows and cols:
        i, j = max(((i, j) for i in rows for j in cols), key=lambda ij: conf[ij])
        mapping[j] = i
        rows.discard(i)
        cols.discard(j)
    return mapping


@props(250)
@given(conf=confusions())
def test_hungarian_total_is_the_brute_force_optimum(conf):
    k, p = conf.shape
    mapping = hungarian_match(conf)
    assert mapping.shape == (p,)
    matched = [int(c) for c in mapping if c >= 0]
    assert all(0 <= c < k for c in matched) and len(set(matched)) == len(matched) == min(k, p)  # one-to-one
    assert matched_total(conf, mapping) == brute_force_best(conf)
    remapped = remap_confusion(conf, mapping)  # (classes, classes + 1): the last column holds unmatched clusters
    assert remapped.shape == (k, k + 1)
    assert int(np.trace(remapped[:, :k])) == brute_force_best(conf)
    assert (remapped.sum(1) == conf.sum(1)).all()  # every pixel of every class kept


def test_brute_force_oracle_tells_greedy_from_optimal():
    conf = np.array([[5, 4], [4, 0]])  # greedy takes the 5, then has only the 0 left: 5; optimal is 4 + 4 = 8
    assert brute_force_best(conf) == 8
    assert matched_total(conf, greedy_match(conf)) == 5
    assert matched_total(conf, hungarian_match(conf)) == 8


# ----------------------------------------------------------------------------- (b) mIoU / Acc


@st.composite
def predictions(draw):
    """n_classes, clusters, and 1-3 (pred, label) maps; labels hold ignored ids (255, >= n_classes, -1)."""
    n = draw(st.integers(1, 5))
    cluster = draw(st.booleans())  # cluster probe: more clusters, Hungarian mapping; linear: identity mapping
    k = n + draw(st.integers(0, 3)) if cluster else n
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    label_ids = st.sampled_from([*range(n), 255, n, n + 2, -1])
    maps = []
    for _ in range(draw(st.integers(1, 3))):
        pred = draw(hnp.arrays(np.int64, (h, w), elements=st.integers(0, k - 1)))
        label = draw(hnp.arrays(np.int64, (h, w), elements=label_ids))
        maps.append((pred, label))
    return n, k, cluster, maps


def naive_scores(pred: np.ndarray, label: np.ndarray, n: int) -> tuple[float, float, list[float | None]]:
    """Per pixel: ignored labels dropped, then IoU per class, mIoU over defined IoUs, pixel accuracy."""
    kept = [(int(p), int(t)) for p, t in zip(pred.ravel(), label.ravel(), strict=True) if 0 <= t < n]
    iou: list[float | None] = []
    for c in range(n):
        inter = sum(1 for p, t in kept if p == c and t == c)
        union = sum(1 for p, t in kept if p == c or t == c)
        iou.append(inter / union if union else None)
    defined = [v for v in iou if v is not None]
    miou = sum(defined) / len(defined) if defined else 0.0
    acc = sum(1 for p, t in kept if p == t) / len(kept) if kept else 0.0
    return miou, acc, iou


@props(150)
@given(case=predictions())
def test_scores_equal_a_per_pixel_recount(case):
    n, k, cluster, maps = case
    conf = sum(confusion_matrix(pred, label, k, n) for pred, label in maps)  # summed over images, as evaluate does
    all_pred = np.concatenate([p.ravel() for p, _ in maps])
    all_label = np.concatenate([t.ravel() for _, t in maps])
    for c, j in itertools.product(range(n), range(k)):  # the confusion itself, cell by cell
        assert conf[c, j] == int(((all_label == c) & (all_pred == j)).sum())
    mapping = hungarian_match(conf) if cluster else np.arange(k)
    s = scores(remap_confusion(conf, mapping))
    miou, acc, iou = naive_scores(mapping[all_pred], all_label, n)  # unmatched clusters -> -1: never a class
    assert s.iou == iou
    assert s.acc == acc
    assert s.miou == pytest.approx(miou, rel=1e-12, abs=0)


# ----------------------------------------------------------------------------- (c) LHP window weights


def naive_lhp(attn: np.ndarray, h: int, w: int, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """docs/hp.md §1 in float64, one anchor at a time: (B, h, w, 9) weights; the same before the mean threshold; and
    where a weight is within float rounding of its row mean (the library, in float32, may keep or drop it)."""
    b, n, _ = attn.shape
    out = np.zeros((b, h, w, 9))
    before = np.zeros((b, h, w, 9))
    unsure = np.zeros((b, h, w, 9), dtype=bool)

    def quantile(ordered: list[float], q: float) -> float:  # linear interpolation between order statistics
        rank = q * (n - 1)
        lo, hi = math.floor(rank), math.ceil(rank)
        return ordered[lo] + (rank - lo) * (ordered[hi] - ordered[lo])

    for bi in range(b):
        for y in range(h):
            for x in range(w):
                row = [float(v) for v in attn[bi, y * w + x]]
                ordered = sorted(row)
                lo, hi = quantile(ordered, 0.1), quantile(ordered, 0.9)
                clipped = [min(max(v, lo), hi) for v in row]
                top = max(clipped)
                e = [math.exp(v - top) for v in clipped]
                weights = [sigma * v / sum(e) for v in e]
                mean = sum(weights) / n
                for slot, (dy, dx) in enumerate(WINDOW_OFFSETS):
                    ny, nx = y + dy, x + dx
                    if not (0 <= ny < h and 0 <= nx < w):
                        continue  # outside the grid: stays 0
                    v = weights[ny * w + nx]
                    before[bi, y, x, slot] = v
                    out[bi, y, x, slot] = 0.0 if v < mean else v
                    unsure[bi, y, x, slot] = abs(v - mean) <= 1e-5 * mean
    return out, before, unsure


@st.composite
def attention(draw):
    h, w, b = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 2))
    n = h * w
    elements = draw(st.sampled_from([
        st.integers(-2, 2).map(float),  # many ties, rows often constant after the clip
        st.floats(-30, 30, width=32),
    ]))
    attn = draw(hnp.arrays(np.float32, (b, n, n), elements=elements))
    sigma = draw(st.sampled_from([28.0, 1.0, 0.37]))
    return h, w, attn, sigma


@props(120)
@given(case=attention())
def test_lhp_weights_equal_a_naive_loop(case):
    h, w, attn, sigma = case
    got = lhp_weights(torch.from_numpy(attn), h, w, sigma=sigma).numpy().astype(np.float64)
    want, before, unsure = naive_lhp(attn, h, w, sigma)
    assert got.shape == want.shape
    assert np.allclose(got[~unsure], want[~unsure], rtol=1e-5, atol=1e-7)
    # at the mean, up to rounding: dropped or kept, nothing else
    at_mean = got[unsure]
    assert ((at_mean == 0) | np.isclose(at_mean, before[unsure], rtol=1e-5, atol=1e-7)).all()


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known and kept: a constant row (every entry equal to the row mean) loses its weights for "
                   "some grid sizes (n = 6, 12, 25, ...: in float32 the mean rounds above the entries). hp-pipe "
                   "computes the reference's float32 rule as it does (softmax · 28, then `< mean`, specs §1); real "
                   "attention rows are never constant. Strict: a change of that arithmetic shows here")
def test_lhp_constant_row_keeps_its_window():
    """A row constant after the clip (here: all logits equal) has every entry equal to its mean, sigma/n: nothing
    is smaller than the mean, so every in-grid slot holds sigma/n (docs/hp.md §1 step 4)."""
    wrong = []
    for h, w in itertools.product(range(1, 7), repeat=2):
        n = h * w
        got = lhp_weights(torch.zeros(1, n, n), h, w)[0]
        for y, x in itertools.product(range(h), range(w)):
            for slot, (dy, dx) in enumerate(WINDOW_OFFSETS):
                if 0 <= y + dy < h and 0 <= x + dx < w and not math.isclose(float(got[y, x, slot]), 28 / n,
                                                                               rel_tol=1e-5):
                    wrong.append((h, w))
    assert not wrong, f"grids whose constant rows lose their weights: {sorted(set(wrong))}"


# ----------------------------------------------------------------------------- (d) int8 round trip

F16_MAX = float(np.finfo(np.float16).max)  # 65504: the largest scale, so vectors up to 127 * 65504 are stored


@st.composite
def vectors(draw):
    """(rows, D) float32: random rows at scales from float16-subnormal to beyond float16's range, constant rows,
    zero rows, a lone spike."""
    r, d = draw(st.integers(1, 4)), draw(st.integers(1, 24))
    x = draw(hnp.arrays(np.float32, (r, d), elements=st.floats(-1, 1, width=32)))
    for i in range(r):
        kind = draw(st.sampled_from(["random", "constant", "zero", "spike"]))
        if kind == "constant":
            x[i] = draw(st.floats(-1, 1, width=32))
        elif kind == "zero":
            x[i] = 0
        elif kind == "spike":
            x[i] = 0
            x[i, draw(st.integers(0, d - 1))] = draw(st.floats(-1, 1, width=32))
        x[i] *= np.float32(2.0 ** draw(st.integers(-40, 24)))  # power of two: exact unless it underflows
    return x


def previous_float16(s: float) -> float:
    return float(np.nextafter(np.float16(s), np.float16(0)))


@props(300)
@given(x=vectors())
def test_int8_round_trip_within_half_a_step(x):
    peak = np.abs(x.astype(np.float64)).max(axis=-1)
    if (peak > QMAX * F16_MAX).any():  # the scale would not fit a float16: refused, never stored wrong
        with pytest.raises(ValueError), np.errstate(over="ignore"):
            quantize(x)
        return
    q, scale = quantize(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == x.shape[:-1]
    assert np.abs(q.astype(np.int64)).max() <= QMAX
    s = scale.astype(np.float64)
    x_hat = q.astype(np.float64) * s[:, None]  # exact: 7 bits times 11 bits
    assert np.array_equal(dequantize(q, scale).numpy().astype(np.float64), x_hat)
    assert np.array_equal(error_bound(scale).astype(np.float64), s / 2)
    for i in range(x.shape[0]):
        # the scale: max|x|/127 rounded up to a float16, i.e. the smallest float16 s with 127·s >= max|x|
        if peak[i] == 0:
            assert s[i] == 0 and (x_hat[i] == 0).all()
            continue
        assert QMAX * s[i] >= peak[i] and QMAX * previous_float16(s[i]) < peak[i]
        if s[i] >= 2.0**-14:  # a normal float16 scale: the docstring's bound relative to the vector's peak
            assert s[i] <= (1 + 2.0**-10) * peak[i] / QMAX
        # every element within half a step (error_bound), exactly
        err = np.abs(x[i].astype(np.float64) - x_hat[i])
        assert (err <= s[i] / 2).all(), (x[i], q[i], s[i])
        # cos(x, x̂) >= sqrt(1 - D·s²/(4·||x||²)) where that is defined
        norm2 = float((x[i].astype(np.float64) ** 2).sum())
        slack = 1 - x.shape[1] * s[i] ** 2 / (4 * norm2)
        if slack > 0 and (x_hat[i] != 0).any():
            cos = float(x[i].astype(np.float64) @ x_hat[i]) / math.sqrt(norm2 * float(x_hat[i] @ x_hat[i]))
            assert cos >= math.sqrt(slack) - 1e-12


def test_int8_bound_for_vectors_with_a_subnormal_scale():
    """Below max|x| = 127·2^-14 the scale is a float16 subnormal: the peak-relative bound is not promised there
    (cache/quant.py), the half-step one is, and the error stays within 2^-25 absolute."""
    x = np.array([[1e-6, 0.37e-6, -0.81e-6]], dtype=np.float32)
    q, scale = quantize(x)
    err = np.abs(dequantize(q, scale).numpy().astype(np.float64) - x).max()
    peak = float(np.abs(x.astype(np.float64)).max())
    assert err <= float(scale[0]) / 2 <= 2.0**-25
    assert float(scale[0]) / 2 > (1 + 2.0**-10) * peak / 254  # why the peak-relative bound is not promised here


# ----------------------------------------------------------------------------- (e) config round trip

# What a string may hold in the round trip below: any UTF-8 character (DEL included: to_toml escapes it)
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
POSITIVE_FLOAT = st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False)
PAPER_ROW = st.fixed_dictionaries(
    {"backbone": TEXT, "features": st.sampled_from(["head", "raw"]), "probe": st.sampled_from(["cluster", "linear"]),
     "acc": st.floats(0, 100)},
    optional={"miou": st.floats(0, 100), "head_dim": st.integers(1, 4096)},
)

# valid values per key, as the settings' types and rules take them (pipeline/settings.py, the methods' settings)
OVERRIDES = {
    "train.method": st.sampled_from(method_names()),
    "dataset.root": TEXT,
    "evaluate.crf_address": TEXT,
    "paper.source": TEXT,
    "paper.results": st.lists(PAPER_ROW, max_size=2),
    "features.compressor": st.sampled_from(["zstd", "lz4", "blosclz", "none"]),
    "features.dtype": st.sampled_from(["float16", "int8"]),
    "features.device": st.sampled_from(["auto", "cpu", "cuda", "cuda:3"]),
    "features.amp": st.sampled_from([True, False, "auto", "true", "false"]),
    "features.lhp_sigma": POSITIVE_FLOAT,
    "features.seed": st.integers(0, 2**63 - 1),
    "evaluate.protocol": st.sampled_from(["paper", "kmeans"]),
    "evaluate.probes": st.sampled_from(["cluster", "linear", "cluster,linear", " linear , cluster"]),
    "evaluate.crf": st.sampled_from([True, False, "auto", "True", "False", "off"]),
    "evaluate.linear_sgd_momentum": st.floats(0, 1, exclude_max=True),
    "evaluate.extra_clusters": st.integers(0, 100),
    "evaluate.baselines": st.booleans(),
    "hp.tau": POSITIVE_FLOAT,
    "hp.rho": st.floats(0, 1),
    "hp.pool_backend": st.sampled_from(["faiss", "torch"]),
    "run.tensorboard": st.booleans(),
}


def command_line_form(value):
    """How --set writes a value (a string the schema coerces), for values that have one."""
    if isinstance(value, bool):
        return st.sampled_from(["true", "yes", "on", "1"] if value else ["false", "no", "off", "0"])
    if isinstance(value, int | float):
        return st.just(repr(value))
    return st.just(value)


@st.composite
def presets_and_overrides(draw):
    preset = draw(st.sampled_from(preset_names()))
    keys = draw(st.lists(st.sampled_from(sorted(OVERRIDES)), unique=True, max_size=4))
    overrides = {}
    for key in keys:
        value = draw(OVERRIDES[key])
        if not isinstance(value, list) and draw(st.booleans()):
            value = draw(command_line_form(value))
        overrides[key] = value
    return preset, overrides


@props(60)
@given(case=presets_and_overrides())
def test_config_round_trips_through_toml(case):
    preset, overrides = case
    config = load_config(preset, overrides)
    text = to_toml(config)
    again = tomllib.loads(text)
    assert again == config
    assert list(again) == list(config)  # sections in the same order
    assert fingerprint(again) == fingerprint(config)
    for section in config:  # what a stage fingerprints: its sections
        assert fingerprint(again[section]) == fingerprint(config[section])
    assert to_toml(again) == text


def test_config_string_with_del_round_trips():
    """DEL (U+007F), which json.dumps leaves as it is and TOML forbids, is escaped by to_toml."""
    config = load_config("synthetic", {"dataset.root": "data\x7fset"})
    assert tomllib.loads(to_toml(config)) == config


# ----------------------------------------------------------------------------- (f) digests

CHUNK_DTYPES = st.sampled_from([np.uint8, np.int8, np.float16, np.float32, np.uint64, np.bool_])


@st.composite
def chunk_values(draw):
    dtype = draw(CHUNK_DTYPES)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6))
    raw = draw(st.binary(min_size=int(np.prod(shape)) * np.dtype(dtype).itemsize,
                         max_size=int(np.prod(shape)) * np.dtype(dtype).itemsize))
    values = np.frombuffer(raw, dtype=np.uint8).copy()
    if dtype is np.bool_:
        values &= 1  # valid booleans only
    return values.view(dtype).reshape(shape)


@props(200)
@given(values=chunk_values(), data=st.data())
def test_digest_changes_with_any_byte(values, data):
    recorded = PRESENT | digest(values)
    check_values(values, recorded)  # the values it was taken from pass
    assert digest(values.copy()) == digest(values)  # equal bytes, equal digests
    if values.ndim > 1:  # a strided view and its C-order copy: the same values as stored, the same digest
        view = np.asfortranarray(values)
        assert digest(view) == digest(values)
    raw = bytearray(values.tobytes())
    at = data.draw(st.integers(0, len(raw) - 1), label="byte")
    flip = data.draw(st.integers(1, 255) if values.dtype != np.bool_ else st.just(1), label="xor")
    raw[at] ^= flip
    changed = np.frombuffer(bytes(raw), dtype=values.dtype).reshape(values.shape)
    assert digest(changed) != digest(values)
    with pytest.raises(ChunkError):
        check_values(changed, recorded)


@props(40)
@given(values=chunk_values().filter(lambda v: v.dtype != np.bool_), compressor=st.sampled_from(["zstd", "none"]),
       data=st.data())
def test_stored_chunk_with_any_byte_changed_fails_its_checksum(values, compressor, data):
    """The writer's codec chain (blosc, then the crc32c codec): any one byte of the chunk object changed is caught
    on decoding."""
    with tempfile.TemporaryDirectory() as folder:
        group = zarr.open_group(zarr.storage.LocalStore(folder), mode="w")
        spec = ((2 * values.shape[0], *values.shape[1:]), values.shape, values.dtype.str)
        _create_array(group, "x", spec, compressor, 3)
        array = group["x"].with_config({"write_empty_chunks": True})  # as the writer: every chunk object written
        array[: values.shape[0]] = values
        path = os.path.join(folder, chunk_key(array, 0))
        with open(path, "rb") as f:
            stored = bytearray(f.read())
        at = data.draw(st.integers(0, len(stored) - 1), label="byte")
        stored[at] ^= data.draw(st.integers(1, 255), label="xor")
        with open(path, "wb") as f:
            f.write(stored)
        with pytest.raises(ChunkError, match="checksum"):
            read_chunk(array, 0)
