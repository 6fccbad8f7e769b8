"""HCL heads, loss, MoGoClustering and the overclustering protocol (docs/hcl.md §2-§5) vs naive computations."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation.metrics import remap_confusion, scores
from pipeline.evaluation.overcluster import (
    many_to_one_match,
    nearest_resize,
    overcluster_maps,
    overcluster_scores,
    standardize_pca,
)
from pipeline.methods.hcl.heads import HCLModel
from pipeline.methods.hcl.loss import hcl_loss, prototype_loss
from pipeline.methods.hcl.mogo import (
    MAX_POINTS_PER_CENTROID,
    MemoryBank,
    kmeans_centroids,
    kmeans_seed,
    nearest_l2,
    sample_tokens,
    unit_rows,
)
from pipeline.methods.hcl.step import param_groups


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _naive_proto(q, k, raw, tau):
    """Per token: a(i) = the raw centroid nearest to k_i in L2 by brute force; dense softmax over the normalized
    centroids written out (docs/hcl.md §4)."""
    unit = [[x / math.sqrt(sum(y * y for y in c)) for x in c] for c in raw]
    terms = []
    for qi, ki in zip(q.tolist(), k.tolist(), strict=True):
        a = min(range(len(raw)), key=lambda j: sum((x - y) ** 2 for x, y in zip(ki, raw[j], strict=True)))
        e = [math.exp(sum(x * y for x, y in zip(qi, cj, strict=True)) / tau) for cj in unit]
        terms.append(-math.log(e[a] / sum(e)))
    return sum(terms) / len(terms)


def _forms(raw):
    return {"raw": raw, "unit": F.normalize(raw, dim=-1)}


def _raw(k, d, seed):
    """Raw k-means-like centroids: means of unit vectors, so norms spread well below 1."""
    g = torch.Generator().manual_seed(seed)
    return _unit(k, d, seed=seed) * (0.2 + 0.8 * torch.rand(k, 1, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("tau", [0.07, 0.5, None])
def test_hcl_loss_matches_naive(tau):
    """τ = 0.5 checks that both kinds get the τ passed in; None, that the default is the paper's 0.07."""
    d, n = 6, 2 * 9
    q, k = _unit(2, 9, d, seed=1), _unit(2, 9, d, seed=2)
    pred = torch.randn(2, 9, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fg = torch.rand(2, 9, generator=torch.Generator().manual_seed(4)) > 0.5
    c_fg, c_bg = _raw(5, d, seed=5), _raw(7, d, seed=6)
    q.requires_grad_(True)
    k.requires_grad_(True)
    if tau is None:
        out, tau = hcl_loss(q, k, pred, fg, _forms(c_fg), _forms(c_bg)), 0.07
    else:
        out = hcl_loss(q, k, pred, fg, _forms(c_fg), _forms(c_bg), tau)

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


def test_nearest_l2_equals_bruteforce():
    q, c = _unit(200, 16, seed=7).float(), _raw(30, 16, seed=8).float()
    want = torch.cdist(q.double(), c.double()).argmin(1)
    assert torch.equal(nearest_l2(q, c), want)
    assert not torch.equal(want, (q @ F.normalize(c, dim=-1).T).argmax(1))  # the raw norms matter here


def test_nearest_l2_casts_float32_centroids_to_float64_queries():
    """kmeans_centroids' float32 centroids meet float64 queries: nearest_l2 casts them itself, same argmin as cdist."""
    q, c = _unit(100, 6, seed=21), _raw(9, 6, seed=22).float()
    assert torch.equal(nearest_l2(q, c), torch.cdist(q, c.double()).argmin(1))


def test_positive_is_the_l2_nearest_raw_centroid_not_the_ip_nearest_unit_one():
    """docs/hcl.md §4: a(i) from the raw centroids in L2. Hand-made: c0 points at k but is short, c1 is a little
    off k's direction but has unit norm, so IP-to-unit picks c0 and L2-to-raw picks c1."""
    k = torch.tensor([[1.0, 0.0]])
    raw = torch.tensor([[0.1, 0.0], [0.8, 0.6]])
    unit = F.normalize(raw, dim=-1)
    assert (k @ unit.T).argmax(1).item() == 0 and torch.cdist(k, raw).argmin(1).item() == 1  # they disagree
    assert nearest_l2(k, raw).item() == 1
    q = torch.tensor([[0.0, 1.0]])  # logits exp(0/τ), exp(0.6/τ): the positive's choice changes the loss
    tau = 0.07
    logits = torch.exp(q @ unit.T / tau)[0]
    got = prototype_loss(q, k, raw, unit, tau)
    assert got.item() == pytest.approx(-math.log(logits[1] / logits.sum()), rel=1e-6)
    assert got.item() != pytest.approx(-math.log(logits[0] / logits.sum()), rel=1e-3)


def test_prototype_loss_casts_float32_centroids_to_the_queries_and_defaults_to_tau_0_07():
    """kmeans_centroids gives float32 centroids (torch.from_numpy) while q may be float64: they follow q's dtype.
    Without τ, the paper's 0.07."""
    q, k = _unit(12, 5, seed=11), _unit(12, 5, seed=12)
    raw = _raw(4, 5, seed=13).float()
    got = prototype_loss(q, k, raw, F.normalize(raw, dim=-1))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_naive_proto(q, k, raw.tolist(), 0.07), abs=1e-5)


def test_no_tokens_of_a_kind_gives_zero_and_keeps_the_graph():
    """An all-foreground batch has no background term: 0 (not the NaN of a mean over nothing), still differentiable,
    and the total is then 0.5 L_fg + 0.5 L_pred."""
    q = torch.zeros(0, 4, requires_grad=True)
    got = prototype_loss(q, torch.zeros(0, 4), torch.eye(4)[:3], torch.eye(4)[:3])
    assert got.item() == 0.0 and got.requires_grad
    got.backward()
    assert q.grad is not None and q.grad.shape == (0, 4)
    q, k, pred = _unit(2, 3, 4, seed=14).float(), _unit(2, 3, 4, seed=15).float(), _unit(2, 3, 4, seed=16).float()
    c = _forms(_raw(3, 4, seed=17).float())
    out = hcl_loss(q, k, pred, torch.ones(2, 3, dtype=torch.bool), c, c)
    assert out["bg"].item() == 0.0 and math.isfinite(out["fg"].item()) and out["fg"].item() > 0
    assert out["loss"].item() == pytest.approx(0.5 * out["fg"].item() + 0.5 * out["pred"].item(), rel=1e-6)


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


@pytest.mark.parametrize(("n", "fraction", "m"),
                         [(10, 0.01, 1), (10, 0.26, 3), (10, 1.0, 10), (10, 2.0, 10), (1, 0.3, 1), (0, 0.3, 0)])
def test_sample_tokens_count(n, fraction, m):
    """round(fraction · n) tokens, at least one when the image has any of the kind, at most all of them."""
    tokens = torch.arange(20.0)[:, None].repeat(1, 3)
    out = sample_tokens(tokens, torch.arange(20) < n, fraction, torch.Generator().manual_seed(0))
    assert out.shape == (m, 3) and (out[:, 0] < n).all() and len(set(out[:, 0].tolist())) == m


def test_sample_tokens_grid_seeded_on_the_cpu():
    """An (h, w, d) grid with an (h, w) mask works like its flattened tokens; the same seed draws the same tokens
    (a resumed run resamples exactly), another seed others; the draw stays on the CPU whatever the default device
    (the generator is a CPU one)."""
    tokens = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(30) % 3 != 0).reshape(6, 5)
    flat = tokens.reshape(30, 4)[mask.reshape(30)]  # 20 tokens
    draw = lambda seed: sample_tokens(tokens, mask, 0.5, torch.Generator().manual_seed(seed))  # noqa: E731
    a = draw(0)
    assert a.shape == (10, 4)
    where = (a[:, None] == flat[None]).all(-1)  # (10, 20): which masked token each sampled row is
    assert (where.sum(1) == 1).all() and (where.sum(0) <= 1).all()  # masked tokens, none twice
    assert torch.equal(a, draw(0)) and not torch.equal(a, draw(1))
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        assert torch.equal(sample_tokens(tokens, mask, 0.5, g), a)


def test_memory_bank_replace_draws_distinct_slots_and_rows():
    """round(fraction · n) distinct slots (0.49 · 40 -> 20) get as many distinct rows of x (all of x when it has
    fewer or exactly that many); torch and float64 input is stored as float32."""
    for fraction, rows, changed in ((0.5, 20, 20), (0.5, 60, 20), (0.5, 7, 7), (0.25, 60, 10), (0.49, 60, 20)):
        x1 = 1 + np.arange(rows * 3, dtype=np.float64).reshape(rows, 3)  # distinct non-zero rows
        bank = MemoryBank(seed=5, replace_fraction=fraction)
        bank.fill(torch.zeros(40, 3, dtype=torch.float64, requires_grad=True))
        assert bank.data.dtype == np.float32 and not bank.data.any()
        bank.replace(torch.from_numpy(x1))
        assert bank.data.dtype == np.float32
        new = {tuple(r) for r in bank.data[bank.data.any(1)].tolist()}
        assert len(new) == (bank.data.any(1)).sum() == changed
        assert new <= {tuple(r) for r in x1.tolist()}
        if rows <= 20:
            assert new == {tuple(r) for r in x1.tolist()}


def test_memory_bank_defaults_and_update_paths():
    """Default seed 0; update fills at epoch 0 (over an existing bank too) and at a later epoch when the bank is
    empty (a run resumed without bank state), replaces otherwise; replace before any fill is an error."""
    x0 = np.arange(40, dtype=np.float32).reshape(10, 4)
    x1 = -1 - np.arange(48, dtype=np.float32).reshape(12, 4)
    a, b = MemoryBank(), MemoryBank(seed=0)
    for bank in (a, b):
        bank.update(x0, epoch=0)
        bank.update(x1, epoch=1)
    np.testing.assert_array_equal(a.data, b.data)
    fresh = MemoryBank()
    with pytest.raises(ValueError):
        fresh.replace(x0)
    assert fresh.data is None
    out = fresh.update(x1, epoch=3)
    assert out is fresh.data
    np.testing.assert_array_equal(out, x1)
    np.testing.assert_array_equal(fresh.update(x0, epoch=0), x0)


def test_memory_bank_state_dict_round_trip_through_a_checkpoint():
    """A resumed run continues exactly: rows and generator survive torch.save / torch.load(weights_only=True), the
    restored bank's next updates equal the original's, and training on never alters the loaded state."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((30, 4)).astype(np.float32) for _ in range(4)]
    bank = MemoryBank(seed=3)
    bank.update(xs[0], 0)
    bank.update(xs[1], 1)
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert isinstance(state["data"], torch.Tensor) and state["data"].dtype == torch.float32
    saved = state["data"].clone()
    restored = MemoryBank(seed=99)
    restored.load_state_dict(state)
    assert restored.data.dtype == np.float32
    np.testing.assert_array_equal(restored.data, bank.data)
    for epoch in (2, 3):
        np.testing.assert_array_equal(restored.update(xs[epoch], epoch), bank.update(xs[epoch], epoch))
    assert torch.equal(state["data"], saved)
    empty = MemoryBank(seed=1).state_dict()  # before the first MoGo pass
    assert empty["data"] is None
    restored.load_state_dict(empty)
    assert restored.data is None
    np.testing.assert_array_equal(restored.update(xs[0], 5), xs[0])
    again = MemoryBank(seed=1)
    again.fill(xs[0])
    for epoch in (6, 7):  # the empty bank's generator came along
        np.testing.assert_array_equal(restored.update(xs[epoch - 5], epoch), again.update(xs[epoch - 5], epoch))


def test_kmeans_centroids_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:4] * 10
    x = np.concatenate([c + 0.1 * rng.standard_normal((50, 8)).astype(np.float32) for c in centres])
    raw, unit = kmeans_centroids(x, k=4, iterations=20, min_points=10, seed=0)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(np.sort(np.linalg.norm(raw, axis=1)), 10.0, rtol=0.01)  # raw: the cluster means
    cos = (centres / 10) @ unit.T
    assert (cos.max(1) > 0.99).all() and sorted(cos.argmax(1)) == [0, 1, 2, 3]
    again = kmeans_centroids(x, k=4, iterations=20, min_points=10, seed=0)
    np.testing.assert_array_equal(raw, again[0])
    np.testing.assert_array_equal(unit, again[1])


def _lloyd(x: np.ndarray, init: np.ndarray, iterations: int) -> np.ndarray:
    """Plain float64 Lloyd's k-means from given centroids: assign to the L2-nearest, move to the mean."""
    c = init.astype(np.float64)
    for _ in range(iterations):
        a = ((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]).argmin(1)
        c = np.stack([x[a == j].mean(0) for j in range(len(c))])
    return c


def test_kmeans_clusters_a_200k_bank_whole():
    """docs/hcl.md §3: max_points_per_centroid = 10M, so a bank above 256·K points is not subsampled. faiss with
    0 iterations gives its initial centroids; Lloyd's in float64 over all 200k points from there is the answer."""
    import faiss

    x = np.random.default_rng(0).standard_normal((200_000, 4)).astype(np.float32)
    k, iterations, seed = 3, 4, kmeans_seed(7, 0)
    init, _ = kmeans_centroids(x, k, iterations=0, min_points=1, seed=seed)
    assert all((x == row).all(1).any() for row in init)  # initial centroids are bank points
    raw, _ = kmeans_centroids(x, k, iterations=iterations, min_points=1, seed=seed)
    want = _lloyd(x.astype(np.float64), init, iterations)
    np.testing.assert_allclose(raw, want, atol=1e-4)
    default = faiss.Kmeans(4, k, niter=iterations, seed=seed, min_points_per_centroid=1, verbose=False)
    default.train(x)  # faiss's default max_points_per_centroid = 256: clusters 768 of the 200k points
    assert np.abs(default.centroids - want).max() > 0.05
    assert MAX_POINTS_PER_CENTROID * k >= 10 * len(x)


def test_unit_rows_small_norms_and_zero_rows():
    """Every nonzero row, however short, is divided by its own norm; a zero row stays zero (no NaN)."""
    c = np.array([[0.0, 0.0, 0.0], [3e-4, 0.0, 4e-4], [0.3, 0.4, 0.0], [1.0, 2.0, 2.0]])
    want = [[0.0, 0.0, 0.0], [0.6, 0.0, 0.8], [0.6, 0.8, 0.0], [1 / 3, 2 / 3, 2 / 3]]
    np.testing.assert_allclose(unit_rows(c), want, rtol=1e-12, atol=0)


def test_kmeans_centroids_defaults_and_float32_outputs():
    """Defaults (docs/hcl.md §3): k = 500, 20 iterations from seed 0's initial centroids (checked against
    float64 Lloyd's: 19 or 21 iterations land elsewhere), min_points 100; both outputs float32."""
    x = np.random.default_rng(0).standard_normal((600, 2)).astype(np.float32)
    assert kmeans_centroids(x, iterations=0, min_points=1)[0].shape == (500, 2)
    x = np.random.default_rng(2).uniform(size=(3000, 2)).astype(np.float32) * 0.1  # raw norms < 1
    init, _ = kmeans_centroids(x, 12, iterations=0, min_points=1, seed=0)
    raw, unit = kmeans_centroids(x, 12)
    assert raw.dtype == np.float32 and unit.dtype == np.float32
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(raw, _lloyd(x64, init, 20), atol=1e-6)
    assert all(np.abs(raw - _lloyd(x64, init, n)).max() > 1e-4 for n in (19, 21))
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)


def test_kmeans_centroids_min_points_warning(capfd):
    """min_points is faiss's min_points_per_centroid: below k·min_points points faiss warns (on stderr).
    Default 100, so 200 points for k = 2 pass and 199 warn; an explicit 60 silences 150 points, and 80 does not
    (faiss's own default, 39, would silence both)."""
    x = np.random.default_rng(3).standard_normal((200, 3)).astype(np.float32)
    cases = [(x, {}, False), (x[:199], {}, True), (x[:150], {"min_points": 60}, False),
             (x[:150], {"min_points": 80}, True)]
    for data, kw, warns in cases:
        capfd.readouterr()
        kmeans_centroids(data, 2, iterations=1, **kw)
        assert ("please provide at least" in capfd.readouterr().err) == warns, (len(data), kw)


def test_kmeans_seed_changes_per_epoch_and_reproduces():
    seeds = [kmeans_seed(7, epoch) for epoch in range(10)]
    assert len(set(seeds)) == 10 and seeds == [kmeans_seed(7, epoch) for epoch in range(10)]
    assert kmeans_seed(8, 0) not in seeds and all(0 <= s < 2**31 for s in seeds)
    spread = [kmeans_seed(0, epoch) for epoch in range(64)]  # the whole C-int range: some in its top half
    assert max(spread) >= 2**30 and min(spread) < 2**30
    x = np.random.default_rng(1).standard_normal((3000, 4)).astype(np.float32)
    run = lambda epoch: kmeans_centroids(x, 5, iterations=3, min_points=1, seed=kmeans_seed(7, epoch))[0]  # noqa: E731
    np.testing.assert_array_equal(run(1), run(1))  # a resumed epoch clusters exactly as before
    assert not np.array_equal(run(0), run(1))  # another epoch starts from other points


def test_head_init_trunc_normal_zero_bias_unit_norms_and_momentum_copy():
    """docs/hcl.md §4: head and projector Linears trunc_normal(0.02) with zero biases, LayerNorms (1, 0); the
    predictor keeps PyTorch's default init, as in the reference; the momentum copy starts equal."""
    torch.manual_seed(0)
    model = HCLModel(width=1536, dim=768, hidden=512, out_dim=64, num_heads=12)
    linears = [m for part in (model.head, model.projector) for m in part.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 + 4 + 3  # embed; qkv, proj, fc1, fc2; projector MLP
    for m in linears:
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
        assert m.weight.abs().max() <= 2.0
    big = model.head.embed.weight.detach().double()  # 768 x 1536: 1.2M draws
    assert big.mean().abs() < 1e-4 and big.std().item() == pytest.approx(0.02, rel=0.01)
    assert big.abs().max() > 3 * 0.02  # truncated at ±2 absolute as the reference, not at ±2 std
    fc1 = model.head.block.mlp.fc1.weight.detach().double()
    assert fc1.std().item() == pytest.approx(0.02, rel=0.01)
    norms = [m for m in model.head.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 4 and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)
    first = model.predictor.mlp[0]
    bound = 1 / math.sqrt(first.in_features)  # PyTorch's default: kaiming_uniform(a=√5) = U(±1/√fan_in)
    assert first.weight.abs().max() <= bound and first.weight.std().item() == pytest.approx(bound / math.sqrt(3),
                                                                                           rel=0.05)
    assert first.bias.abs().max() > 0
    for online, momentum in ((model.head, model.momentum_head), (model.projector, model.momentum_projector)):
        for (name, p), (_, pm) in zip(online.named_parameters(), momentum.named_parameters(), strict=True):
            assert torch.equal(p, pm), name


def test_every_trained_parameter_has_weight_decay():
    """docs/hcl.md §4: AdamW weight decay 0.04 on all parameters, biases and norms included."""
    model = HCLModel(width=48, dim=16, hidden=32, out_dim=8, num_heads=2)
    groups = param_groups(model, 0.04)
    assert all(g["weight_decay"] == 0.04 for g in groups)
    grouped = [p for g in groups for p in g["params"]]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trained)
    assert {id(p) for p in grouped} == {id(p) for p in trained}
    assert any(p.ndim == 1 for p in grouped)  # biases and LayerNorm parameters decay too
    momentum = {id(p) for part in (model.momentum_head, model.momentum_projector) for p in part.parameters()}
    assert not momentum & {id(p) for p in grouped}
    opt = torch.optim.AdamW(groups, lr=1e-3)
    bias = model.head.norm_in.bias
    with torch.no_grad():
        bias.fill_(1.0)
    bias.grad = torch.zeros_like(bias)
    for p in trained:
        if p is not bias:
            p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: only the decay moves it, by lr · wd
    torch.testing.assert_close(bias.detach(), torch.full_like(bias, 1.0 - 1e-3 * 0.04))


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
    assert out["pixel_acc_mean"] == pytest.approx(1.0) and out["miou_mean"] == pytest.approx(1.0)
    assert len(out["per_seed"]) == 2 and out["pixel_acc_std"] == pytest.approx(0.0)
    noise = overcluster_scores(rng.standard_normal((600, 16)), labels, n_classes=4, k=6, pca=8, seeds=(0,))
    assert noise["pixel_acc_mean"] < 0.6


def test_nearest_resize_matches_torch_nearest():  # floor index, as the reference resizes (docs/hcl.md §5)
    maps = np.random.default_rng(1).integers(0, 50, size=(3, 7, 9))
    for size in (4, 7, 100):
        expected = F.interpolate(torch.from_numpy(maps)[:, None].double(), size=(size, size), mode="nearest")
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
    assert out["pixel_acc_mean"] == pytest.approx(1.0) and out["miou_mean"] == pytest.approx(1.0)
    assert out["k"] == 5 and out["size"] == 12 and len(out["per_seed"]) == 2
    capped = overcluster_maps(features[:1, :2, :2], pixel_labels[:1], n_classes=3, k=500, pca=4, seeds=(0,))
    assert capped["k"] == 4  # K capped at the number of patches


def test_hcl_loss_stays_finite_and_float32_under_float16_autocast():
    """exp(q·c/τ) overflows float16 (e^14.3 > 65,504): the loss must not run in half precision."""
    q = torch.ones(4, 8) / math.sqrt(8)
    centroids = {"raw": q[:2].half(), "unit": q[:2].half()}  # q·c = 1 for both: exp(1/0.07) = 1.6e6 per term
    mask = torch.tensor([True, True, False, False])
    with torch.autocast("cpu", dtype=torch.float16):
        out = hcl_loss(q.half(), q.half(), q.half(), mask, centroids, centroids, tau=0.07)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert out["fg"].item() == pytest.approx(math.log(2), abs=1e-3)  # two equal logits
