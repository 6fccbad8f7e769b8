"""The paper protocol's online probes (docs/hp.md §8): losses, gradients and Adam steps against float64 naive
re-computations, RNG isolation from the head, plain-data state, and the protocol/CRF keys."""

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.evaluation.online_probes import (
    OnlineProbes,
    cluster_lookup_loss,
    crf_enabled,
    online_probe_settings,
    protocol_of,
)
from pipeline.evaluation.probes import linear_probe_loss

ADAM_EPS = 1e-8


def settings(probes=("cluster", "linear"), n_classes=3, extra=0, seed=0):
    return {"probes": list(probes), "n_classes": n_classes, "extra_clusters": extra, "cluster_lr": 5e-3,
            "linear_lr": 1e-3, "seed": seed}


def naive_cluster(codes: np.ndarray, clusters: np.ndarray) -> tuple[float, np.ndarray]:
    """ClusterLookup's loss as the reference writes it (one-hot of the argmax times the cosines), and its
    gradient in the centroids by hand: d cos(x, c)/dc = (x̂ − cos·ĉ)/||c||."""
    x = codes.transpose(0, 2, 3, 1).reshape(-1, codes.shape[1])  # (N, D) patches
    xh = x / np.linalg.norm(x, axis=1, keepdims=True)
    cn = np.linalg.norm(clusters, axis=1, keepdims=True)
    ch = clusters / cn
    cos = xh @ ch.T  # (N, K)
    winner = cos.argmax(1)
    one_hot = np.eye(len(clusters))[winner]
    loss = -(one_hot * cos).sum(1).mean()
    grad = np.zeros_like(clusters)
    for i, k in enumerate(winner):
        grad[k] -= (xh[i] - cos[i, k] * ch[k]) / cn[k, 0] / len(x)
    return loss, grad


def bilinear_matrix(out: int, inp: int) -> np.ndarray:
    """Rows: output pixels; the weights of bilinear resizing with align_corners=False (PyTorch's convention)."""
    m = np.zeros((out, inp))
    for o in range(out):
        src = max((o + 0.5) * inp / out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), inp - 1)
        i1 = min(i0 + 1, inp - 1)
        m[o, i0] += 1 - (src - i0)
        m[o, i1] += src - i0
    return m


def naive_linear(codes, weight, bias, labels, n_classes):
    """Cross-entropy of the 1x1-conv logits upsampled to the label size, mean over labelled pixels, and its
    gradients in the conv's weight and bias, in float64 by hand."""
    b, _, h, w = codes.shape
    big_h, big_w = labels.shape[1:]
    my, mx = bilinear_matrix(big_h, h), bilinear_matrix(big_w, w)
    low = np.einsum("cd,bdij->bcij", weight, codes) + bias[None, :, None, None]
    up = np.einsum("Yi,bcij,Xj->bcYX", my, low, mx)
    up = up - up.max(1, keepdims=True)
    p = np.exp(up) / np.exp(up).sum(1, keepdims=True)
    valid = (labels >= 0) & (labels < n_classes)
    n = valid.sum()
    target = np.eye(n_classes)[np.where(valid, labels, 0)].transpose(0, 3, 1, 2)  # (B, C, H, W)
    loss = -(np.log(p) * target).sum(1)[valid].sum() / n
    g_up = (p - target) * valid[:, None] / n
    g_low = np.einsum("Yi,bcYX,Xj->bcij", my, g_up, mx)
    return loss, np.einsum("bcij,bdij->cd", g_low, codes), g_low.sum((0, 2, 3))


def adam_first_step(param: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
    """Adam's first update: the bias-corrected moments are g and g², so the step is lr·g/(|g| + eps)."""
    return param - lr * grad / (np.abs(grad) + ADAM_EPS)


def test_cluster_lookup_loss_gradient_and_step_match_float64():
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(2, 6, 3, 4, generator=g)
    probes = OnlineProbes(6, settings(probes=["cluster"], n_classes=4, extra=1), torch.device("cpu"), False)
    c0 = probes.clusters.detach().double().numpy().copy()
    loss, grad = naive_cluster(codes.double().numpy(), c0)
    clusters = probes.clusters.detach().clone().requires_grad_()
    ours = cluster_lookup_loss(codes, clusters)
    ours.backward()
    assert ours.item() == pytest.approx(loss, abs=1e-6)
    np.testing.assert_allclose(clusters.grad.double().numpy(), grad, atol=1e-7)
    assert (np.abs(grad).sum(1) > 0).sum() >= 2  # several centroids win patches: the check is not vacuous
    terms = probes.step(codes, None)
    assert terms["cluster_probe"] == pytest.approx(loss, abs=1e-6) and "linear_probe" not in terms
    np.testing.assert_allclose(probes.clusters.detach().double().numpy(), adam_first_step(c0, grad, 5e-3), atol=1e-6)
    assert probes.clusters.shape == (5, 6)  # n_classes + extra_clusters centroids


def test_linear_probe_cross_entropy_at_label_size_matches_float64():
    g = torch.Generator().manual_seed(1)
    n_classes = 3
    codes = torch.randn(2, 5, 3, 3, generator=g)
    labels = torch.randint(0, n_classes, (2, 8, 8), generator=g)
    labels[0, :3, :] = 255  # ignored pixels
    labels[1, 5, 5] = 7  # out of range: ignored too
    probes = OnlineProbes(5, settings(probes=["linear"], n_classes=n_classes), torch.device("cpu"), True)
    w0 = probes.linear.conv.weight.detach()[:, :, 0, 0].double().numpy().copy()
    b0 = probes.linear.conv.bias.detach().double().numpy().copy()
    loss, gw, gb = naive_linear(codes.double().numpy(), w0, b0, labels.numpy(), n_classes)
    ours = linear_probe_loss(probes.linear, codes, labels, n_classes)
    ours.backward()
    assert ours.item() == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(probes.linear.conv.weight.grad[:, :, 0, 0].double().numpy(), gw, atol=1e-6)
    np.testing.assert_allclose(probes.linear.conv.bias.grad.double().numpy(), gb, atol=1e-6)
    probes.linear.zero_grad()
    terms = probes.step(codes, labels.to(torch.uint8))  # the store's label dtype
    assert terms["linear_probe"] == pytest.approx(loss, rel=1e-6) and "cluster_probe" not in terms
    np.testing.assert_allclose(probes.linear.conv.weight.detach()[:, :, 0, 0].double().numpy(),
                               adam_first_step(w0, gw, 1e-3), atol=1e-6)
    np.testing.assert_allclose(probes.linear.conv.bias.detach().double().numpy(), adam_first_step(b0, gb, 1e-3),
                               atol=1e-6)
    assert probes.linear_steps == 1 and probes.steps == 1


def test_a_batch_without_labelled_pixels_leaves_the_linear_probe_alone():
    probes = OnlineProbes(4, settings(), torch.device("cpu"), True)
    before = {k: v.clone() for k, v in probes.linear.state_dict().items()}
    terms = probes.step(torch.randn(1, 4, 2, 2), torch.full((1, 4, 4), 255, dtype=torch.uint8))
    assert "linear_probe" not in terms and probes.linear_steps == 0  # the reference: a NaN loss, a skipped step
    for key, value in probes.linear.state_dict().items():
        assert torch.equal(value, before[key])


def test_probes_draw_nothing_from_the_heads_rng_and_start_from_their_seed():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = OnlineProbes(8, settings(seed=5), torch.device("cpu"), True)
    a.step(torch.randn(2, 8, 2, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 4, 4, dtype=torch.uint8))
    assert torch.equal(torch.get_rng_state(), state)  # the head's dropout draws are the same under either protocol
    b = OnlineProbes(8, settings(seed=5), torch.device("cpu"), True)
    assert torch.equal(b.clusters, torch.randn(3, 8, generator=torch.Generator().manual_seed(5)))  # N(0, 1) init
    c = OnlineProbes(8, settings(seed=6), torch.device("cpu"), True)
    assert not torch.equal(b.linear.conv.weight, c.linear.conv.weight)


def test_state_is_plain_data_and_a_reload_continues_identically(tmp_path):
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 6, 3, 3, generator=g), torch.randint(0, 3, (2, 6, 6), generator=g)) for _ in range(4)]
    straight = OnlineProbes(6, settings(), torch.device("cpu"), True)
    for codes, labels in batches:
        straight.step(codes, labels)
    first = OnlineProbes(6, settings(), torch.device("cpu"), True)
    for codes, labels in batches[:2]:
        first.step(codes, labels)
    torch.save(first.state_dict(), tmp_path / "probes.pt")
    resumed = OnlineProbes(6, settings(seed=9), torch.device("cpu"), True)  # different start: the state overrides
    resumed.load_state_dict(torch.load(tmp_path / "probes.pt", weights_only=True))
    for codes, labels in batches[2:]:
        resumed.step(codes, labels)
    assert torch.equal(resumed.clusters, straight.clusters)
    for key, value in straight.linear.state_dict().items():
        assert torch.equal(resumed.linear.state_dict()[key], value), key
    assert (resumed.steps, resumed.linear_steps) == (4, 4)


def test_protocol_and_crf_keys():
    config = load_config("synthetic")
    assert protocol_of(config) == "kmeans" and crf_enabled(config) is False  # crf = auto: off under kmeans
    assert online_probe_settings(config) is None
    config["evaluate"]["protocol"] = "paper"
    assert crf_enabled(config) is True  # auto: on under the paper protocol, as the reference reports
    assert online_probe_settings(config) == {"probes": ["cluster", "linear"], "n_classes": 8, "extra_clusters": 0,
                                             "cluster_lr": 5e-3, "linear_lr": 1e-3, "seed": 0}
    for value, expected in (("false", False), ("True", True), (False, False)):
        config["evaluate"]["crf"] = value
        assert crf_enabled(config) is expected
    config["evaluate"]["crf"] = "sometimes"
    with pytest.raises(UserError, match="evaluate.crf must be true, false or auto"):
        crf_enabled(config)
    config["evaluate"]["protocol"] = "stego"
    with pytest.raises(UserError, match="evaluate.protocol must be one of paper, kmeans"):
        protocol_of(config)
    from pipeline.methods.registry import method_of

    hcl = load_config("synthetic", {"train.method": "hcl", "evaluate.protocol": "paper"})
    assert method_of(hcl).online_probes(hcl) is None  # HCL trains no probes with its head


def test_paper_protocol_is_refused_for_hcl_before_any_work(tmp_path):
    from stages import evaluate

    config = load_config("synthetic", {"train.method": "hcl", "evaluate.protocol": "paper"})
    with pytest.raises(UserError, match="evaluate.protocol = paper is not one of HCL's evaluations.*--set "
                                        "evaluate.protocol=kmeans"):
        evaluate.run(config, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was prepared or trained
