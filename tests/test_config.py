import pytest

from pipeline.config import fingerprint, load_config, parse_sets, preset_names
from pipeline.errors import UserError
from pipeline.methods.registry import names

METHODS = names()  # the registered methods, in registration order

# docs/hp.md §6, transcribed independently of the preset files.
SPEC = {
    "cocostuff27": dict(head_dim=512, epochs=3, tau=0.8, alpha=0.05, rho=0.02, pool_size=2048, renew_interval=100,
                        ema_m=0.99, warmup=1000, backbone="vit_small_patch8_224.dino"),
    "cityscapes": dict(head_dim=512, epochs=30, tau=0.6, alpha=0.05, rho=0.02, pool_size=2048, renew_interval=20,
                       ema_m=0.999, warmup=50, backbone="vit_small_patch8_224.dino"),
    "potsdam": dict(head_dim=256, epochs=10, tau=0.4, alpha=0.0, rho=1.0, pool_size=1024, renew_interval=20,
                    ema_m=0.999, warmup=100, backbone="vit_base_patch8_224.dino"),
}


def test_every_dataset_has_a_preset():
    assert {"cocostuff27", "cityscapes", "potsdam", "voc", "synthetic", "folder"} <= set(preset_names())


@pytest.mark.parametrize("name", sorted(SPEC))
def test_presets_hold_the_spec_values(name):
    config = load_config(name)
    for key, value in SPEC[name].items():
        section = "features" if key == "backbone" else "hp"
        assert config[section][key] == value, (name, key)
    # common values of §6/§7
    assert config["hp"]["batch_size"] == 64
    assert config["prepare"]["resolution"] == 224 and config["prepare"]["val_resolution"] == 320
    assert config["prepare"]["crop_ratio"] == 0.5


def test_overrides_are_typed_and_win():
    config = load_config("cityscapes", parse_sets(["hp.tau=0.7", "features.n_views=3", "prepare.five_crop=false"]))
    assert config["hp"]["tau"] == 0.7 and isinstance(config["hp"]["tau"], float)
    assert config["features"]["n_views"] == 3
    assert config["prepare"]["five_crop"] is False


def test_unknown_key_names_the_key_and_a_suggestion():
    with pytest.raises(UserError, match=r"hp\.tua.*did you mean 'hp\.tau'"):
        load_config("cityscapes", {"hp.tua": "1"})
    with pytest.raises(UserError, match=r"train\.tua.*did you mean 'hp\.tau'"):  # a key that left [train]
        load_config("cityscapes", {"train.tua": "1"})
    with pytest.raises(UserError, match="unknown config key 'nosection.x'"):
        load_config("cityscapes", {"nosection.x": "1"})
    with pytest.raises(UserError, match=r"'hp\.epochs' must be an integer, got 'many'.*--set hp\.epochs="):
        load_config("cityscapes", {"hp.epochs": "many"})
    with pytest.raises(UserError, match="unknown dataset preset 'cityscape'"):
        load_config("cityscape")
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_sets(["hp.tau"])


def test_fingerprint_is_order_independent_and_value_sensitive():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 1.5})


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_runs_hcl_with_the_spec_settings(name):
    from pipeline.methods.hcl.multilevel import patch_sizes

    config = load_config(name)
    patch = 8 if "patch8" in config["features"]["backbone"] else 16
    assert patch_sizes(config["features"]["backbone"]) == ((8, 16, 32, 56) if patch == 8 else (16, 32, 56))  # §1
    h = config["hcl"]
    assert (h["lr"], h["weight_decay"], h["tau"], h["ema_m"], h["sample_fraction"], h["bank_replace"]) == (
        1e-4, 0.04, 0.07, 0.996, 0.3, 0.5)  # docs/hcl.md §3-§4
    if name != "synthetic":  # the synthetic preset shrinks the head and K for a CPU
        assert (h["dim"], h["hidden"], h["out_dim"], h["heads"], h["clusters"]) == (768, 2048, 256, 12, 500)
        from pipeline.methods.hcl.heads import (
            build_model,  # what the trainer builds from the preset: the spec's shapes (§2)
        )

        model = build_model(1536, h)
        assert [tuple(m.weight.shape) for m in model.projector.mlp if hasattr(m, "weight")] == [
            (2048, 768), (2048, 2048), (256, 2048)]
        predictor = [tuple(m.weight.shape) for m in model.predictor.mlp if hasattr(m, "weight")]
        assert predictor == [(2048, 256), (256, 2048)]
        assert model.head.block.attn.num_heads == 12 and tuple(model.head.embed.weight.shape) == (768, 1536)
        assert (h["epochs"], h["batch_size"], h["seed"], h["lr_drop_epoch"], h["lr_drop"]) == (10, 64, 7, 3, 0.1)
    assert load_config("voc")["train"]["method"] == "hcl"


# docs/hp.md §8 and the paper's Tables 1-3, transcribed independently of the preset files:
# (dataset, backbone, features, probe) -> (Acc, mIoU); Potsdam-3 reports unsupervised Acc only.
S8, S16, B8 = "vit_small_patch8_224.dino", "vit_small_patch16_224.dino", "vit_base_patch8_224.dino"
PAPER = {
    ("cocostuff27", S8, "head", "cluster"): (57.2, 24.6), ("cocostuff27", S8, "head", "linear"): (75.6, 42.7),
    ("cocostuff27", S16, "head", "cluster"): (54.5, 24.3), ("cocostuff27", S16, "head", "linear"): (74.1, 39.1),
    ("cocostuff27", S8, "raw", "cluster"): (28.7, 11.3), ("cocostuff27", S8, "raw", "linear"): (68.6, 33.9),
    ("cityscapes", B8, "head", "cluster"): (79.5, 18.4), ("cityscapes", B8, "head", "linear"): (90.9, 33.0),
    ("cityscapes", S8, "head", "cluster"): (80.1, 18.4), ("cityscapes", S8, "head", "linear"): (91.2, 30.6),
    ("cityscapes", S8, "raw", "linear"): (84.6, 22.8),
    ("potsdam", B8, "head", "cluster"): (82.4, None), ("potsdam", B8, "raw", "cluster"): (53.0, None),
}


def test_presets_evaluate_with_the_paper_protocol_and_hold_its_numbers():
    for name, epochs in (("cocostuff27", 3), ("cityscapes", 20), ("potsdam", 10)):
        config = load_config(name)
        assert config["evaluate"]["protocol"] == "paper" and config["evaluate"]["crf"] == "auto", name
        assert config["paper"]["epochs"] == epochs and config["paper"]["source"], name
    for name in ("synthetic", "folder", "voc"):
        config = load_config(name)
        assert config["evaluate"]["protocol"] == "kmeans" and config["paper"]["results"] == [], name
    for (name, backbone, features, probe), (acc, miou) in PAPER.items():
        rows = [r for r in load_config(name)["paper"]["results"]
                if (r["backbone"], r["features"], r["probe"]) == (backbone, features, probe)]
        assert len(rows) == 1 and (rows[0]["acc"], rows[0].get("miou")) == (acc, miou), (name, backbone, probe)


@pytest.mark.parametrize("key,value,expected", [
    ("hp.batch_size", "-4", "integer >= 1"), ("hp.epochs", "0", "integer >= 1"),
    ("features.chunk_size", "-8", "integer >= 1"), ("hp.tau", "0", "(0, inf)"), ("hp.tau", "nan", "finite"),
    ("hp.rho", "1.5", "[0, 1]"), ("hp.dropout", "1", "[0, 1)"), ("hcl.bank_replace", "-0.1", "[0, 1]"),
    ("train.method", "hpp", "one of " + ", ".join(METHODS)), ("evaluate.protocol", "stego", "one of paper, kmeans"),
    ("hcl_features.views", "1", "integer >= 2"), ("hp.lr", "inf", "finite"),
])
def test_out_of_range_values_are_refused_when_the_config_is_built(key, value, expected):
    with pytest.raises(UserError) as info:
        load_config("synthetic", {key: value})
    message = str(info.value)
    assert f"'{key}'" in message and expected in message and f"--set {key}=" in message


def test_every_preset_is_within_range_and_boundaries_are_accepted():
    for name in preset_names():
        load_config(name)  # raises if a preset itself is out of range
    config = load_config("synthetic", {"hp.rho": "0", "hp.dropout": "0", "hp.warmup": "0",
                                       "hp.alpha": "0", "evaluate.extra_clusters": "0", "hp.ema_m": "1"})
    assert (config["hp"]["rho"], config["hp"]["ema_m"]) == (0.0, 1.0)


@pytest.mark.slow
def test_cli_range_errors_exit_2_with_one_line(tmp_path):
    import subprocess
    import sys

    for args in (["train", "--batch-size", "-4"], ["features", "--chunk-size", "0"], ["train", "--epochs", "-3"]):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--workdir", str(tmp_path)],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("error: config key") and "Traceback" not in proc.stderr
        assert not (tmp_path / "synthetic").exists()  # refused before any work


@pytest.mark.parametrize("name", preset_names())
def test_printed_config_is_toml_that_loads_back_to_the_same_config(name):
    import tomllib

    from pipeline.config import to_toml

    config = load_config(name, {"hp.tau": "0.75", "dataset.root": 'C:\\data "x"'})
    assert tomllib.loads(to_toml(config)) == config


def test_cli_conventions():
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("hp-pipe ")
    for command in ([], ["features"], ["train"], ["evaluate"], ["predict"], ["status"], ["bench", "train"]):
        short, long = runner.invoke(app, [*command, "-h"]), runner.invoke(app, [*command, "--help"])
        assert short.exit_code == 0 and short.output == long.output
        assert "<bool>" not in short.output and "…" not in short.output
    assert "repeat" in runner.invoke(app, ["train", "-h"]).output  # --set says it can be given several times
    assert "--data-root" not in runner.invoke(app, ["report", "-h"]).output  # only options that apply
    # a choice (an enum): listed in --help, and a wrong one refused by typer with the choices, before any work
    for command, option, choices in ((["features"], "--split", ("train", "val", "all")),
                                     (["features"], "--scheduler", ("local", "local-cluster", "distributed")),
                                     (["evaluate"], "--probe", ("cluster", "linear", "all")),
                                     (["predict"], "--probe", ("cluster", "linear")),
                                     (["train"], "--device", ("auto", "cpu", "cuda")),
                                     (["bench", "scale"], "--dtype", ("float16", "int8")),
                                     (["bench", "scale"], "--renewal", ("chunks", "gather")),
                                     (["bench", "train"], "--method", METHODS),
                                     (["train"], "--method", METHODS)):
        assert f"{option} <{'|'.join(choices)}>" in runner.invoke(app, [*command, "-h"]).output
        result = runner.invoke(app, [*command, option, "x"])
        listed = ", ".join(f"'{c}'" for c in choices)
        assert result.exit_code == 2 and f"'x' is not one of {listed}" in result.output, (command, option)


# ----------------------------------------------------------------------------- the typed schema (pipeline/settings.py)

def _presets_dir():
    from importlib import resources

    return resources.files("pipeline.presets")


def _method_presets():
    """Each method package's presets.toml, read here with plain tomllib: {package: tables}."""
    import tomllib
    from pathlib import Path

    import pipeline

    root = Path(pipeline.__file__).parent / "methods"
    return {p.parent.name: tomllib.loads(p.read_text()) for p in sorted(root.glob("*/presets.toml"))}


def _merged_toml(name, method="hp"):
    """The preset on top of _common.toml, then every method's own sections (the tables of its [defaults] that
    _common.toml lacks: its defaults, then its table for the dataset) and the chosen method's values for the other
    sections, merged here with plain tomllib (independent of load_config). Sections keyed by name."""
    import tomllib

    merged = tomllib.loads(_presets_dir().joinpath("_common.toml").read_text())
    core = set(merged)
    for section, values in tomllib.loads(_presets_dir().joinpath(f"{name}.toml").read_text()).items():
        merged[section] = {**merged.get(section, {}), **values}
    for package, tables in _method_presets().items():
        own = set(tables["defaults"]) - core
        for section in own:
            merged[section] = {**tables["defaults"][section], **tables.get(name, {}).get(section, {})}
        if package == method:
            for table in (tables["defaults"], tables.get(name, {})):
                for section in set(table) - own - {"by_backbone"}:
                    merged[section] = {**merged[section], **table[section]}
    return merged


def _by_section(config):
    return {section: _typed_tree(values) for section, values in config.items()}


def _typed_tree(value):
    """Values with their exact types (1, 1.0 and True are all different here), keys in order."""
    if isinstance(value, dict):
        return [(k, _typed_tree(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_typed_tree(v) for v in value]
    return type(value), value


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_to_exactly_its_merged_toml(name):
    config = load_config(name)
    assert _by_section(config) == _by_section(_merged_toml(name))
    for method in _method_presets():  # the chosen method's presets: its values for [features], [evaluate], ...
        expected = _merged_toml(name, method)
        expected["train"]["method"] = method
        assert _by_section(load_config(name, {"train.method": method})) == _by_section(expected)
    assert all(type(v) in (bool, int, float, str, list) for values in config.values() for v in values.values())


def test_the_dataclasses_hold_no_defaults_and_match_the_common_preset():
    import dataclasses
    import tomllib

    from pipeline.settings import DATASET_SECTIONS, section_classes

    common = tomllib.loads(_presets_dir().joinpath("_common.toml").read_text())
    for tables in _method_presets().values():  # each method's own sections: the defaults in its presets.toml
        common.update({s: v for s, v in tables["defaults"].items() if s not in common})
    assert set(section_classes()) == set(common)
    for name, cls in [*section_classes().items(), *(("dataset", c) for c in DATASET_SECTIONS.values())]:
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (name, f.name)
        if cls in section_classes().values():
            assert {f.name for f in dataclasses.fields(cls)} == set(common[name]), name


@pytest.mark.parametrize("name", preset_names())
def test_a_preset_missing_a_key_is_refused_at_load(name, monkeypatch):
    import pipeline.config as config_module

    read = config_module._read_preset
    merged = _merged_toml(name)
    dropped = [(section, next(iter(values))) for section, values in merged.items()]
    if name == "synthetic":
        dropped.append(("dataset", "n_train"))  # the generated dataset's own options
    read_method = config_module.method_presets
    for section, key in dropped:
        def without(preset, section=section, key=key):
            data = read(preset)
            data.get(section, {}).pop(key, None)
            return data

        def method_without(method, section=section, key=key):  # a method's own section: its presets.toml
            tables = read_method(method)
            for table in tables.values():
                table.get(section, {}).pop(key, None)
            return tables

        monkeypatch.setattr(config_module, "_read_preset", without)  # the key gone from every file that has it
        monkeypatch.setattr(config_module, "method_presets", method_without)
        with pytest.raises(UserError, match=rf"preset '{name}'.* has no key '{section}\.{key}'"):
            load_config(name)
    monkeypatch.setattr(config_module, "_read_preset", read)
    monkeypatch.setattr(config_module, "method_presets", read_method)
    load_config(name)


def test_a_preset_with_an_unknown_key_or_section_is_refused(monkeypatch):
    import pipeline.config as config_module

    read = config_module._read_preset

    def extra(preset):
        data = read(preset)
        if preset == "voc":
            data["features"]["backbon"] = "x"
        return data

    monkeypatch.setattr(config_module, "_read_preset", extra)
    with pytest.raises(UserError, match=r"preset 'voc'.*unknown config key 'features\.backbon'.*did you mean "
                                        r"'features\.backbone'"):
        load_config("voc")
    read_method = config_module.method_presets

    def method_extra(method):  # a method's own section, in its presets.toml
        tables = read_method(method)
        tables.get("voc", tables["defaults"]).setdefault(method.section, {})["tua"] = 0.5
        return tables

    monkeypatch.setattr(config_module, "_read_preset", read)
    monkeypatch.setattr(config_module, "method_presets", method_extra)
    with pytest.raises(UserError, match=r"preset 'voc'.*unknown config key 'hp\.tua'.*did you mean 'hp\.tau'"):
        load_config("voc")
    monkeypatch.setattr(config_module, "method_presets", read_method)
    monkeypatch.setattr(config_module, "_read_preset", lambda p: {**read(p), **({"trian": {}} if p == "voc" else {})})
    with pytest.raises(UserError, match=r"unknown section \[trian\]"):
        load_config("voc")


@pytest.mark.parametrize("key,value,expected", [
    ("prepare.five_crop", "maybe", "true or false"), ("run.tensorboard", 1, "true or false"),
    ("features.n_views", "2.5", "an integer"), ("hp.epochs", 3.0, "an integer"),
    ("hp.epochs", True, "an integer"),
    ("hp.tau", "abc", "a finite number"), ("hp.tau", "0.5x", "a finite number"),
    ("features.backbone", 5, "a string"), ("paper.results", "none", "a list"),
])
def test_a_value_of_the_wrong_type_is_refused(key, value, expected):
    with pytest.raises(UserError) as info:
        load_config("synthetic", {key: value})
    message = str(info.value)
    assert f"'{key}'" in message and f"must be {expected}" in message and f"--set {key}=" in message


@pytest.mark.parametrize("key,value,choices", [
    ("features.compressor", "gzip", "zstd, lz4, blosclz, none"), ("features.dtype", "int4", "float16, int8"),
    ("hp.pool_backend", "cuda", "faiss, torch"), ("train.device", "cuda:0", "auto, cpu, cuda"),
    ("evaluate.cluster_method", "spectral", "kmeans, adam"), ("evaluate.linear_optimizer", "adamw", "auto, adam, sgd"),
    ("evaluate.crf_scheduler", "threads", "processes, distributed"), ("train.method", "HP", ", ".join(METHODS)),
])
def test_a_wrong_choice_is_refused_with_the_choices_and_a_valid_fix(key, value, choices):
    with pytest.raises(UserError) as info:
        load_config("synthetic", {key: value})
    message, first = str(info.value), choices.split(",")[0]
    assert f"'{key}' must be one of {choices}, got '{value}'" in message and f"--set {key}={first} " in message
    assert load_config("synthetic", {key: first})[key.split(".")[0]][key.split(".")[1]] == first  # the fix works


@pytest.mark.parametrize("key,value,expected", [
    ("features.amp", "True", "true, false or auto"),  # read literally (extraction/workers.py amp_setting): "True" would
                                                      # silently mean off
    ("evaluate.crf", "maybe", "true, false or auto"), ("evaluate.probes", "cluster,knn", "comma-separated list"),
    ("dataset.name", "mnist", "one of cityscapes"), ("paper.results", [{"backbone": "b", "features": "head",
                                                                         "probe": "knn", "acc": 1.0}], "a list of"),
    ("hcl.lr_drop", "0", "(0, 1]"), ("evaluate.linear_sgd_momentum", "1", "[0, 1)"),
])
def test_out_of_range_words_and_rows_are_refused(key, value, expected):
    with pytest.raises(UserError) as info:
        load_config("synthetic", {key: value})
    assert f"'{key}'" in str(info.value) and expected in str(info.value)


def test_command_line_words_are_kept_as_written_and_typed_in_the_view():
    from pipeline.settings import Auto, Protocol, typed

    overrides = {"evaluate.crf": "True", "features.amp": "true", "hp.alpha": 0, "hp.tau": "0.7",
                 "run.tensorboard": "no", "train.method": "hcl"}
    config = load_config("synthetic", overrides)
    assert _typed_tree({k: config[k.split(".")[0]][k.split(".")[1]] for k in overrides}) == _typed_tree(
        {"evaluate.crf": "True", "features.amp": "true", "hp.alpha": 0, "hp.tau": 0.7,
         "run.tensorboard": False, "train.method": "hcl"})  # as today: the dict holds plain values, as given
    view = typed(config)
    assert view.hp.tau == 0.7 and type(view.hp.alpha) is float and view.hp.alpha == 0.0
    assert view.train.method == "hcl" and view.evaluate.protocol is Protocol.kmeans
    assert view.evaluate.crf is True and view.features.amp is True and view.run.tensorboard is False
    assert typed(load_config("synthetic")).evaluate.crf is Auto.auto
    assert view.dataset.n_train == 16 and not hasattr(typed(load_config("voc")).dataset, "n_train")
    with pytest.raises(AttributeError):
        view.hp.tau = 0.5  # read-only: the dict is the config


@pytest.mark.parametrize("key", ["tau", "epochs", "batch_size", "pool_size", "seed"])
def test_a_key_that_moved_from_train_to_hp_is_named_at_its_new_place(key):
    """HP's settings left [train] for [hp]: the old spelling is refused with the new one, and the new one works."""
    with pytest.raises(UserError, match=rf"'train\.{key}' is now 'hp\.{key}'.*--set hp\.{key}="):
        load_config("synthetic", {f"train.{key}": "3"})
    assert load_config("synthetic", {f"hp.{key}": "3"})["hp"][key] == 3
    assert key not in load_config("synthetic")["train"]
