"""Benches time equal work on both sides of every ratio, and say how much each side did."""

import pytest

from benches.train import cycle_epochs
from pipeline.methods.hp.schedule import renews_at


def test_cache_side_runs_as_many_iterations_as_asked_across_epochs():
    """A bench store smaller than the timed iterations: the cache side starts new epochs instead of stopping
    (it once timed 4 cache iterations against 21 reference ones and reported a ratio of 132)."""
    asked_epochs = []

    def epoch(e):
        asked_epochs.append(e)
        return iter([f"e{e}b0", f"e{e}b1", f"e{e}b2", f"e{e}b3"])  # 4 batches per epoch (64 images / batch 16)

    steps = list(cycle_epochs(epoch, 21))
    assert [i for i, _ in steps] == list(range(21))
    assert steps[4][1] == "e1b0" and steps[-1][1] == "e5b0" and asked_epochs == [0, 1, 2, 3, 4, 5]
    renewals = sum(renews_at(i, 5) for i, _ in steps)
    assert renewals == sum(renews_at(i, 5) for i in range(21))  # the reference side's count at the same interval


def test_an_empty_epoch_is_an_error_not_an_endless_loop():
    with pytest.raises(ValueError, match="smaller than one batch"):
        list(cycle_epochs(lambda e: iter([]), 3))


def test_bare_side_of_bench_features_makes_the_stages_passes():
    """Per image: one clean pass plus one per photometric view, batched by chunk, as the features stage does."""
    import numpy as np

    from benches.features import bare_forward_seconds

    seen = []
    _, passes = bare_forward_seconds(lambda x: seen.append(len(x)), np.zeros((7, 8, 8, 3), np.uint8), 2, 3)
    assert passes == 7 * (1 + 2) == sum(seen)
    assert seen == [3, 6, 3, 6, 1, 2]  # chunks of 3, 3, 1 images; each with its views in one batch


def test_distinct_images_figures_follow_each_presets_settings():
    """`bench train`'s data-order figures are computed with each preset's own batch, chunk, buffer, seeds and
    epochs ([hp] and [train]), and hp-pipe's plan is within 1 % of an i.i.d. shuffle (issue 9's target)."""
    from benches.order import TRAIN_IMAGES, distinct_images_figures
    from pipeline.config import load_config

    figures = distinct_images_figures()
    for dataset, n_images in TRAIN_IMAGES.items():
        prefix = "" if dataset == "cocostuff27" else f"{dataset}_"
        config, setup = load_config(dataset), figures[f"{prefix}distinct_images_setup"]
        assert setup == {"images": n_images, "crops_per_image": 5, "batch_size": config["hp"]["batch_size"],
                         "chunk_size": config["features"]["chunk_size"],
                         "buffer_chunks": config["train"]["buffer_chunks"], "epochs": config["hp"]["epochs"],
                         "features_seed": config["features"]["seed"], "train_seed": config["hp"]["seed"]}
        assert 0.99 <= figures[f"{prefix}distinct_images_over_iid"] <= 1.01


# ---------------------------------------------------------------- bench all (benches/all.py)
def fake_results(auto_dtype="float32"):
    """What each bench's --json line holds, as far as `bench all` reads it."""
    return {
        "features": {"ratio": 0.97, "ratio_spread": [0.95, 0.99]},
        "train-hp": {"ratio": 10.4, "ratio_spread": [9.8, 10.9], "cache_autocast": "float32"},
        "train-hp-preset": {"ratio": 16.0, "loss_matmul_ratio": 0.86, "non_loss_share": 0.3,
                            "cache_autocast": auto_dtype},
        "train-hp-preset-fp32": {"ratio": 15.0, "cache_autocast": "float32"},
        "train-hcl": {"ratio": 3.2},
        "train-stego": {"ratio": 12.0},
        "scale": {"iterations_per_s": {"2000": 2.0, "500000": 1.9}},
        "evaluate": {"crf_ratio": 1.8},
    }


def test_bench_all_runs_each_bench_once_and_reuses_the_auto_run_where_auto_is_fp32(tmp_path):
    import json

    from benches import all as bench_all

    canned, ran = fake_results("float32"), []

    def run(args, workdir):
        name = next(n for n, a in bench_all.BENCHES.items() if a == args)
        ran.append(name)
        return canned[name]

    results = bench_all.measure(tmp_path, run=run, log=lambda *_: None)
    assert ran == [n for n in bench_all.BENCHES if n != "train-hp-preset-fp32"]  # auto was fp32: no second run
    assert results["train-hp-preset-fp32"] is results["train-hp-preset"]
    ran.clear()
    canned = fake_results("bfloat16")
    bench_all.measure(tmp_path, run=run, log=lambda *_: None, save=False)
    assert "train-hp-preset-fp32" in ran  # auto was bf16: fp32 is a run of its own
    ran.clear()
    bench_all.measure(tmp_path, only=["features", "scale"], run=run, log=lambda *_: None, save=False)
    assert ran == ["features", "scale"]
    assert json.loads((tmp_path / "bench-all" / "train-hcl.json").read_text()) == {"ratio": 3.2}  # saved as it ended


def test_bench_all_table_judges_each_figure_against_its_floor(tmp_path):
    from benches import all as bench_all

    rows = {r["figure"].strip(): r for r in bench_all.table(fake_results(), "test machine")}
    assert rows["extraction: stage over bare forward"]["met"] is True
    assert rows["HP from the cache, fp32, defaults (x)"]["met"] is False  # 10.4 < 11
    assert rows["its non-loss share of the iteration"]["met"] is False  # 0.3 > the 0.25 ceiling
    assert rows["its loss over a same-precision matmul"]["met"] is True
    assert rows["iterations/s, smallest store over largest"]["value"] == 0.95  # 1.9 / 2.0
    assert rows["dense CRF, parallel over serial (x)"]["met"] is None  # no floor: reported only
    text = bench_all.markdown(list(rows.values()), "test machine")
    assert "| 10.4 | 9.8–10.9 | ≥ 11 | **no** |" in text and "| 0.3 |  | ≤ 0.25 | **no** |" in text
    assert "Machine: test machine" in text


def test_bench_all_replaces_only_its_own_section(tmp_path):
    from benches import all as bench_all

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nmutation table\n")
    bench_all.write_section(doc, "first table")
    bench_all.write_section(doc, "second table")
    text = doc.read_text()
    assert text.startswith("# Results\n\nmutation table\n") and text.count(bench_all.BEGIN) == 1
    assert "second table" in text and "first table" not in text
    doc.write_text(text + "\n## After\n\nkept\n")
    bench_all.write_section(doc, "third table")
    assert doc.read_text().endswith("## After\n\nkept\n") and "third table" in doc.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["off", "on"])
def test_bench_train_splits_the_iteration_into_its_parts(tmp_path, amp):
    """`bench train` on a tiny cache: both sides did the same work, the cache side ran in the asked precision, and
    the iteration's parts are each measured (every part of a step took time) and add up to the whole."""
    import json
    import subprocess
    import sys

    args = ["--images", "10", "--resolution", "64", "--batch-size", "2", "--iterations", "4", "--pool-size", "4",
            "--renew-interval", "2", "--repeats", "1", "--amp", amp]
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "train", *args, "--workdir", str(tmp_path),
                           "--json"], capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["iterations_cache"] == figures["iterations_reference"] == 4
    assert figures["renewals_cache"] == figures["renewals_reference"] == 2  # every 2 of 4 iterations, on each side
    assert figures["cache_autocast"] == {"off": "float32", "on": "bfloat16"}[amp]
    assert figures["reference_autocast"] == "float32" and figures["loss_matmul_dtype"] == figures["cache_autocast"]
    parts = figures["iteration_parts_ms"]
    for part in ("batch_read", "step_inputs", "head_forward", "positives_faiss", "loss_forward_backward",
                 "head_backward", "optimizer", "ema", "renewal"):
        assert parts[part] > 0, part
    assert sum(parts.values()) == pytest.approx(figures["iteration_ms"], abs=0.1)  # `other` closes the sum
    assert parts["other"] >= -0.1  # no part was counted twice
    assert figures["non_loss_share"] == pytest.approx(1 - parts["loss_forward_backward"] / figures["iteration_ms"],
                                                      abs=0.01)
    assert figures["ratio_spread"][0] <= figures["ratio"] <= figures["ratio_spread"][1]
    assert "cores" in figures["machine"]


@pytest.mark.parametrize(("iterations", "interval"), [(10, 20), (20, 20), (21, 20), (10, 5), (1, 1), (7, 3)])
def test_bench_train_times_whole_renewal_intervals(iterations, interval):
    """Each side pays its amortised Pool_sp renewal exactly: the timed iterations are whole intervals with one
    renewal each (10 iterations at interval 20 once timed none, leaving out the reference's largest cost)."""
    from benches.train import renews_after, timed_iterations

    timed = timed_iterations(iterations, interval)
    assert timed >= iterations and timed % interval == 0 and timed - iterations < interval
    renewals = [i for i in range(timed) if renews_after(i, interval)]
    assert len(renewals) == timed // interval and renewals[-1] == timed - 1
