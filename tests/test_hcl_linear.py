"""HCL's linear probe protocol (docs/hcl.md §5): a 1x1 conv on the frozen features, dense CRF on by default, and the
HCL reference's optimizer for its linear fine-tuning (SGD 0.1, momentum 0.9, weight decay 1e-4, lr x 0.1 from
epoch 4), named with epochs and resolution in metrics.json; HP keeps Adam (docs/hp.md §8)."""

import numpy as np
import pytest
import torch

from cache import writer
from cache.reader import FeatureStore
from cache.schema import CodesLayout
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.evaluation import scoring as evaluation
from pipeline.evaluation.crf import CRF_PARAMS
from pipeline.evaluation.online_probes import crf_enabled
from pipeline.evaluation.probes import LinearProbe, linear_optimizer, linear_probe_loss
from pipeline.training.checkpoints import load_checkpoint

SGD = {"optimizer": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "lr_drop_epoch": 4, "lr_drop": 0.1}


def codes_store(path, n=8, grid=4, dim=6, label_size=8, classes=3) -> FeatureStore:
    rng = np.random.default_rng(0)
    patch_labels = rng.integers(0, classes, size=(n, grid, grid))
    codes = np.eye(dim)[patch_labels] * 3 + rng.normal(0, 0.5, size=(n, grid, grid, dim))
    labels = np.repeat(np.repeat(patch_labels, label_size // grid, 1), label_size // grid, 2).astype(np.uint8)
    labels[:, 0, :] = 255  # ignored
    url = str(path / "codes.zarr")
    attrs = {"fingerprint": "x", "split": "train", "resolution": 64}
    group = writer.create_store(url, CodesLayout(n, grid, dim, label_size), 4, attrs, True)
    for c in range(n // 4):
        writer.write_chunk(group, c, {"feat": codes[4 * c:4 * c + 4].astype(np.float16),
                                      "label": labels[4 * c:4 * c + 4]})
    writer.mark_complete(group)
    return FeatureStore.open(url)


def test_hcl_runs_get_the_reference_sgd_and_crf_while_hp_keeps_adam():
    hp, hcl = load_config("synthetic"), load_config("synthetic", {"train.method": "hcl"})
    assert linear_optimizer(hp) == {"optimizer": "Adam", "lr": 1e-3}
    assert linear_optimizer(hcl) == SGD
    assert linear_optimizer(load_config("voc")) == SGD  # the VOC preset trains HCL
    assert crf_enabled(hcl) and not crf_enabled(hp)  # crf = auto: on for HCL, off for HP under kmeans
    chosen = load_config("synthetic", {"train.method": "hcl", "evaluate.linear_optimizer": "adam",
                                       "evaluate.crf": "false"})
    assert linear_optimizer(chosen) == {"optimizer": "Adam", "lr": 1e-3} and not crf_enabled(chosen)
    with pytest.raises(UserError, match="evaluate.linear_optimizer"):
        load_config("synthetic", {"evaluate.linear_optimizer": "lbfgs"})
    hp["evaluate"]["linear_optimizer"] = "lbfgs"  # a config built without the range check
    with pytest.raises(UserError, match="adam, sgd or auto"):
        linear_optimizer(hp)


def test_sgd_probe_equals_a_hand_written_sgd_with_the_step_schedule(tmp_path):
    store = codes_store(tmp_path)
    e_cfg = {"seed": 0, "linear_lr": 1e-3, "linear_epochs": 3, "batch_size": 4}
    opt = {**SGD, "lr_drop_epoch": 2}
    probe = evaluation.train_linear(store, 3, e_cfg, tmp_path / "probe.pt", print, opt)

    torch.manual_seed(0)  # the same initial weights, then SGD written out: buf = m·buf + (g + wd·p); p -= lr·buf
    naive = LinearProbe(6, 3)
    bufs = [torch.zeros_like(p) for p in naive.parameters()]
    for epoch in range(3):
        lr = 0.1 * (0.1 if epoch >= 2 else 1.0)
        for batch in store.batches(["feat", "label"], 4, shuffle_seed=epoch):
            loss = linear_probe_loss(naive, batch["feat"].float().permute(0, 3, 1, 2), batch["label"], 3)
            grads = torch.autograd.grad(loss, list(naive.parameters()))
            with torch.no_grad():
                for p, g, buf in zip(naive.parameters(), grads, bufs, strict=True):
                    buf.mul_(0.9).add_(g + 1e-4 * p)
                    p.sub_(lr * buf)
    for got, want in zip(probe.parameters(), naive.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert load_checkpoint(tmp_path / "probe.pt")["settings"] == {"seed": 0, "batch_size": 4, **opt}

    # resumed after epoch 1: the same weights (the lr is set from the epoch, the momentum comes back)
    evaluation.train_linear(store, 3, {**e_cfg, "linear_epochs": 1}, tmp_path / "resumed.pt", print, opt)
    resumed = evaluation.train_linear(store, 3, e_cfg, tmp_path / "resumed.pt", print, opt)
    for got, want in zip(resumed.parameters(), probe.parameters(), strict=True):
        assert torch.equal(got, want)


def test_metrics_name_the_linear_probes_optimizer_epochs_and_resolution(tmp_path):
    store = codes_store(tmp_path)
    config = load_config("synthetic", {"train.method": "hcl"})
    settings = evaluation.protocol_settings(config, "kmeans", crf_enabled(config), None, store)
    linear = settings["linear_probe"]
    assert {k: linear[k] for k in SGD} == SGD
    assert linear["epochs"] == config["evaluate"]["linear_epochs"] and linear["batch_size"] == 8
    assert linear["resolution"] == "64 px training crops as cached (4x4 features, labels 8x8), no augmentation"
    assert settings["crf"]["enabled"] is True  # the HCL reference's CRF values (10 iterations, 1/3, 67/3/4)
    assert {k: settings["crf"][k] for k in CRF_PARAMS} == CRF_PARAMS
    hp = evaluation.protocol_settings(load_config("synthetic"), "kmeans", False, None, store)["linear_probe"]
    assert (hp["optimizer"], hp["lr"]) == ("Adam", 1e-3) and "momentum" not in hp
