"""Dense CRF (docs/hp.md §8): it denoises, it calls pydensecrf like the reference, parallel == serial."""

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.evaluation import crf
from pipeline.evaluation.crf import crf_bench, crf_labels, dense_crf

BLUE, ORANGE = (20, 30, 110), (250, 160, 30)


def two_regions(size: int = 64, flip: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left half dark blue (class 0), right half bright orange (class 1); logits = 2 * one-hot of noisy labels."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[:, size // 2:] = 1
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[truth == 0], image[truth == 1] = BLUE, ORANGE
    noisy = np.where(rng.random((size, size)) < flip, 1 - truth, truth)
    logits = 2.0 * np.stack([noisy == 0, noisy == 1]).astype(np.float32)
    return image, logits, truth


def random_inputs(n: int, size: int, k: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[:, :, : size // 2] //= 4  # some structure for the bilateral term to follow
    return images, rng.normal(0, 1.5, (n, k, size, size)).astype(np.float32)


def test_crf_denoises_two_regions():
    image, logits, truth = two_regions()
    noisy_acc = (logits.argmax(0) == truth).mean()
    refined_acc = (dense_crf(image, logits).argmax(0) == truth).mean()
    assert 0.70 < noisy_acc < 0.80
    assert refined_acc > 0.95
    assert refined_acc - noisy_acc > 0.10


def test_marginals_are_distributions_and_confident_unary_wins():
    images, logits = random_inputs(1, 40, 5)
    q = dense_crf(images[0], logits[0])
    assert q.shape == logits[0].shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert (q >= 0).all()
    assert (q.argmax(0) != logits[0].argmax(0)).any()  # the pairwise terms do change something here ...
    confident = 1e4 * (logits[0] == logits[0].max(0, keepdims=True)).astype(np.float32)
    np.testing.assert_array_equal(dense_crf(images[0], confident).argmax(0), logits[0].argmax(0))  # ... not here


class SpyCRF:
    """Stands in for pydensecrf.densecrf.DenseCRF2D and records what the module hands it."""

    calls: list = []

    def __init__(self, w, h, k):
        self.shape = (k, h, w)
        SpyCRF.calls.append(("init", w, h, k))

    def setUnaryEnergy(self, u):  # noqa: N802 (pydensecrf's names)
        SpyCRF.calls.append(("unary", u))

    def addPairwiseGaussian(self, **kw):  # noqa: N802
        SpyCRF.calls.append(("gaussian", kw))

    def addPairwiseBilateral(self, **kw):  # noqa: N802
        SpyCRF.calls.append(("bilateral", kw))

    def inference(self, n):
        SpyCRF.calls.append(("inference", n))
        k, h, w = self.shape
        return np.full((k, h * w), 1.0 / k, dtype=np.float32)


def test_calls_pydensecrf_like_the_reference(monkeypatch):
    monkeypatch.setattr(crf.dcrf, "DenseCRF2D", SpyCRF)
    SpyCRF.calls = []
    images, logits = random_inputs(1, 12, 3)
    logits[0, 0, 0, 0] = 40.0  # one near-zero probability, to see the 1e-5 clip
    dense_crf(images[0], logits[0])
    names = [c[0] for c in SpyCRF.calls]
    assert names == ["init", "unary", "gaussian", "bilateral", "inference"]  # reference order
    assert SpyCRF.calls[0][1:] == (12, 12, 3)  # DenseCRF2D(w, h, k)
    z = logits[0].astype(np.float64)
    p = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)
    unary = SpyCRF.calls[1][1]
    assert unary.dtype == np.float32 and unary.flags.c_contiguous and unary.shape == (3, 144)
    np.testing.assert_allclose(unary, -np.log(np.clip(p, 1e-5, 1.0)).reshape(3, -1), rtol=1e-5, atol=1e-5)
    assert SpyCRF.calls[2][1] == dict(sxy=1, compat=3)  # docs/hp.md §8: Gaussian sxy=1, compat=3
    bil = SpyCRF.calls[3][1]
    assert (bil["sxy"], bil["srgb"], bil["compat"]) == (67, 3, 4)
    rgbim = bil["rgbim"]
    assert rgbim.dtype == np.uint8 and rgbim.flags.c_contiguous
    np.testing.assert_array_equal(rgbim, images[0][:, :, ::-1])  # BGR, like the reference
    assert SpyCRF.calls[4][1] == 10


def test_parallel_schedulers_equal_serial():
    images, logits = random_inputs(6, 40, 4)
    serial = crf_labels(images, logits)
    assert serial.shape == (6, 40, 40) and serial.dtype == np.int64
    assert not np.array_equal(serial, logits.argmax(1))
    np.testing.assert_array_equal(serial[3], dense_crf(images[3], logits[3]).argmax(0))
    streamed = crf_labels(images, (lg for lg in logits), workers=2, scheduler="processes", chunk_size=1)
    np.testing.assert_array_equal(streamed, serial)  # 6 chunks, 4 in flight, order kept
    np.testing.assert_array_equal(crf_labels(images, logits, workers=2, scheduler="distributed"), serial)


def test_bench_sides_do_the_same_work_and_can_fail(monkeypatch):
    import pipeline.evaluation.crf as crf

    report = crf_bench(n_images=2, size=32, workers=2, n_classes=4, repeats=2)
    assert report["identical"] is True
    assert report["images_serial"] == report["images_parallel"] == 2 * 2  # both sides: every image, every repeat
    real = crf.crf_labels

    def broken(images, logits, workers=1, **kwargs):  # a parallel path that loses a label map's content
        out = real(images, logits, workers=workers, **kwargs)
        return out if workers == 1 else np.zeros_like(out)

    monkeypatch.setattr(crf, "crf_labels", broken)
    assert crf_bench(n_images=2, size=32, workers=2, n_classes=4, repeats=1)["identical"] is False


def test_bad_inputs_are_named():
    images, logits = random_inputs(2, 16, 3)
    with pytest.raises(ValueError, match="upsample the logits"):
        dense_crf(images[0], logits[0][:, :8])
    with pytest.raises(ValueError, match=r"uint8"):
        dense_crf(images[0].astype(np.float32), logits[0])
    with pytest.raises(ValueError, match="NaN"):
        dense_crf(images[0], np.full_like(logits[0], np.nan))
    with pytest.raises(ValueError, match=r"image 1.*upsample"):
        crf_labels(images, [logits[0], logits[1][:, :, :4]])
    with pytest.raises(ValueError, match="1 logits for 2 images"):
        crf_labels(images, logits[:1])
    with pytest.raises(ValueError, match="1 logits for 2 images"):
        crf_labels(images, (lg for lg in logits[:1]))
    with pytest.raises(UserError, match="scheduler must be one of"):
        crf_labels(images, logits, workers=2, scheduler="threads")
    with pytest.raises(UserError, match="workers"):
        crf_labels(images, logits, workers=0)
