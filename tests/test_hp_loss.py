"""L_hp (docs/hp.md §5) against a naive dense implementation written from the spec alone, plus the schedules."""

import math
import re
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


def assert_matches_naive(out, inputs, u):
    """The loss, its two terms and the reported counts equal the naive float64 computation's."""
    loss, ghp, lhp, (g, h, _) = naive_hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO)
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.ghp_term, ghp, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.lhp_term, lhp, rtol=0, atol=1e-10)
    kept = g.any(dim=1)
    assert out.kept_anchors == pytest.approx(float(kept.double().mean()))
    assert out.positives_per_anchor == pytest.approx(float((g | h)[kept].sum(dim=1).double().mean()))


def test_loss_matches_naive():
    inputs, u = make_inputs()
    out = hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO)
    assert out.loss.dtype == torch.float64
    assert_matches_naive(out, inputs, u)


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


def test_autocast_rounds_the_products_only():
    """Under autocast (train.amp) the products take bf16 operands, as autocast runs a matmul, and the rest stays in
    float32 (§5: the weights, the log-sum-exp and the sums; the reference's float16 `w` is not copied): the loss and
    its gradients come back in float32, near the float64 loss of the same inputs rounded to bf16, and not equal to
    the float32 loss (the products really were rounded)."""
    inputs, u = make_inputs(seed=14)
    inputs = {k: v.float() for k, v in inputs.items()}
    plain, mixed = leaves(inputs), leaves(inputs)
    fp32 = hp_loss(**plain, u=u, lam=LAM, tau=TAU, rho=RHO)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = hp_loss(**mixed, u=u, lam=LAM, tau=TAU, rho=RHO)
    assert bf16.loss.dtype == torch.float32 and float(bf16.loss.detach()) != float(fp32.loss.detach()) != 0
    rounded = {k: v.bfloat16().double() for k, v in inputs.items()}
    naive = float(naive_hp_loss(**rounded, u=u.double(), lam=LAM, tau=TAU, rho=RHO)[0])
    assert float(bf16.loss.detach()) == pytest.approx(naive, rel=2e-3)
    assert float(fp32.loss.detach()) == pytest.approx(naive, rel=2e-3)
    fp32.loss.backward()
    bf16.loss.backward()
    for key in ("z", "z_mix"):
        assert mixed[key].grad.dtype == torch.float32
        cosine = F.cosine_similarity(mixed[key].grad.flatten(), plain[key].grad.flatten(), dim=0)
        assert float(cosine) > 0.98, key


@pytest.mark.filterwarnings("error")  # e.g. an `out=` block of the wrong shape, resized with a warning
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
    loss, _, _, (g, h, _) = naive_hp_loss(**ref, u=u, lam=LAM, tau=TAU, rho=rho)
    assert not g[group_a.reshape(-1)].any()  # the construction did drop group A
    assert g[~group_a.reshape(-1)].any(dim=1).sum() >= 3
    out.loss.backward()
    loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(ours["z"].grad).all() and torch.isfinite(ours["z_mix"].grad).all()
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours["z"].grad, ref["z"].grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours["z_mix"].grad, ref["z_mix"].grad, rtol=0, atol=1e-10)
    kept = g.any(dim=1)
    assert out.kept_anchors == pytest.approx(float(kept.double().mean()))
    # image 1 keeps no anchor: its empty round adds no positives either
    assert out.positives_per_anchor == pytest.approx(float((g | h)[kept].sum(dim=1).double().mean()))


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
    """The messages name every shape, and the u one the (n, N) it wanted."""
    inputs, u = make_inputs()
    with pytest.raises(ValueError, match=re.escape(f"u must be (n, N) = {(NP, B * NP)}, got {(NP, B * NP - 1)}")):
        hp_loss(**inputs, u=u[:, :-1], lam=LAM, tau=TAU, rho=RHO)
    shapes = f"f={(B, NP)}, s_m={(B, NP)}, z_mix={(B, NP, D)}, r={(B, NP - 1)}, r_m={(B, NP)}"
    with pytest.raises(ValueError, match=re.escape(f"hp_loss: z is {(B, NP, D)} (B, n, D) but {shapes}")):
        hp_loss(**{**inputs, "r": inputs["r"][:, :-1]}, u=u, lam=LAM, tau=TAU, rho=RHO)


@pytest.mark.parametrize("bad", ["f 4-d", "f 2-d", "s_m 4-d", "z and z_mix 4-d", "z_mix", "r_m"])
def test_each_wrong_shape_is_refused(bad):
    """Each input of the wrong rank or size is refused, also when its first two sizes are (B, n) (a rank-4 f would
    otherwise be flattened into the rows without complaint)."""
    inputs, u = make_inputs()
    wrong = {"f 4-d": {"f": inputs["f"][..., None]}, "f 2-d": {"f": inputs["f"][..., 0]},
             "s_m 4-d": {"s_m": inputs["s_m"][..., None]},
             "z and z_mix 4-d": {"z": inputs["z"][..., None], "z_mix": inputs["z_mix"][..., None]},
             "z_mix": {"z_mix": inputs["z_mix"][..., :-1]}, "r_m": {"r_m": inputs["r_m"][:-1]}}[bad]
    with pytest.raises(ValueError, match="hp_loss: z is"):
        hp_loss(**{**inputs, **wrong}, u=u, lam=LAM, tau=TAU, rho=RHO)


# ------------------------------------------------------------------ options, dtypes and devices
@pytest.mark.parametrize("tile", [1, 4])
def test_tiles_without_gradients_match_naive(tile):
    """A forward-only call (evaluation) with several tiles per round, 6 = 4 + 2 included, against the naive loss."""
    inputs, u = make_inputs(seed=5)
    out = hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO, anchor_tile=tile)
    assert_matches_naive(out, inputs, u)


def test_anchor_tile_zero_is_whole_rounds_and_negative_is_refused():
    """anchor_tile = 0 means whole rounds, like None (the docstring's promise); a negative one is an error."""
    inputs, u = make_inputs(seed=5)
    whole = hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO)
    zero = hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO, anchor_tile=0)
    assert float(zero.loss) == float(whole.loss)
    with pytest.raises(ValueError, match="anchor_tile must be positive.*got -1"):
        hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO, anchor_tile=-1)


@pytest.mark.parametrize("key", ["z", "z_mix"])
def test_gradient_when_only_one_of_z_and_z_mix_needs_it(key):
    """A frozen z (or z_mix) still gives the other its full gradient."""
    inputs, u = make_inputs(seed=1)
    ours, ref = {**inputs, key: inputs[key].clone().requires_grad_(True)}, leaves(inputs)
    hp_loss(**ours, u=u, lam=LAM, tau=TAU, rho=RHO).loss.backward()
    naive_hp_loss(**ref, u=u, lam=LAM, tau=TAU, rho=RHO)[0].backward()
    assert ref[key].grad.abs().max() > 1e-3
    torch.testing.assert_close(ours[key].grad, ref[key].grad, rtol=0, atol=1e-10)


class OpNames(TorchDispatchMode):
    """The names of the tensor ops run under this mode."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_forward_only_calls_do_no_gradient_work():
    """Evaluation pays for no backward: without requires_grad, or under no_grad, no −m_ij (addcmul) and no
    gradient matmuls (addmm_) are computed; with gradients wanted they are (so the op names are the right ones)."""
    inputs, u = make_inputs(seed=5)
    calls = {}
    for case in ("plain", "no_grad", "grad"):
        args = inputs if case == "plain" else leaves(inputs)
        with OpNames() as mode, torch.set_grad_enabled(case != "no_grad"):
            hp_loss(**args, u=u, lam=LAM, tau=TAU, rho=RHO)
        calls[case] = mode.names
    assert {"addcmul", "addmm_"} <= calls["grad"]
    assert not {"addcmul", "addmm_"} & (calls["plain"] | calls["no_grad"])


def test_u_is_drawn_from_the_global_rng_without_a_generator():
    """Neither u nor a generator: u comes from torch's global generator, on the inputs' device."""
    inputs, _ = make_inputs(seed=6)
    with torch.random.fork_rng():
        torch.manual_seed(21)
        drawn = hp_loss(**inputs, lam=LAM, tau=TAU, rho=RHO)
        torch.manual_seed(21)
        u = torch.rand(NP, B * NP)
    given = hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=RHO)
    assert float(drawn.loss) == float(given.loss)


def test_random_negatives_need_u_strictly_below_rho():
    """§5: k is a random negative iff u < ρ; with u on a grid that hits ρ exactly, u = ρ must not count."""
    inputs, u = make_inputs(seed=16)
    u, rho = (u * 4).floor() / 4, 0.5  # u in {0, 0.25, 0.5, 0.75}
    out = hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=rho)
    want = naive_hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=rho)[0]
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-10)
    with_ties = naive_hp_loss(**inputs, u=u, lam=LAM, tau=TAU, rho=rho + 1e-9)[0]  # u <= ρ
    assert abs(float(with_ties) - float(want)) > 1e-3  # the ties do change the loss


def test_row_max_is_taken_per_row_for_long_vectors():
    """z of norm √(100τ) (logits up to 100, past float32's exp) next to unit z_mix (logits up to 1/τ): each row is
    shifted by its own max, so both terms match the float64 naive ones; one shift for the whole block would push
    every z_mix logit ~100 below it, into float32's underflow."""
    inputs, u = make_inputs(seed=17)
    gen = torch.Generator().manual_seed(17)
    clustered = F.normalize(1 + 0.5 * torch.randn(B, NP, D, generator=gen, dtype=torch.float64), dim=-1)
    inputs = {**inputs, "z": clustered * math.sqrt(100 * TAU)}  # cos > 0: every logit within 100 of its row max
    ref = leaves(inputs)
    _, ghp, lhp, _ = naive_hp_loss(**ref, u=u, lam=LAM, tau=TAU, rho=RHO)
    ours = leaves({k: v.float() for k, v in inputs.items()})
    out = hp_loss(**ours, u=u.float(), lam=LAM, tau=TAU, rho=RHO)
    assert float(out.ghp_term) == pytest.approx(float(ghp.detach()), rel=1e-5)
    assert float(out.lhp_term) == pytest.approx(float(lhp.detach()), rel=1e-5)
    out.loss.backward()
    (ghp + lhp).backward()
    for key in ("z", "z_mix"):
        torch.testing.assert_close(ours[key].grad.double(), ref[key].grad, rtol=1e-4, atol=1e-4)


def test_half_precision_inputs_are_computed_in_float32():
    """bfloat16 inputs (autocast outputs) are computed in float32 (§5: float32 or better) and their gradients are
    kept in bfloat16, the inputs' own dtype, in the graph."""
    inputs, u = make_inputs(seed=18)
    half = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    ours, ref = leaves(half), leaves({k: v.double() for k, v in half.items()})  # the same rounded values
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = hp_loss(**ours, u=u, lam=LAM, tau=TAU, rho=RHO)
    want = naive_hp_loss(**ref, u=u, lam=LAM, tau=TAU, rho=RHO)[0]
    assert out.loss.dtype == torch.float32
    assert float(out.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.bfloat16, (B, NP, D))] * 2
    out.loss.backward()
    want.backward()
    for key in ("z", "z_mix"):
        assert ours[key].grad.dtype == torch.bfloat16
        torch.testing.assert_close(ours[key].grad.double(), ref[key].grad, rtol=2e-2, atol=2e-3)


def test_loss_dtype_follows_the_inputs_not_the_default_dtype():
    """Under torch.set_default_dtype(float64), float32 inputs (with a round that keeps no anchor) still give a
    float32 loss, equal to the one made under the usual default."""
    inputs, u, _ = dropping_inputs()
    single = {k: v.float() for k, v in inputs.items()}
    plain = hp_loss(**single, u=u.float(), lam=LAM, tau=TAU, rho=RHO)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        under = hp_loss(**single, u=u.float(), lam=LAM, tau=TAU, rho=RHO)
    finally:
        torch.set_default_dtype(previous)
    assert under.loss.dtype == under.ghp_term.dtype == under.lhp_term.dtype == torch.float32
    assert float(under.loss) == float(plain.loss)


@pytest.mark.parametrize("draw", ["u", "generator", "global"])
@pytest.mark.parametrize("tile", [None, 4])
def test_own_tensors_follow_the_inputs_not_the_default_device(draw, tile):
    """Every tensor the loss makes itself (u, blocks, indices, sums) goes on the inputs' device: under a default
    device of 'meta' (standing in for a process that defaults to cuda), a CPU batch gives the same loss, counts
    and gradients. The inputs include a round that keeps no anchor."""
    inputs, u, _ = dropping_inputs()
    results = []
    for default in (None, "meta"):
        args = leaves(inputs)
        extra = {"u": u} if draw == "u" else {"generator": torch.Generator().manual_seed(3)} if draw == "generator" \
            else {}
        with torch.random.fork_rng():
            torch.manual_seed(4)
            if default is None:
                out = hp_loss(**args, lam=LAM, tau=TAU, rho=RHO, anchor_tile=tile, **extra)
            else:
                with torch.device(default):
                    out = hp_loss(**args, lam=LAM, tau=TAU, rho=RHO, anchor_tile=tile, **extra)
        out.loss.backward()
        results.append((float(out.loss.detach()), out.kept_anchors, out.positives_per_anchor, args["z"].grad,
                        args["z_mix"].grad))
    (loss, kept, positives, grad_z, grad_z_mix), meta = results
    assert meta[:3] == (loss, kept, positives)
    assert torch.equal(meta[3], grad_z) and torch.equal(meta[4], grad_z_mix)


class FreshBlocks(TorchDispatchMode):
    """Counts the tensors with `columns` columns that ops make afresh: not written into an `out=` block, not
    changed in place, not a view of another tensor."""

    def __init__(self, columns):
        super().__init__()
        self.columns, self.count = columns, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):
            for t in out if isinstance(out, tuple | list) else (out,):
                self.count += isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.columns
        return out


def test_scratch_blocks_are_made_once_per_call():
    """The (rows x N) blocks are made once per loss call and reused by every tile (the _Blocks docstring: a fresh
    block costs more than the work done on it): 18 tiles of one anchor make no more of them than 3 whole rounds."""
    inputs, u = make_inputs(seed=5)
    counts = []
    for tile in (None, 1):
        with FreshBlocks(B * NP) as mode:
            hp_loss(**leaves(inputs), u=u, lam=LAM, tau=TAU, rho=RHO, anchor_tile=tile)
        counts.append(mode.count)
    assert counts[0] == counts[1]


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


def test_shift_is_the_max_over_the_contrast_set_not_the_whole_row():
    """τ = 0.01, and each anchor's positives (its contrast set, ρ = 0) lie at 120° from it in z: their logits are
    −50 against the anchor's own 1/τ = 100. Shifted by the whole row's max, every exp(s_ik − shift) of Dn_i is
    exp(−150), below float32's smallest number: log 0, a loss of −inf. Shifted by Dn_i's max, it matches the float64
    naive loss, value and gradients."""
    b, n, d = 1, 6, 8
    group, direction = torch.arange(n) // 3, torch.arange(n) % 3  # f groups of three; three z directions each
    f = F.one_hot(group, d).double()[None]  # positives: the two others of one's f group, at 120° in z
    s_m = F.one_hot(torch.arange(n), d).double()[None]  # H: nobody else
    angle = 2 * math.pi * direction.double() / 3
    z = torch.zeros(b, n, d, dtype=torch.float64)
    z[0, :, 0], z[0, :, 1] = torch.cos(angle), torch.sin(angle)
    r = torch.full((b, n), 0.5, dtype=torch.float64)
    inputs, u = dict(f=f, s_m=s_m, z=z, z_mix=z.clone(), r=r, r_m=r.clone()), torch.rand(n, b * n, dtype=torch.float64)
    ref = leaves(inputs)
    want, _, _, _ = naive_hp_loss(**ref, u=u, lam=LAM, tau=0.01, rho=0.0)
    ours = leaves({k: v.float() for k, v in inputs.items()})
    got = hp_loss(**ours, u=u.float(), lam=LAM, tau=0.01, rho=0.0)
    assert torch.isfinite(got.loss) and float(got.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    got.loss.backward()
    want.backward()
    for key in ("z", "z_mix"):
        torch.testing.assert_close(ours[key].grad.double(), ref[key].grad, rtol=1e-4, atol=1e-4)
