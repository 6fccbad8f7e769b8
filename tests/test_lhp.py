"""LHP weights (docs/hp.md §1) against a naive per-row loop written from the spec."""

import pytest
import torch

from pipeline.extraction.lhp import WINDOW_OFFSETS, _quantile_sorted, lhp_weights, window_counts, window_index


def naive_lhp(attn: torch.Tensor, h: int, w: int, sigma: float = 28.0) -> torch.Tensor:
    """Spec §1 literally: one anchor row at a time, explicit 3x3 window with border clipping."""
    b = attn.shape[0]
    out = torch.zeros(b, h, w, 9)
    for bi in range(b):
        for i in range(h * w):
            row = attn[bi, i].float()
            lo, hi = torch.quantile(row, 0.1), torch.quantile(row, 0.9)
            row = torch.clamp(row, lo, hi).softmax(0) * sigma
            row = torch.where(row < row.mean(), torch.zeros_like(row), row)
            y, x = divmod(i, w)
            slot = 0
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        out[bi, y, x, slot] = row[(y + dy) * w + (x + dx)]
                    slot += 1
    return out


@pytest.mark.parametrize("h,w", [(5, 7), (4, 4), (1, 3)])
def test_lhp_matches_naive(h, w):
    g = torch.Generator().manual_seed(h * 10 + w)
    attn = torch.randn(2, h * w, h * w, generator=g) * 4
    got = lhp_weights(attn, h, w)
    assert got.shape == (2, h, w, 9) and got.dtype == torch.float32
    torch.testing.assert_close(got, naive_lhp(attn, h, w), atol=1e-6, rtol=0)


def test_lhp_sigma_scales_and_threshold_holds():
    h, w = 5, 7
    attn = torch.randn(2, h * w, h * w, generator=torch.Generator().manual_seed(1))
    a28, a1 = lhp_weights(attn, h, w), lhp_weights(attn, h, w, sigma=1.0)
    torch.testing.assert_close(a28, 28 * a1)
    # every kept weight is at least the row mean of sigma*softmax, i.e. about sigma/n
    kept = a28[a28 > 0]
    assert kept.numel() > 0 and kept.min() >= 28 / (h * w) * (1 - 1e-5)


def test_window_counts():
    c = window_counts(5, 7)
    assert c.shape == (5, 7)
    assert c[0, 0] == c[0, -1] == c[-1, 0] == c[-1, -1] == 4
    assert (c[0, 1:-1] == 6).all() and (c[-1, 1:-1] == 6).all()
    assert (c[1:-1, 0] == 6).all() and (c[1:-1, -1] == 6).all()
    assert (c[1:-1, 1:-1] == 9).all()
    assert c.sum() == 9 * 3 * 5 + 6 * 2 * (3 + 5) + 4 * 4


def test_out_of_image_slots_are_zero_and_inside_slots_match_counts():
    h, w = 5, 7
    # logits 1 inside each anchor's window, 0 elsewhere: every in-image slot is above the row mean
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    near = ((yy[:, None] - yy[None]).abs() <= 1) & ((xx[:, None] - xx[None]).abs() <= 1)
    kept = lhp_weights(near.float()[None], h, w)
    torch.testing.assert_close(kept.gt(0).sum(-1).float(), window_counts(h, w)[None])
    # large random logits: slots pointing outside the grid must be exactly 0
    out = lhp_weights(torch.randn(2, h * w, h * w) * 100, h, w)
    for slot, (dy, dx) in enumerate(WINDOW_OFFSETS):
        for y in range(h):
            for x in range(w):
                if not (0 <= y + dy < h and 0 <= x + dx < w):
                    assert (out[:, y, x, slot] == 0).all()
    assert WINDOW_OFFSETS[4] == (0, 0)


def test_lhp_rejects_wrong_grid():
    """The message names the offending shape and grid, so a bad call site is easy to find."""
    with pytest.raises(ValueError, match=r"attention \(1, 12, 12\) does not match a 3x5 grid"):
        lhp_weights(torch.zeros(1, 12, 12), 3, 5)
    with pytest.raises(ValueError, match="does not match a 3x4 grid"):
        lhp_weights(torch.zeros(1, 12, 11), 3, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 5, 11), (3, 7), (11,)])
def test_quantile_sorted_is_bit_exact_torch_quantile(dtype, shape):
    """Docstring promise: torch.quantile's arithmetic (q and weight in the input dtype) along the last dim,
    for any leading shape, not only the square (B, n, n) rows lhp_weights passes."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    s = x.sort(dim=-1).values
    for q in (0.1, 0.9, 0.37):
        got = _quantile_sorted(s, q)
        want = torch.quantile(x, q, dim=-1, keepdim=True)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want), (q, got - want)


def test_window_index_and_lhp_weights_stay_on_the_given_device():
    """Every intermediate follows the requested / input device (meta stands in for a GPU: mixing it with cpu
    tensors raises), instead of silently falling back to the cpu default."""
    index, valid = window_index(3, 4, "meta")
    assert index.device.type == valid.device.type == "meta"
    assert index.shape == valid.shape == (12, 9)
    out = lhp_weights(torch.zeros(2, 12, 12, device="meta"), 3, 4)
    assert out.device.type == "meta" and out.shape == (2, 3, 4, 9) and out.dtype == torch.float32


def test_window_index_default_device_and_values():
    """Default is cpu; clipped indices and validity match the offsets literally."""
    h, w = 3, 4
    index, valid = window_index(h, w)
    assert index.device.type == valid.device.type == "cpu" and valid.dtype == torch.bool
    for i in range(h * w):
        y, x = divmod(i, w)
        for k, (dy, dx) in enumerate(WINDOW_OFFSETS):
            ny, nx = y + dy, x + dx
            assert bool(valid[i, k]) == (0 <= ny < h and 0 <= nx < w)
            assert int(index[i, k]) == min(max(ny, 0), h - 1) * w + min(max(nx, 0), w - 1)


@pytest.mark.parametrize("h,w", [(2, 2), (4, 4)])
def test_constant_row_keeps_its_whole_window(h, w):
    """A constant row is all ties at exactly the row mean (sigma/n is exact for n = 4, 16): '< mean' keeps
    every entry, so each in-image slot holds sigma/n."""
    n = h * w
    got = lhp_weights(torch.zeros(1, n, n), h, w)
    _, valid = window_index(h, w)
    want = valid.reshape(1, h, w, 9).float() * (28.0 / n)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, naive_lhp(torch.zeros(1, n, n), h, w), atol=0, rtol=0)


def test_batch_elements_are_independent():
    """The threshold is each row's own mean: a constant row (every entry exactly at its mean, kept) must not
    be affected by what the other batch elements hold."""
    h, w = 2, 2
    alone = lhp_weights(torch.zeros(1, 4, 4), h, w)
    for seed in range(6):
        other = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 4
        both = lhp_weights(torch.cat([torch.zeros(1, 4, 4), other]), h, w)
        assert torch.equal(both[:1], alone), seed
        assert torch.equal(both[1:], lhp_weights(other, h, w)), seed
