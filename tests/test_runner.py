import json

import pytest

from pipeline.config import load_config
from pipeline.orchestration.graph import stage_plan
from pipeline.orchestration.runner import read_manifest, run_stage, stage_state


def _body(calls, outputs=None):
    def body(ctx):
        calls.append(ctx.fresh)
        return dict(outputs or {"value": len(calls)}, summary="done")

    return body


def test_complete_stage_is_skipped_and_force_recomputes(tmp_path, capsys):
    calls = []
    run_stage(tmp_path, "s", {"a": 1}, {}, _body(calls))
    manifest = run_stage(tmp_path, "s", {"a": 1}, {}, _body(calls))
    assert calls == [False]
    assert "up to date" in capsys.readouterr().out
    assert manifest["status"] == "complete" and manifest["outputs"] == {"value": 1}
    run_stage(tmp_path, "s", {"a": 1}, {}, _body(calls), force=True)
    assert calls == [False, True]
    for key in ("status", "fingerprint", "config", "inputs", "outputs", "timings", "versions"):
        assert key in read_manifest(tmp_path, "s")


def test_changed_config_recomputes_fresh_and_names_the_key(tmp_path, capsys):
    calls = []
    run_stage(tmp_path, "s", {"a": 1, "b": 2}, {}, _body(calls))
    run_stage(tmp_path, "s", {"a": 1, "b": 3}, {}, _body(calls))
    assert calls == [False, True]
    assert "config.b" in capsys.readouterr().out


def test_failure_is_recorded_and_next_run_resumes(tmp_path):
    def boom(ctx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "s", {"a": 1}, {}, boom)
    assert read_manifest(tmp_path, "s")["status"] == "interrupted"
    calls = []
    run_stage(tmp_path, "s", {"a": 1}, {}, _body(calls))
    assert calls == [False]  # same fingerprint: resume, not start over
    json.loads((tmp_path / "stages" / "s.json").read_text())  # whole, valid JSON


def test_changed_config_invalidates_the_stage_and_later_stages(tmp_path):
    def plan(**overrides):  # HP's stages, and HCL's own stores (from an HCL config of the same settings)
        hp = stage_plan(load_config("cityscapes", {"dataset.root": str(tmp_path), **overrides}), tmp_path)
        hcl = stage_plan(load_config("cityscapes", {"dataset.root": str(tmp_path), "train.method": "hcl",
                                                    **overrides}), tmp_path)
        return {**hp, **{n: hcl[n] for n in ("features-train-hcl", "features-val-hcl")}}

    for name, (stage_config, inputs) in plan().items():
        run_stage(tmp_path, name, stage_config, inputs, _body([]))
    states = {n: stage_state(tmp_path, n, *p) for n, p in plan().items()}
    assert set(states.values()) == {"complete"}
    states = {n: stage_state(tmp_path, n, *p) for n, p in plan(**{"prepare.crop_ratio": "0.4"}).items()}
    hcl_stores = {"features-train-hcl", "features-val-hcl"}  # HCL's own stores never read HP's prepare/features
    assert {n for n, state in states.items() if state == "stale"} == set(states) - hcl_stores
    assert {states[n] for n in hcl_stores} == {"complete"}
    states = {n: stage_state(tmp_path, n, *p) for n, p in plan(**{"features.n_views": "1"}).items()}
    assert states == {"prepare": "complete", "features-train": "stale", "features-val": "stale", "train": "stale",
                      "evaluate": "stale", "features-train-hcl": "complete", "features-val-hcl": "complete"}
    states = {n: stage_state(tmp_path, n, *p)
              for n, p in plan(**{"features.backbone": "vit_small_patch16_224.dino"}).items()}
    assert {states[n] for n in hcl_stores} == {"stale"}  # but they do depend on the backbone
    states = {n: stage_state(tmp_path, n, *p) for n, p in plan(**{"hcl_features.views": "3"}).items()}
    stale = {n for n, state in states.items() if state == "stale"}
    assert stale == {"features-train-hcl", "features-val-hcl"}  # HP's train and evaluate do not read them


def test_hcl_train_and_evaluate_read_the_hcl_arrays_stage(tmp_path):
    hp, hcl = (stage_plan(load_config("voc", {"train.method": m, "dataset.root": str(tmp_path)}), tmp_path)
               for m in ("hp", "hcl"))
    assert set(hp["train"][1]) == {"features-train"} and set(hcl["train"][1]) == {"features-train-hcl"}
    assert hcl["features-train-hcl"][1] == {} and "prepare" not in hcl["features-train-hcl"][0]  # no HP upstream
    assert set(hcl["evaluate"][1]) == {"train", "features-val-hcl"}
    assert "hcl" in hcl["train"][0] and "hcl" not in hp["train"][0]


@pytest.mark.parametrize("content", ['[]', '{"status": 3}', '{"status": "complete", "fingerprint": "x", '
                                     '"outputs": "oops"}', "\udcff"])
def test_a_manifest_of_the_wrong_shape_counts_as_not_run(tmp_path, capsys, content):
    calls = []
    run_stage(tmp_path, "s", {"a": 1}, {}, _body(calls))
    (tmp_path / "stages" / "s.json").write_text(content, errors="surrogateescape")
    assert read_manifest(tmp_path, "s") is None
    assert "not a valid manifest" in capsys.readouterr().err
    run_stage(tmp_path, "s", {"a": 1}, {}, _body(calls))  # recomputed, no AttributeError
    assert len(calls) == 2 and read_manifest(tmp_path, "s")["status"] == "complete"


def test_atomic_write_leaves_no_temporary_file_when_the_write_fails(tmp_path):
    import errno

    from pipeline.files import atomic_write, atomic_write_text

    atomic_write_text(tmp_path / "kept.txt", "finished work")

    def full_disk(tmp):
        tmp.write_text("half a fi")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError):
        atomic_write(tmp_path / "kept.txt", full_disk)
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]  # no stray temporary
    assert (tmp_path / "kept.txt").read_text() == "finished work"  # the old file is intact


def test_disk_full_is_one_error_line_with_exit_1(tmp_path):
    """The whole CLI with every file write failing as on a full disk: one line naming the path, exit 1."""
    import subprocess
    import sys

    script = (
        "import errno, os, sys\n"
        "import pipeline.files as files\n"
        "def replace(src, dst):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', str(dst))\n"
        "files.os.replace = replace\n"
        "from pipeline.cli import main\n"
        f"sys.argv = ['hp-pipe', 'prepare', '--workdir', {str(tmp_path)!r}, '--set', 'dataset.n_train=1',"
        " '--set', 'dataset.n_val=1', '--set', 'dataset.size=32']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left" in lines[0] and str(tmp_path) in lines[0] and "MiB free" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary left anywhere


def test_hp_settings_never_make_an_hcl_run_stale_and_the_reverse(tmp_path):
    """[hp] holds HP's own settings and [hcl] HCL's: changing τ of one method leaves the other's training
    fingerprint unchanged, while a setting both methods read ([train]) changes both."""
    from pipeline.config import fingerprint

    def train_fp(method: str, **sets: str) -> str:
        config = load_config("voc", {"train.method": method, "dataset.root": str(tmp_path), **sets})
        return fingerprint(*stage_plan(config, tmp_path)["train"])

    for method in ("hp", "hcl"):
        base = train_fp(method)
        assert (train_fp(method, **{"hp.tau": "0.33"}) == base) == (method == "hcl")
        assert (train_fp(method, **{"hcl.tau": "0.33"}) == base) == (method == "hp")
        assert train_fp(method, **{"train.checkpoint_interval": "7"}) != base
