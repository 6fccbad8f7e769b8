"""STEGO head and channel dropout (docs/stego.md §2) against naive float64 computations."""

import math

import pytest
import torch

from pipeline.methods.stego.head import StegoHead, channel_dropout


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_channel_dropout_zeroes_whole_planes_and_rescales():
    x = torch.rand(4, 256, 3, 5, generator=gen(1)) + 0.5  # strictly positive: a zero can only come from the mask
    p = 0.3
    out = channel_dropout(x, p, gen(2))
    ratio = (out / x).reshape(4, 256, -1)
    dropped = ratio[..., 0] == 0
    assert torch.all(ratio[dropped] == 0)  # whole plane zeroed
    assert torch.allclose(ratio[~dropped], torch.full_like(ratio[~dropped], 1 / (1 - p)))  # the rest x 1/(1-p)
    assert abs(dropped.float().mean().item() - p) < 0.06


def test_channel_dropout_mask_is_the_generators_uniforms():
    x = torch.randn(3, 7, 2, 2, generator=gen(0))
    out = channel_dropout(x, 0.25, gen(5))
    u = torch.rand(3, 7, 1, 1, generator=gen(5))
    expected = torch.where(u < 0.25, torch.zeros_like(x), x / 0.75)
    assert torch.allclose(out, expected)
    assert torch.equal(channel_dropout(x, 0.25, gen(5)), out)  # same seed, same mask
    assert not torch.equal(channel_dropout(x, 0.25, gen(6)), out)


def test_channel_dropout_edges():
    x = torch.randn(2, 3, 2, 2)
    assert channel_dropout(x, 0.0, gen(0)) is x
    assert torch.equal(channel_dropout(x, 1.0, gen(0)), torch.zeros_like(x))
    with pytest.raises(ValueError):
        channel_dropout(x, 1.5, gen(0))


def naive_code(head: StegoHead, f: torch.Tensor, mask_a=None, mask_b=None) -> torch.Tensor:
    """c = L1(a*f) + L3(relu(L2(b*f))) in float64, per pixel as matrix products."""
    f = f.double()
    fa = f if mask_a is None else f * mask_a
    fb = f if mask_b is None else f * mask_b
    w1, b1 = head.linear.weight.double()[:, :, 0, 0], head.linear.bias.double()
    w2, b2 = head.nonlinear[0].weight.double()[:, :, 0, 0], head.nonlinear[0].bias.double()
    w3, b3 = head.nonlinear[2].weight.double()[:, :, 0, 0], head.nonlinear[2].bias.double()
    pa = fa.permute(0, 2, 3, 1)  # (B, h, w, C)
    pb = fb.permute(0, 2, 3, 1)
    lin = pa @ w1.T + b1
    hidden = torch.clamp(pb @ w2.T + b2, min=0)
    return (lin + hidden @ w3.T + b3).permute(0, 3, 1, 2)


def test_head_shapes_and_default_init():
    head = StegoHead(12, 5)
    assert head.dim == 5
    assert head.linear.weight.shape == (5, 12, 1, 1)
    assert [type(m).__name__ for m in head.nonlinear] == ["Conv2d", "ReLU", "Conv2d"]
    assert head.nonlinear[0].weight.shape == (12, 12, 1, 1) and head.nonlinear[2].weight.shape == (5, 12, 1, 1)
    bound = 1 / math.sqrt(12)  # PyTorch's default Conv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for conv in (head.linear, head.nonlinear[0], head.nonlinear[2]):
        assert conv.bias is not None
        assert conv.weight.abs().max() <= bound and conv.bias.abs().max() <= bound
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm | torch.nn.LayerNorm) for m in head.modules())


def test_head_eval_matches_naive():
    head = StegoHead(6, 4)
    f = torch.randn(2, 6, 3, 5, generator=gen(3)).half()  # the cache is fp16
    f_out, code = head(f, None)
    assert f_out.dtype == torch.float32 and code.dtype == torch.float32
    assert torch.equal(f_out, f.float())
    assert torch.allclose(code.double(), naive_code(head, f.float()), atol=1e-5)
    assert torch.equal(head.codes(f), code)


def test_head_training_draw_order_and_values():
    head = StegoHead(8, 3, dropout=0.4)
    f = torch.randn(3, 8, 2, 4, generator=gen(4))
    f_loss, code = head(f, gen(9))
    g = gen(9)  # documented order: linear branch, nonlinear branch, loss features
    keep_a, keep_b, keep_f = ((torch.rand(3, 8, 1, 1, generator=g) >= 0.4).double() / 0.6 for _ in range(3))
    assert torch.allclose(code.double(), naive_code(head, f, keep_a, keep_b), atol=1e-5)
    assert torch.allclose(f_loss.double(), f.double() * keep_f, atol=1e-6)
    # three independent masks: the loss features are not the features of either branch
    assert not torch.equal(keep_a, keep_f) and not torch.equal(keep_a, keep_b)
    again = head(f, gen(9))
    assert torch.equal(again[0], f_loss) and torch.equal(again[1], code)


def test_head_gradient_reaches_all_layers():
    head = StegoHead(5, 2)
    _, code = head(torch.randn(2, 5, 3, 3, generator=gen(0)), gen(1))
    code.square().sum().backward()
    for p in head.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_channel_dropout_is_bit_for_bit_mask_then_scale():
    """The scale applied to the mask (one pass over x) gives the bits of x·mask, then ·1/(1-p) (two passes), signed
    zeros, infinities and NaNs included."""
    x = torch.randn(5, 64, 3, 3, generator=gen(3)) * 1e3
    x[0, 0, 0, 0], x[1, 1, 0, 0], x[2, 2, 0, 0] = float("inf"), float("nan"), -0.0
    u = torch.rand(5, 64, 1, 1, generator=gen(4))
    keep = (u >= 0.1).float()
    naive = x * keep * (1.0 / (1.0 - 0.1))
    out = channel_dropout(x, 0.1, gen(4))
    assert torch.equal(out.isnan(), naive.isnan())
    same = out.isnan() | ((out == naive) & (torch.signbit(out) == torch.signbit(naive)))
    assert bool(same.all())
