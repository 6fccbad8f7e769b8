"""L_hp (docs/hp.md §5) against a naive dense implementation written from the spec alone, plus the schedules."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.methods.hp.loss import hp_loss, positive_masks
from pipeline.methods.hp.schedule import lambda_at, renews_at

B, NP, C, D = 3, 6, 5, 4  # images, patches per image (n), backbone width, head width
TAU, LAM, RHO = 0.7, 0.6, 0.3


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ naive reference (dense N x N, loops)
def naive_masks(f, s_m, r, r_m, u, rho):
    """G, H, Dn as dense N x N boolean matrices, entry by entry from §5."""
    n_all, n = f.shape[0], u.shape[0]
    cos_f, cos_s = f @ f.T, s_m @ s_m.T
    g = torch.zeros(n_all, n_all, dtype=torch.bool)
    h = torch.zeros_like(g)
    dn = torch.zeros_like(g)
    for i in range(n_all):
        for j in range(n_all):
            if i == j:
                continue
            g[i, j] = bool(cos_f[i, j] > r[i]) or bool(cos_f[i, j] > r[j])
            h[i, j] = bool(cos_s[i, j] > r_m[i]) or bool(cos_s[i, j] > r_m[j])
            dn[i, j] = bool(g[i, j]) or bool(u[i % n, j] < rho)  # k(i) = i mod n: position of i in its image
    return g, h, dn


def naive_term(zz, g, h, dn, lam, tau, b, n):
    """Σ_rounds round loss for one of z / z_mix."""
    n_all = zz.shape[0]
    w = g.double() + lam * h.double()
    total = zz.new_zeros(())
    for rnd in range(b):
        losses, w_sums = [], []
        for i in range(rnd * n, (rnd + 1) * n):
            if not g[i].any():  # anchors with G_i empty are dropped
                continue
            x = torch.stack([zz[i] @ zz[j] / tau for j in range(n_all)])
            lse = torch.log(sum(torch.exp(x[k]) for k in range(n_all) if dn[i, k]))
            logp = x - lse
            w_sums.append(w[i].sum())
            losses.append(-(w[i] * logp).sum() / w[i].sum())
        if not losses:
            continue
        losses, w_sums = torch.stack(losses), torch.stack(w_sums)
        omega = w_sums / w_sums.mean()
        total = total + ((tau / 0.07) * losses * omega).mean()
    return total


def naive_hp_loss(f, s_m, z, z_mix, r, r_m, u, lam, tau, rho):
    b, n = z.shape[:2]
    flat = [x.reshape(b * n, -1) for x in (f, s_m, z, z_mix)]
    g, h, dn = naive_masks(flat[0], flat[1], r.reshape(-1), r_m.reshape(-1), u, rho)
    ghp = naive_term(flat[2], g, h, dn, lam, tau, b, n) / (2 * b)
    lhp = naive_term(flat[3], g, h, dn, lam, tau, b, n) / (2 * b)
    return ghp + lhp, ghp, lhp, (g, h, dn)


# ------------------------------------------------------------------ inputs
def unit(*shape, gen, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=dtype), dim=-1)


def make_inputs(seed=0, b=B, n=NP, c=C, d=D, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    f, s_m = unit(b, n, c, gen=gen, dtype=dtype), unit(b, n, d, gen=gen, dtype=dtype)
    z, z_mix = unit(b, n, d, gen=gen, dtype=dtype), unit(b, n, d, gen=gen, dtype=dtype)
    r = 0.55 + 0.45 * torch.rand(b, n, generator=gen, dtype=dtype)
    r_m = 0.3 + 0.6 * torch.rand(b, n, generator=gen, dtype=dtype)
    u = torch.rand(n, b * n, generator=gen, dtype=dtype)
    return dict(f=f, s_m=s_m, z=z, z_mix=z_mix, r=r, r_m=r_m), u


def leaves(inputs):
    out = dict(inputs)
    out["z"] = inputs["z"].clone().requires_grad_(True)
    out["z_mix"] = inputs["z_mix"].clone().requires_grad_(True)
    return out


# ------------------------------------------------------------------ loss value and gradients
def test_inputs_exercise_every_case():
    """The random inputs hit every branch of §5, so the comparisons below mean something."""
    inputs, u = make_inputs()
    _, _, _, (g, h, dn) = naive_hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO)
    kept = g.any(dim=1)
    assert 0 < kept.sum() < len(kept)  # some anchors dropped, some kept
    assert (dn & ~g).any()  # random negatives from u
    assert (h & ~g).any() and (h & ~dn).any()  # H-only positives, some outside the contrast set
    assert (g & h).any()


def test_loss_matches_naive():
    inputs, u = make_inputs()
    out = hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO)
    loss, ghp, lhp, (g, h, _) = naive_hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.ghp_term, ghp, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.lhp_term, lhp, rtol=0, atol=1e-10)
    kept = g.any(dim=1)
    assert out.kept_anchors == pytest.approx(float(kept.double().mean()))
    assert out.positives_per_anchor == pytest.approx(float((g | h)[kept].sum(dim=1).double().mean()))


def test_gradients_match_naive():
    inputs, u = make_inputs(seed=1)
    ours, ref = leaves(inputs), leaves(inputs)
    hp_loss(**ours, u=u, lam=LAM, tau=TAU, rho=RHO).loss.backward()
    naive_hp_loss(**ref, u=u, lam=LAM, tau=TAU, rho=RHO)[0].backward()
    for key in ("z", "z_mix"):
        assert ref[key].grad.abs().max() > 1e-3
        torch.testing.assert_close(ours[key].grad, ref[key].grad, rtol=0, atol=1e-10)


def test_gradients_reach_a_projection_head():
    """The precomputed gradients chain into the modules that produced z and z_mix."""
    inputs, u = make_inputs(seed=2)
    s = torch.randn(B, NP, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    s_mix = s.roll(1, dims=1)
    grads = []
    for fn in (hp_loss, naive_hp_loss):
        proj = torch.nn.Linear(D, D, dtype=torch.float64)
        torch.nn.init.eye_(proj.weight)
        torch.nn.init.zeros_(proj.bias)
        z, z_mix = F.normalize(proj(s), dim=-1), F.normalize(proj(s_mix), dim=-1)
        args = {**inputs, "z": z, "z_mix": z_mix}
        out = fn(**args, u=u, lam=LAM, tau=TAU, rho=RHO)
        (out.loss if fn is hp_loss else out[0]).backward()
        grads.append(proj.weight.grad)
    assert grads[1].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)


def test_float32_matches_float64_naive():
    inputs, u = make_inputs(seed=4)
    out = hp_loss(**{k: v.float() for k, v in inputs.items()}, u=u.float(), lam=LAM, tau=TAU, rho=RHO)
    assert out.loss.dtype == torch.float32
    assert float(out.loss) == pytest.approx(float(naive_hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO)[0]), rel=1e-5)


def test_autocast_does_not_lower_the_precision():
    """Under mixed precision the loss still runs in float32 (§5: the reference's float16 is not copied)."""
    inputs, u = make_inputs(seed=14)
    inputs = {k: v.float() for k, v in inputs.items()}
    plain = hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO)
    assert mixed.loss.dtype == torch.float32
    assert float(mixed.loss) == float(plain.loss)


@pytest.mark.parametrize("tile", [1, 4, 6])
def test_tiles_equal_whole_rounds(tile):
    inputs, u = make_inputs(seed=5)
    whole, tiled = leaves(inputs), leaves(inputs)
    a = hp_loss(**whole, u=u, lam=LAM, tau=TAU, rho=RHO)
    b = hp_loss(**tiled, u=u, lam=LAM, tau=TAU, rho=RHO, anchor_tile=tile)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(tiled["z"].grad, whole["z"].grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(tiled["z_mix"].grad, whole["z_mix"].grad, rtol=0, atol=1e-12)
    assert (b.kept_anchors, b.positives_per_anchor) == (a.kept_anchors, a.positives_per_anchor)


def test_u_is_drawn_from_the_generator_once_per_call():
    inputs, _ = make_inputs(seed=6)
    drawn = hp_loss(**inputs, lam=LAM, tau=TAU, rho=RHO, generator=torch.Generator().manual_seed(9))
    u = torch.rand(NP, B * NP, generator=torch.Generator().manual_seed(9))
    given = hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO)
    assert float(drawn.loss) == float(given.loss)


def test_lambda_weights_task_specific_positives():
    """λ = 0 ignores H entirely: the loss equals the one with r_m so large that H is empty."""
    inputs, u = make_inputs(seed=7)
    no_h = {**inputs, "r_m": torch.full_like(inputs["r_m"], 2.0)}
    a = hp_loss(**inputs, u=u, lam=0.0, tau=TAU, rho=RHO)
    b = hp_loss(**no_h, u=u, lam=0.0, tau=TAU, rho=RHO)
    c = hp_loss(**inputs, u=u, lam=1.0, tau=TAU, rho=RHO)
    assert float(a.loss) == pytest.approx(float(b.loss), abs=1e-12)
    assert abs(float(c.loss) - float(a.loss)) > 1e-6


# ------------------------------------------------------------------ positive sets
def test_positive_masks_symmetric_without_anchor():
    inputs, _ = make_inputs(seed=8)
    x, r = inputs["f"].reshape(B * NP, C), inputs["r"].reshape(-1)
    rounds = []
    for b in range(B):
        anchors = torch.arange(b * NP, (b + 1) * NP)
        rounds.append(positive_masks(x[anchors], x, r[anchors], r, anchors))
    full = torch.cat(rounds)
    assert full.shape == (B * NP, B * NP)
    assert torch.equal(full, full.T)
    assert not full.diagonal().any()
    assert full.any() and not full.all()
    g, _, _ = naive_masks(x, x, r, r, torch.ones(NP, B * NP), 0.0)
    assert torch.equal(full, g)


def test_positive_mask_uses_either_criterion():
    """j ∈ G_i when only r_j is exceeded, and when only r_i is."""
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)  # cos(0,1) = 0.8
    r = torch.tensor([0.9, 0.5, 0.99], dtype=torch.float64)
    m = positive_masks(x, x, r, r, torch.arange(3))
    assert m[0, 1] and m[1, 0]  # 0.8 > r_1 = 0.5 although 0.8 < r_0 = 0.9
    assert not m[0, 2] and not m[2, 0]  # cos 0 below both
    assert m[1, 2] and m[2, 1]  # cos 0.6 > r_1 = 0.5 only
    tie = positive_masks(x, x, torch.full((3,), 0.6, dtype=torch.float64), torch.full((3,), 0.6, dtype=torch.float64),
                         torch.arange(3))
    assert tie[0, 1] and not tie[1, 2]  # strictly greater: cos(1, 2) = 0.6 = r is not a positive


# ------------------------------------------------------------------ dropped anchors
def dropping_inputs():
    """Image 1 and half of image 2 live in dims 0-1 with r = 1.5; the rest in dims 2-4 with r >= 0.05.

    Across the two groups cos = 0 < every r_j, within group A cos <= 1 < 1.5: group A has G_i empty.
    """
    inputs, u = make_inputs(seed=10)
    f = inputs["f"].clone()
    group_a = torch.zeros(B, NP, dtype=torch.bool)
    group_a[1] = True
    group_a[2, : NP // 2] = True
    f[group_a, 2:] = 0
    f[~group_a, :2] = 0
    f = F.normalize(f, dim=-1)
    r = torch.where(group_a, torch.full_like(inputs["r"], 1.5), 0.05 + 0.5 * inputs["r"].clamp(0, 1))
    return {**inputs, "f": f, "r": r}, u, group_a


@pytest.mark.parametrize("rho", [RHO, 0.0])
def test_dropped_anchors_match_naive_and_stay_finite(rho):
    inputs, u, group_a = dropping_inputs()
    ours, ref = leaves(inputs), leaves(inputs)
    out = hp_loss(**ours, u=u, lam=LAM, tau=TAU, rho=rho)
    loss, _, _, (g, _, _) = naive_hp_loss(**ref, u=u, lam=LAM, tau=TAU, rho=rho)
    assert not g[group_a.reshape(-1)].any()  # the construction did drop group A
    assert g[~group_a.reshape(-1)].any(dim=1).sum() >= 3
    out.loss.backward()
    loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(ours["z"].grad).all() and torch.isfinite(ours["z_mix"].grad).all()
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours["z"].grad, ref["z"].grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours["z_mix"].grad, ref["z_mix"].grad, rtol=0, atol=1e-10)
    assert out.kept_anchors == pytest.approx(float(g.any(dim=1).double().mean()))


def test_large_logits_take_the_row_max_out(monkeypatch):
    """At τ = 0.01 the logits reach 100, past float32's exp: the loss still matches the float64 naive one,
    and only because the row max is taken out first (without it the same call is not finite)."""
    inputs, u = make_inputs(seed=15)
    tau = 0.01
    want, _, _, _ = naive_hp_loss(**inputs, u=u, lam=LAM, tau=tau, rho=RHO)
    single = {k: v.float() for k, v in inputs.items()}
    got = hp_loss(**leaves(single), u=u.float(), lam=LAM, tau=tau, rho=RHO)
    assert float(got.loss.detach()) == pytest.approx(float(want), rel=1e-5)
    monkeypatch.setattr("pipeline.methods.hp.loss.SAFE_EXP", float("inf"))
    unshifted = hp_loss(**leaves(single), u=u.float(), lam=LAM, tau=tau, rho=RHO)
    assert not torch.isfinite(unshifted.loss)


def test_no_kept_anchor_gives_zero_loss():
    inputs, u = make_inputs(seed=11)
    out = hp_loss(**leaves({**inputs, "r": torch.full_like(inputs["r"], 1.5)}), u=u, lam=LAM, tau=TAU, rho=RHO)
    assert float(out.loss.detach()) == 0.0 and out.kept_anchors == 0.0 and out.positives_per_anchor == 0.0
    out.loss.backward()  # a zero gradient, not an error


# ------------------------------------------------------------------ memory: never an N x N matrix
class MaxNumel(TorchDispatchMode):
    """Largest output of any tensor op run under this mode."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("tile", [None, 4])
def test_peak_op_size_is_a_round_not_the_batch(tile):
    b, n, c, d = 16, 12, 5, 4
    inputs, u = make_inputs(seed=12, b=b, n=n, c=c, d=d, dtype=torch.float32)
    n_all = b * n
    ours = leaves(inputs)
    with MaxNumel() as mode:
        out = hp_loss(**ours, u=u, lam=LAM, tau=TAU, rho=RHO, anchor_tile=tile)
        out.loss.backward()
    rows = tile or n
    # a tile's (2, rows, N) logits of z and z_mix, the (N, D) rows, or the (n, N) draws u the caller hands in
    assert mode.max_numel <= max(2 * rows * n_all, n_all * max(c, d), n * n_all), (mode.max_numel, mode.op)
    assert mode.max_numel < n_all * n_all // 4


def test_graph_keeps_only_per_patch_gradients():
    """After the forward, the autograd graph holds the two (B, n, D) gradients, not B rounds of n x N tiles."""
    b, n = 16, 12
    inputs, u = make_inputs(seed=13, b=b, n=n, dtype=torch.float32)
    ours = leaves(inputs)
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = hp_loss(**ours, u=u, lam=LAM, tau=TAU, rho=RHO)
    alive = [tuple(t().shape) for t in saved if t() is not None]
    assert alive == [(b, n, D), (b, n, D)]
    out.loss.backward()


def test_shape_errors():
    inputs, u = make_inputs()
    with pytest.raises(ValueError, match="u must be"):
        hp_loss(**inputs, u=u[:, :-1], lam=LAM, tau=TAU, rho=RHO)
    with pytest.raises(ValueError, match="r="):
        hp_loss(**{**inputs, "r": inputs["r"][:, :-1]}, u=u, lam=LAM, tau=TAU, rho=RHO)


# ------------------------------------------------------------------ schedules
def test_lambda_ramp_boundaries():
    warmup, total = 50, 250
    assert lambda_at(0, warmup, total) == 0.0
    assert lambda_at(warmup, warmup, total) == 0.0
    assert lambda_at(warmup + 1, warmup, total) == pytest.approx(1 / (total - warmup))
    assert lambda_at(150, warmup, total) == pytest.approx(0.5)
    assert lambda_at(total, warmup, total) == 1.0
    assert lambda_at(10, 1000, 20) == 0.0  # warmup longer than the run: λ stays 0


def test_renews_at_every_interval_but_not_at_zero():
    hits = [i for i in range(61) if renews_at(i, 20)]
    assert hits == [20, 40, 60]
    assert not renews_at(0, 1) and renews_at(1, 1)
    with pytest.raises(ValueError):
        renews_at(5, 0)
