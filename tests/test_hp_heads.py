"""HP heads (docs/hp.md §2) and the LHP mix (§3) against hand computations."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.extraction.lhp import WINDOW_OFFSETS
from pipeline.methods.hp.heads import ProjectionHead, SegmentationHead, ema_update, lhp_mix

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_weights(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    return conv.weight[:, :, 0, 0], conv.bias


def test_segmentation_head_is_l1_plus_l3_relu_l2():
    torch.manual_seed(0)
    head = SegmentationHead(6, 4)
    f = torch.randn(2, 6, 3, 5)
    (w1, b1), (w2, b2), (w3, b3) = (conv_weights(m) for m in (head.cluster1[0], head.cluster2[0], head.cluster2[2]))
    hidden = torch.relu(torch.einsum("oc,bchw->bohw", w2, f) + b2[:, None, None])
    expected = (torch.einsum("oc,bchw->bohw", w1, f) + b1[:, None, None]
                + torch.einsum("oc,bchw->bohw", w3, hidden) + b3[:, None, None])
    out = head(f)
    assert out.shape == (2, 4, 3, 5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_segmentation_head_loads_a_reference_state_dict():
    """The reference's cluster1 / cluster2 (nn.Sequential of 1x1 convs) load key for key."""
    reference = nn.Module()
    reference.cluster1 = nn.Sequential(nn.Conv2d(6, 4, (1, 1)))
    reference.cluster2 = nn.Sequential(nn.Conv2d(6, 6, (1, 1)), nn.ReLU(), nn.Conv2d(6, 4, (1, 1)))
    head = SegmentationHead(6, 4)
    head.load_state_dict(reference.state_dict(), strict=True)
    f = torch.randn(1, 6, 2, 2)
    torch.testing.assert_close(head(f), reference.cluster1(f) + reference.cluster2(f))


def test_projection_head_is_one_linear_layer_then_unit_norm():
    torch.manual_seed(1)
    head = ProjectionHead(4)
    s = torch.randn(2, 4, 3, 3) * 5
    z = head(s)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 3, 3))
    w, b = conv_weights(head.proj)
    expected = F.normalize(torch.einsum("oc,bchw->bohw", w, s) + b[:, None, None], dim=1)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)


def test_ema_update_follows_the_formula():
    torch.manual_seed(2)
    online = SegmentationHead(3, 2)
    ema = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before_ema = copy.deepcopy(ema.state_dict())
    before_online = copy.deepcopy(online.state_dict())
    m = 0.9
    ema_update(ema, online, m)
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(value, m * before_ema[name] + (1 - m) * before_online[name])
        assert not torch.equal(value, before_ema[name])
    for name, value in online.state_dict().items():
        assert torch.equal(value, before_online[name])  # the online head is untouched
    assert all(p.grad is None for p in online.parameters())


def test_ema_update_refuses_different_modules():
    with pytest.raises(ValueError, match="different parameters"):
        ema_update(SegmentationHead(3, 2), ProjectionHead(2), 0.5)


# ------------------------------------------------------------------ LHP mix
def naive_mix(s, weights):
    """s_mix_i = (1/|W_i|) Σ_{j∈W_i} a_ij s_j, looping over anchors and their in-image neighbours."""
    b, d, h, w = s.shape
    out = torch.zeros_like(s)
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                count = 0
                for k, (dy, dx) in enumerate(WINDOW_OFFSETS):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w:
                        count += 1
                        out[bi, :, y, x] += weights[bi, y, x, k] * s[bi, :, ny, nx]
                assert count == (4 if y in (0, h - 1) and x in (0, w - 1) else 6 if y in (0, h - 1) or x in (0, w - 1)
                                 else 9)
                out[bi, :, y, x] /= count
    return out


def test_lhp_mix_matches_naive_loop():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    weights = torch.rand(2, 4, 5, 9, generator=gen, dtype=torch.float64)  # non-zero also outside the image
    torch.testing.assert_close(lhp_mix(s, weights), naive_mix(s, weights), rtol=0, atol=1e-12)


def test_lhp_mix_divides_by_the_window_size():
    """With all weights 1 and s constant, s_mix = (#in-image neighbours)/|W_i| = 1 everywhere."""
    s = torch.ones(1, 2, 4, 4)
    mix = lhp_mix(s, torch.ones(1, 4, 4, 9))
    torch.testing.assert_close(mix, torch.ones_like(mix))


@pytest.mark.parametrize("anchor", [(2, 3), (0, 2), (0, 0)])
def test_lhp_mix_gradient_reaches_every_window_neighbour(anchor):
    h, w = 4, 5
    y0, x0 = anchor
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(1, 3, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.zeros(1, h, w, 9, dtype=torch.float64)
    weights[0, y0, x0] = 0.5 + torch.rand(9, generator=gen, dtype=torch.float64)
    lhp_mix(s, weights)[0, :, y0, x0].sum().backward()
    window = [(y0 + dy, x0 + dx, k) for k, (dy, dx) in enumerate(WINDOW_OFFSETS)
              if 0 <= y0 + dy < h and 0 <= x0 + dx < w]
    expected = torch.zeros(h, w, dtype=torch.float64)
    for y, x, k in window:
        expected[y, x] = weights[0, y0, x0, k] / len(window)
    assert len(window) in (9, 6, 4)
    assert torch.equal(s.grad[0].abs().sum(0) != 0, expected != 0)  # exactly the window positions
    torch.testing.assert_close(s.grad[0], expected.expand(3, h, w))


def test_lhp_mix_refuses_mismatched_weights():
    with pytest.raises(ValueError, match="do not match"):
        lhp_mix(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, 9))


def test_each_branch_of_S_and_S_m_draws_its_own_dropout_mask():
    """The reference computes cluster1(drop(f)) + cluster2(drop(f)): two masks per head call (§2)."""
    from pipeline.methods.hp.pool import PoolIndex
    from pipeline.methods.hp.step import HPHeads, Pools, StepSettings, training_step

    torch.manual_seed(0)
    b, c, h, w = 2, 16, 3, 3
    heads = HPHeads(c, 8, dropout=0.5).train()
    f, f_aug = torch.randn(b, c, h, w), torch.randn(b, c, h, w)
    calls = []  # (input, output) of every dropout draw in one step
    heads.drop.register_forward_hook(lambda module, args, out: calls.append((args[0].detach(), out.detach())))
    pools = Pools(PoolIndex(F.normalize(torch.randn(4, c), dim=1), "torch"),
                  PoolIndex(F.normalize(torch.randn(4, 8), dim=1), "torch"))
    lhp = torch.rand(b, h, w, 9)
    training_step(heads, f, f_aug, lhp, pools, 0.5, StepSettings(0.5, 0.5, 0.1), torch.Generator().manual_seed(0))
    masks_of = lambda x: [(out != 0).flatten(2).any(2) for inp, out in calls if torch.equal(inp, x)]  # noqa: E731
    on_f, on_aug = masks_of(f), masks_of(f_aug)
    assert len(on_f) == 5 and len(on_aug) == 2  # f: mining, S's two branches, S_m's two branches; f_aug: S's two
    distinct = {tuple(m.flatten().tolist()) for m in on_f}
    assert len(distinct) == 5  # five independent draws (equal masks: probability 2^-32 per pair)
    # S's output is the naive recomputation from its two recorded masks
    drop_1, drop_2 = [out for inp, out in calls if torch.equal(inp, f)][1:3]
    expected = heads.S.cluster1(drop_1) + heads.S.cluster2(drop_2)
    calls.clear()
    it = iter([drop_1, drop_2])
    torch.testing.assert_close(heads.S(f, lambda x: next(it)), expected)


def test_ema_uses_the_weights_from_before_each_optimizer_step():
    """The reference updates S_m inside the training forward, before the optimizer step (§2)."""
    from pipeline.methods.hp.step import HPHeads
    from pipeline.methods.hp.training import make_optimizers, optimize

    torch.manual_seed(0)
    heads = HPHeads(6, 4)
    opt_s, opt_p = make_optimizers(heads, {"lr": 0.1, "weight_decay": 0.0})
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    m, snapshots = 0.9, []
    for _ in range(2):
        snapshots.append({k: v.detach().clone() for k, v in heads.S.state_dict().items()})
        loss = heads.P(heads.S(torch.randn(2, 6, 3, 3))).pow(3).sum()
        optimize(heads, loss, opt_s, opt_p, scaler, grad_clip=10.0, ema_m=m)
    s0, s1 = snapshots
    for name, value in heads.S_m.state_dict().items():
        # step 1: m·S_0 + (1−m)·S_0 = S_0; step 2: m·S_0 + (1−m)·S_1 (S_1 = after the first step)
        torch.testing.assert_close(value, m * s0[name] + (1 - m) * s1[name], rtol=0, atol=1e-6)
        assert not torch.allclose(s1[name], heads.S.state_dict()[name])  # S did move in step 2
