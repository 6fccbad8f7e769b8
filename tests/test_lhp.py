"""LHP weights (docs/hp.md §1) against a naive per-row loop written from the spec."""

import pytest
import torch

from pipeline.extraction.lhp import WINDOW_OFFSETS, lhp_weights, window_counts


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
    with pytest.raises(ValueError):
        lhp_weights(torch.zeros(1, 12, 12), 3, 5)
