import numpy as np
import pytest
import torch

from pipeline.evaluation.metrics import confusion_matrix, hungarian_match, remap_confusion, scores
from pipeline.evaluation.probes import adam_cluster_probe, assign, spherical_kmeans


def test_confusion_and_scores_against_hand_counts():
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 7]])  # 255 and 7 are outside 0..2: ignored
    pred = np.array([[0, 1, 1, 1], [1, 1, 0, 0]])  # class 2 is never predicted
    conf = confusion_matrix(pred, label, n_pred=3, n_classes=3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [0, 2, 0]]
    s = scores(conf)
    # IoU0 = 1/(1+0+1) ; IoU1 = 2/(2+3+0) ; IoU2 = 0/(0+0+2)
    assert s.iou == [0.5, 0.4, 0.0]
    assert s.miou == np.mean([0.5, 0.4, 0.0]) and s.acc == 3 / 6


def test_class_absent_everywhere_has_no_iou():
    conf = confusion_matrix(np.array([0, 1]), np.array([0, 1]), n_pred=3, n_classes=3)
    s = scores(conf)
    assert s.iou == [1.0, 1.0, None] and s.miou == 1.0


def test_permuted_perfect_clustering_scores_100_after_matching():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, size=(4, 16, 16))
    perm = rng.permutation(7)[:5]  # 7 clusters, 5 used
    pred = perm[label]
    conf = confusion_matrix(pred, label, n_pred=7, n_classes=5)
    mapping = hungarian_match(conf)
    assert [mapping[perm[c]] for c in range(5)] == list(range(5))
    s = scores(remap_confusion(conf, mapping))
    assert s.miou == 1.0 and s.acc == 1.0


def test_unmatched_clusters_count_as_wrong():
    label = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # cluster 2 takes one pixel of class 0 but has no class of its own
    conf = confusion_matrix(pred, label, n_pred=3, n_classes=2)
    s = scores(remap_confusion(conf, hungarian_match(conf)))
    assert s.acc == 3 / 4


@pytest.mark.parametrize("fit", [spherical_kmeans, adam_cluster_probe])
def test_cluster_probes_recover_well_separated_codes(fit):
    rng = np.random.default_rng(1)
    centers = np.eye(6)[:4] * 5
    truth = rng.integers(0, 4, size=400)
    codes = centers[truth] + rng.normal(0, 0.3, size=(400, 6))
    centroids = fit(codes, 4, seed=0)
    ids = assign(torch.from_numpy(codes.T[None, :, :, None]).float(), torch.from_numpy(centroids))[0, :, 0].numpy()
    conf = confusion_matrix(ids, truth, n_pred=4, n_classes=4)
    assert scores(remap_confusion(conf, hungarian_match(conf))).acc == 1.0


def test_assign_upsamples_bilinearly_before_argmax():
    codes = torch.zeros(1, 2, 1, 2)
    codes[0, 0, 0, 0] = 1.0  # left patch points to centroid 0
    codes[0, 1, 0, 1] = 1.0  # right patch to centroid 1
    ids = assign(codes, torch.eye(2), size=(1, 4))
    assert ids.tolist() == [[[0, 0, 1, 1]]]


def best_by_brute_force(confusion: np.ndarray) -> int:
    """The most pixels any one-to-one cluster -> class assignment can match: every injection tried."""
    import itertools

    classes, clusters = confusion.shape
    if clusters >= classes:
        return max(sum(confusion[c, k] for c, k in enumerate(chosen))
                   for chosen in itertools.permutations(range(clusters), classes))
    return max(sum(confusion[c, k] for k, c in enumerate(chosen))
               for chosen in itertools.permutations(range(classes), clusters))


def matched_pixels(confusion: np.ndarray, mapping: np.ndarray) -> int:
    """Pixels on the diagonal under `mapping` (cluster -> class, -1 unmatched), each class matched once."""
    taken = [c for c in mapping if c >= 0]
    assert len(taken) == len(set(taken))  # one-to-one
    return int(sum(confusion[c, k] for k, c in enumerate(mapping) if c >= 0))


def test_hungarian_matches_as_many_pixels_as_the_best_assignment():
    """Against brute force over every assignment, on matrices where a greedy pick (largest cell first) loses:
    [[5, 4], [4, 0]] greedy takes 5 and then 0 (5 pixels), the optimum crosses (8); and on random K <= 6
    matrices with empty classes and empty clusters, square or with extra clusters."""
    trap = np.array([[5, 4], [4, 0]])
    assert matched_pixels(trap, hungarian_match(trap)) == best_by_brute_force(trap) == 8
    rng = np.random.default_rng(0)
    for trial in range(300):
        classes = int(rng.integers(1, 7))
        clusters = classes + int(rng.integers(0, 3)) if classes < 6 else 6
        confusion = rng.integers(0, 20, (classes, clusters)) * (rng.random((classes, clusters)) < 0.7)
        if trial % 5 == 0:
            confusion[rng.integers(classes)] = 0  # a class without pixels
        mapping = hungarian_match(confusion)
        assert matched_pixels(confusion, mapping) == best_by_brute_force(confusion), confusion
        assert scores(remap_confusion(confusion, mapping)).acc == pytest.approx(
            best_by_brute_force(confusion) / max(confusion.sum(), 1)) or confusion.sum() == 0


def test_mapping_is_integer_and_an_unmatched_cluster_is_minus_one():
    """More clusters than classes: the extra cluster maps to exactly -1 (remap_confusion's "no class" column), and
    the mapping indexes arrays, so it is an integer array; remapped counts keep the confusion matrix's dtype."""
    confusion = np.array([[5, 0, 1], [0, 4, 2]], dtype=np.int64)  # 2 classes x 3 clusters
    mapping = hungarian_match(confusion)
    assert mapping.dtype == np.int64 and mapping.tolist() == [0, 1, -1]
    remapped = remap_confusion(confusion, mapping)
    assert remapped.dtype == np.int64 and remapped.tolist() == [[5, 0, 1], [0, 4, 2]]
