"""HCL multi-level backbone and foreground mask: FlexiViT resize vs a float64 pseudo-inverse, branches vs the
native Backbone, level concatenation, and the mask vs a naive sort/cumsum/flood-fill implementation."""

from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.extraction.backbone import load_backbone, normalize
from pipeline.methods.hcl.foreground import foreground_mask, mass_threshold, remove_small
from pipeline.methods.hcl.multilevel import branch_forward, concat_levels, multilevel_features, resize_patch_kernel

NAME = "vit_small_patch16_224.dino"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a 2nd thread only adds contention


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(NAME, "random")


def _images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randint(0, 256, (b, size, size, 3), generator=g, dtype=torch.uint8))


def _bicubic_aa(x: torch.Tensor, size: int) -> torch.Tensor:
    """The resize the reference's kernels invert (docs/hcl.md §1): torch bicubic, antialiased."""
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


# --- HCL's own views (docs/hcl.md §4-§5, pipeline/methods/hcl/views.py)
# -------------------------------------------------

import torchvision.transforms.functional as TF  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from cache import writer  # noqa: E402
from cache.reader import FeatureStore, batch_plan  # noqa: E402
from cache.schema import CodesLayout  # noqa: E402
from pipeline.methods.hcl.views import (  # noqa: E402
    Photometric,
    apply_photometric,
    crop_box,
    draw_photometric,
    epoch_crops,
    epoch_keep,
    train_views,
    val_view,
)

DRAWS = 4000


def _scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A colourful picture with sharp edges: smooth gradients plus bright blocks."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([40 + 150 * yy / h, 40 + 150 * xx / w, 200 - 120 * (yy + xx) / (h + w)], -1)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y:y + 8, x:x + 8] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def test_crop_boxes_lie_in_the_image_with_the_reference_scale_and_offsets():
    """§4: a square of int(s * short) with s ~ U[0.8, 1]; both offsets round((short - side) * u), as the reference."""
    ratios = []
    for k, (h, w) in enumerate([(375, 500), (500, 333), (64, 64), (97, 211)] * 50):
        for r in range(2):
            top, left, side = crop_box(h, w, 3, k, r)
            short = min(h, w)
            assert 0 <= top <= short - side and 0 <= left <= short - side  # within the image, and the reference's
            assert top + side <= h and left + side <= w                  # offsets range over the short side
            assert int(0.8 * short) <= side <= short
            ratios.append(side / short)
            assert crop_box(h, w, 3, k, r) == (top, left, side)  # reproducible from (seed, image, crop)
    ratios = np.asarray(ratios)
    assert abs(ratios.mean() - 0.9) < 0.01 and ratios.min() < 0.81 and ratios.max() > 0.99  # U[0.8, 1]
    boxes = {crop_box(375, 500, 3, 7, r) for r in range(20)}
    assert len(boxes) > 15  # each crop its own scale and offset
    assert crop_box(375, 500, 4, 7, 0) != crop_box(375, 500, 3, 7, 0)  # the seed matters


def test_photometric_draws_follow_the_spec():
    """§4: four ops, each its own p = 0.8 coin (P(none) = 0.2^4, not one shared coin's 0.2), factors in range; blur
    p = 0.5 with the reference's sigma = |0.1 + 3.8 (u - 0.5)|, i.e. in [0, 1.8] with doubled density below 0.1."""
    draws = [draw_photometric(0, k, k % 3, k % 2) for k in range(DRAWS)]
    factors = np.array([[np.nan if f is None else f for f in d.factors] for d in draws])
    on = ~np.isnan(factors)
    assert np.all(np.abs(on.mean(0) - 0.8) < 0.03)  # each op ~0.8
    assert on.all(1).mean() == pytest.approx(0.8 ** 4, abs=0.03)  # independent coins
    assert (~on).all(1).mean() < 0.01  # 0.2^4 = 0.0016; one shared coin would give 0.2
    for j, (low, high) in enumerate([(0.7, 1.3)] * 3 + [(-0.1, 0.1)]):
        values = factors[on[:, j], j]
        assert low <= values.min() < low + 0.02 and high - 0.02 < values.max() <= high
    sigma = np.array([np.nan if d.blur is None else d.blur for d in draws])
    blurred = sigma[~np.isnan(sigma)]
    assert len(blurred) / DRAWS == pytest.approx(0.5, abs=0.03)
    assert blurred.min() >= 0 and blurred.max() <= 1.8 + 1e-9 and blurred.min() < 0.05 and blurred.max() > 1.75
    assert (blurred <= 0.1).mean() == pytest.approx(0.2 / 1.9, abs=0.03)  # |σ| folds (−0.1, 0] onto [0, 0.1)
    assert (blurred > 1.0).mean() == pytest.approx(0.8 / 1.9, abs=0.03)
    assert draw_photometric(0, 5, 1, 1) == draw_photometric(0, 5, 1, 1) != draw_photometric(1, 5, 1, 1)


def test_photometric_ops_run_in_the_fixed_order_and_blur_is_pil_gaussian():
    image = Image.fromarray(_scene(48, 48))
    params = Photometric((1.3, 0.6, 1.25, 0.07), 1.2)
    expected = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, 1.3), 0.6), 1.25),
                             0.07).filter(ImageFilter.GaussianBlur(1.2))
    assert np.array_equal(np.asarray(apply_photometric(image, params)), np.asarray(expected))
    swapped = TF.adjust_brightness(TF.adjust_contrast(image, 0.6), 1.3)  # contrast before brightness
    only_two = np.asarray(apply_photometric(image, Photometric((1.3, 0.6, None, None), None)))
    assert not np.array_equal(only_two, np.asarray(swapped))
    assert np.array_equal(np.asarray(apply_photometric(image, Photometric((None,) * 4, None))), np.asarray(image))


def test_no_variant_is_grayscale():
    """§4: no grayscale op (the reference's is misspelt and never applies): every variant of a colourful crop keeps
    its colour (saturation factors stay >= 0.7)."""
    image = _scene(40, 40)
    spreads = []
    for k in range(300):
        _, views, _ = train_views(image, None, (0, 0, 40), [draw_photometric(1, k, 0, 0)], 48, 24)
        v = views[0].astype(int)
        spreads.append(np.abs(v - v.mean(-1, keepdims=True)).mean())
    plain = train_views(image, None, (0, 0, 40), [], 48, 24)[0].astype(int)
    assert min(spreads) > 0.4 * np.abs(plain - plain.mean(-1, keepdims=True)).mean()


def test_views_are_made_at_crop_resolution_and_pixel_aligned():
    image, label = _scene(90, 120), np.arange(90 * 120, dtype=np.int64).reshape(90, 120) % 251
    box = (5, 11, 76)
    plain, views, lab = train_views(image, label.astype(np.uint8), box, [
        Photometric((None,) * 4, None), Photometric((0.8, None, None, None), None), Photometric((None,) * 4, 1.5)],
        96, 32)
    assert plain.shape == (32, 32, 3) and views.shape == (3, 32, 32, 3) and lab.shape == (32, 32)
    crop = Image.fromarray(image[5:81, 11:87]).resize((96, 96), Image.Resampling.BILINEAR)
    assert np.array_equal(plain, np.asarray(crop.resize((32, 32), Image.Resampling.BILINEAR)))
    assert np.array_equal(views[0], plain)  # every op off: the plain crop, pixel for pixel
    darker = plain.astype(float) * 0.8  # linear (no clipping): commutes with the resizes up to rounding
    assert np.abs(views[1] - darker).max() <= 2  # aligned: a one-pixel shift would leave the blocks' edges far off
    assert np.abs(views[1] - np.roll(darker, 1, axis=1)).max() > 20
    blurred_at_96 = np.asarray(crop.filter(ImageFilter.GaussianBlur(1.5)).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(views[2], blurred_at_96)  # σ in pixels of the crop resolution (448 in the spec)
    blurred_at_32 = np.asarray(Image.fromarray(plain).filter(ImageFilter.GaussianBlur(1.5)))
    assert np.abs(views[2].astype(int) - blurred_at_32).max() > 5
    idx = ((np.arange(32) + 0.5) * 76 / 32).astype(int)  # nearest, centre sampling
    assert np.array_equal(lab, label[5:81, 11:87][idx[:, None], idx[None, :]].astype(np.uint8))


def test_constant_image_variants_are_uniform_colour_changes_of_the_plain_crop():
    image = np.full((50, 70, 3), (120, 60, 200), np.uint8)
    plain, views, _ = train_views(image, None, crop_box(50, 70, 0, 0, 0),
                                  [draw_photometric(0, 0, 0, v) for v in range(6)], 64, 16)
    assert (plain == (120, 60, 200)).all()
    for v in views:  # the same colour op everywhere, blur has nothing to blur: still constant
        assert (v == v[0, 0]).all()


def _naive_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear (cv2.INTER_LINEAR / torch align_corners=False), no antialiasing, float64."""
    def axis(n: int):
        src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n - 1)
        return i0, np.minimum(i0 + 1, n - 1), src - i0

    (y0, y1, wy), (x0, x1, wx) = axis(image.shape[0]), axis(image.shape[1])
    im = image.astype(np.float64)
    top = im[y0][:, x0] * (1 - wx)[None, :, None] + im[y0][:, x1] * wx[None, :, None]
    bottom = im[y1][:, x0] * (1 - wx)[None, :, None] + im[y1][:, x1] * wx[None, :, None]
    return top * (1 - wy)[:, None, None] + bottom * wy[:, None, None]


def test_val_view_is_the_whole_image_resized_bilinear_with_nearest_labels():
    image = _scene(75, 100, seed=2)
    label = (np.arange(75)[:, None] * 3 + np.arange(100)[None, :]).astype(np.uint8)
    resized, lab = val_view(image, label, 64)
    assert resized.shape == (64, 64, 3) and lab.shape == (64, 64)  # aspect not kept, no crop
    assert np.abs(resized.astype(float) - _naive_bilinear(image, 64)).max() <= 1.0
    rows, cols = (np.arange(64) * 75) // 64, (np.arange(64) * 100) // 64  # floor index, as cv2.INTER_NEAREST
    assert np.array_equal(lab, label[rows[:, None], cols[None, :]])
    assert lab[-1, -1] == label[73, 98] and lab[0, 0] == label[0, 0]  # floor(63 * 75 / 64), floor(63 * 100 / 64)


def test_each_epoch_uses_one_crop_per_image_drawn_from_seed_and_epoch():
    n, crops = 500, 3
    choices = np.stack([epoch_crops(n, crops, 7, e) for e in range(10)])
    assert choices.min() == 0 and choices.max() == crops - 1
    assert np.array_equal(choices[4], epoch_crops(n, crops, 7, 4))  # pure: a resumed run draws the same
    assert all((choices[e] != choices[e + 1]).mean() > 0.5 for e in range(9))  # a new crop every epoch, mostly
    assert abs(choices.mean() - 1.0) < 0.05
    assert not np.array_equal(epoch_crops(n, crops, 8, 0), choices[0])
    keep = epoch_keep(n, crops, 7, 2)
    assert keep.sum() == n and np.array_equal(np.flatnonzero(keep), np.arange(n) * crops + choices[2])


def test_batch_plan_with_keep_batches_only_the_kept_samples():
    n, chunk, batch = 48, 4, 5
    keep = epoch_keep(n // 2, 2, 0, 1)
    as_lists = lambda plan: [(chunks, [b.tolist() for b in batches]) for chunks, batches in plan]  # noqa: E731
    assert as_lists(batch_plan(n, chunk, batch, 3, 2, False, np.ones(n, bool))) == as_lists(
        batch_plan(n, chunk, batch, 3, 2, False))  # keeping everything is the plan without `keep`
    plan = batch_plan(n, chunk, batch, 3, 2, False, keep)
    seen = np.concatenate([b for _, batches in plan for b in batches])
    assert sorted(seen.tolist()) == np.flatnonzero(keep).tolist()  # each kept sample exactly once, no other
    dropped = batch_plan(n, chunk, batch, 3, 2, True, keep)
    assert sum(len(bs) for _, bs in dropped) == keep.sum() // batch  # iterations = images // batch
    sparse = np.zeros(n, bool)
    sparse[[1, 30]] = True
    assert sorted(c for chunks, _ in batch_plan(n, chunk, 2, 3, 1, False, sparse) for c in chunks) == [0, 7]


def test_store_batches_with_keep_read_every_kept_sample_and_resume_exactly(tmp_path):
    """Buffers of one chunk with one kept sample each make no batch of their own: their samples must still be read
    (with the next buffer), and skipping batches on resume must give the same tail."""
    n, chunk = 40, 4
    group = writer.create_store(str(tmp_path / "s.zarr"), CodesLayout(n, 1, 1), chunk, {"fingerprint": "x"}, True)
    for c in range(n // chunk):
        writer.write_chunk(group, c, {"feat": np.arange(c * chunk, (c + 1) * chunk, dtype=np.float16)
                                      .reshape(chunk, 1, 1, 1)})
    writer.mark_complete(group)
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    keep = np.zeros(n, bool)
    keep[np.arange(0, n, chunk) + np.arange(n // chunk) % chunk] = True  # one sample per chunk
    read = lambda start: [b["feat"].flatten().tolist() for b in store.batches(  # noqa: E731
        ["feat"], 3, shuffle_seed=5, buffer_chunks=1, drop_last=False, start_batch=start, keep=keep)]
    full = read(0)
    assert sorted(v for b in full for v in b) == np.flatnonzero(keep).tolist()
    for b in store.batches(["feat"], 3, shuffle_seed=5, buffer_chunks=1, keep=keep):
        assert b["feat"].flatten().tolist() == b["index"].tolist()  # each sample is itself
    for start in range(1, len(full)):
        assert read(start) == full[start:]
