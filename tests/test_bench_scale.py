"""`hp-pipe bench scale` (tiny) and the loss-vs-matmul figures of `bench train`: the work the JSON reports was done,
and the bench fails when renewal reads a share of the store."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, mm_flop

from benches import scale as bench_scale
from benches.train import loss_matmul_figures
from cache.reader import FeatureStore
from pipeline.methods.hp.loss import hp_loss
from pipeline.methods.hp.schedule import renews_at

TINY = {"iterations": 5, "batch_size": 4, "head_dim": 16, "pool_size": 64, "renew_interval": 2, "chunk_size": 4,
        "resolution": 48, "patch": 16, "dim": 16, "views": 2, "unique_chunks": 8, "repeats": 2, "reader_crops": 64}


def _expected_renewals(iterations, interval):
    return sum(renews_at(i, interval) for i in range(iterations))  # the bench's iterations are never past an epoch


@pytest.mark.slow
def test_tiny_scale_did_the_work_its_json_reports(tmp_path):
    sizes = [64, 1024]
    figures = bench_scale.scale(sizes, tmp_path, **TINY, isolate=False)
    keys = [str(s) for s in sizes]
    assert figures["sizes"] == sizes
    for key in ("iterations_per_s", "renewal_s", "peak_rss_mib", "renewal_chunks_read", "iterations"):
        assert list(figures[key]) == keys, key
    assert figures["iterations"] == {k: TINY["iterations"] for k in keys}
    assert figures["renewals"] == {k: _expected_renewals(TINY["iterations"], TINY["renew_interval"]) for k in keys}
    assert figures["store_chunks"] == {k: int(k) // TINY["chunk_size"] for k in keys}
    bound = math.ceil(TINY["pool_size"] / TINY["chunk_size"])  # 16 chunks of 4: all of the 64-crop store
    assert figures["renewal_chunks_bound"] == bound and figures["renewal_chunks_read"] == {k: bound for k in keys}
    assert figures["flat"]["renewal_chunks_read"] is True
    crop_bytes = 3 * 3 * TINY["dim"] * 2  # a 3 x 3 grid of 16 float16 channels
    assert figures["renewal_mb_decoded"] == {k: round(bound * TINY["chunk_size"] * crop_bytes / 1e6, 3) for k in keys}
    assert figures["renewals_timed"] == {k: TINY["repeats"] for k in keys}  # each size's median is of as many
    assert figures["rounds"] == bench_scale.ROUNDS  # iterations/s: the median of as many fresh runs per size
    assert all(figures["iterations_per_s_min"][k] <= figures["iterations_per_s"][k]
               <= figures["iterations_per_s_max"][k] for k in keys)
    assert all(figures["renewal_s_min"][k] <= figures["renewal_s"][k] <= figures["renewal_s_max"][k] for k in keys)
    assert set(figures["reader_crops_per_s_by_threads"]) == {"1", "2"} and figures["reader_crops"] == 64
    # the stores hold what they say: n crops, chunks past the unique ones equal to their template (links), checked
    store = FeatureStore.open(str(tmp_path / "bench-scale" / "store-1024-float16.zarr"))
    assert len(store) == 1024 and store.read_chunk("feat", 8 + 3).shape == (4, 3, 3, 16)
    np.testing.assert_array_equal(store.read_chunk("feat_aug", 8 * 20 + 5), store.read_chunk("feat_aug", 5))
    assert not np.array_equal(store.read_chunk("feat", 5), store.read_chunk("feat", 6))


@pytest.mark.slow
def test_a_renewal_reading_a_share_of_the_store_fails_the_flatness_check(tmp_path):
    """The old renewal (every chunk its random crops fall in) reads all 16 chunks of the small store but about
    57 of the 256 of the large one: the figure grows with the store and its flatness check is false."""
    figures = bench_scale.scale([64, 1024], tmp_path, **TINY, renewal="gather", isolate=False)
    reads = figures["renewal_chunks_read"]
    assert reads["64"] == 16
    expected = 256 * (1 - (1 - 1 / 256) ** 64)  # distinct chunks of 64 random crops among 256 chunks: 56.9
    assert abs(reads["1024"] - expected) < 12 and reads["1024"] > 1.1 * reads["64"]
    assert figures["flat"]["renewal_chunks_read"] is False
    assert figures["flat"]["renewal_mb_decoded"] is False  # the bytes grow with the chunks
    crop_bytes = 3 * 3 * TINY["dim"] * 2
    assert figures["renewal_mb_decoded"]["64"] == round(16 * TINY["chunk_size"] * crop_bytes / 1e6, 3)


@pytest.mark.slow
def test_cli_json_in_fresh_processes(tmp_path):
    args = ["--sizes", "32,64", "--iterations", "3", "--batch-size", "4", "--head-dim", "16", "--pool-size", "8",
            "--renew-interval", "2", "--chunk-size", "4", "--resolution", "32", "--dim", "8", "--unique-chunks", "4",
            "--repeats", "1", "--dtype", "int8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "scale", *args, "--workdir", str(tmp_path),
                           "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["sizes"] == [32, 64] and figures["shapes"]["dtype"] == "int8"
    assert figures["iterations"] == {"32": 3, "64": 3} and figures["renewals"] == {"32": 1, "64": 1}
    assert figures["renewal_chunks_read"] == {"32": 2.0, "64": 2.0}
    assert figures["peak_rss_method"].startswith("ru_maxrss")
    assert all(v > 0 for v in figures["peak_rss_mib"].values())


def test_loss_flop_count_is_torchs_own_count():
    """The figure's FLOPs, 2·N²·(C + 7D) when every anchor is kept, against torch's FlopCounterMode on hp_loss."""
    b, n, c, d = 3, 16, 24, 8
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    f, s_m = unit(b, n, c), unit(b, n, d)
    z, z_mix = unit(b, n, d).requires_grad_(), unit(b, n, d).requires_grad_()
    r = torch.full((b, n), 0.15)
    in_place = {torch.ops.aten.addmm_: lambda acc, a, b, *_, **__: mm_flop(a, b)}  # torch lists addmm, not addmm_
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        out = hp_loss(f, s_m, z, z_mix, r, r, lam=0.5, tau=0.6, rho=0.02, generator=g)
        out.loss.backward()
    assert out.kept_anchors == 1.0
    assert counter.get_total_flops() == 2 * (b * n) ** 2 * (c + 7 * d)
    figures = loss_matmul_figures(b, n, c, d, repeats=1)
    assert figures["loss_kept_anchors"] == 1.0 and figures["loss_shape"] == {"batch": b, "n": n, "C": c, "D": d}
    assert figures["loss_flop"] == counter.get_total_flops()
    assert figures["loss_peak_mib"] > 0 and figures["matmul_gflops"] > 0
