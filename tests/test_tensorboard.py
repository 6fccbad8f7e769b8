"""TensorBoard event files, read back with tensorboard's own reader: the scalars and steps are metrics.jsonl's, also
after a resume; the checkpoint images show the validation images; run.tensorboard = false writes none."""

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cache.reader import FeatureStore
from pipeline.config import load_config
from pipeline.orchestration import paths
from pipeline.reporting.plots import blend
from pipeline.reporting.tensorboard import EVENTS, ITERATION_SECONDS, matched_clusters, result_tag, write_evaluation
from pipeline.training import trainer
from pipeline.training.trainer import MetricsLog
from stages import features
from stages import train as train_stage
from tests.fixtures import TINY_TRAIN, kill_training_when

TINY = {**TINY_TRAIN, "dataset.n_val": "2"}  # two val images: the overlays
TOTAL = 15  # 20 training crops (4 images five-cropped) / batch 4 = 5 iterations per epoch, 3 epochs
CHECKPOINTS = [2, 4, 6, 8, 10, 12, 14, 15]


def tiny_config(**extra):
    return load_config("synthetic", {**TINY, **extra})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Train and val stores built once (training never writes to them)."""
    path = tmp_path_factory.mktemp("work")
    features.run(tiny_config(), path, "train")
    features.run(tiny_config(), path, "val")
    return path


def read_events(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def metrics_lines(run_folder):
    return [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]


def assert_scalars_are_the_metrics_lines(run_folder, resumed_at: int = 0):
    """Every number of every metrics.jsonl line is a scalar `train/<key>` at the line's iteration, once; and the
    iteration time between lines of the same process (`seconds` counts from the process's start)."""
    lines, events = metrics_lines(run_folder), read_events(run_folder)
    keys = sorted(k for k in lines[0] if k != "iteration")
    assert {"loss", "lambda", "positives", "seconds"} <= set(keys)
    assert sorted(t for t in events.Tags()["scalars"]) == sorted([ITERATION_SECONDS, *(f"train/{k}" for k in keys)])
    for key in keys:
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [line["iteration"] for line in lines], key
        assert [e.value for e in scalars] == [np.float32(line[key]) for line in lines], key
    timed = [(e.step, e.value) for e in events.Scalars(ITERATION_SECONDS)]
    previous = {line["iteration"]: prev for prev, line in zip([None, *lines], lines, strict=False)}
    expected = []
    for line in lines:
        if line["iteration"] == resumed_at:
            continue  # written again after the resume, from another process's clock: no time for it
        before = previous[line["iteration"]]
        start = (0, 0.0) if before is None else (before["iteration"], 0.0 if before["iteration"] == resumed_at
                                                  else before["seconds"])
        expected.append((line["iteration"], np.float32((line["seconds"] - start[1]) / (line["iteration"] - start[0]))))
    assert timed == expected
    return events


def test_event_files_hold_the_metrics_lines_and_the_checkpoint_images(workdir):
    config = tiny_config()
    train_stage.run(config, workdir, "board")
    out = paths.run_dir(config, workdir, "board")
    events = assert_scalars_are_the_metrics_lines(out)
    assert [line["iteration"] for line in metrics_lines(out)] == list(range(1, TOTAL + 1))
    images = events.Images("val/overlays")
    assert [e.step for e in images] == CHECKPOINTS
    # each row: the val image | its ground truth blended | the head's matched clusters blended
    val = FeatureStore.open(paths.store_url(config, workdir, "val"))
    image, label = val.read("image", 0, 2), val.read("label", 0, 2)
    grid = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert grid.shape == (2 * 64, 3 * 64, 3)
    n = config["dataset"]["n_classes"]
    for row in range(2):
        cells = grid[64 * row:64 * (row + 1)]
        assert np.array_equal(cells[:, :64], image[row])
        assert np.array_equal(cells[:, 64:128], blend(image[row], label[row], n))


def test_a_resume_reads_no_step_twice(workdir, monkeypatch):
    """A run stopped 3 lines after its checkpoint at 6 (lines 7-9 and their events written), then resumed: the
    events read back are metrics.jsonl's (1..15 once), the killed run's lines 7-9 purged."""
    config = tiny_config()
    out = paths.run_dir(config, workdir, "stopped")
    real_save, real_append = trainer.save_checkpoint, MetricsLog.append

    def save_until_6(path, state):
        if state["iteration"] <= 6:
            real_save(path, state)

    def stop_after_9(self, record):
        real_append(self, record)
        if record["iteration"] == 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_until_6)
    monkeypatch.setattr(MetricsLog, "append", stop_after_9)
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(config, workdir, "stopped")
    monkeypatch.undo()
    killed = read_events(out)
    assert [e.step for e in killed.Scalars("train/loss")] == list(range(1, 10))  # 7..9 are there before resuming
    time.sleep(1.1)  # event files are read in name order, whose first field is the second they were opened in
    train_stage.run(config, workdir, "stopped")
    events = assert_scalars_are_the_metrics_lines(out, resumed_at=6)
    assert [line["iteration"] for line in metrics_lines(out)] == list(range(1, TOTAL + 1))
    assert [e.step for e in events.Images("val/overlays")] == CHECKPOINTS


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_events(workdir):
    """The real thing: `hp-pipe train` SIGKILLed after a checkpoint, then resumed."""
    config = tiny_config()
    ckpt = paths.checkpoint_path(paths.run_dir(config, workdir, "killed"))
    state = kill_training_when(workdir, "killed", TINY, ckpt, lambda state: 0 < state["iteration"] < TOTAL - 2)
    time.sleep(1.1)
    train_stage.run(config, workdir, "killed")
    events = assert_scalars_are_the_metrics_lines(ckpt.parent.parent, resumed_at=state["iteration"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, TOTAL + 1))
    assert [e.step for e in events.Images("val/overlays")] == CHECKPOINTS


def test_off_writes_no_event_file_and_the_same_weights(workdir):
    """run.tensorboard = false: no event file anywhere in the run; and the images (which build a head from each
    checkpoint) leave the training untouched: the same final weights with and without them."""
    on, off = tiny_config(), tiny_config(**{"run.tensorboard": "false"})
    train_stage.run(on, workdir, "with-board")
    train_stage.run(off, workdir, "no-board")
    assert not list(paths.run_dir(off, workdir, "no-board").rglob(EVENTS))
    assert list(paths.run_dir(on, workdir, "with-board").glob(EVENTS))
    with_board = torch.load(paths.checkpoint_path(paths.run_dir(on, workdir, "with-board")), weights_only=True)
    without = torch.load(paths.checkpoint_path(paths.run_dir(off, workdir, "no-board")), weights_only=True)
    for key, value in with_board["heads"].items():
        assert torch.equal(value, without["heads"][key]), key


def test_matched_clusters_recover_labels_from_codes_that_encode_them():
    """Codes that are the one-hot labels (at patch level): k-means finds the classes, Hungarian names them."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(2, 4, 4))
    labels[0, 0, :3] = [0, 1, 2]
    codes = torch.nn.functional.one_hot(torch.from_numpy(labels), 3).permute(0, 3, 1, 2).float()
    assert np.array_equal(matched_clusters(codes, labels, 3), labels)


def test_evaluation_scalars_and_hparams(tmp_path):
    config = tiny_config()
    results = [{"name": "HP cluster", "features": "head", "probe": "cluster", "crf": False, "miou": 41.25, "acc": 70.5},
               {"name": "HP cluster + CRF", "features": "head", "probe": "cluster", "crf": True, "miou": 43.0,
                "acc": 71.0},
               {"name": "DINO overcluster", "features": "raw", "probe": "overcluster", "crf": False, "miou": 20.0,
                "acc": 50.0, "acc_ref": 12.5}]
    metrics = {"results": results, "random_init": True, "protocol_settings": {"name": "kmeans"}}
    write_evaluation(config, metrics, tmp_path, step=15)
    write_evaluation(config, metrics, tmp_path, step=15)  # a re-evaluation replaces, never adds
    events = read_events(tmp_path)
    expected = {"eval/head_cluster/miou": 41.25, "eval/head_cluster/acc": 70.5, "eval/head_cluster_crf/miou": 43.0,
                "eval/head_cluster_crf/acc": 71.0, "eval/raw_overcluster/miou": 20.0, "eval/raw_overcluster/acc": 50.0,
                "eval/raw_overcluster/acc_ref": 12.5}
    assert {result_tag(r) for r in results} == {"eval/head_cluster", "eval/head_cluster_crf", "eval/raw_overcluster"}
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, value in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(15, np.float32(value))]
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.string_value or v.number_value or v.bool_value for k, v in start.hparams.items()}
    assert hparams["method"] == "hp" and hparams["protocol"] == "kmeans" and hparams["random_init"] == "true"
    assert hparams["hp.head_dim"] == 32 and hparams["evaluate.probes"] == "cluster,linear"
    off = tmp_path / "off"
    write_evaluation(tiny_config(**{"run.tensorboard": "false"}), metrics, off, step=15)
    assert not off.exists() or not list(off.glob(EVENTS))
