"""train.amp / features.amp (pipeline/precision.py): which dtype a forward runs in, on which machine, and what a
bf16 run keeps in fp32."""

import pytest
import torch

from pipeline import precision
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.methods.hp.heads import ProjectionHead
from pipeline.orchestration import graph, paths
from stages import features
from stages import train as train_stage
from tests.fixtures import TINY_TRAIN

BF16, FP16 = torch.bfloat16, torch.float16


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This CPU as one with native bf16 products (the suite pins it as one without, tests/conftest.py)."""
    monkeypatch.setenv(precision.OVERRIDE, "1")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    with_bf16 = tmp_path / "bf16"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 sha_ni\n\nflags\t: fpu\n")
    without = tmp_path / "zen3"
    without.write_text("processor\t: 0\nflags\t\t: fpu avx avx2 fma\n")
    amx = tmp_path / "amx"
    amx.write_text("flags\t\t: avx2 amx_tile amx_bf16\n")
    read = precision._cpu_flags.__wrapped__
    assert "avx512_bf16" in read(str(with_bf16)) and "avx2" in read(str(without))
    assert read(str(tmp_path / "absent")) == frozenset()
    monkeypatch.delenv(precision.OVERRIDE)
    for path, expected in ((with_bf16, True), (without, False), (amx, True)):
        monkeypatch.setattr(precision, "_cpu_flags", lambda p=str(path): read(p))
        assert precision.cpu_bf16() is expected
        monkeypatch.setenv(precision.OVERRIDE, "0" if expected else "1")  # the override wins either way
        assert precision.cpu_bf16() is not expected
        monkeypatch.delenv(precision.OVERRIDE)


@pytest.mark.parametrize(("setting", "device", "bf16_cpu", "train", "extract"), [
    ("auto", "cpu", False, None, None),  # a CPU without native bf16: emulated bf16 is slower than fp32
    ("auto", "cpu", True, BF16, BF16),
    (True, "cpu", False, BF16, BF16),  # forced: the GPU's path on any CPU
    ("true", "cpu", True, BF16, BF16),
    (False, "cpu", True, None, None),
    ("false", "cpu", True, None, None),
    ("auto", "cuda", False, FP16, BF16),  # training: the references' fp16 with loss scaling
    (True, "cuda", False, FP16, BF16),
    (False, "cuda", True, None, None),
])
def test_the_autocast_dtype_of_each_setting(monkeypatch, setting, device, bf16_cpu, train, extract):
    monkeypatch.setenv(precision.OVERRIDE, "1" if bf16_cpu else "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # extraction then assumes a bf16 GPU
    assert precision.training_autocast(setting, device) == train
    assert precision.extraction_autocast(setting, device) == extract
    assert precision.dtype_name(train) == {None: "float32", BF16: "bfloat16", FP16: "float16"}[train]


def test_train_amp_takes_only_true_false_or_auto():
    with pytest.raises(UserError, match=r"train\.amp") as info:
        load_config("synthetic", {"train.amp": "fast"})
    assert "true, false or auto" in str(info.value)


def fingerprints(config, workdir):
    steps = graph.plan(config, workdir, runs=["r"])
    return steps["features-train"].fingerprint, steps["train-r"].fingerprint


def test_auto_is_fingerprinted_as_what_it_resolves_to(tmp_path, monkeypatch):
    """The same `auto` on a bf16 CPU and on another one computes different numbers: different fingerprints, so a
    store or run of one is never taken for the other's; an explicit setting equal to what auto resolves to is the
    same computation, and the same fingerprint."""
    auto = load_config("synthetic", {**TINY_TRAIN, "train.device": "cpu", "features.device": "cpu"})
    fp32 = load_config("synthetic", {**TINY_TRAIN, "train.device": "cpu", "features.device": "cpu",
                                     "train.amp": "false", "features.amp": "false"})
    forced = load_config("synthetic", {**TINY_TRAIN, "train.device": "cpu", "features.device": "cpu",
                                       "train.amp": "true", "features.amp": "true"})
    plain = fingerprints(auto, tmp_path)
    assert plain == fingerprints(fp32, tmp_path)
    monkeypatch.setenv(precision.OVERRIDE, "1")
    on_bf16 = fingerprints(auto, tmp_path)
    assert on_bf16[0] != plain[0] and on_bf16[1] != plain[1]
    assert on_bf16 == fingerprints(forced, tmp_path)
    assert fingerprints(fp32, tmp_path) == plain  # off is off on every machine
    steps = graph.plan(auto, tmp_path, runs=["r"])
    assert steps["train-r"].config["train"]["amp"] == "bfloat16"


def test_projection_normalizes_in_fp32_under_autocast():
    head = ProjectionHead(8)
    s = torch.randn(2, 8, 3, 3)
    with torch.autocast("cpu", dtype=BF16):
        z = head(s)
    assert z.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(2, 3, 3), atol=1e-6)  # unit norm to fp32 precision


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("work")
    features.run(load_config("synthetic", TINY_TRAIN), path, "train")
    return path


def test_a_bf16_run_keeps_its_state_in_fp32_says_so_and_tracks_the_fp32_run(workdir, monkeypatch):
    """train.amp = true on the CPU: the heads run in bf16 (seen at the convolutions), while the weights, the EMA copy
    and the optimizer state stay fp32; the manifest says which precision ran; the loss curve stays close to the fp32
    run's (not equal: the products are rounded to 8 bits)."""
    seen = []
    original = torch.nn.Conv2d.forward

    def spy(self, x):
        out = original(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    runs = {}
    for amp in ("true", "false"):
        seen.clear()
        config = load_config("synthetic", {**TINY_TRAIN, "hp.epochs": "4", "train.amp": amp})
        manifest = train_stage.run(config, workdir, f"amp-{amp}")
        state = torch.load(paths.checkpoint_path(paths.run_dir(config, workdir, f"amp-{amp}")), weights_only=True)
        runs[amp] = (manifest["outputs"], state, set(seen))
    bf16, fp32 = runs["true"], runs["false"]
    assert BF16 in bf16[2] and fp32[2] == {torch.float32}  # (Pool_sp renewals run outside the step, in fp32)
    assert bf16[0]["precision"] == {"train_autocast": "bfloat16", "store_dtype": "float16",
                                    "store_forward": "float32"}
    assert fp32[0]["precision"]["train_autocast"] == "float32"
    for state in (bf16[1], fp32[1]):
        assert {t.dtype for t in state["heads"].values()} == {torch.float32}
        moments = [v for s in state["opt_s"]["state"].values() for v in s.values() if v.ndim > 0]
        assert moments and {t.dtype for t in moments} == {torch.float32}
    loss = lambda outputs: outputs["final"]["loss"]  # noqa: E731
    assert loss(bf16[0]) != loss(fp32[0])  # bf16 really ran
    assert loss(bf16[0]) == pytest.approx(loss(fp32[0]), rel=0.05)
