"""Methods as plug-ins (docs/methods.md): the registry is the one list of methods, nothing outside a method's own
package compares a method's name, and every registered method fills the contract consistently."""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.methods.registry import REGISTERED, method_named, methods, names
from pipeline.orchestration.graph import method_stages

ROOT = Path(__file__).resolve().parents[1]


def name_comparisons(names: set[str], root: Path = ROOT) -> list[str]:
    """file:line of every comparison of a method's name with a string literal outside that method's package."""
    hits = set()
    for folder in ("pipeline", "stages", "cache", "benches"):
        for path in (root / folder).rglob("*.py"):
            own = {n for n in names if n in path.relative_to(root).parts[:-1]}
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare):
                    for side in [node.left, *node.comparators]:
                        for value in [side, *getattr(side, "elts", [])]:
                            if isinstance(value, ast.Constant) and value.value in names - own:
                                hits.add(f"{path.relative_to(root)}:{node.lineno}")
    return sorted(hits)


def test_no_method_name_is_compared_with_a_literal_outside_its_package():
    assert name_comparisons(set(names())) == []


def test_the_scan_finds_a_comparison(tmp_path):
    """Not vacuous: comparisons written into a library module are found, in its own package they are allowed."""
    (tmp_path / "pipeline" / "methods" / "hcl").mkdir(parents=True)
    (tmp_path / "pipeline" / "x.py").write_text("def f(config):\n    return config['train']['method'] == 'hcl'\n"
                                                "def g(m):\n    return m in ('hp', 'other')\n")
    (tmp_path / "pipeline" / "methods" / "hcl" / "y.py").write_text("ok = 'hcl' == 'hcl'\n")
    for folder in ("stages", "cache", "benches"):
        (tmp_path / folder).mkdir()
    assert name_comparisons({"hp", "hcl"}, tmp_path) == ["pipeline/x.py:2", "pipeline/x.py:4"]


def test_an_unknown_method_is_refused_listing_the_registered_ones():
    with pytest.raises(UserError, match="train.method must be one of " + ", ".join(REGISTERED)):
        method_named("nosuch")
    with pytest.raises(UserError, match="config key 'train.method' must be one of " + ", ".join(REGISTERED)):
        load_config("synthetic", {"train.method": "nosuch"})


def test_the_cli_lists_the_registered_methods():
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["train", "--method", "nosuch"])
    assert result.exit_code == 2 and all(f"'{name}'" in result.output for name in REGISTERED)


@pytest.mark.parametrize("name", list(REGISTERED))
def test_every_registered_method_fills_the_contract(name):
    method = methods()[name]
    assert method.name == name and method.section in method.sections
    presets = tomllib.loads(resources.files(method.presets).joinpath("presets.toml").read_text())
    for section, cls in method.sections.items():  # every field of its sections has a default in its presets
        assert {f.name for f in dataclasses.fields(cls)} == set(presets["defaults"][section]), section
    graph = method_stages(method)
    for stage in (*method.stores.values(), *method.train_inputs, *method.val_inputs):
        assert stage in graph and graph[stage].level == "dataset", stage
    assert graph["train"].sections == ("train", method.section)
    assert graph["codes"].inputs == ("train", method.stores["val"], *method.val_inputs)
    for section in method.sections:
        assert section in method.training_sections or section.endswith("_cache"), section
    for dataset in ("synthetic", "cocostuff27"):
        config = load_config(dataset, {"train.method": name})
        assert all(section in config for section in method.sections)
        assert config["evaluate"]["protocol"] in method.protocols


def test_a_run_of_one_method_is_not_evaluated_as_another(tmp_path):
    from pipeline.orchestration import paths
    from pipeline.orchestration.runs import for_run, write_record

    config = load_config("synthetic")
    folder = paths.run_dir(config, tmp_path, "hp")
    folder.mkdir(parents=True)
    write_record(folder, config)
    other = next(n for n in REGISTERED if n != config["train"]["method"])
    with pytest.raises(UserError, match=rf"run 'hp' was trained with method hp .*not {other}"):
        for_run("synthetic", {"train.method": other}, tmp_path, "hp")
    assert for_run("synthetic", {}, tmp_path, "hp").config["train"]["method"] == "hp"


# Fingerprints of every step as the code before the methods became plug-ins computed them (the same settings, work
# folder /tmp/nowork, an unreadable dataset root): a work folder finished before the change stays up to date. The
# train steps and those after them moved once since, on purpose: `train.amp` became auto | true | false and the
# fingerprint holds its resolved autocast dtype (pipeline/precision.py), as [features] holds the forward's.
BEFORE = {
    ("synthetic", "hp", "kmeans"): {"prepare": "2679438e10adb12d", "features-train": "bfe190c2aae35c8b",
                                    "features-val": "7a71cb28f298da19", "train-hp": "d872fa98f253cfbc",
                                    "codes-hp": "c0fcb40d833eb584", "probe-head-hp": "813b2573a398988b",
                                    "probe-raw-hp": "dd6aee227bdb137b", "evaluate-hp": "0c39c856059ec392"},
    ("synthetic", "hp", "paper"): {"train-hp": "7a4d804d07f87335", "codes-hp": "6aa3806acbbfd580",
                                   "probe-head-hp": "697570baf8037086", "probe-raw-hp": "551fc7763f18f63a",
                                   "evaluate-hp": "ae2b052422a175c3"},
    ("synthetic", "hcl", "kmeans"): {"features-train-hcl": "055df3d08acd0b67", "features-val-hcl": "448623250e674ffe",
                                     "train-hcl": "53f7ba874e251d4a", "codes-hcl": "0fbdc11853ba3b35",
                                     "probe-head-hcl": "c69e016608e82f4b", "probe-raw-hcl": "85770ad55aefb599",
                                     "evaluate-hcl": "d36f2a060e7e4c1a"},
    ("voc", "hcl", "kmeans"): {"features-train-hcl": "309381dc30ffb202", "features-val-hcl": "4140c98dbd306194",
                               "train-hcl": "fc30472eec0be8c6", "codes-hcl": "181bcf85e759645e",
                               "evaluate-hcl": "a7052d054b24518d"},
}


@pytest.mark.parametrize("dataset,method,protocol", list(BEFORE))
def test_fingerprints_from_before_the_plugin_refactor_are_unchanged(dataset, method, protocol):
    from pipeline.orchestration.graph import plan

    config = load_config(dataset, {"train.method": method, "evaluate.protocol": protocol,
                                   "dataset.root": "/nonexistent"})
    steps = plan(config, Path("/tmp/nowork"), runs=[method])
    assert {name: steps[name].fingerprint for name in BEFORE[dataset, method, protocol]} == \
        BEFORE[dataset, method, protocol]


def test_a_run_record_written_before_the_change_still_loads(tmp_path):
    """A record in the old layout (HCL's sections before [train], no section of a method added since) gives the run
    its recorded training settings."""
    from pipeline.config import to_toml
    from pipeline.orchestration import paths
    from pipeline.orchestration.runs import for_run

    config = load_config("synthetic", {"hp.tau": "0.5"})
    order = ["dataset", "prepare", "features", "hcl_features", "train", "hp", "hcl", "evaluate", "run", "paper"]
    old = {section: config[section] for section in order}
    folder = paths.run_dir(config, tmp_path, "hp")
    folder.mkdir(parents=True)
    paths.run_config_path(folder).write_text(to_toml(old))
    settings = for_run("synthetic", {}, tmp_path, "hp")
    assert settings.config["hp"]["tau"] == 0.5 and settings.taken["hp.tau"] == (0.5, 0.6)
    assert set(settings.config) == set(load_config("synthetic"))  # every section of today's schema
