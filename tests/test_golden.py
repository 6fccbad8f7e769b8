"""Nothing moves: one tiny run per method, trained and evaluated through the command line with fixed seeds, ends on
the checkpoint tensors and scores recorded in tests/golden/ before the methods became plug-ins.

Bit-identical on the machine the record was made on (same CPU model and vector instructions, torch and thread
count: float reductions depend on all of them); elsewhere the test skips saying which machine the record is from.
`HP_PIPE_WRITE_GOLDEN=1 pytest tests/test_golden.py` rewrites the record (only when a change is meant to move the
numbers: say so in the commit).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures import TINY_EVALUATE

GOLDEN = Path(__file__).parent / "golden"
HCL_TINY = {
    "dataset.n_train": "4", "dataset.n_val": "2", "dataset.size": "96",
    "features.backbone": "vit_small_patch16_224.dino", "features.weights": "random", "features.chunk_size": "4",
    "hcl_features.resolution": "64", "hcl_features.crop_resolution": "128", "hcl_features.val_resolution": "64",
    "train.log_interval": "1", "train.checkpoint_interval": "3",
    "hcl.batch_size": "2", "hcl.epochs": "2", "hcl.dim": "32", "hcl.hidden": "64", "hcl.out_dim": "16",
    "hcl.heads": "2", "hcl.clusters": "4", "hcl.kmeans_min_points": "1", "hcl.lr_drop_epoch": "1",
    "hcl.lr": "1e-3", "evaluate.overcluster_k": "6", "evaluate.overcluster_seeds": "2",
    "evaluate.linear_epochs": "1", "evaluate.crf": "false", "evaluate.pictures": "1",
}
RUNS = {"hp": {**TINY_EVALUATE, "evaluate.crf": "false"}, "hcl": HCL_TINY}


def machine() -> str:
    """What decides float rounding: the CPU model and vector instructions, torch's version and the thread count the
    runs use (1)."""
    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        flags = next(line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = []
    isa = ",".join(f for f in sorted(flags) if f.startswith(("avx", "fma", "amx", "sse4")))
    return f"{model} [{isa}] | torch {torch.__version__} | 1 thread"


def train_and_evaluate(method: str, workdir: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    """`hp-pipe train` then `hp-pipe evaluate` in a fresh process on one thread: the checkpoint's tensors and the
    metrics' result rows (every field but timings)."""
    sets = [arg for key, value in RUNS[method].items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for command in ("train", "evaluate"):
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", command, "--dataset", "synthetic",
                               "--method", method, "--workdir", str(workdir), *sets],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    run = workdir / "synthetic" / "runs" / method
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    tensors = {}

    def collect(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            tensors[prefix] = value.detach().cpu().numpy()
        elif isinstance(value, dict):
            for key, inner in value.items():
                collect(f"{prefix}/{key}" if prefix else str(key), inner)

    for key in ("heads", "model", "ema", "teacher", "probes", "head"):
        if key in state:
            collect(key, state[key])
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    rows = [{k: v for k, v in row.items() if "second" not in k} for row in metrics["results"]]
    return tensors, rows


@pytest.mark.parametrize("method", sorted(RUNS))
@pytest.mark.slow
def test_golden_run_is_unchanged(method, tmp_path):
    tensors, rows = train_and_evaluate(method, tmp_path)
    assert tensors, "the checkpoint holds no weights"
    record, arrays = GOLDEN / f"{method}.json", GOLDEN / f"{method}.npz"
    if os.environ.get("HP_PIPE_WRITE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        np.savez_compressed(arrays, **{k.replace("/", "|"): v for k, v in tensors.items()})
        record.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
        pytest.skip(f"golden record of {method} rewritten")
    golden = json.loads(record.read_text())
    with np.load(arrays) as saved:
        expected = {k.replace("|", "/"): saved[k] for k in saved.files}
    assert sorted(tensors) == sorted(expected)
    assert [r["name"] for r in rows] == [r["name"] for r in golden["rows"]]
    if golden["machine"] != machine():
        # float rounding differs between CPUs and torch builds, and a training run can amplify it (a k-means
        # assignment that flips): bit-identity is checked on the machine the record was made on
        worst = max(float(np.max(np.abs(value - expected[name]))) for name, value in tensors.items())
        pytest.skip(f"golden record made on '{golden['machine']}', this is '{machine()}' (largest weight difference "
                    f"{worst:.2e}): rewrite it here with HP_PIPE_WRITE_GOLDEN=1 to check bit-identity on this machine")
    for name, value in tensors.items():
        assert np.array_equal(value, expected[name]), f"{name} moved (recorded on this machine: bit-identical)"
    assert rows == golden["rows"]
