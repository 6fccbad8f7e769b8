"""HCL multi-level backbone and foreground mask: FlexiViT resize vs a float64 pseudo-inverse, branches vs the
native Backbone, level concatenation, and the mask vs a naive sort/cumsum/flood-fill implementation."""

from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.backbone import load_backbone, normalize
from pipeline.hcl.foreground import foreground_mask, mass_threshold, remove_small
from pipeline.hcl.multilevel import branch_forward, concat_levels, multilevel_features, resize_patch_kernel

NAME = "vit_small_patch16_224.dino"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a 2nd thread only adds contention


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(NAME, "random")


def _images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randint(0, 256, (b, size, size, 3), generator=g, dtype=torch.uint8))


def _bicubic_aa(x: torch.Tensor, size: int) -> torch.Tensor:
    """The resize the reference's kernels invert (specs/HCL.md §1): torch bicubic, antialiased."""
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def _bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=False, align_corners=False)


# --- kernel resize --------------------------------------------------------------------------------


def _direct_flexi(w: torch.Tensor, size: int, resize=_bicubic_aa) -> np.ndarray:
    """FlexiViT by hand in float64: B's columns are the resizes of the p*p basis patches; w' = pinv(B)^T vec(w)."""
    c_out, c_in, p, _ = w.shape
    basis = torch.eye(p * p, dtype=torch.float64).view(p * p, 1, p, p)
    b = resize(basis, size).reshape(p * p, size * size).T.numpy()  # (size*size, p*p)
    flat = w.double().reshape(c_out * c_in, p * p).numpy()
    return (np.linalg.pinv(b).T @ flat.T).T.reshape(c_out, c_in, size, size)


@pytest.mark.parametrize(("patch", "size"), [(4, 6), (4, 2), (16, 32), (16, 56), (8, 56)])
def test_resize_patch_kernel_matches_float64_pseudo_inverse_of_bicubic_antialiased(patch, size):
    """DINO-scale kernels (std 0.05) against the float64 pseudo-inverse to 1e-6; bilinear kernels are far off."""
    w = 0.05 * torch.randn(4, 3, patch, patch, generator=torch.Generator().manual_seed(1))
    got = resize_patch_kernel(w, size)
    assert got.shape == (4, 3, size, size) and got.dtype == w.dtype
    want = _direct_flexi(w, size)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6, rtol=0)
    if size > patch:  # the old bilinear kernels differ by a good share of the kernel's magnitude
        assert np.abs(_direct_flexi(w, size, _bilinear) - want).max() > 0.2 * np.abs(want).max()


def test_resize_patch_kernel_preserves_patch_projection_when_upsampling():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    w6 = resize_patch_kernel(w, 6).double()
    before = torch.einsum("nchw,ochw->no", x, w)
    after = torch.einsum("nchw,ochw->no", _bicubic_aa(x, 6), w6)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


# --- branches ---------------------------------------------------------------------------------------


def test_native_branch_equals_backbone(backbone):
    images = _images(2, 64)
    feat, cls, attn = branch_forward(backbone, images, 16)
    out = backbone(images)
    torch.testing.assert_close(feat, out.feat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, out.cls_attn, atol=1e-6, rtol=1e-5)
    assert cls.shape == (2, 384)
    share = attn.sum(dim=(-2, -1))  # softmax over CLS + patches, CLS column dropped
    assert ((share > 0.5) & (share < 1)).all()


def test_coarse_branch_sees_patchwise_upsampled_image_as_native(backbone):
    """FlexiViT's promise end to end: each 32 px patch = bicubic antialiased 2x of a 16 px patch -> same tokens,
    because the resized kernel preserves the projection, the bias is kept and the 4x4 grid gets the same position
    embeddings."""
    images = _images(1, 64, seed=3)
    patches = images.unfold(2, 16, 16).unfold(3, 16, 16)  # (1, 3, 4, 4, 16, 16)
    up = _bicubic_aa(patches.permute(0, 2, 3, 1, 4, 5).reshape(16, 3, 16, 16), 32)
    big = up.reshape(1, 4, 4, 3, 32, 32).permute(0, 3, 1, 4, 2, 5).reshape(1, 3, 128, 128)
    torch.testing.assert_close(big[..., 32:64, 96:128], up[7:8])  # patch (1, 3) landed in place
    native, native_cls, native_attn = branch_forward(backbone, images, 16)
    coarse, coarse_cls, coarse_attn = branch_forward(backbone, big, 32)
    torch.testing.assert_close(coarse, native, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(coarse_cls, native_cls, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(coarse_attn, native_attn, atol=1e-5, rtol=1e-3)


def test_multilevel_shapes_and_concat(backbone):
    images = _images(2, 64, seed=4)
    levels = multilevel_features(backbone, images)
    _, finest_cls, _ = branch_forward(backbone, images, 16)
    torch.testing.assert_close(levels["cls"], finest_cls)  # the finest branch's CLS, not a coarse one
    torch.testing.assert_close(levels["cls_attn"], backbone(images).cls_attn, atol=1e-6, rtol=1e-5)
    assert set(levels) == {"p16", "p32", "p56", "cls", "cls_attn"}
    assert levels["p16"].shape == (2, 4, 4, 384)
    assert levels["p32"].shape == (2, 2, 2, 384)
    assert levels["p56"].shape == (2, 1, 1, 384)  # 64 px resized to 56: the grid spans the whole image
    assert levels["cls_attn"].shape == (2, 6, 4, 4)
    cat = concat_levels(levels, "p16")
    assert cat.shape == (2, 4, 4, 4 * 384)  # (levels + 1) * C = 1536
    torch.testing.assert_close(cat[..., :384], levels["p16"])
    up = F.interpolate(levels["p32"].permute(0, 3, 1, 2), size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cat[1, 2, 1, 384:768], up[1, :, 2, 1])
    assert not torch.allclose(cat[1, 2, 1, 384:768], levels["p32"][1, 1, 0])  # really interpolated, not nearest
    torch.testing.assert_close(cat[1, 3, 0, 768:1152], levels["p56"][1, 0, 0])  # 1x1 grid broadcasts
    for i, j in [(0, 0), (3, 3), (1, 2)]:
        torch.testing.assert_close(cat[:, i, j, 1152:], levels["cls"])


# --- foreground mask --------------------------------------------------------------------------------


def _naive_blur(m: np.ndarray, kernel: int = 7, sigma: float = 0.6) -> np.ndarray:
    x = np.arange(kernel) - kernel // 2
    k1 = np.exp(-0.5 * (x / sigma) ** 2)
    k2 = np.outer(k1, k1) / k1.sum() ** 2
    pad = kernel // 2
    padded = np.pad(m, pad, mode="reflect")
    out = np.zeros_like(m, dtype=np.float64)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            out[i, j] = (padded[i:i + kernel, j:j + kernel] * k2).sum()
    return out


def _naive_mask(attn: np.ndarray, mass: float = 0.7, min_size: int = 3) -> np.ndarray:
    """attn (heads,h,w): largest first, keep while the kept mass < mass*total; flood fill, drop small."""
    blurred = _naive_blur(attn.mean(axis=0))
    h, w = blurred.shape
    keep = np.zeros(h * w, dtype=bool)
    acc, total = 0.0, blurred.sum()
    for idx in np.argsort(-blurred.ravel(), kind="stable"):
        if acc >= mass * total:
            break
        keep[idx] = True
        acc += blurred.ravel()[idx]
    keep = keep.reshape(h, w)
    seen = np.zeros_like(keep)
    out = np.zeros_like(keep)
    for si in range(h):
        for sj in range(w):
            if not keep[si, sj] or seen[si, sj]:
                continue
            comp, queue = [], deque([(si, sj)])
            seen[si, sj] = True
            while queue:
                i, j = queue.popleft()
                comp.append((i, j))
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        a, b = i + di, j + dj
                        if 0 <= a < h and 0 <= b < w and keep[a, b] and not seen[a, b]:
                            seen[a, b] = True
                            queue.append((a, b))
            if len(comp) >= min_size:
                for i, j in comp:
                    out[i, j] = True
    return out


def test_foreground_mask_matches_naive_on_random_maps():
    g = torch.Generator().manual_seed(5)
    attn = (3 * torch.randn(4, 3, 10, 12, generator=g)).flatten(2).softmax(-1).view(4, 3, 10, 12)
    got = foreground_mask(attn)
    assert got.dtype == torch.bool and got.shape == (4, 10, 12)
    for b in range(4):
        np.testing.assert_array_equal(got[b].numpy(), _naive_mask(attn[b].double().numpy()))
    assert got.any() and not got.all()


def test_foreground_mask_keeps_seventy_percent_of_blurred_mass():
    yy, xx = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    blob = torch.exp(-((yy - 6) ** 2 + (xx - 8) ** 2) / 8) + 0.01
    attn = torch.stack([blob * 0.5, blob * 1.5])[None]  # mean over heads = blob
    mask = foreground_mask(attn)[0]
    blurred = torch.from_numpy(_naive_blur(blob.double().numpy()))
    share = blurred[mask].sum() / blurred.sum()
    assert 0.7 <= share < 0.7 + blurred.max() / blurred.sum()  # no more than one patch beyond the threshold
    assert mask[6, 8] and not mask[0, 0]


def test_foreground_mask_removes_one_and_two_patch_blobs():
    s = 1.0
    m = torch.full((16, 16), 1e-4)
    m[2:8, 2:8] = 0.3 * s  # big blob, its blurred cells stay above the spikes' blurred neighbours
    m[12, 2] = s  # 1 patch
    m[12, 6:8] = s  # 2 patches
    m[12, 11:14] = s  # 3 patches
    attn = m[None, None]
    kept = mass_threshold(torch.from_numpy(_naive_blur(m.double().numpy()))[None], 0.7)[0]
    spikes = {(12, 2), (12, 6), (12, 7), (12, 11), (12, 12), (12, 13)}
    assert all(kept[p] for p in spikes)  # the mass rule alone keeps all three blobs, exactly these cells
    assert kept[11:14].sum() == len(spikes)
    mask = foreground_mask(attn)[0]
    assert not mask[12, 2] and not mask[12, 6] and not mask[12, 7]
    assert mask[12, 11] and mask[12, 12] and mask[12, 13]
    assert mask[4, 4]


def test_remove_small_uses_eight_connectivity():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # diagonal chain: one component only with 8-connectivity
    mask[5, 4] = mask[5, 5] = True
    np.testing.assert_array_equal(remove_small(mask, 3), np.eye(6, dtype=bool) & (np.arange(6) < 3)[:, None])
