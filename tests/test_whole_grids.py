"""Preset resolutions made whole for the backbone's patch at config load (docs/stages.md), explicit ones refused,
and a bad --backbone refused before any stage runs."""

import os
import subprocess
import sys

import pytest

from pipeline.config import grid_keys, load_config, nearest_whole, preset_names
from pipeline.errors import UserError
from pipeline.extraction.backbone import BACKBONES, backbone_facts
from pipeline.orchestration.graph import plan

DINOV2 = "vit_small_patch14_reg4_dinov2.lvd142m"
DINOV3 = "vit_small_patch16_dinov3.lvd1689m"


def nearest_by_search(value: int, patch: int) -> int:
    """Brute force: the multiple of `patch` closest to `value`, the larger on a tie."""
    candidates = [patch * k for k in range(1, value // patch + 3)]
    return min(candidates, key=lambda c: (abs(c - value), -c))


@pytest.mark.parametrize("patch", [8, 14, 16])
def test_nearest_whole_matches_a_brute_force_search(patch):
    assert all(nearest_whole(value, patch) == nearest_by_search(value, patch) for value in range(1, 700))


def grid_values(config) -> dict[str, int]:
    return {key: config[key.partition(".")[0]][key.partition(".")[2]] for key in grid_keys()}


@pytest.mark.parametrize("preset", preset_names())
@pytest.mark.parametrize("name", [DINOV2, DINOV3])
def test_preset_resolutions_become_whole_for_the_patch(preset, name):
    dino = grid_values(load_config(preset))
    got = grid_values(load_config(preset, {"features.backbone": name}))
    patch = backbone_facts(name).patch_size
    assert got == {key: nearest_by_search(value, patch) for key, value in dino.items()}
    assert all(value % patch == 0 for value in got.values())


def test_patch14_moves_only_what_is_not_whole():
    got = grid_values(load_config("cityscapes", {"features.backbone": DINOV2}))
    assert got == {"prepare.resolution": 224, "prepare.val_resolution": 322,
                   "hcl_features.resolution": 224, "hcl_features.val_resolution": 448}


@pytest.mark.parametrize("name", BACKBONES)
def test_dino_presets_divide_every_preset_resolution(name):
    """Why the DINO presets may skip the check (and timm's import) at config load."""
    patch = backbone_facts(name).patch_size
    for preset in preset_names():
        assert all(v % patch == 0 for v in grid_values(load_config(preset, {"features.backbone": name})).values())


def test_an_explicit_resolution_is_never_changed():
    config = load_config("cityscapes", {"features.backbone": DINOV2, "prepare.val_resolution": 308})
    assert config["prepare"]["val_resolution"] == 308
    with pytest.raises(UserError, match=r"prepare.val_resolution = 320 .*=308 or prepare.val_resolution=322"):
        load_config("cityscapes", {"features.backbone": DINOV2, "prepare.val_resolution": 320})


def test_the_snapped_resolution_is_in_the_fingerprints(tmp_path):
    snapped = plan(load_config("cityscapes", {"features.backbone": DINOV2}), tmp_path)
    explicit = plan(load_config("cityscapes", {"features.backbone": DINOV2, "prepare.val_resolution": 308}), tmp_path)
    assert snapped["prepare"].config["prepare"]["val_resolution"] == 322
    assert snapped["features-val"].fingerprint != explicit["features-val"].fingerprint


@pytest.mark.parametrize("command, backbone, fragment", [
    ("features", "vit_tiny_nonexistent_patch16_224", "timm has no model"),
    ("train", "resnet50.a1_in1k", "is not a ViT"),
    ("status", "vit_tiny_nonexistent_patch16_224", "timm has no model")])
@pytest.mark.slow
def test_a_bad_backbone_is_refused_before_any_stage(tmp_path, command, backbone, fragment):
    work = tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", command, "--backbone", backbone, "--workdir",
                           str(work)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.count("error: ") == 1
    assert fragment in proc.stderr and backbone in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written: no work folder, no dataset, no lock
