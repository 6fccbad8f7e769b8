"""Photometric views: determinism, RNG isolation, and equality with the reference's torchvision pipeline (bit for bit,
the fast hue shift included)."""

import random

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from pipeline.extraction.augment import adjust_hue, photometric_view
from pipeline.extraction.backbone import IMAGENET_MEAN, IMAGENET_STD, normalize

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randint(0, 256, (1, 24, 32, 3), generator=g, dtype=torch.uint8))[0]


def _reference_view(image: torch.Tensor, seed: int) -> torch.Tensor:
    """hynnsk/HP build.py: the photometric Compose, torch RNG seeded right before it runs."""
    tf = T.Compose([
        T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
        T.RandomGrayscale(0.2),
        T.RandomApply([T.GaussianBlur((5, 5))]),
    ])
    torch.manual_seed(seed)
    return tf(image)


def test_same_seed_same_view_different_seed_different_view():
    img = _image()
    a, b = photometric_view(img, 7), photometric_view(img, 7)
    assert torch.equal(a, b)
    others = [photometric_view(img, s) for s in (8, 9, 10)]
    assert all(not torch.allclose(a, o, atol=1e-3) for o in others)


def test_caller_rng_untouched():
    torch.manual_seed(123)
    random.seed(5)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    photometric_view(_image(), 3)
    photometric_view(_image(), 4, on_normalized=False)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


def test_on_normalized_equals_reference_pipeline():
    img = _image(1)
    for seed in range(40):  # enough draws to land in every branch and near the probability thresholds
        torch.testing.assert_close(photometric_view(img, seed), _reference_view(img, seed), atol=0, rtol=0)


def test_on_unnormalized_is_normalize_of_jittered_image():
    img = _image(2)
    for seed in range(6):
        expected = (_reference_view(img * STD + MEAN, seed) - MEAN) / STD
        torch.testing.assert_close(photometric_view(img, seed, on_normalized=False), expected)


def test_value_ranges_show_the_reference_quirk():
    """ColorJitter clamps float tensors to [0,1]: on the normalized tensor that wipes out negative values."""
    img = _image(3)
    assert img.min() < -1  # a normalized image has plenty of negative values
    for seed in range(4):
        quirk = photometric_view(img, seed)
        assert quirk.min() >= 0 and quirk.max() <= 1 + 1e-6
        clean = photometric_view(img, seed, on_normalized=False)
        assert clean.min() < 0  # stays in normalized space
        pixels = clean * STD + MEAN
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns: tells -0.0 from 0.0 and one NaN from another, as the stored bytes would."""
    return t.contiguous().view(torch.int32)


def _hue_inputs() -> list[torch.Tensor]:
    """Images of every kind the hue shift meets: normalized (negative values), [0, 1], channel ties, exact
    zeros and -0.0, a channel max of exactly 0 beside a negative channel (torchvision's NaN) and non-finite values."""
    g = torch.Generator().manual_seed(0)
    images = []
    for _ in range(20):
        images.append(torch.randn(3, 16, 20, generator=g) * 2)
        images.append(torch.rand(3, 16, 20, generator=g))
        images.append(torch.randint(0, 4, (3, 16, 20), generator=g).float() / 3)
        images.append(torch.randint(-2, 3, (3, 16, 20), generator=g).float() / 2)
        signed = torch.rand(3, 16, 20, generator=g)
        signed[:, ::3] = -0.0
        signed[0, ::5] = 0.0
        images.append(signed)
    odd = torch.randn(3, 16, 20, generator=g)
    odd[1, ::4], odd[2, ::7], odd[0, 1::7] = float("nan"), float("inf"), -float("inf")
    return [*images, odd]


def test_adjust_hue_is_torchvisions_bit_for_bit():
    """The fast hue shift the views use computes exactly torchvision's floats (its signed zeros and NaNs too)."""
    g = torch.Generator().manual_seed(1)
    for image in _hue_inputs():
        factor = float(torch.empty(1).uniform_(-0.5, 0.5, generator=g))
        assert torch.equal(_bits(adjust_hue(image, factor)), _bits(TF.adjust_hue(image, factor)))
    image = _image(4)
    for factor in (-0.5, -0.1, 0.0, 0.1, 0.5):  # the range's ends included
        assert torch.equal(_bits(adjust_hue(image, factor)), _bits(TF.adjust_hue(image, factor)))
    with pytest.raises(ValueError, match="hue_factor"):
        adjust_hue(image, 0.6)


def test_views_are_the_reference_pipelines_bits():
    """Every view, in both modes, has the bits of the reference's torchvision Compose (seeded the same way)."""
    g = torch.Generator().manual_seed(5)
    images = normalize(torch.randint(0, 256, (3, 40, 48, 3), generator=g, dtype=torch.uint8))
    for image in images:
        for seed in range(60):
            assert torch.equal(_bits(photometric_view(image, seed)), _bits(_reference_view(image, seed))), seed
            expected = (_reference_view(image * STD + MEAN, seed) - MEAN) / STD
            assert torch.equal(_bits(photometric_view(image, seed, on_normalized=False)), _bits(expected)), seed
