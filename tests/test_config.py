"""Config system: composition, interpolation, overrides, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import DictConfig

from detkit.config import load_config, validate
from detkit.errors import ConfigError


def test_defaults_and_required_keys():
    cfg = load_config()
    for key in ["model.backbone.name", "model.backbone.pretrained", "model.backbone.out_levels",
                "model.backbone.frozen_stages", "model.backbone.norm", "model.neck.name", "model.neck.out_channels",
                "model.neck.levels", "model.head.name", "model.num_classes", "data.train.format", "data.val.images",
                "data.test.annotations", "data.train.split", "data.train.classes", "data.image_size",
                "data.batch_size", "data.num_workers", "train.epochs", "train.lr", "train.optimizer",
                "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.precision", "output_dir",
                "seed"]:
        value = cfg
        for part in key.split("."):
            assert part in value, f"missing key {key}"
            value = value[part]


def test_base_composition_interpolation_and_overrides(write_yaml):
    write_yaml("bases/model.yaml", "model:\n  backbone: {name: resnet50, frozen_stages: 1}\n  num_classes: 5\n")
    write_yaml("bases/data.yaml", "data:\n  image_size: 320\n  batch_size: 2\n")
    path = write_yaml(
        "exp.yaml",
        "_base_: [bases/model.yaml, bases/data.yaml]\n"
        "model:\n  num_classes: 7\n  neck: {out_channels: '${data.image_size}'}\n"
        "data:\n  batch_size: 3\n",
    )
    cfg = load_config(path, ["data.image_size=416", "model.backbone.out_levels=[c3,c4,c5]"])
    assert isinstance(cfg, DictConfig)
    assert cfg.name == "exp"  # from the file name
    assert cfg.model.backbone.name == "resnet50" and cfg.model.backbone.frozen_stages == 1  # from a base
    assert cfg.model.num_classes == 7  # the file wins over its base
    assert cfg.data.batch_size == 3
    assert cfg.data.image_size == 416  # the command line wins over files
    assert cfg.model.neck.out_channels == 416  # interpolation resolved after overrides
    assert list(cfg.model.backbone.out_levels) == ["c3", "c4", "c5"]
    assert cfg.output_dir.startswith("runs/exp/")  # ${name} and ${now:...}


def test_nested_bases_resolve_relative_to_their_file(write_yaml):
    write_yaml("a/b/root.yaml", "seed: 7\n")
    write_yaml("a/mid.yaml", "_base_: b/root.yaml\ndata: {batch_size: 9}\n")
    path = write_yaml("top.yaml", "_base_: a/mid.yaml\n")
    cfg = load_config(path)
    assert cfg.seed == 7 and cfg.data.batch_size == 9


def test_unknown_key_suggests_the_nearest(write_yaml):
    path = write_yaml("bad.yaml", "model:\n  backbone:\n    nmae: resnet18\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "unknown config key 'model.backbone.nmae' (did you mean 'model.backbone.name'?)" in msg
    assert str(path) in msg and "\n" not in msg


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.batch_sise' \(did you mean 'data.batch_size'\?\)"):
        load_config(None, ["data.batch_sise=4"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.batch_size=abc", "config key 'data.batch_size' = 'abc': expected int"),
        ("model.backbone.out_levels=3", "config key 'model.backbone.out_levels' = 3: expected a list of str"),
        ("model.backbone.pretrained=[1]", "config key 'model.backbone.pretrained' = [1]: expected str or null"),
        ("model.backbone=resnet", "config key 'model.backbone' = 'resnet': expected a mapping"),
        ("model.backbone.norm=bnn", "config key 'model.backbone.norm' = 'bnn': expected one of bn, frozen_bn, sync_bn"),
        ("train.lr=fast", "config key 'train.lr' = 'fast': expected float"),
    ],
)
def test_wrong_type_names_key_value_and_type(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_bad_yaml_and_bad_base(write_yaml, tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = write_yaml("bad.yaml", "model:\n  backbone: [resnet\n")
    with pytest.raises(ConfigError, match=r"bad YAML in .*bad.yaml \(line \d+, column \d+\)"):
        load_config(bad)
    top = write_yaml("top.yaml", "_base_: missing_base.yaml\n")
    with pytest.raises(ConfigError, match="base config not found: missing_base.yaml"):
        load_config(top)
    loop = write_yaml("loop.yaml", "_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular _base_"):
        load_config(loop)
    scalar = write_yaml("scalar.yaml", "just a string\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def test_bad_override_syntax_and_interpolation():
    with pytest.raises(ConfigError, match="bad override 'data.batch_size': expected key=value"):
        load_config(None, ["data.batch_size"])
    with pytest.raises(ConfigError, match="config key 'model.neck.out_channels': cannot resolve interpolation"):
        load_config(None, ["model.neck.out_channels=${nope.key}"])
    for value in ("{depths:[2,1]}", "[1, 2", "{a: 1", "'unclosed"):  # YAML that does not parse: one line naming it
        with pytest.raises(ConfigError, match=r"bad override .model.backbone.kwargs=.*not YAML") as info:
            load_config(None, ["data.batch_size=2", f"model.backbone.kwargs={value}"])
        assert "\n" not in str(info.value)


def test_free_form_sections_accept_any_key():
    cfg = load_config(None, ["model.backbone.kwargs.drop_path_rate=0.1", "trainer.devices=[0,1]"])
    assert cfg.model.backbone.kwargs.drop_path_rate == 0.1
    assert list(cfg.trainer.devices) == [0, 1]


def test_validate_in_memory_dicts():
    cfg = validate({"model": {"backbone": {"name": "resnet34"}}})
    assert cfg.model.backbone.name == "resnet34" and cfg.model.neck.name == "fpn"
    with pytest.raises(ConfigError, match="unknown config key 'model.bakbone'"):
        validate({"model": {"bakbone": {}}})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "detkit.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_config_show_and_one_line_errors(write_yaml):
    path = write_yaml("exp.yaml", "model:\n  backbone: {name: resnet50}\n")
    out = _cli("config", "show", str(path), "data.batch_size=16")
    assert out.returncode == 0, out.stderr
    assert "name: resnet50" in out.stdout and "batch_size: 16" in out.stdout
    bad = write_yaml("bad.yaml", "model:\n  backbone:\n    nmae: x\n")
    out = _cli("config", "show", str(bad))
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [f"detkit: error: {bad}: unknown config key 'model.backbone.nmae' "
                     "(did you mean 'model.backbone.name'?)"]
    out = _cli("config", "show", str(path), "data.batch_size=x")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "expected int" in out.stderr



def test_container_type_mismatch_and_non_utf8(write_yaml, tmp_path):
    path = write_yaml("x.yaml", "model:\n  backbone:\n    out_levels: {a: 1}\n")
    with pytest.raises(ConfigError, match="x.yaml"):
        load_config(path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8 text"):
        load_config(bad)


def test_choices_checked_after_interpolation(write_yaml):
    path = write_yaml("i.yaml", "data:\n  resize: ${data.train.name}\n  train: {name: stretch}\n")
    assert load_config(path).data.resize == "stretch"
    with pytest.raises(ConfigError, match="'data.resize' = 'squash': expected one of letterbox, stretch"):
        load_config(path, ["data.train.name=squash"])
