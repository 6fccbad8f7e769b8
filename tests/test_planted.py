"""Planted features (issue 9 §4): the generator does what it says, the broken loss is broken, the bench runs."""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import pipeline.methods.hp.step as hp_model
from benches.planted import (
    PlantedBench,
    PlantedHCLBench,
    PlantedStegoBench,
    loss_replaced,
    random_neighbours,
    run_seed,
    run_seed_hcl,
    run_seed_stego,
    shuffled_positives,
    shuffled_targets,
)
from benches.planted_data import (
    N_CLASSES,
    PlantedSettings,
    generate,
    generate_hcl,
    hcl_patch_sizes,
    label_fractions,
    patch_labels,
    world,
    write_hcl_store,
    write_store,
)
from benches.train import cluster_probe
from cache.reader import FeatureStore
from pipeline.datasets.synthetic import render_scene
from pipeline.extraction.lhp import WINDOW_OFFSETS, lhp_weights
from pipeline.methods.hp.loss import hp_loss
from pipeline.methods.hp.pool import PoolIndex

SMALL = dataclasses.replace(PlantedSettings(), grid=8)  # 64 px scenes: the bench's generator, smaller


def naive_segments(patch_label: np.ndarray) -> np.ndarray:
    """8-connected regions of one label by breadth-first search (independent of scipy.ndimage)."""
    h, w = patch_label.shape
    seg = np.full((h, w), -1)
    next_id = 0
    for y in range(h):
        for x in range(w):
            if seg[y, x] >= 0:
                continue
            seg[y, x] = next_id
            queue = deque([(y, x)])
            while queue:
                cy, cx = queue.popleft()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and seg[ny, nx] < 0 and \
                                patch_label[ny, nx] == patch_label[y, x]:
                            seg[ny, nx] = next_id
                            queue.append((ny, nx))
            next_id += 1
    return seg


def test_patch_label_is_the_majority_pixel_label():
    _, label = render_scene(np.random.default_rng(3), 64)
    got = patch_labels(label_fractions(label, 8))
    for py in range(8):
        for px in range(8):
            block = label[py * 8:(py + 1) * 8, px * 8:(px + 1) * 8].ravel()
            assert got[py, px] == np.bincount(block, minlength=N_CLASSES).argmax()


def test_feature_is_prototype_mix_plus_one_style_per_image():
    """Without noise, feat - Σ_c frac_c μ_c is the same vector at every patch of an image, inside the style subspace."""
    s = dataclasses.replace(SMALL, noise=0.0)
    p = generate(s, 0, "train", range(3))
    protos, basis = world(s, 0)
    for i in range(3):
        mix = label_fractions(p.label[i], s.grid) @ protos
        offset = p.feat[i] - mix
        np.testing.assert_allclose(offset, np.broadcast_to(p.style[i], offset.shape), atol=1e-5)
        np.testing.assert_allclose(basis @ (basis.T @ p.style[i]), p.style[i], atol=1e-5)  # in span(U)
    assert np.linalg.norm(p.style[0] - p.style[1]) > 0.1  # images differ in style


def test_without_the_style_patches_sit_at_their_class_prototype():
    """With the bench's noise, pure patches minus their image's style are nearest to their own class prototype,
    and the style is what makes one image's patches cluster together."""
    p = generate(SMALL, 1, "train", range(12))
    protos, _ = world(SMALL, 1)
    fractions = np.stack([label_fractions(lab, SMALL.grid) for lab in p.label])
    pure = fractions.max(-1) == 1.0
    destyled = (p.feat - p.style[:, None, None, :])[pure]
    nearest = np.linalg.norm(destyled[:, None, :] - protos[None], axis=-1).argmin(1)
    assert (nearest == p.patch_label[pure]).mean() > 0.9
    f = p.feat.reshape(12, -1, SMALL.dim)
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    labels = p.patch_label.reshape(12, -1)
    same_image_other_class, other_image_same_class = [], []
    for i in range(12):
        for j in range(12):
            sim = f[i] @ f[j].T
            same = labels[i][:, None] == labels[j][None, :]
            if i == j:
                same_image_other_class.append(sim[~same])
            else:
                other_image_same_class.append(sim[same])
    assert np.concatenate(same_image_other_class).mean() > np.concatenate(other_image_same_class).mean()


def test_views_move_the_style_only_a_little():
    p = generate(SMALL, 0, "train", range(2), n_views=3)
    _, basis = world(SMALL, 0)
    assert p.feat_aug.shape == (2, 3, SMALL.grid, SMALL.grid, SMALL.dim)
    shift = (p.feat_aug - p.feat[:, None]).mean(axis=(2, 3))  # (B, K, C): the view's style jitter + mean fresh noise
    outside = shift - shift @ basis @ basis.T
    assert np.abs(outside).max() < 0.02  # fresh noise averages out over the patches
    assert 0 < np.linalg.norm(shift, axis=-1).max() < SMALL.style


def test_planted_logits_favour_one_segment_and_lhp_is_the_projects():
    p = generate(SMALL, 2, "train", range(4), with_lhp=True)
    n = SMALL.grid ** 2
    noise = []
    for i in range(4):
        seg = naive_segments(p.patch_label[i]).reshape(-1)
        same = seg[:, None] == seg[None, :]
        noise.append(p.attn_logits[i] - SMALL.attn_same * same)
        # LHP of the planted logits puts more weight on same-segment neighbours than on others
        lhp = p.lhp[i].reshape(n, 9)
        weights_same, weights_other = [], []
        for k, (dy, dx) in enumerate(WINDOW_OFFSETS):
            for a in range(n):
                y, x = divmod(a, SMALL.grid)
                if (dy, dx) != (0, 0) and 0 <= y + dy < SMALL.grid and 0 <= x + dx < SMALL.grid:
                    b = (y + dy) * SMALL.grid + x + dx
                    (weights_same if seg[a] == seg[b] else weights_other).append(lhp[a, k])
        if weights_other:
            assert np.mean(weights_same) > 2 * np.mean(weights_other)
    noise = np.concatenate([x.ravel() for x in noise])
    assert abs(noise.mean()) < 0.03 and abs(noise.std() - 1) < 0.03  # the rest is unit Gaussian noise
    expected = lhp_weights(torch.from_numpy(p.attn_logits), SMALL.grid, SMALL.grid, SMALL.lhp_sigma).numpy()
    np.testing.assert_array_equal(p.lhp, expected)


def test_store_is_a_valid_train_and_val_store(tmp_path):
    url = write_store(str(tmp_path / "train.zarr"), SMALL, 0, "train", 10, n_views=2, chunk_size=4)
    store = FeatureStore.open(url, expect={"split": "train", "dataset": "planted"})
    g, c = SMALL.grid, SMALL.dim
    assert store.array("feat").shape == (10, g, g, c) and store.array("feat_aug").shape == (10, 2, g, g, c)
    assert store.array("lhp").shape == (10, g, g, 9) and store.array("label").shape == (10, 64, 64)
    # image 6 regenerated alone (another chunking) gives the stored arrays: LHP from its own planted logits
    alone = generate(SMALL, 0, "train", [6], n_views=2, with_lhp=True)
    np.testing.assert_array_equal(store.read("feat", 6, 7), alone.feat.astype(np.float16))
    np.testing.assert_array_equal(store.read("label", 6, 7), alone.label)
    lhp = lhp_weights(torch.from_numpy(alone.attn_logits), g, g, SMALL.lhp_sigma).numpy().astype(np.float16)
    np.testing.assert_array_equal(store.read("lhp", 6, 7), lhp)
    val = FeatureStore.open(write_store(str(tmp_path / "val.zarr"), SMALL, 0, "val", 5, chunk_size=4))
    assert "lhp" not in val.names() and "feat_aug" not in val.names()
    assert not np.array_equal(val.read("label", 0, 1), store.read("label", 0, 1))  # val draws other scenes


def test_removing_the_planted_style_is_the_known_answer():
    """The probe scores the generator's answer (style removed) far above raw features: the bench has headroom."""
    tr, va = generate(SMALL, 0, "train", range(40)), generate(SMALL, 0, "val", range(16))
    probe = lambda f_tr, f_va: cluster_probe(  # noqa: E731
        f_tr.reshape(-1, SMALL.dim), [torch.from_numpy(f).permute(2, 0, 1) for f in f_va], va.label, N_CLASSES)
    raw = probe(tr.feat, va.feat)["miou"]
    answer = probe(tr.feat - tr.style[:, None, None], va.feat - va.style[:, None, None])["miou"]
    assert answer > raw + 10


def test_broken_loss_permutes_the_positives_across_anchors():
    """The broken loss is hp_loss on (f, s_m, r, r^m) permuted by one permutation of the batch's patches."""
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    f, s_m, z, z_mix = unit(2, 6, 5), unit(2, 6, 4), unit(2, 6, 4), unit(2, 6, 4)
    r, r_m = torch.rand(2, 6, generator=g) * 0.5, torch.rand(2, 6, generator=g) * 0.5
    u = torch.rand(6, 12, generator=g)
    broken, calls = shuffled_positives(seed=3)
    got = broken(f, s_m, z, z_mix, r, r_m, lam=0.5, tau=0.6, rho=0.3, u=u).loss
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(10_003))  # the loss's own draw
    assert not torch.equal(perm, torch.arange(12)) and calls == [1]
    shuffle = lambda x: x.reshape(12, *x.shape[2:])[perm].reshape(x.shape)  # noqa: E731
    want = hp_loss(shuffle(f), shuffle(s_m), z, z_mix, shuffle(r), shuffle(r_m), lam=0.5, tau=0.6, rho=0.3, u=u).loss
    assert torch.equal(got, want)
    assert not torch.equal(got, hp_loss(f, s_m, z, z_mix, r, r_m, lam=0.5, tau=0.6, rho=0.3, u=u).loss)


def test_loss_replaced_reaches_the_training_step_and_is_undone():
    original = hp_model.hp_loss
    broken, calls = shuffled_positives(seed=0)
    heads = hp_model.HPHeads(5, 4)
    pools = hp_model.Pools(PoolIndex(torch.nn.functional.normalize(torch.randn(3, 5), dim=1), "torch"),
                           PoolIndex(torch.nn.functional.normalize(torch.randn(3, 4), dim=1), "torch"))
    f = torch.randn(2, 5, 3, 3)
    with loss_replaced(broken):
        hp_model.training_step(heads, f, f, torch.ones(2, 3, 3, 9), pools, 0.0, hp_model.StepSettings(0.6, 0.5, 0.0))
    assert calls == [1] and hp_model.hp_loss is original


TINY = PlantedBench(n_train=48, n_val=8, chunk_size=8, precision_images=8, planted=SMALL,
                    train={"head_dim": 32, "batch_size": 8, "epochs": 4, "pool_size": 48, "warmup": 2,
                           "renew_interval": 3, "checkpoint_interval": 1000, "log_interval": 1000,
                           "pool_backend": "torch"})


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread while inside: the tracked figures were recorded so, and the machine has 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The bench on a tiny planted store (48 training scenes at 64 px, 24 iterations), without the broken run."""
    with one_thread():
        yield run_seed(TINY, 1, tmp_path_factory.mktemp("planted"), broken=False)


# The tiny bench's figures, tracked: seed 1 as recorded on this project's 2-core machine (one torch thread), and a
# band of half the range over seeds 1-5 (raw 23.0-47.1, head 16.7-29.2, head - raw -6.3 to -17.9 mIoU), so that a
# change that moves a figure by more than the seeds do fails here. HP's head scoring below raw features on planted
# stores is the method on this generator: the reference implementation, trained on the same stores, degrades the
# same way (README, "Quality with a known answer").
TRACKED = {"raw": (34.05, 12.1), "head": (20.5, 6.3), "head - raw": (-13.55, 5.8)}


def test_tiny_planted_bench_figures_stay_in_their_band(tiny_run):
    figures = {"raw": tiny_run["raw"]["miou"], "head": tiny_run["head"]["miou"]}
    figures["head - raw"] = figures["head"] - figures["raw"]
    for name, (recorded, band) in TRACKED.items():
        assert abs(figures[name] - recorded) <= band, (name, figures[name], recorded, band)


def test_tiny_planted_bench_explains_its_figure(tiny_run):
    """The bench's own diagnosis: most of G's positives come from the anchor's image, and those are less precise
    than the cross-image ones (the planted style makes other-class patches of one image look alike)."""
    p = tiny_run["precision"]
    assert p["ghp_own_image_share"] > 50
    assert p["ghp_own_image_precision"] < p["ghp_cross_image_precision"]
    assert 0 < tiny_run["raw"]["miou"] < 100 and tiny_run["iterations"] == (48 // 8) * 4


# ---------------------------------------------------------------- HCL's planted stores
def naive_mix(label: np.ndarray, grid: int, protos: np.ndarray) -> np.ndarray:
    """Σ_c (share of class c's pixels in the cell) μ_c, cell by cell with explicit pixel counts."""
    cell = label.shape[0] // grid
    out = np.zeros((grid, grid, protos.shape[1]))
    for y in range(grid):
        for x in range(grid):
            block = label[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell].ravel()
            for c in range(N_CLASSES):
                out[y, x] += (block == c).sum() / block.size * protos[c]
    return out


def test_hcl_branches_are_the_same_generator_at_their_own_grids():
    """Without noise every branch (patch 8/16/28 px: 14/7/4 cells) is the prototype mix of its cells plus the image's
    style, the very offset `generate` gives that image; the CLS token is the whole image's mix plus that style."""
    s = dataclasses.replace(PlantedSettings(), noise=0.0)
    assert hcl_patch_sizes(s) == (8, 16, 28)
    p = generate_hcl(s, 4, "train", [3, 5], crops=2)
    hp_style = generate(s, 4, "train", [3, 5]).style
    protos, _ = world(s, 4)
    for k in range(4):  # sample k = image k // 2, crop k % 2
        style = hp_style[k // 2]
        for patch, grid in ((8, 14), (16, 7), (28, 4)):
            np.testing.assert_allclose(p.levels[patch][k], naive_mix(p.label[k], grid, protos) + style, atol=1e-5)
        np.testing.assert_allclose(p.cls[k], naive_mix(p.label[k], 1, protos)[0, 0] + style, atol=1e-5)
    assert p.source_image.tolist() == [3, 3, 5, 5]


def test_hcl_foreground_is_the_object_classes_and_variants_move_the_style():
    p = generate_hcl(PlantedSettings(), 0, "train", range(3), crops=2, n_views=2)
    things = [N_CLASSES - 4, N_CLASSES - 3, N_CLASSES - 2, N_CLASSES - 1]  # building, tree, car, person
    for k in range(6):
        naive = np.array([[np.bincount(p.label[k][y * 8:(y + 1) * 8, x * 8:(x + 1) * 8].ravel(),
                                       minlength=N_CLASSES).argmax() for x in range(14)] for y in range(14)])
        assert np.array_equal(p.fg_mask[k], np.isin(naive, things))
    assert 0 < p.fg_mask.mean() < 0.5
    _, basis = world(PlantedSettings(), 0)
    shifts = {q: (p.aug[q] - p.levels[q][:, None]).mean(axis=(2, 3)) for q in (8, 16, 28)}  # (S, V, C)
    np.testing.assert_allclose(shifts[8], shifts[28], atol=0.03)  # one jitter for every branch of a variant
    np.testing.assert_allclose(shifts[8], (p.aug_cls - p.cls[:, None]), atol=0.06)
    outside = shifts[8] - shifts[8] @ basis @ basis.T
    assert np.abs(outside).max() < 0.03 and 0 < np.linalg.norm(shifts[8], axis=-1).max() < PlantedSettings().style
    # the crops of one image differ by their noise only
    assert not np.array_equal(p.levels[8][0], p.levels[8][1])


def test_hcl_store_is_read_as_hcl_stores_are(tmp_path):
    """Chunks of 3 samples cut images' crops apart: every sample still equals its image regenerated alone."""
    from pipeline.methods.hcl.store import hcl_arrays
    from pipeline.methods.hcl.views import epoch_keep

    s = PlantedSettings()
    store = FeatureStore.open(write_hcl_store(str(tmp_path / "t.zarr"), s, 1, "train", 5, crops=2, n_views=2,
                                              chunk_size=3))
    assert len(store) == 10 and store.attrs["images"] == 5 and store.attrs["crops"] == 2
    assert {"feat", "hcl_p16", "hcl_p28", "hcl_cls", "fg_mask", "hcl_aug_p8", "hcl_aug_cls"} <= set(hcl_arrays(store))
    assert store.read("source_image", 0, 10).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    alone = generate_hcl(s, 1, "train", [3], crops=2, n_views=2)
    np.testing.assert_array_equal(store.read("feat", 7, 8), alone.levels[8][1:2].astype(np.float16))
    np.testing.assert_array_equal(store.read("hcl_aug_p28", 6, 8), alone.aug[28].astype(np.float16))
    assert epoch_keep(5, 2, 0, 0).sum() == 5
    val = FeatureStore.open(write_hcl_store(str(tmp_path / "v.zarr"), s, 1, "val", 3, chunk_size=2))
    assert len(val) == 3 and "fg_mask" not in val.names() and "hcl_aug_cls" not in val.names()


def test_bench_training_settings_do_not_follow_the_preset(monkeypatch):
    """Every HP setting the bench's figures depend on is the bench's own: a preset with other [hp] values
    (e.g. a synthetic preset shrunk for `make run`) leaves the bench's config unchanged."""
    import benches.planted as bp

    real = bp.load_config
    other = {"head_dim": 8, "epochs": 1, "batch_size": 2, "tau": 0.1, "alpha": 0.9, "rho": 0.5, "pool_size": 4,
             "renew_interval": 1, "ema_m": 0.5, "warmup": 0, "lr": 1.0, "weight_decay": 0.0, "grad_clip": 1.0,
             "dropout": 0.5}
    assert set(other) == set(bp.HP_TRAIN)
    shrunk = lambda name, overrides: real(name, {**{f"hp.{k}": v for k, v in other.items()}, **overrides})  # noqa: E731
    before = bp.train_config(PlantedBench(), 3)
    monkeypatch.setattr(bp, "load_config", shrunk)
    after = bp.train_config(PlantedBench(), 3)
    assert {k: after["hp"][k] for k in bp.HP_TRAIN} == {k: before["hp"][k] for k in bp.HP_TRAIN} == bp.HP_TRAIN
    assert after["hp"]["seed"] == 3 and after["evaluate"]["protocol"] == "kmeans"
    hcl = bp.hcl_config(bp.PlantedHCLBench(), 2)["hcl"]
    assert {k: hcl[k] for k in bp.HCL_TRAIN} == bp.HCL_TRAIN and hcl["seed"] == 2
    stego = bp.stego_config(bp.PlantedStegoBench(), 4)
    assert {k: stego["stego"][k] for k in bp.STEGO_TRAIN} == bp.STEGO_TRAIN and stego["stego"]["seed"] == 4
    assert {k: stego["stego_cache"][k] for k in bp.STEGO_KNN} == bp.STEGO_KNN
    assert stego["evaluate"]["protocol"] == "kmeans"  # no online probe trained with the head


HCL_TINY = PlantedHCLBench(n_train=16, n_val=4, chunk_size=8, planted=SMALL, hcl={
    "batch_size": 8, "epochs": 2, "clusters": 4, "kmeans_min_points": 5, "dim": 16, "hidden": 32, "out_dim": 16,
    "heads": 2, "lr_drop_epoch": 1})


@pytest.fixture(scope="module")
def tiny_hcl_run(tmp_path_factory) -> Iterator[tuple[dict[str, Any], Path]]:
    """HCL's bench on a tiny planted store (16 scenes × 2 crops at 64 px, 4 iterations, stopped after 2), seed 1,
    with its broken run (shuffled targets, 4 more iterations), one torch thread; and its work folder."""
    workdir = tmp_path_factory.mktemp("planted-hcl")
    with one_thread():
        yield run_seed_hcl(HCL_TINY, 1, workdir), workdir


# HCL's tiny bench, tracked like HP's: seed 1 on this project's 2-core machine (one torch thread), a band of half the
# range over seeds 1-5 (raw 21.5-40.9, at the start 9.5-22.0, after 2 iterations 9.1-20.1, after 4 9.1-20.1, broken
# 9.2-21.9 mIoU). Four steps barely move HCL (end - start -1.9 to +0.9, broken - end -0.8 to +4.4): these bands track
# the stores, the probe and the initial model more than what training does.
TRACKED_HCL = {"raw": (21.54, 9.69), "start": (9.45, 6.27), "middle": (9.14, 5.48), "end": (9.13, 5.5),
               "broken": (9.18, 6.37)}


def test_tiny_planted_hcl_bench_figures_stay_in_their_band(tiny_hcl_run):
    r, _ = tiny_hcl_run
    for name, (recorded, band) in TRACKED_HCL.items():
        assert abs(r[name]["miou"] - recorded) <= band, (name, r[name]["miou"], recorded, band)


def test_hcl_broken_loss_feeds_hcl_loss_keys_of_other_tokens_of_their_kind(monkeypatch):
    """The broken loss hands hcl_loss the batch's own keys k, each on another token of its kind (foreground keys on
    foreground tokens, background on background), and everything else unchanged; another draw at each call."""
    import benches.planted as bp

    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    q, k, pred_q = unit(2, 32, 8), unit(2, 32, 8), unit(2, 32, 8)
    fg_mask = torch.rand(2, 32, generator=g) < 0.4
    centroids = {kind: {"raw": unit(3, 8), "unit": unit(3, 8)} for kind in ("fg", "bg")}
    seen: list[tuple[torch.Tensor, ...]] = []
    monkeypatch.setattr(bp, "hcl_loss", lambda *args: seen.append(args) or {"loss": torch.zeros(())})
    broken, record = shuffled_targets(seed=3)
    for _ in range(2):
        broken(q, k, pred_q, fg_mask, centroids["fg"], centroids["bg"], 0.07)
    assert record["calls"] == 2 and record["tokens"] == 2 * 64
    flat, fg = k.reshape(64, 8), fg_mask.reshape(64)
    sources = []
    for args in seen:
        assert args[0] is q and args[2] is pred_q and args[3] is fg_mask and args[6] == 0.07
        assert args[4] is centroids["fg"] and args[5] is centroids["bg"]
        given = args[1].reshape(64, 8)
        source = (given[:, None] == flat[None]).all(-1).float().argmax(1)  # the token whose key each token got
        assert torch.equal(given, flat[source]) and sorted(source.tolist()) == list(range(64))  # a permutation
        assert torch.equal(fg[source], fg)  # within each kind
        assert (source == torch.arange(64)).float().mean() < 0.2  # on another token: its own only by chance
        sources.append(source)
    assert not torch.equal(sources[0], sources[1])


def test_tiny_planted_hcl_broken_run_trained_on_targets_at_chance(tiny_hcl_run):
    """Every step of the broken run went through the broken loss, and the MoGo targets a(i) it trained on agree with
    each token's own target only as often as targets drawn at random with the same shares do (a plain run: 100 %)."""
    r, _ = tiny_hcl_run
    t = r["broken_targets"]
    assert t["calls"] == r["end_iteration"] == 4 and t["tokens"] == 4 * 8 * 64
    assert abs(t["same_target"] - t["chance_target"]) < 5 and t["same_target"] < 50


def test_tiny_planted_hcl_bench_stopping_at_the_middle_changes_nothing(tiny_hcl_run, tmp_path):
    """The HCL bench stops after half the epochs (its middle figure) and resumes: the resumed run ends
    with exactly the weights of a run trained straight through."""
    import benches.planted as bp
    from pipeline.methods.hcl import training as hcl_training
    from pipeline.orchestration.runner import StageContext
    from pipeline.training.checkpoints import load_checkpoint

    r, workdir = tiny_hcl_run
    store = FeatureStore.open(str(workdir / "hcl-seed-1" / "train.zarr"))
    ctx = StageContext(name="straight", fingerprint="straight", fresh=True, manifest={})
    with one_thread():
        straight = hcl_training.train(ctx, bp.hcl_config(HCL_TINY, 1), store, tmp_path / "straight")
    assert (r["middle_iteration"], r["end_iteration"]) == (2, 4)
    stopped = load_checkpoint(str(workdir / "hcl-seed-1" / "hcl" / "checkpoints" / "last.pt"))["model"]
    through = load_checkpoint(straight["checkpoint"])["model"]
    assert stopped.keys() == through.keys()
    assert all(torch.equal(stopped[k], through[k]) for k in stopped)


# ---------------------------------------------------------------- STEGO's planted bench
# HP's tiny stores (TINY's sizes: the same stores, so the same raw figure), STEGO_TRAIN at batch 8 for 4 epochs:
# 24 iterations, positives from ranks 1..7 of a 30-neighbour table.
STEGO_TINY = PlantedStegoBench(n_train=48, n_val=8, chunk_size=8, planted=SMALL, stego={"batch_size": 8, "epochs": 4})


@pytest.fixture(scope="module")
def tiny_stego_run(tmp_path_factory) -> Iterator[tuple[dict[str, Any], Path]]:
    """STEGO's bench on TINY's store, seed 1, with its broken run (random neighbours), one torch thread; and the
    seed's folder."""
    workdir = tmp_path_factory.mktemp("planted-stego")
    with one_thread():
        yield run_seed_stego(STEGO_TINY, 1, workdir), workdir / "stego-seed-1"


# STEGO's tiny bench, tracked like HP's: seed 1 on this project's 2-core machine (one torch thread), a band of half
# the range over seeds 1-5 (raw 23.0-47.1, at the start 23.4-37.7, trained 14.6-20.2, broken 13.7-19.9 mIoU).
# Like HP, STEGO ends below its initial head and below raw features on this generator, and the broken run (random
# positives) scores like the real one: the neighbour table's positives share the anchor's classes barely more often
# than random images do (the image style dominates the pooled features; README, "Quality with a known answer").
TRACKED_STEGO = {"raw": (34.05, 12.06), "start": (25.66, 7.13), "head": (14.55, 2.83), "broken": (13.66, 3.11)}


def test_tiny_planted_stego_bench_figures_stay_in_their_band(tiny_stego_run):
    r, _ = tiny_stego_run
    for name, (recorded, band) in TRACKED_STEGO.items():
        assert abs(r[name]["miou"] - recorded) <= band, (name, r[name]["miou"], recorded, band)
    assert r["iterations"] == (48 // 8) * 4


def test_stego_bench_trains_on_hps_store(tiny_stego_run, tiny_run):
    """The STEGO bench's stores are HP's: with TINY's sizes and seed its raw figure is HP's, to the digit."""
    assert tiny_stego_run[0]["raw"] == tiny_run["raw"]


def test_stego_broken_run_draws_random_positives_and_the_plain_run_the_tables(tiny_stego_run):
    """What the trainer drew, batch by batch: the plain run's positives are all among the anchor's 7 nearest crops of
    the knn stage's table; the broken run's are there only by chance (7 of the 47 other crops, 14.9 %), so the
    broken run did not train on the table."""
    r, _ = tiny_stego_run
    chance = 100 * 7 / 47
    assert r["head_positives"]["drawn"] == r["broken_positives"]["drawn"] == 24 * 8  # every batch was seen
    assert r["head_positives"]["in_table"] == 100.0
    assert r["broken_positives"]["in_table"] < 2 * chance


def test_random_neighbours_keep_the_table_shape_and_self_and_nothing_else(tiny_stego_run):
    """The broken table: each crop itself at rank 0 (as the knn table has it), random other crops at every other
    rank, drawn anew per seed; and the reader counts its calls (the bench's proof that the trainer used it)."""
    from pipeline.methods.stego.stages import read_table

    _, root = tiny_stego_run
    manifest = {"outputs": {"store": str(root / "stego-knn-train.zarr")}}
    table = read_table(manifest, 48)
    read, calls = random_neighbours(seed=1)
    broken = read(manifest, 48)
    assert calls == [1] and broken.shape == table.shape == (48, 30)
    assert np.array_equal(broken[:, 0], np.arange(48)) and np.array_equal(table[:, 0], np.arange(48))
    assert (broken[:, 1:] != np.arange(48)[:, None]).all() and broken.min() >= 0 and broken.max() < 48
    assert (broken[:, 1:8] == table[:, 1:8]).mean() < 0.1
    assert not np.array_equal(broken, random_neighbours(seed=2)[0](manifest, 48))


def test_a_style_control_changes_only_the_style_and_never_the_bench_default(capsys):
    """`--style` is a control run: only the image-style strength differs from the bench's generator, it says so, and
    the default bench keeps the generator fixed before any head was trained."""
    from benches.planted import planted_bench, with_style
    from pipeline.errors import UserError

    assert planted_bench("hp")[1] == PlantedBench() and planted_bench("hcl")[1] == PlantedHCLBench()
    assert planted_bench("stego")[1] == PlantedStegoBench()
    assert with_style(PlantedBench(), None) == PlantedBench()
    for base in (PlantedBench(), PlantedHCLBench(), PlantedStegoBench()):
        control = with_style(base, 0.0)
        assert control.planted.style == 0.0
        assert dataclasses.replace(control.planted, style=base.planted.style) == base.planted
        assert dataclasses.replace(control, planted=base.planted) == base
    assert "control run: image style 0" in capsys.readouterr().out
    with pytest.raises(UserError, match="--style"):
        with_style(PlantedBench(), -1.0)
