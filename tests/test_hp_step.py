"""One HP training step (pipeline/methods/hp/step.py) against a naive float64 recomputation from docs/hp.md §2-§5.

The dropout masks are the only randomness a recomputation cannot know in advance: they are recorded through a
hook on the heads' Dropout2d and replayed; the uniform contrast mask u comes from a clone of the step's generator.
"""

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.hp.pool import PoolIndex
from pipeline.methods.hp.step import HPHeads, Pools, StepSettings, training_step
from tests.test_hp_loss import naive_hp_loss

pytestmark = pytest.mark.usefixtures("one_thread")
B, C, D, H, W = 2, 6, 4, 3, 4
OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # docs/hp.md §1: the 3x3 window, row-major


def conv1x1(x, conv):
    """(B, C, h, w) through a 1x1 conv, written out: out[b, o, y, x] = Σ_c w[o, c] x[b, c, y, x] + bias[o]."""
    w, bias = conv.weight.double()[:, :, 0, 0], conv.bias.double()
    return torch.einsum("oc,bcyx->boyx", w, x) + bias[None, :, None, None]


def naive_S(head, drop_1, drop_2):
    """§2: S(f) = L1(drop(f)) + L3(relu(L2(drop(f)))), one dropout mask per branch."""
    l2, l3 = head.cluster2[0], head.cluster2[2]
    return conv1x1(drop_1, head.cluster1[0]) + conv1x1(torch.relu(conv1x1(drop_2, l2)), l3)


def naive_mix(s, lhp):
    """§3: s_mix_i = (1/|W_i|) Σ_{j in W_i} a_ij s_j, windows clipped at the border."""
    out = torch.zeros_like(s)
    for b in range(s.shape[0]):
        for y in range(H):
            for x in range(W):
                inside = [(k, y + dy, x + dx) for k, (dy, dx) in enumerate(OFFSETS)
                          if 0 <= y + dy < H and 0 <= x + dx < W]
                out[b, :, y, x] = sum(lhp[b, y, x, k].double() * s[b, :, yy, xx] for k, yy, xx in inside) / len(inside)
    return out


def assert_dropout_of(recorded, source, p):
    """`recorded` is Dropout2d(p) of `source`: whole channels zeroed per image, the rest scaled by 1/(1-p)."""
    kept = recorded.abs().flatten(2).amax(2) > 0  # (B, C): channel kept
    torch.testing.assert_close(recorded, kept[:, :, None, None] * source.double() / (1 - p), rtol=1e-5, atol=1e-6)


def test_training_step_matches_a_naive_recomputation():
    torch.manual_seed(3)
    heads = HPHeads(C, D, dropout=0.3).train()
    with torch.no_grad():  # S_m a little different from S, as after some training
        for p in heads.S_m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    f, f_aug = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    lhp = torch.rand(B, H, W, 9)
    pool_ag, pool_sp = F.normalize(torch.randn(5, C), dim=1), F.normalize(torch.randn(5, D), dim=1)
    pools = Pools(PoolIndex(pool_ag, "torch"), PoolIndex(pool_sp, "torch"))
    settings, lam = StepSettings(tau=0.6, rho=0.4, alpha=0.05), 0.3
    generator = torch.Generator().manual_seed(11)
    u_generator = torch.Generator().manual_seed(11)

    drops = []  # every Dropout2d draw of the step, in call order
    heads.drop.register_forward_hook(lambda module, args, out: drops.append(out.detach().double()))
    out = training_step(heads, f, f_aug, lhp, pools, lam, settings, generator)

    # the step draws, in order: mining f; S(f) x2; S(f_aug) x2; S_m(f) x2 and S_m's output; the LHP mix
    f_mine_d, s1, s2, a1, a2, m1, m2, s_m_d, mix_d = drops
    f_mine = F.normalize(f_mine_d, dim=1)
    s, s_aug = naive_S(heads.S, s1, s2), naive_S(heads.S, a1, a2)
    # the recorded draws are dropouts of what the spec says they drop
    for recorded, source in ((f_mine_d, f), (s1, f), (s2, f), (a1, f_aug), (a2, f_aug), (m1, f), (m2, f)):
        assert_dropout_of(recorded, source, 0.3)
    assert_dropout_of(s_m_d, naive_S(heads.S_m, m1, m2), 0.3)  # §2: S_m's output is dropped out once more
    assert_dropout_of(mix_d, naive_mix(s, lhp), 0.3)  # §3: the LHP mix is dropped out too
    s_m = F.normalize(s_m_d, dim=1)
    proj = lambda x: F.normalize(conv1x1(x, heads.P.proj), dim=1)  # noqa: E731  §2: z = normalize(P(s))
    z, z_aug, z_mix = proj(s), proj(s_aug), proj(mix_d)
    flat = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731  (B, n, ·)
    r = (flat(f_mine) @ pool_ag.double().T).amax(-1)  # §4: r_i = max_p cos(f_i, Pool_ag_p)
    r_m = (flat(s_m) @ pool_sp.double().T).amax(-1)
    u = torch.rand((H * W, B * H * W), generator=u_generator).double()  # §5: one u per loss call
    l_hp, _, _, _ = naive_hp_loss(flat(f_mine), flat(s_m), flat(z), flat(z_mix), r, r_m, u, lam, settings.tau,
                                  settings.rho)
    consistency = (z - z_aug).norm(dim=1).mean()  # §5
    expected = l_hp + settings.alpha * consistency
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.codes.double(), s, rtol=1e-5, atol=1e-6)  # what the online probes see
    assert out.terms["consistency"] == pytest.approx(float(consistency.detach()), rel=1e-5)
