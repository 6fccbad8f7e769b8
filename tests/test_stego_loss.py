"""STEGO's correlation loss (docs/stego.md §3) against naive float64 computations written from the formulas."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation.online_probes import cluster_lookup_loss
from pipeline.methods.stego.loss import (
    StegoLossSettings,
    correlation,
    correlation_term,
    linear_probe_loss,
    sample,
    stego_loss,
    super_perm,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_sample(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup by hand: output point (i, j) reads coords[b, j, i] = (x, y); x runs over the width, y over
    the height; -1/+1 are the border patch centres; positions are clamped into the grid (border padding)."""
    t = t.double()
    b_, c_, h, w = t.shape
    s = coords.shape[1]
    out = torch.zeros(b_, c_, s, s, dtype=torch.float64)
    for b in range(b_):
        for i in range(s):
            for j in range(s):
                x, y = (float(v) for v in coords[b, j, i])
                col = min(max((x + 1) / 2 * (w - 1), 0.0), w - 1)
                row = min(max((y + 1) / 2 * (h - 1), 0.0), h - 1)
                c0, r0 = math.floor(col), math.floor(row)
                c1, r1 = min(c0 + 1, w - 1), min(r0 + 1, h - 1)
                ax, ay = col - c0, row - r0
                out[b, :, i, j] = ((1 - ay) * ((1 - ax) * t[b, :, r0, c0] + ax * t[b, :, r0, c1])
                                   + ay * ((1 - ax) * t[b, :, r1, c0] + ax * t[b, :, r1, c1]))
    return out


def test_sample_matches_manual_bilinear_including_borders():
    t = torch.randn(2, 3, 4, 6, generator=gen(0))  # h != w: a swapped axis would show
    coords = torch.rand(2, 5, 5, 2, generator=gen(1)) * 2 - 1
    coords[0, 0, 0] = torch.tensor([-1.0, -1.0])
    coords[0, 0, 1] = torch.tensor([1.0, 1.0])
    coords[0, 1, 0] = torch.tensor([1.0, -1.0])
    coords[1, 2, 3] = torch.tensor([-1.0, 1.0])
    coords[1, 4, 4] = torch.tensor([1.0, 0.3])
    out = sample(t, coords)
    assert out.shape == (2, 3, 5, 5)
    assert torch.allclose(out.double(), naive_sample(t, coords), atol=1e-5)
    # the corners are exactly the corner patches; output (i, j) reads coords[:, j, i]
    assert torch.allclose(out[0, :, 0, 0], t[0, :, 0, 0])
    assert torch.allclose(out[0, :, 1, 0], t[0, :, -1, -1])
    assert torch.allclose(out[0, :, 0, 1], t[0, :, 0, -1])  # coords[0, 1, 0] = (x=+1, y=-1): top right
    assert torch.allclose(out[1, :, 3, 2], t[1, :, -1, 0])  # coords[1, 2, 3] = (x=-1, y=+1): bottom left


def test_super_perm_is_the_formula_and_never_self():
    for size in range(1, 10):
        for seed in range(30):
            perm = super_perm(size, gen(seed))
            base = torch.randperm(size, generator=gen(seed)).tolist()
            expected = [((v + 1) if v == i else v) % size for i, v in enumerate(base)]
            assert perm.tolist() == expected
            assert perm.dtype == torch.long
            if size >= 2:
                assert all(perm[i] != i for i in range(size))


def test_super_perm_is_not_always_a_bijection():
    assert any(len(set(super_perm(4, gen(s)).tolist())) < 4 for s in range(50))


def naive_unit(x: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) -> (B, S*S, C) rows divided by max(norm, 1e-10)."""
    rows = x.double().flatten(2).transpose(1, 2)
    return rows / rows.norm(dim=2, keepdim=True).clamp(min=1e-10)


def naive_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    s = a.shape[-1]
    return (naive_unit(a) @ naive_unit(b).transpose(1, 2)).reshape(a.shape[0], s, s, s, s)


def test_correlation_matches_loops():
    a = torch.randn(2, 5, 3, 3, generator=gen(0))
    b = torch.randn(2, 5, 3, 3, generator=gen(1))
    got = correlation(a, b)
    assert got.shape == (2, 3, 3, 3, 3)
    for n, h, w, i, j in itertools.product(range(2), range(3), range(3), range(3), range(3)):
        u, v = a[n, :, h, w].double(), b[n, :, i, j].double()
        assert abs(got[n, h, w, i, j].item() - (u @ v / (u.norm() * v.norm())).item()) < 1e-6


def naive_term(f1, f2, c1, c2, shift, pointwise, zero_clamp, stabilize=False):
    fd = naive_corr(f1, f2)
    if pointwise:
        fd = fd - fd.mean(dim=(3, 4), keepdim=True) + fd.mean()
    cd = naive_corr(c1, c2)
    cd = torch.clamp(cd, min=0.0) if zero_clamp else cd
    if stabilize:
        cd = torch.clamp(cd, max=0.8)
    return -cd * (fd - shift)


@pytest.mark.parametrize("pointwise,zero_clamp,stabilize",
                         [(True, True, False), (False, True, False), (True, False, False), (False, False, True)])
def test_correlation_term_matches_naive(pointwise, zero_clamp, stabilize):
    f1, f2 = torch.randn(2, 5, 3, 3, generator=gen(0)), torch.randn(2, 5, 3, 3, generator=gen(1))
    c1 = torch.randn(2, 4, 3, 3, generator=gen(2))
    c2 = c1 + 0.7 * torch.randn(2, 4, 3, 3, generator=gen(3))  # code correlations both above 0.8 and below 0
    f1.requires_grad_(True)
    c1.requires_grad_(True)
    loss, cd = correlation_term(f1, f2, c1, c2, 0.3, pointwise, zero_clamp, stabilize)
    assert torch.allclose(loss.double(), naive_term(f1.detach(), f2, c1.detach(), c2, 0.3, pointwise, zero_clamp,
                                                     stabilize), atol=1e-6)
    assert torch.allclose(cd.double(), naive_corr(c1.detach(), c2), atol=1e-6)  # cd is unclamped
    assert (cd > 0.8).any() and (cd < 0).any()  # every clamp is exercised
    loss.sum().backward()
    assert f1.grad is None  # F carries no gradient
    assert c1.grad is not None and c1.grad.abs().sum() > 0


def naive_stego(f, c, f_pos, c_pos, s: StegoLossSettings, seed: int) -> dict[str, float]:
    """§3 items 1-7 straight from the formulas, in float64, consuming the documented draws: P1, P2, the perms."""
    g = gen(seed)
    b_, n = f.shape[0], s.feature_samples
    p1 = torch.rand(b_, n, n, 2, generator=g) * 2 - 1
    p2 = torch.rand(b_, n, n, 2, generator=g) * 2 - 1
    fs, cs = naive_sample(f, p1), naive_sample(c, p1)
    fs_pos, cs_pos = naive_sample(f_pos, p2), naive_sample(c_pos, p2)
    intra = naive_term(fs, fs, cs, cs, s.b_intra, s.pointwise, s.zero_clamp).mean()
    inter = naive_term(fs, fs_pos, cs, cs_pos, s.b_inter, s.pointwise, s.zero_clamp).mean()
    total, count = 0.0, 0
    for _ in range(s.neg_samples):
        base = torch.randperm(b_, generator=g).tolist()
        partner = [((v + 1) if v == i else v) % b_ for i, v in enumerate(base)]
        fn = naive_sample(torch.stack([f[k] for k in partner]), p2)
        cn = naive_sample(torch.stack([c[k] for k in partner]), p2)
        term = naive_term(fs, fn, cs, cn, s.b_neg, s.pointwise, s.zero_clamp)
        total += term.sum().item()
        count += term.numel()
    neg = total / count if count else 0.0
    loss = s.correspondence_weight * (s.w_intra * intra.item() + s.w_inter * inter.item() + s.w_neg * neg)
    return {"loss": loss, "intra": intra.item(), "inter": inter.item(), "neg": neg}


def settings(**kw) -> StegoLossSettings:
    base = {"feature_samples": 3, "neg_samples": 5, "pointwise": True, "zero_clamp": True, "w_intra": 0.67,
            "w_inter": 0.25, "w_neg": 0.63, "b_intra": 0.08, "b_inter": 0.02, "b_neg": 0.66,
            "correspondence_weight": 1.5}
    base.update(kw)
    return StegoLossSettings(**base)


def tiny_batch(b: int, seed: int = 0):
    g = gen(seed)
    f, f_pos = torch.randn(b, 5, 4, 5, generator=g), torch.randn(b, 5, 4, 5, generator=g)
    c, c_pos = torch.randn(b, 4, 4, 5, generator=g), torch.randn(b, 4, 4, 5, generator=g)
    return f, c, f_pos, c_pos


@pytest.mark.parametrize("b,pointwise,zero_clamp", [(2, True, True), (3, False, True), (3, True, False),
                                                    (2, False, False)])
def test_stego_loss_matches_naive_spec(b, pointwise, zero_clamp):
    f, c, f_pos, c_pos = tiny_batch(b)
    s = settings(pointwise=pointwise, zero_clamp=zero_clamp)
    out = stego_loss(f, c, f_pos, c_pos, s, gen(7))
    ref = naive_stego(f, c, f_pos, c_pos, s, 7)
    for key in ("loss", "intra", "inter", "neg"):
        assert abs(getattr(out, key).item() - ref[key]) < 1e-5, key
    assert out.loss.ndim == 0 and not out.intra.requires_grad and not out.neg.requires_grad


def test_stego_loss_without_negatives():
    f, c, f_pos, c_pos = tiny_batch(2)
    s = settings(neg_samples=0)
    out = stego_loss(f, c, f_pos, c_pos, s, gen(3))
    assert out.neg.item() == 0.0
    assert abs(out.loss.item() - naive_stego(f, c, f_pos, c_pos, s, 3)["loss"]) < 1e-5


def test_stego_loss_gradient_reaches_codes_only():
    f, c, f_pos, c_pos = tiny_batch(3, seed=1)
    for t in (f, c, f_pos, c_pos):
        t.requires_grad_(True)
    out = stego_loss(f, c, f_pos, c_pos, settings(feature_samples=4), gen(0))
    out.loss.backward()
    assert f.grad is None and f_pos.grad is None
    assert c.grad is not None and c.grad.abs().sum() > 0
    assert c_pos.grad is not None and c_pos.grad.abs().sum() > 0


def test_stego_loss_is_reproducible_from_the_seed():
    f, c, f_pos, c_pos = tiny_batch(3, seed=2)
    s = settings()
    a = stego_loss(f, c, f_pos, c_pos, s, gen(11)).loss
    assert torch.equal(a, stego_loss(f, c, f_pos, c_pos, s, gen(11)).loss)
    assert not torch.equal(a, stego_loss(f, c, f_pos, c_pos, s, gen(12)).loss)


def test_settings_need_the_preset_values():
    with pytest.raises(TypeError):
        StegoLossSettings(pointwise=True)  # weights and shifts have no defaults
    with pytest.raises(ValueError):
        settings(neg_samples=-1)


def test_linear_probe_loss_matches_masked_cross_entropy():
    logits = torch.randn(2, 3, 4, 4, generator=gen(0), requires_grad=True)
    labels = torch.randint(-1, 5, (2, 8, 8), generator=gen(1))  # -1, 3 and 4 are ignored for 3 classes
    labels[0, 0, 0] = 255
    got = linear_probe_loss(logits, labels, 3)
    up = F.interpolate(logits.detach().double(), size=(8, 8), mode="bilinear", align_corners=False)
    rows = up.permute(0, 2, 3, 1).reshape(-1, 3)
    flat = labels.reshape(-1)
    keep = (flat >= 0) & (flat < 3)
    log_p = rows[keep] - torch.logsumexp(rows[keep], dim=1, keepdim=True)
    expected = -log_p[torch.arange(int(keep.sum())), flat[keep]].mean()
    assert abs(got.item() - expected.item()) < 1e-5
    got.backward()
    assert logits.grad.abs().sum() > 0


def test_linear_probe_loss_without_labelled_pixels_is_zero():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = linear_probe_loss(logits, torch.full((1, 4, 4), -1), 3)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_cluster_probe_loss_is_stegos_hard_cluster_lookup():
    """The project's existing cluster probe loss equals STEGO's ClusterLookup(alpha=None) loss, value and gradient."""
    codes = torch.randn(2, 4, 3, 3, generator=gen(0))
    centroids = torch.randn(5, 4, generator=gen(1), requires_grad=True)
    ours = cluster_lookup_loss(codes, centroids)
    ours.backward()
    grad_ours = centroids.grad.clone()
    centroids.grad = None
    inner = torch.einsum("bdhw,kd->bkhw", F.normalize(codes, dim=1), F.normalize(centroids, dim=1))
    hard = F.one_hot(inner.argmax(1), 5).permute(0, 3, 1, 2).float()
    theirs = -(hard * inner).sum(1).mean()
    theirs.backward()
    assert torch.allclose(ours, theirs) and torch.allclose(grad_ours, centroids.grad, atol=1e-7)


def test_sample_pads_with_the_border_outside_the_grid():
    """Coordinates past ±1 read the border patches (border padding), not zeros; float64 maps take float32 coords."""
    t = torch.randn(1, 2, 3, 4, generator=gen(0), dtype=torch.float64) + 5.0  # far from zero: zero padding shows
    coords = torch.tensor([[[[1.5, 0.2], [-1.4, -1.3]], [[0.3, 1.7], [-2.0, 0.9]]]])
    out = sample(t, coords)
    assert out.dtype == torch.float64
    assert torch.allclose(out, naive_sample(t, coords.clamp(-1, 1)), atol=1e-12)


def test_correlation_normalises_with_eps_1e_10():
    """A point with norm below the eps is divided by 1e-10 (§3.4), not scaled up to a unit vector."""
    a = torch.zeros(1, 3, 1, 1)
    a[0, 0, 0, 0] = 1e-11  # norm 1e-11 < eps: becomes 0.1 * e0
    b = torch.zeros(1, 3, 1, 1)
    b[0, 0, 0, 0] = 3.0
    got = correlation(a, b)
    assert torch.allclose(got.double(), naive_corr(a, b), atol=1e-6)
    assert abs(got.item() - 0.1) < 1e-6


def test_correlation_term_stabilize_keeps_the_zero_clamp():
    """With zero_clamp and stabilize both on, Cd is clamped to [0, 0.8], not just from above."""
    f1, f2 = torch.randn(2, 5, 3, 3, generator=gen(0)), torch.randn(2, 5, 3, 3, generator=gen(1))
    c1 = torch.randn(2, 4, 3, 3, generator=gen(2))
    c2 = c1 + 0.7 * torch.randn(2, 4, 3, 3, generator=gen(3))
    loss, cd = correlation_term(f1, f2, c1, c2, 0.3, True, True, True)
    assert (cd < 0).any() and (cd > 0.8).any()
    assert torch.allclose(loss.double(), naive_term(f1, f2, c1, c2, 0.3, True, True, True), atol=1e-6)


def naive_cd_means(f, c, f_pos, c_pos, s: StegoLossSettings, seed: int) -> dict[str, float]:
    """Means of the unclamped code correlations of the three terms, from the same draws as naive_stego."""
    g = gen(seed)
    b_, n = f.shape[0], s.feature_samples
    p1 = torch.rand(b_, n, n, 2, generator=g) * 2 - 1
    p2 = torch.rand(b_, n, n, 2, generator=g) * 2 - 1
    cs, cs_pos = naive_sample(c, p1), naive_sample(c_pos, p2)
    negs = []
    for _ in range(s.neg_samples):
        base = torch.randperm(b_, generator=g).tolist()
        partner = [((v + 1) if v == i else v) % b_ for i, v in enumerate(base)]
        negs.append(naive_corr(cs, naive_sample(torch.stack([c[k] for k in partner]), p2)))
    return {"cd_intra": naive_corr(cs, cs).mean().item(), "cd_inter": naive_corr(cs, cs_pos).mean().item(),
            "cd_neg": torch.stack(negs).mean().item() if negs else 0.0}


@pytest.mark.parametrize("neg_samples", [0, 3])
def test_stego_loss_logs_the_code_correlation_means(neg_samples):
    """cd_intra, cd_inter and cd_neg are the detached means of the unclamped Cd of each term (0 without negatives)."""
    f, c, f_pos, c_pos = tiny_batch(3, seed=4)
    s = settings(neg_samples=neg_samples)
    out = stego_loss(f, c, f_pos, c_pos, s, gen(5))
    ref = naive_cd_means(f, c, f_pos, c_pos, s, 5)
    for key in ("cd_intra", "cd_inter", "cd_neg"):
        value = getattr(out, key)
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad, key
        assert abs(value.item() - ref[key]) < 1e-5, key
    if neg_samples:
        assert ref["cd_neg"] != 0.0


def test_stego_loss_computes_features_at_the_codes_precision():
    """float32 features with float64 codes: the features are cast to float64, so the result matches the naive float64
    computation to far below float32 rounding."""
    f, c, f_pos, c_pos = tiny_batch(2, seed=6)
    c, c_pos = c.double(), c_pos.double()
    s = settings()
    out = stego_loss(f, c, f_pos, c_pos, s, gen(8))
    ref = naive_stego(f, c, f_pos, c_pos, s, 8)
    assert out.loss.dtype == torch.float64
    for key in ("loss", "intra", "inter", "neg"):
        assert abs(getattr(out, key).item() - ref[key]) < 1e-12, key


def test_stego_loss_coords_follow_the_data_device():
    """Data on another device than the generator (CUDA data, CPU generator; here 'meta'): the coordinates are moved
    to the data's device, so sampling works."""
    f, c, f_pos, c_pos = (t.to("meta") for t in tiny_batch(2))
    out = stego_loss(f, c, f_pos, c_pos, settings(neg_samples=2), gen(0))
    assert out.loss.device.type == "meta" and out.loss.shape == ()


def test_stego_loss_draws_on_the_generators_device():
    """The draws use the generator's device, not the default device: a different default device (here 'meta')
    changes nothing."""
    f, c, f_pos, c_pos = tiny_batch(3, seed=3)
    s = settings(neg_samples=3)
    expected = stego_loss(f, c, f_pos, c_pos, s, gen(9))
    with torch.device("meta"):
        got = stego_loss(f, c, f_pos, c_pos, s, gen(9))
        perm = super_perm(5, gen(1))
    assert torch.equal(got.loss, expected.loss) and torch.equal(got.neg, expected.neg)
    assert perm.tolist() == super_perm(5, gen(1)).tolist()


def test_settings_refuse_each_bad_value_with_its_name():
    """feature_samples >= 1 and neg_samples >= 0 are accepted at the boundary; below it each is refused by name."""
    assert settings(feature_samples=1, neg_samples=0).feature_samples == 1
    with pytest.raises(ValueError, match=r"stego\.feature_samples must be >= 1, got 0"):
        settings(feature_samples=0)
    with pytest.raises(ValueError, match=r"stego\.neg_samples must be >= 0, got -1"):
        settings(neg_samples=-1)


def test_stego_loss_with_one_feature_sample():
    """S = 1 (allowed by the settings) still matches the naive computation."""
    f, c, f_pos, c_pos = tiny_batch(2, seed=5)
    s = settings(feature_samples=1, neg_samples=2)
    out = stego_loss(f, c, f_pos, c_pos, s, gen(2))
    assert abs(out.loss.item() - naive_stego(f, c, f_pos, c_pos, s, 2)["loss"]) < 1e-5


def test_linear_probe_loss_with_one_labelled_pixel_is_its_cross_entropy():
    """One valid pixel: the mean is over that one pixel (the clamp to 1 only guards the empty case)."""
    logits = torch.randn(1, 3, 2, 2, generator=gen(0))
    labels = torch.full((1, 2, 2), -1)
    labels[0, 1, 0] = 2
    got = linear_probe_loss(logits, labels, 3)
    row = logits[0, :, 1, 0].double()
    assert abs(got.item() - (torch.logsumexp(row, 0) - row[2]).item()) < 1e-6


def test_linear_probe_loss_uses_same_size_logits_as_they_are(monkeypatch):
    """Logits already at the labels' size are not resampled (no needless interpolation pass); other sizes are."""
    calls = []
    interpolate = F.interpolate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("size"))
        return interpolate(*args, **kwargs)

    monkeypatch.setattr(F, "interpolate", spy)
    logits = torch.randn(2, 3, 4, 5, generator=gen(0))
    labels = torch.randint(0, 3, (2, 4, 5), generator=gen(1))
    got = linear_probe_loss(logits, labels, 3)
    assert calls == []
    assert abs(got.item() - F.cross_entropy(logits, labels).item()) < 1e-6
    linear_probe_loss(logits, torch.randint(0, 3, (2, 8, 10), generator=gen(2)), 3)
    assert [tuple(size) for size in calls] == [(8, 10)]


def stego_loss_term_by_term(f, c, f_pos, c_pos, s: StegoLossSettings, generator: torch.Generator):
    """The loss as it was written before each feature sample was normalised once: every term through the public
    `correlation_term`, which normalises its own inputs. Returns (loss, cd means) with the draws in the same order."""
    shape = (c.shape[0], s.feature_samples, s.feature_samples, 2)
    p1 = torch.rand(shape, generator=generator) * 2 - 1
    p2 = torch.rand(shape, generator=generator) * 2 - 1
    fs, fs_pos, cs, cs_pos = sample(f, p1), sample(f_pos, p2), sample(c, p1), sample(c_pos, p2)
    flags = {"pointwise": s.pointwise, "zero_clamp": s.zero_clamp, "stabilize": s.stabilize}
    intra, cd_intra = correlation_term(fs, fs, cs, cs, s.b_intra, **flags)
    inter, cd_inter = correlation_term(fs, fs_pos, cs, cs_pos, s.b_inter, **flags)
    negs = []
    for _ in range(s.neg_samples):
        partner = super_perm(c.shape[0], generator)
        negs.append(correlation_term(fs, sample(f[partner], p2), cs, sample(c[partner], p2), s.b_neg, **flags)[0])
    neg = torch.stack(negs).mean()
    loss = s.correspondence_weight * (s.w_intra * intra.mean() + s.w_inter * inter.mean() + s.w_neg * neg)
    return loss, cd_intra.mean(), cd_inter.mean()


@pytest.mark.parametrize("pointwise", [True, False])
def test_stego_loss_is_bit_for_bit_the_term_by_term_loss_with_its_gradient(pointwise):
    """Normalising each feature sample once (stego_loss) changes no bit of the loss or of the codes' gradient."""
    f, c, f_pos, c_pos = tiny_batch(4, seed=5)
    s = settings(pointwise=pointwise, feature_samples=4)
    c1, c_pos1 = c.clone().requires_grad_(True), c_pos.clone().requires_grad_(True)
    out = stego_loss(f, c1, f_pos, c_pos1, s, gen(9))
    out.loss.backward()
    c2, c_pos2 = c.clone().requires_grad_(True), c_pos.clone().requires_grad_(True)
    loss, cd_intra, cd_inter = stego_loss_term_by_term(f, c2, f_pos, c_pos2, s, gen(9))
    loss.backward()
    assert torch.equal(out.loss, loss) and torch.equal(out.cd_intra, cd_intra) and torch.equal(out.cd_inter, cd_inter)
    assert torch.equal(c1.grad, c2.grad) and torch.equal(c_pos1.grad, c_pos2.grad)


def test_under_autocast_the_products_round_and_the_loss_stays_fp32():
    """train.amp: a bf16 head's codes enter the loss; the correlations' products run in bf16 (autocast's), the
    normalisation, clamps and sums in fp32: the loss comes back fp32, near the float64 spec on the same codes (rounded
    to bf16 as the head gave them), and not equal to the fp32 loss (the products really were rounded)."""
    f, c, f_pos, c_pos = tiny_batch(3, seed=4)
    c, c_pos = c.bfloat16(), c_pos.bfloat16()  # what a bf16 head hands over
    s = settings(feature_samples=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = stego_loss(f, c, f_pos, c_pos, s, gen(5))
    plain = stego_loss(f, c.float(), f_pos, c_pos.float(), s, gen(5))
    ref = naive_stego(f, c.float(), f_pos, c_pos.float(), s, 5)
    assert mixed.loss.dtype == torch.float32 and mixed.intra.dtype == torch.float32
    assert mixed.loss.item() != plain.loss.item()
    for key in ("loss", "intra", "inter", "neg"):
        assert abs(getattr(mixed, key).item() - ref[key]) < 2e-2 * max(1.0, abs(ref[key])), key
        assert abs(getattr(plain, key).item() - ref[key]) < 1e-5, key
