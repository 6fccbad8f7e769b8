"""HCL through the stages on a tiny synthetic set: its own stores (built from the source images, without HP's prepare),
training (one crop per image and epoch, schedule, MoGo, exact resume, NaN guard), evaluation (codes against a direct
computation, overclustering rows, predict) and the stage graph."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cache import writer
from cache.reader import FeatureStore
from cache.schema import CodesLayout
from pipeline.config import load_config
from pipeline.datasets import open_split
from pipeline.errors import UserError
from pipeline.extraction.backbone import normalize
from pipeline.extraction.workers import resolve_backbone
from pipeline.methods.hcl import training as hcl_training
from pipeline.methods.hcl.foreground import foreground_mask
from pipeline.methods.hcl.heads import build_model
from pipeline.methods.hcl.multilevel import branch_forward
from pipeline.methods.hcl.step import lr_at, param_groups, two_variants
from pipeline.methods.hcl.store import hcl_arrays
from pipeline.methods.hcl.views import crop_box, draw_photometric, epoch_keep, train_views
from pipeline.orchestration import paths
from pipeline.orchestration.runner import read_manifest
from stages import evaluate, features_hcl
from stages import train as train_stage
from tests.fixtures import kill_training_when

TINY = {
    "dataset.n_train": "4", "dataset.n_val": "2", "dataset.size": "96",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random", "features.chunk_size": "4",
    "hcl_features.resolution": "64", "hcl_features.crop_resolution": "128", "hcl_features.val_resolution": "64",
    "train.method": "hcl", "train.log_interval": "1", "train.checkpoint_interval": "3",
    "hcl.batch_size": "2", "hcl.epochs": "3", "hcl.dim": "32", "hcl.hidden": "64", "hcl.out_dim": "16",
    "hcl.heads": "2", "hcl.clusters": "4", "hcl.kmeans_min_points": "1", "hcl.lr_drop_epoch": "2",
    "hcl.lr": "1e-3", "evaluate.overcluster_k": "6", "evaluate.overcluster_seeds": "2",
    "evaluate.linear_epochs": "1", "evaluate.crf": "false",
}
IMAGES, CROPS, BATCH = 4, 2, 2


def tiny_config(**extra):
    return load_config("synthetic", {**TINY, **extra})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """`hp-pipe features --method hcl` on a fresh workdir: both of HCL's stores, nothing of HP's."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    path = tmp_path_factory.mktemp("hcl")
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(app, ["features", "--dataset", "synthetic", "--method", "hcl", "--workdir",
                                      str(path), *sets])
    assert result.exit_code == 0, result.output
    return path


def store_of(workdir, split="train"):
    return FeatureStore.open(read_manifest(workdir / "synthetic", f"features-{split}-hcl")["outputs"]["store"])


def test_a_fresh_workdir_gets_hcl_stores_without_hp_prepare_or_features(workdir):
    sdir, config = workdir / "synthetic", tiny_config()
    assert not (sdir / "prepared").exists()  # no five-crops, no prepare stage
    assert {p.stem for p in (sdir / "stages").glob("*.json")} == {"features-train-hcl", "features-val-hcl"}
    assert sorted(p.name for p in (sdir / "features").glob("*.zarr")) == [
        "hcl-train-vit_small_patch16_224.dino-64.zarr", "hcl-val-vit_small_patch16_224.dino-64.zarr"]
    for split in ("train", "val"):
        store = store_of(workdir, split)
        assert store.url == paths.hcl_store_url(config, workdir, split) and store.attrs["kind"] == "hcl"
        assert hcl_arrays(store)
    preview = read_manifest(sdir, "features-train-hcl")["outputs"]["preview"]
    assert preview.endswith("hcl-train-foreground.png") and os.path.getsize(preview) > 0


def test_train_store_holds_each_images_crops_views_and_branches(workdir):
    """Sample s = (slot s // R, crop s % R); its crop box, pixels, label, branches, mask and variants against a direct
    computation from the source image."""
    config, store = tiny_config(), store_of(workdir)
    h = config["hcl_features"]
    assert len(store) == IMAGES * CROPS and (store.attrs["images"], store.attrs["crops"]) == (IMAGES, CROPS)
    sources, boxes = store.read("source_image", 0, len(store)), store.read("crop_box", 0, len(store))
    assert sorted(sources.tolist()) == sorted(list(range(IMAGES)) * CROPS)
    assert np.array_equal(sources[0::2], sources[1::2])  # the R crops of an image side by side
    assert (boxes[0::2] != boxes[1::2]).any(axis=1).all()  # each crop its own scale and offset
    dataset, backbone = open_split(config, workdir, "train"), resolve_backbone(config)
    for s in (0, 3, 6):
        i, r = int(sources[s]), s % CROPS
        sample = dataset[i]
        box = crop_box(*sample.image.shape[:2], h["seed"], i, r)
        assert tuple(boxes[s]) == box
        plain, views, label = train_views(sample.image, sample.label, box,
                                          [draw_photometric(h["seed"], i, r, v) for v in range(2)], 128, 64)
        assert np.array_equal(store.read("image", s, s + 1)[0], plain)
        assert np.array_equal(store.read("label", s, s + 1)[0], label)
        x = normalize(torch.from_numpy(plain[None].copy()))
        feat, cls, attn = branch_forward(backbone, x, 16)
        p56, _, _ = branch_forward(backbone, x, 56)
        for name, want in (("feat", feat), ("hcl_cls", cls), ("hcl_p56", p56)):
            np.testing.assert_allclose(store.read(name, s, s + 1).astype(np.float32), want.numpy(), atol=2e-2,
                                       rtol=1e-2, err_msg=name)
        assert np.array_equal(store.read("fg_mask", s, s + 1), foreground_mask(attn).numpy())
        aug, aug_cls, _ = branch_forward(backbone, normalize(torch.from_numpy(views)), 16)
        np.testing.assert_allclose(store.read("hcl_aug_p16", s, s + 1)[0].astype(np.float32), aug.numpy(),
                                   atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(store.read("hcl_aug_cls", s, s + 1)[0].astype(np.float32), aug_cls.numpy(),
                                   atol=2e-2, rtol=1e-2)
    variants = store.read("hcl_aug_p16", 0, len(store))
    assert variants.shape == (len(store), 2, 4, 4, 384) and not np.array_equal(variants[:, 0], variants[:, 1])
    assert store.array("hcl_aug_p56").shape[1:] == (2, 1, 1, 384)


def test_val_store_holds_each_whole_image_at_val_resolution(workdir):
    config, store = tiny_config(), store_of(workdir, "val")
    dataset = open_split(config, workdir, "val")
    assert len(store) == 2 and store.read("source_image", 0, 2).tolist() == [0, 1]
    assert not {"fg_mask", "crop_box", "hcl_aug_p16", "hcl_aug_cls"} & set(store.names())  # no crop, no variants
    for i in range(2):
        sample = dataset[i]
        x = torch.from_numpy(sample.image).permute(2, 0, 1)[None].float()
        direct = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        image = store.read("image", i, i + 1)[0]
        assert image.shape == (64, 64, 3) and np.abs(image - direct).max() <= 0.5 + 1e-4  # the whole image
        idx = (np.arange(64) * sample.label.shape[0]) // 64
        assert np.array_equal(store.read("label", i, i + 1)[0], sample.label[idx[:, None], idx[None, :]])
    backbone = resolve_backbone(config)
    feat, cls, _ = branch_forward(backbone, normalize(torch.from_numpy(store.read("image", 0, 2))), 16)
    np.testing.assert_allclose(store.read("feat", 0, 2).astype(np.float32), feat.numpy(), atol=2e-2, rtol=1e-2)


def test_hcl_stage_resumes_unfinished_chunks(workdir):
    config, sdir = tiny_config(), workdir / "synthetic"
    store = store_of(workdir)
    before = {n: store.read(n, 0, len(store)) for n in store.names()}
    group = writer.open_group(store.url, mode="r+")
    group["_done"][1] = False  # as if killed while writing chunk 1
    group["hcl_aug_p16"][4:8] = 0
    group["image"][4:8] = 0
    manifest = read_manifest(sdir, "features-train-hcl")
    manifest["status"] = "interrupted"
    (sdir / "stages" / "features-train-hcl.json").write_text(json.dumps(manifest))
    again = features_hcl.run(config, workdir, "train")
    assert again["outputs"]["computed"] == 4  # only the unfinished chunk
    after = FeatureStore.open(store.url)
    for name, values in before.items():
        assert np.array_equal(after.read(name, 0, len(after)), values), name
    assert not (sdir / "prepared").exists()


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


def test_an_epoch_is_one_pass_over_the_images_with_one_crop_each(workdir, monkeypatch):
    """§4: iterations per epoch = images // batch; MoGo and the steps of an epoch read the same one crop per image,
    chosen from (hcl.seed, epoch); epochs differ. Also the schedule, MoGo once per epoch and both centroid forms."""
    config = tiny_config()
    seen = []
    real = FeatureStore.batches

    def spy(self, names, batch_size, *args, **kwargs):
        for batch in real(self, names, batch_size, *args, **kwargs):
            seen.append((kwargs.get("shuffle_seed"), kwargs.get("keep"), batch["index"].tolist()))
            yield batch

    monkeypatch.setattr(FeatureStore, "batches", spy)
    manifest = train_stage.run(config, workdir)
    monkeypatch.setattr(FeatureStore, "batches", real)
    assert manifest["outputs"]["iterations_per_epoch"] == IMAGES // BATCH == 2
    seed = config["hcl"]["seed"]
    keeps = [epoch_keep(IMAGES, CROPS, seed, e) for e in range(3)]
    assert len({k.tobytes() for k in keeps}) > 1  # a new crop choice per epoch
    for epoch, keep in enumerate(keeps):
        kept = sorted(np.flatnonzero(keep).tolist())
        mogo = [c for c in seen if c[0] is None and np.array_equal(c[1], keep)]
        steps = [c for c in seen if c[0] == seed * 1000 + epoch]
        assert sorted(i for c in mogo for i in c[2]) == kept  # MoGo: every image once, its epoch crop
        assert all(np.array_equal(c[1], keep) for c in steps) and len(steps) == IMAGES // BATCH
        assert sorted(i for c in steps for i in c[2]) == kept  # the steps: the same crops, each once
    out = paths.run_dir(config, workdir, "hcl")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 7))  # 4 images / 2 = 2 per epoch, 3 epochs
    assert {r["lr"] for r in records if r["epoch"] < 2} == {1e-3}
    assert [r["lr"] for r in records if r["epoch"] >= 2] == pytest.approx([1e-4] * 2)
    assert len(manifest["timings"]["mogo_seconds"]) == 3
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    fg = state["centroids"]["fg"]  # §3: both forms kept, the raw ones for a(i), the unit ones for the logits
    assert state["clustered_epoch"] == 2 and fg["raw"].shape == fg["unit"].shape == (4, 16)
    torch.testing.assert_close(fg["unit"], F.normalize(fg["raw"], dim=1))
    assert (out / "curves.png").stat().st_size > 0 and manifest["outputs"]["random_init"] is True
    with pytest.raises(UserError, match="hcl.batch_size = 5 exceeds the 4 training images"):
        train_stage.run(tiny_config(**{"hcl.batch_size": "5"}), workdir, "too-big")


def test_interrupted_run_resumes_to_identical_weights(workdir, monkeypatch):
    config = tiny_config()
    train_stage.run(config, workdir, "straight")
    straight = torch.load(paths.run_dir(config, workdir, "straight") / "checkpoints" / "last.pt",
                          weights_only=True)
    real_step, calls = hcl_training.training_step, []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the 2nd step of epoch 1: resumed mid-epoch from the checkpoint at iteration 3
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(hcl_training, "training_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(config, workdir, "resumed")
    monkeypatch.setattr(hcl_training, "training_step", real_step)
    assert read_manifest(workdir / "synthetic", "train-resumed")["status"] == "interrupted"
    train_stage.run(config, workdir, "resumed")
    out = paths.run_dir(config, workdir, "resumed")
    resumed = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["iteration"] == straight["iteration"] == 6
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for kind in ("fg", "bg"):
        for form in ("raw", "unit"):
            assert torch.equal(straight["centroids"][kind][form], resumed["centroids"][kind][form])
        assert np.array_equal(straight["banks"][kind]["data"], resumed["banks"][kind]["data"])
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert strip(out / "metrics.jsonl") == strip(paths.run_dir(config, workdir, "straight") / "metrics.jsonl")


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(workdir, monkeypatch):
    config = tiny_config()
    real_step = hcl_training.training_step

    def nan_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(hcl_training, "training_step", nan_step)
    with pytest.raises(UserError, match="diverged.*hcl.lr"):
        train_stage.run(config, workdir, "nan")
    assert (paths.run_dir(config, workdir, "nan") / "checkpoints" / "last.pt").exists()  # the post-MoGo one


def test_evaluate_reads_hcl_stores_and_codes_are_the_online_head(workdir):
    config = tiny_config()
    manifest = evaluate.run(config, workdir)
    rdir = paths.run_dir(config, workdir, "hcl")
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
    codes = FeatureStore.open(str(rdir / "codes" / "val.zarr"))
    np.testing.assert_allclose(codes.read("feat", 0, 2).astype(np.float32), expected, atol=1e-2, rtol=1e-2)
    assert codes.array("label").shape == (2, 64, 64)  # the val store's whole-image labels
    train_codes = FeatureStore.open(str(rdir / "codes" / "train.zarr"))
    assert len(train_codes) == IMAGES * CROPS  # the linear probe sees the plain views of every cached crop
    metrics = json.loads((rdir / "eval" / "metrics.json").read_text())
    names = {r["name"] for r in metrics["results"]}
    raw = "ViT-S/16 features (random init)"  # the raw-feature rows say what they are: random weights here
    assert {"HCL cluster", "HCL linear", f"{raw} cluster", "HCL overcluster K=6", f"{raw} overcluster K=6"} <= names
    over = next(r for r in metrics["results"] if r["name"] == "HCL overcluster K=6")
    assert over["seeds"] == 2 and over["miou_std"] >= 0 and 0 <= over["acc"] <= 100
    assert metrics["method"] == "hcl" and manifest["status"] == "complete"
    assert "whole image" in metrics["protocol"]["val_resolution"]
    assert "± " in (rdir / "eval" / "report.md").read_text()
    assert not (workdir / "synthetic" / "prepared").exists()  # evaluation needed nothing of HP's either


def test_stores_of_another_version_are_refused(workdir, monkeypatch, tmp_path):
    """HCL stores of another version, and HCL arrays added to one of HP's stores (schema 1-2), are refused with the
    command that rebuilds them; a new HCL schema changes the features-<split>-hcl fingerprint."""
    from cache.schema import HCL_SCHEMA
    from pipeline.config import fingerprint
    from pipeline.orchestration import graph

    config, store = tiny_config(), store_of(workdir)
    assert store.attrs["hcl_schema"] == HCL_SCHEMA == 4
    group = writer.open_group(store.url, mode="r+")
    try:
        group.attrs["hcl_schema"] = 2
        with pytest.raises(UserError, match=r"version 2.*rerun `hp-pipe features --method hcl`.*--force"):
            hcl_arrays(FeatureStore.open(store.url))
        with pytest.raises(UserError, match="features --method hcl"):  # train reads the store: refused too
            train_stage.run(config, workdir, "old-store")
    finally:
        group.attrs["hcl_schema"] = HCL_SCHEMA
    old = writer.create_store(str(tmp_path / "hp.zarr"), CodesLayout(2, 1, 1), 2, {
        "fingerprint": "x", "hcl": {"hcl_schema": 2, "complete": True}}, True)
    writer.mark_complete(old)
    with pytest.raises(UserError, match=r"HCL arrays of version 2 added to HP's five-crop store.*--method hcl"):
        hcl_arrays(FeatureStore.open(str(tmp_path / "hp.zarr")))
    now = graph.stage_plan(config, workdir)["features-train-hcl"]
    import pipeline.methods.hcl.method as hcl_method

    monkeypatch.setattr(hcl_method, "HCL_SCHEMA", 2)
    before = graph.stage_plan(config, workdir)["features-train-hcl"]
    assert now[0]["hcl_schema"] == 4 and before[0]["hcl_schema"] == 2
    assert fingerprint(*now) != fingerprint(*before)  # an old manifest is stale: the store is rebuilt


def test_hcl_needs_two_crops_two_variants_and_a_known_method(workdir):
    for key in ("crops", "views"):
        config = tiny_config()
        config["hcl_features"][key] = 1  # past the config checks: the stage refuses it too
        with pytest.raises(UserError, match=f"hcl_features.{key} = 1.*--set hcl_features.{key}=2"):
            features_hcl.run(config, workdir, "train")
    with pytest.raises(UserError, match="train.method'? must be one of hp, hcl"):  # when built, or when run (the
        # registered methods, in order: HP and HCL first)
        train_stage.run(tiny_config(**{"train.method": "hcp"}), workdir)


def test_local_cluster_writes_the_same_store(workdir, tmp_path):
    reference = store_of(workdir)
    url = str(tmp_path / "dist.zarr")
    features_hcl.run(tiny_config(), tmp_path, "train", store=url, scheduler="local-cluster", workers=2)
    distributed = FeatureStore.open(url)
    assert distributed.names() == reference.names()
    for name in reference.names():
        a, b = reference.read(name, 0, len(reference)), distributed.read(name, 0, len(distributed))
        if a.dtype.kind in "biu":  # pixels, labels, masks, boxes: identical
            assert np.array_equal(a, b), name
        else:  # one torch thread per worker: float reductions may differ in the last bits
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-2, err_msg=name)


def test_vit_s8_gets_four_branches(tmp_path):
    config = tiny_config(**{"features.backbone": "vit_small_patch8_224.dino", "dataset.n_train": "1"})
    manifest = features_hcl.run(config, tmp_path, "train")
    store = FeatureStore.open(manifest["outputs"]["store"])
    assert manifest["outputs"]["patch_sizes"] == [8, 16, 32, 56]
    shapes = {n: store.array(n).shape[1:] for n in hcl_arrays(store)}
    assert shapes["feat"] == (8, 8, 384) and shapes["hcl_p16"] == (4, 4, 384) and shapes["hcl_p32"] == (2, 2, 384)
    assert shapes["fg_mask"] == (8, 8) and shapes["hcl_aug_p8"] == (2, 8, 8, 384)
    assert shapes["hcl_aug_p56"] == (2, 1, 1, 384)


def test_native_grids_against_the_concatenated_form():
    from cache.schema import HCLLayout

    layout = HCLLayout(1, 224, (16, 32, 56), 384, 2, True, True)  # the spec's example: 14x14, 7x7, 4x4 + CLS
    per_crop = (14 * 14 + 7 * 7 + 4 * 4 + 1) * 384 * 2
    assert layout.native_fp16_bytes_per_sample() == 3 * per_crop  # the plain crop and two variants
    assert layout.concatenated_fp16_bytes_per_sample() == 3 * 14 * 14 * 4 * 384 * 2
    assert 0.3 < layout.native_fp16_bytes_per_sample() / layout.concatenated_fp16_bytes_per_sample() < 0.35
    arrays = layout.arrays()
    assert arrays["image"] == ((224, 224, 3), "uint8") and arrays["crop_box"] == ((3,), "int32")
    val = HCLLayout(1, 448, (16, 32, 56), 384, 0, True, False).arrays()
    assert set(val) == {"feat", "hcl_p32", "hcl_p56", "hcl_cls", "image", "label", "source_image"}
    assert val["feat"][0] == (28, 28, 384) and val["label"][0] == (448, 448)


def test_predict_with_live_branches_agrees_with_the_cached_evaluation(workdir, tmp_path):
    from PIL import Image

    from pipeline.evaluation.probes import cosine_scores
    from stages import predict

    config = tiny_config()
    evaluate.run(config, workdir)  # up to date after the evaluate test; computed here when run alone
    rdir = paths.run_dir(config, workdir, "hcl")
    metrics = json.loads((rdir / "eval" / "metrics.json").read_text())
    val = store_of(workdir, "val")
    (tmp_path / "in").mkdir()
    Image.fromarray(val.read("image", 0, 1)[0]).save(tmp_path / "in" / "val0.png")
    predict.run(config, workdir, None, tmp_path / "in", tmp_path / "out", "cluster", crf=False)
    row = next(r for r in metrics["results"] if r["name"] == "HCL cluster")
    centroids = torch.from_numpy(np.load(rdir / "eval" / metrics["probes"]["centroids"]))  # relative to eval/
    codes = torch.from_numpy(FeatureStore.open(str(rdir / "codes" / "val.zarr")).read("feat", 0, 1)).float()
    cached = np.asarray(row["cluster_to_class"])[cosine_scores(codes.permute(0, 3, 1, 2), centroids,
                                                               (64, 64)).argmax(1)[0].numpy()]
    live = np.asarray(Image.open(tmp_path / "out" / "val0.png"))
    assert (live == np.where(cached >= 0, cached, 255)).mean() > 0.95


@pytest.mark.parametrize("kill_at", ["right-after-clustering", "mid-epoch"])
@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_weights(workdir, kill_at):
    """A real SIGKILL of `hp-pipe train --method hcl`: right after an epoch's MoGoClustering was checkpointed (the
    only checkpoints are the post-clustering ones) or between two steps; the resumed run equals a straight one."""
    epochs = 6  # a long enough run for the poll below to see the checkpoint it waits for, even on a fast machine
    extra = {"train.checkpoint_interval": "100" if kill_at == "right-after-clustering" else "1",
             "hcl.epochs": str(epochs)}
    config = tiny_config(**extra)
    run = f"killed-{kill_at}"
    train_stage.run(config, workdir, f"straight-{kill_at}")
    straight = torch.load(paths.run_dir(config, workdir, f"straight-{kill_at}") / "checkpoints" / "last.pt",
                          weights_only=True)
    ckpt = paths.checkpoint_path(paths.run_dir(config, workdir, run))
    iters = IMAGES // BATCH

    def should_kill(state):  # a post-clustering checkpoint of a later epoch (the only kind written with
        # checkpoint_interval 100), or any checkpoint between two steps of epoch 1 or later
        after_clustering = state["clustered_epoch"] >= 1 and state["iteration"] == state["clustered_epoch"] * iters
        mid_epoch = iters < state["iteration"] < epochs * iters and state["iteration"] % iters
        return after_clustering if kill_at == "right-after-clustering" else mid_epoch

    seen = kill_training_when(workdir, run, {**TINY, **extra}, ckpt, should_kill)["iteration"]
    assert read_manifest(workdir / "synthetic", f"train-{run}")["status"] == "running"  # as a kill leaves it
    assert torch.load(ckpt, weights_only=True)["iteration"] >= seen
    train_stage.run(config, workdir, run)
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["iteration"] == straight["iteration"] == epochs * iters
    assert len(resumed["mogo_seconds"]) == epochs  # one clustering per epoch: the resumed run never clustered twice
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for kind in ("fg", "bg"):
        for form in ("raw", "unit"):
            assert torch.equal(straight["centroids"][kind][form], resumed["centroids"][kind][form])
        assert torch.equal(straight["banks"][kind]["data"], resumed["banks"][kind]["data"])
