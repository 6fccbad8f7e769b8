"""HCL heads, loss, MoGoClustering and the overclustering protocol (specs/HCL.md §2-§5) vs naive computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.hcl.heads import HCLModel
from pipeline.hcl.loss import hcl_loss
from pipeline.hcl.mogo import MemoryBank, kmeans_centroids, nearest, sample_tokens
from pipeline.metrics import remap_confusion, scores
from pipeline.overcluster import (
    many_to_one_match,
    nearest_resize,
    overcluster_maps,
    overcluster_scores,
    standardize_pca,
)


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _naive_proto(q, k, c, tau):
    """Per token: nearest centroid of k_i by brute force, dense softmax over all centroids written out."""
    terms = []
    for qi, ki in zip(q.tolist(), k.tolist(), strict=True):
        a = max(range(len(c)), key=lambda j: sum(x * y for x, y in zip(ki, c[j], strict=True)))
        e = [math.exp(sum(x * y for x, y in zip(qi, cj, strict=True)) / tau) for cj in c]
        terms.append(-math.log(e[a] / sum(e)))
    return sum(terms) / len(terms)


def test_hcl_loss_matches_naive():
    d, n, tau = 6, 2 * 9, 0.07
    q, k = _unit(2, 9, d, seed=1), _unit(2, 9, d, seed=2)
    pred = torch.randn(2, 9, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fg = torch.rand(2, 9, generator=torch.Generator().manual_seed(4)) > 0.5
    c_fg, c_bg = _unit(5, d, seed=5), _unit(7, d, seed=6)
    q.requires_grad_(True)
    k.requires_grad_(True)
    out = hcl_loss(q, k, pred, fg, c_fg, c_bg, tau)

    qf, kf, m = q.detach().reshape(n, d), k.detach().reshape(n, d), fg.reshape(n)
    want_fg = _naive_proto(qf[m], kf[m], c_fg.tolist(), tau)
    want_bg = _naive_proto(qf[~m], kf[~m], c_bg.tolist(), tau)
    p = pred.reshape(n, d).tolist()
    want_pred = 0.0
    for pi, ki in zip(p, kf.tolist(), strict=True):
        norm = math.sqrt(sum(x * x for x in pi))
        want_pred += sum((x / norm - y) ** 2 for x, y in zip(pi, ki, strict=True))
    want_pred /= n * d
    assert 0 < m.sum() < n
    assert out["fg"].item() == pytest.approx(want_fg, abs=1e-6)
    assert out["bg"].item() == pytest.approx(want_bg, abs=1e-6)
    assert out["pred"].item() == pytest.approx(want_pred, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * (want_fg + want_bg) + 0.5 * want_pred, abs=1e-6)
    out["loss"].backward()
    assert k.grad is None and q.grad is not None  # k is a target: no gradient into the momentum branch


def test_nearest_equals_bruteforce():
    q, c = _unit(200, 16, seed=7).float(), _unit(30, 16, seed=8).float()
    np.testing.assert_array_equal(nearest(q, c), (q @ c.T).argmax(1).numpy())
    np.testing.assert_array_equal(nearest(q.numpy(), c.numpy()), (q @ c.T).argmax(1).numpy())


def test_many_to_one_match_hand_made():
    conf = np.array([[10, 1, 0, 5, 0],   # rows: classes, columns: clusters
                     [2, 8, 1, 0, 4],
                     [0, 3, 9, 1, 6]])
    mapping = many_to_one_match(conf)
    np.testing.assert_array_equal(mapping, [0, 1, 2, 0, 2])
    s = scores(remap_confusion(conf, mapping))
    # class x class after mapping: [[15,1,0],[2,8,5],[1,3,15]]
    assert s.acc == pytest.approx(38 / 50)
    assert s.miou == pytest.approx((15 / 19 + 8 / 19 + 15 / 24) / 3)


def test_memory_bank_fill_replace_seeded():
    x0 = np.arange(40, dtype=np.float32).reshape(10, 4)
    x1 = -1 - np.arange(48, dtype=np.float32).reshape(12, 4)
    banks = [MemoryBank(seed=s) for s in (3, 3, 4)]
    for b in banks:
        b.update(x0, epoch=0)
        np.testing.assert_array_equal(b.data, x0)
        b.update(x1, epoch=1)
        changed = (b.data != x0).any(1)
        assert changed.sum() == 5
        assert all(any((row == r).all() for r in x1) for row in b.data[changed])
    np.testing.assert_array_equal(banks[0].data, banks[1].data)
    assert not np.array_equal(banks[0].data, banks[2].data)


def test_sample_tokens_fraction_of_masked():
    tokens = torch.arange(20.0)[:, None].repeat(1, 3)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:10] = True
    out = sample_tokens(tokens, mask, 0.3, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3)
    assert len(set(out[:, 0].tolist())) == 3 and (out[:, 0] < 10).all()


def test_kmeans_centroids_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:4] * 10
    x = np.concatenate([c + 0.1 * rng.standard_normal((50, 8)).astype(np.float32) for c in centres])
    c = kmeans_centroids(x, k=4, iterations=20, min_points=10, seed=0)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    cos = (centres / 10) @ c.T
    assert (cos.max(1) > 0.99).all() and sorted(cos.argmax(1)) == [0, 1, 2, 3]
    np.testing.assert_array_equal(c, kmeans_centroids(x, k=4, iterations=20, min_points=10, seed=0))


def test_momentum_update_formula():
    torch.manual_seed(0)
    model = HCLModel(width=8, dim=24, hidden=16, out_dim=8, num_heads=2)
    online, mom = model.head.embed.weight, model.momentum_head.embed.weight
    assert not mom.requires_grad and online.requires_grad
    with torch.no_grad():
        online.fill_(1.0)
        mom.fill_(3.0)
        model.projector.mlp[0].bias.fill_(-2.0)
        model.momentum_projector.mlp[0].bias.fill_(2.0)
    model.momentum_update(0.9)
    torch.testing.assert_close(mom, torch.full_like(mom, 0.9 * 3.0 + 0.1 * 1.0))
    torch.testing.assert_close(model.momentum_projector.mlp[0].bias, torch.full((16,), 0.9 * 2.0 - 0.1 * 2.0))
    torch.testing.assert_close(online, torch.ones_like(online))
    q, p, k = model(torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    assert q.shape == p.shape == k.shape == (2, 5, 8) and not k.requires_grad
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(2, 5))


def test_overcluster_perfect_features_full_accuracy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=600)
    labels[:20] = 255  # ignored
    embed = rng.standard_normal((5, 16)).astype(np.float32)
    features = embed[np.minimum(labels, 4)]
    out = overcluster_scores(features, labels, n_classes=4, k=6, pca=8, seeds=(0, 1))
    assert out["acc_mean"] == pytest.approx(1.0) and out["miou_mean"] == pytest.approx(1.0)
    assert len(out["per_seed"]) == 2 and out["acc_std"] == pytest.approx(0.0)
    noise = overcluster_scores(rng.standard_normal((600, 16)), labels, n_classes=4, k=6, pca=8, seeds=(0,))
    assert noise["acc_mean"] < 0.6


def test_nearest_resize_matches_torch_nearest_exact():
    maps = np.random.default_rng(1).integers(0, 50, size=(3, 7, 9))
    for size in (4, 7, 100):
        expected = F.interpolate(torch.from_numpy(maps)[:, None].double(), size=(size, size), mode="nearest-exact")
        assert np.array_equal(nearest_resize(maps, size), expected[:, 0].long().numpy())


def test_standardize_pca_matches_float64_reference():
    x = np.random.default_rng(2).standard_normal((400, 12)) @ np.diag(np.arange(1, 13))
    z = (x - x.mean(0)) / x.std(0)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    ref = z @ vt[:5].T
    got = standardize_pca(x.astype(np.float32), 5)
    # principal axes are defined up to sign
    np.testing.assert_allclose(np.abs(got), np.abs(ref), atol=1e-3)
    np.testing.assert_allclose(standardize_pca(x.astype(np.float32), 5, block=64), got, atol=1e-4)  # streamed


def test_overcluster_maps_on_class_features_is_perfect_at_any_mask_size():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=(4, 6, 6))
    embed = rng.standard_normal((3, 10)).astype(np.float32)
    features = embed[labels]  # one vector per class: patch-level labels are recoverable exactly
    pixel_labels = np.repeat(np.repeat(labels, 8, axis=1), 8, axis=2)  # (4, 48, 48)
    out = overcluster_maps(features, pixel_labels, n_classes=3, k=5, pca=4, seeds=(0, 1), size=12)
    assert out["acc_mean"] == pytest.approx(1.0) and out["miou_mean"] == pytest.approx(1.0)
    assert out["k"] == 5 and out["size"] == 12 and len(out["per_seed"]) == 2
    capped = overcluster_maps(features[:1, :2, :2], pixel_labels[:1], n_classes=3, k=500, pca=4, seeds=(0,))
    assert capped["k"] == 4  # K capped at the number of patches


def test_hcl_loss_stays_finite_and_float32_under_float16_autocast():
    """exp(q·c/τ) overflows float16 (e^14.3 > 65,504): the loss must not run in half precision."""
    q = torch.ones(4, 8) / math.sqrt(8)
    centroids = q[:2].clone()  # q·c = 1 for both: exp(1/0.07) = 1.6e6 per term
    mask = torch.tensor([True, True, False, False])
    with torch.autocast("cpu", dtype=torch.float16):
        out = hcl_loss(q.half(), q.half(), q.half(), mask, centroids.half(), centroids.half(), tau=0.07)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert out["fg"].item() == pytest.approx(math.log(2), abs=1e-3)  # two equal logits
