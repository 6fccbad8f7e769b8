"""HCL through the stages on a tiny synthetic cache: its store arrays, training (schedule, MoGo, exact resume, NaN
guard), evaluation (codes against a direct computation, overclustering rows) and the stage graph."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cache import writer
from cache.reader import FeatureStore
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.hcl.foreground import foreground_mask
from pipeline.hcl.heads import build_model
from pipeline.hcl.multilevel import branch_forward
from pipeline.hcl.step import lr_at, param_groups, two_variants
from pipeline.runner import read_manifest
from stages import evaluate, features, features_hcl, train_hcl
from stages import train as train_stage

TINY = {
    "dataset.n_train": "4", "dataset.n_val": "2", "dataset.size": "128",
    "prepare.resolution": "64", "prepare.val_resolution": "64",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random",
    "features.n_views": "2", "features.chunk_size": "4",
    "train.method": "hcl", "train.log_interval": "1", "train.checkpoint_interval": "3",
    "hcl.batch_size": "4", "hcl.epochs": "3", "hcl.dim": "32", "hcl.hidden": "64", "hcl.out_dim": "16",
    "hcl.heads": "2", "hcl.clusters": "8", "hcl.kmeans_min_points": "2", "hcl.lr_drop_epoch": "2",
    "hcl.lr": "1e-3", "evaluate.overcluster_k": "6", "evaluate.overcluster_seeds": "2",
    "evaluate.linear_epochs": "1",
}


def tiny_config(**extra):
    return load_config("synthetic", {**TINY, **extra})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hcl")
    features_hcl.run(tiny_config(), path, "train")
    return path


def store_of(workdir, split="train"):
    return FeatureStore.open(read_manifest(workdir / "synthetic", f"features-{split}")["outputs"]["store"])


def test_hcl_arrays_match_a_direct_computation(workdir):
    store = store_of(workdir)
    backbone = features.resolve_backbone(tiny_config())
    x = torch.from_numpy(store.read("image", 0, 4)).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    x = (x - mean) / std
    p32, _, _ = branch_forward(backbone, x, 32)
    _, cls, _ = branch_forward(backbone, x, 16)
    np.testing.assert_allclose(store.read("hcl_p32", 0, 4).astype(np.float32), p32.numpy(), atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(store.read("hcl_cls", 0, 4).astype(np.float32), cls.numpy(), atol=2e-2, rtol=1e-2)
    mask = foreground_mask(torch.from_numpy(store.read("cls_attn", 0, len(store))).float())
    assert np.array_equal(store.read("fg_mask", 0, len(store)), mask.numpy())
    variants = store.read("hcl_aug_p16", 0, len(store))
    assert variants.shape == (len(store), 2, 4, 4, 384)
    assert not np.array_equal(variants[:, 0], variants[:, 1])  # two different photometric variants per crop
    assert store.array("hcl_aug_p56").shape[1:] == (2, 1, 1, 384)
    preview = read_manifest(workdir / "synthetic", "features-train-hcl")["outputs"]["preview"]
    assert preview.endswith("train-foreground.png") and os.path.getsize(preview) > 0


def test_hcl_stage_resumes_unfinished_chunks_and_leaves_hp_arrays_alone(workdir):
    config, sdir = tiny_config(), workdir / "synthetic"
    store = store_of(workdir)
    before = {n: store.read(n, 0, len(store)) for n in store.names()}
    feat_finished = read_manifest(sdir, "features-train")["finished"]
    group = writer.open_group(store.url, mode="r+")
    group["_done_hcl"][1] = False  # as if killed while writing chunk 1
    group["hcl_aug_p16"][4:8] = 0
    manifest = read_manifest(sdir, "features-train-hcl")
    manifest["status"] = "interrupted"
    (sdir / "stages" / "features-train-hcl.json").write_text(json.dumps(manifest))
    features_hcl.run(config, workdir, "train")
    after = FeatureStore.open(store.url)
    for name, values in before.items():
        assert np.array_equal(after.read(name, 0, len(after)), values), name
    assert read_manifest(sdir, "features-train")["finished"] == feat_finished  # HP's stage was not rerun


def test_schedule_groups_and_variants():
    assert [lr_at(e, 1e-4, 3, 0.1) for e in range(5)] == pytest.approx([1e-4] * 3 + [1e-5] * 2)
    model = build_model(48, {"dim": 16, "hidden": 32, "out_dim": 8, "heads": 2})
    (group,) = param_groups(model, 0.04)  # §4: one group, weight decay on all trained parameters
    names = {id(p): n for n, p in model.named_parameters()}
    assert group["weight_decay"] == 0.04
    assert sorted(names[id(p)] for p in group["params"]) == sorted(n for n in names.values()
                                                                   if not n.startswith("momentum"))
    first, second = two_variants(1000, 3, torch.Generator().manual_seed(0))
    assert (first != second).all() and set(first.tolist()) == {0, 1, 2} and set(second.tolist()) == {0, 1, 2}


def test_run_logs_schedule_and_clusters_once_per_epoch(workdir):
    config = tiny_config()
    manifest = train_stage.run(config, workdir)
    out = train_stage.run_dir(config, workdir, "hcl")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 16))  # 20 crops / 4 = 5 per epoch, 3 epochs
    assert {r["lr"] for r in records if r["epoch"] < 2} == {1e-3}
    assert [r["lr"] for r in records if r["epoch"] >= 2] == pytest.approx([1e-4] * 5)
    assert len(manifest["timings"]["mogo_seconds"]) == 3
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    fg = state["centroids"]["fg"]  # §3: both forms kept, the raw ones for a(i), the unit ones for the logits
    assert state["clustered_epoch"] == 2 and fg["raw"].shape == fg["unit"].shape == (8, 16)
    assert torch.allclose(fg["unit"].norm(dim=1), torch.ones(8), atol=1e-5)
    torch.testing.assert_close(fg["unit"], F.normalize(fg["raw"], dim=1))
    assert (fg["raw"].norm(dim=1) < 0.999).any()  # means of unit keys: the raw centroids are not unit vectors
    assert (out / "curves.png").stat().st_size > 0 and manifest["outputs"]["random_init"] is True


def test_interrupted_run_resumes_to_identical_weights(workdir, monkeypatch):
    config = tiny_config()
    train_stage.run(config, workdir, "straight")
    straight = torch.load(train_stage.run_dir(config, workdir, "straight") / "checkpoints" / "last.pt",
                          weights_only=True)
    real_step, calls = train_hcl.training_step, []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # epoch 1, two steps past the checkpoint at iteration 6
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_hcl, "training_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(config, workdir, "resumed")
    monkeypatch.setattr(train_hcl, "training_step", real_step)
    assert read_manifest(workdir / "synthetic", "train-resumed")["status"] == "interrupted"
    train_stage.run(config, workdir, "resumed")
    out = train_stage.run_dir(config, workdir, "resumed")
    resumed = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["iteration"] == straight["iteration"] == 15
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for kind in ("fg", "bg"):
        for form in ("raw", "unit"):
            assert torch.equal(straight["centroids"][kind][form], resumed["centroids"][kind][form])
        assert np.array_equal(straight["banks"][kind]["data"], resumed["banks"][kind]["data"])
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert strip(out / "metrics.jsonl") == strip(train_stage.run_dir(config, workdir, "straight") / "metrics.jsonl")


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(workdir, monkeypatch):
    config = tiny_config()
    real_step = train_hcl.training_step

    def nan_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_hcl, "training_step", nan_step)
    with pytest.raises(UserError, match="diverged.*hcl.lr"):
        train_stage.run(config, workdir, "nan")
    assert (train_stage.run_dir(config, workdir, "nan") / "checkpoints" / "last.pt").exists()  # the post-MoGo one


def test_evaluate_codes_are_the_online_head_on_concatenated_branches(workdir):
    config = tiny_config()
    manifest = evaluate.run(config, workdir)
    rdir = train_stage.run_dir(config, workdir, "hcl")
    state = torch.load(rdir / "checkpoints" / "last.pt", weights_only=True)
    model = build_model(state["width"], state["hcl"])
    model.load_state_dict(state["model"])
    model.eval()
    val = store_of(workdir, "val")
    feat = torch.from_numpy(val.read("feat", 0, 2)).float()  # (2, 4, 4, 384)
    up = lambda name: F.interpolate(torch.from_numpy(val.read(name, 0, 2)).float().permute(0, 3, 1, 2),  # noqa: E731
                                    size=(4, 4), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    cls = torch.from_numpy(val.read("hcl_cls", 0, 2)).float()[:, None, None, :].expand(2, 4, 4, 384)
    x = torch.cat([feat, up("hcl_p32"), up("hcl_p56"), cls], dim=-1).reshape(2, 16, -1)
    with torch.no_grad():
        expected = model.features(x).reshape(2, 4, 4, -1).numpy()
    codes = FeatureStore.open(str(rdir / "codes" / "val.zarr")).read("feat", 0, 2).astype(np.float32)
    np.testing.assert_allclose(codes, expected, atol=1e-2, rtol=1e-2)
    metrics = json.loads((rdir / "eval" / "metrics.json").read_text())
    names = {r["name"] for r in metrics["results"]}
    assert {"HCL cluster", "HCL linear", "DINO cluster", "HCL overcluster K=6", "DINO overcluster K=6"} <= names
    over = next(r for r in metrics["results"] if r["name"] == "HCL overcluster K=6")
    assert over["seeds"] == 2 and over["miou_std"] >= 0 and 0 <= over["acc"] <= 100
    assert metrics["method"] == "hcl" and manifest["status"] == "complete"
    assert "± " in (rdir / "eval" / "report.md").read_text()


def test_hcl_arrays_of_another_version_are_refused(workdir, monkeypatch):
    """Stores written with the bilinear kernels (HCL schema 1, no `hcl_schema` attribute) are refused with the
    command that rebuilds them, and a new HCL schema changes the features-<split>-hcl fingerprint."""
    from cache.schema import HCL_SCHEMA
    from pipeline import graph
    from pipeline.config import fingerprint

    config, store = tiny_config(), store_of(workdir)
    assert store.attrs["hcl"]["hcl_schema"] == HCL_SCHEMA == 2
    group = writer.open_group(store.url, mode="r+")
    saved = dict(group.attrs["hcl"])
    try:
        group.attrs["hcl"] = {k: v for k, v in saved.items() if k != "hcl_schema"}  # as written before schema 2
        with pytest.raises(UserError, match=r"version 1.*rerun `hp-pipe features --method hcl`.*--force"):
            features_hcl.hcl_arrays(FeatureStore.open(store.url))
        with pytest.raises(UserError, match="features --method hcl"):  # train reads the store: refused too
            train_stage.run(config, workdir, "old-store")
    finally:
        group.attrs["hcl"] = saved
    assert features_hcl.hcl_arrays(FeatureStore.open(store.url))
    now = graph.stage_plan(config, workdir)["features-train-hcl"]
    monkeypatch.setattr(graph, "HCL_SCHEMA", 1)
    before = graph.stage_plan(config, workdir)["features-train-hcl"]
    assert now[0]["hcl_schema"] == 2 and before[0]["hcl_schema"] == 1
    assert fingerprint(*now) != fingerprint(*before)  # an old manifest is stale: the arrays are recomputed


def test_hcl_needs_two_variants_and_a_known_method(workdir):
    with pytest.raises(UserError, match="hcl_features.views"):
        train_stage.run(tiny_config(**{"hcl_features.views": "1"}), workdir)
    with pytest.raises(UserError, match="train.method must be one of hp, hcl"):
        train_stage.run(tiny_config(**{"train.method": "hcp"}), workdir)


def test_local_cluster_writes_the_same_hcl_arrays(workdir, tmp_path):
    reference = store_of(workdir)
    url = str(tmp_path / "dist.zarr")
    features_hcl.run(tiny_config(), tmp_path, "train", store=url, scheduler="local-cluster", workers=2)
    distributed = FeatureStore.open(url)
    for name in features_hcl.hcl_arrays(reference):
        a, b = reference.read(name, 0, len(reference)), distributed.read(name, 0, len(distributed))
        if a.dtype == bool:
            assert np.array_equal(a, b), name
        else:  # one torch thread per worker: float reductions may differ in the last bits
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-2, err_msg=name)


def test_vit_s8_gets_four_branches(tmp_path):
    config = tiny_config(**{"features.backbone": "vit_small_patch8_224.dino", "dataset.n_train": "1"})
    manifest = features_hcl.run(config, tmp_path, "train")
    store = FeatureStore.open(manifest["outputs"]["store"])
    assert manifest["outputs"]["patch_sizes"] == [8, 16, 32, 56]
    shapes = {n: store.array(n).shape[1:] for n in features_hcl.hcl_arrays(store)}
    assert shapes["hcl_p16"] == (4, 4, 384) and shapes["hcl_p32"] == (2, 2, 384) and shapes["fg_mask"] == (8, 8)
    assert shapes["hcl_aug_p8"] == (2, 8, 8, 384) and shapes["hcl_aug_p56"] == (2, 1, 1, 384)


def test_native_grids_against_the_concatenated_form():
    from cache.schema import HCLLayout

    layout = HCLLayout(1, 224, (16, 32, 56), 384, 2)  # the spec's example: 14x14, 7x7, 4x4 + CLS at 224 px
    per_crop = (14 * 14 + 7 * 7 + 4 * 4 + 1) * 384 * 2
    assert layout.native_fp16_bytes_per_sample() == 3 * per_crop  # the plain crop and two variants
    assert layout.concatenated_fp16_bytes_per_sample() == 3 * 14 * 14 * 4 * 384 * 2
    assert 0.3 < layout.native_fp16_bytes_per_sample() / layout.concatenated_fp16_bytes_per_sample() < 0.35


def test_predict_with_live_branches_agrees_with_the_cached_evaluation(workdir, tmp_path):
    from PIL import Image

    from pipeline.probes import cosine_scores
    from stages import predict

    config = tiny_config()
    evaluate.run(config, workdir)  # up to date after the evaluate test; computed here when run alone
    rdir = train_stage.run_dir(config, workdir, "hcl")
    metrics = json.loads((rdir / "eval" / "metrics.json").read_text())
    val = store_of(workdir, "val")
    (tmp_path / "in").mkdir()
    Image.fromarray(val.read("image", 0, 1)[0]).save(tmp_path / "in" / "val0.png")
    predict.run(config, workdir, None, tmp_path / "in", tmp_path / "out", "cluster", crf=False)
    row = next(r for r in metrics["results"] if r["name"] == "HCL cluster")
    centroids = torch.from_numpy(np.load(metrics["probes"]["centroids"]))
    codes = torch.from_numpy(FeatureStore.open(str(rdir / "codes" / "val.zarr")).read("feat", 0, 1)).float()
    cached = np.asarray(row["cluster_to_class"])[cosine_scores(codes.permute(0, 3, 1, 2), centroids,
                                                               (64, 64)).argmax(1)[0].numpy()]
    live = np.asarray(Image.open(tmp_path / "out" / "val0.png"))
    assert (live == np.where(cached >= 0, cached, 255)).mean() > 0.95
