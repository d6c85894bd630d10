"""Every YAML in conf/ parses print_config reproduces a run; bad input fails at parse."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY_TOKENIZER
from vlt.cli import main as vlt
from vlt.models import DiTConfig, TokenizerConfig, preset_config

STAGE_CONFIGS = sorted(p for p in (ROOT / "conf").glob("*/*.yaml") if p.parent.name != "trainer")
TRAINER_CONFIGS = sorted((ROOT / "conf" / "trainer").glob("*.yaml"))


def print_config(*args: str, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        vlt(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stage_config_parses(path, capsys):
    config = print_config("-c", str(path), capsys=capsys)
    assert config["model"]["class_path"].startswith("vlt.lit.")
    assert config["data"]["class_path"] == "vlt.data.WebDataModule"
    assert "${" not in yaml.safe_dump(config), "an interpolation was left unresolved"


# Model init args that hold a registry kind's config (the key, minus a `_config` suffix, names the kind).
PRESET_SECTIONS = ("tokenizer", "tokenizer_config", "dit")
DEFAULTS = {"tokenizer": TokenizerConfig(), "dit": DiTConfig()}  # the signatures' defaults


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_model_config_is_the_named_preset_plus_the_listed_fields(path, capsys):
    """What a config runs is a registered preset (covered by the registry's contract tests) plus the
    fields the file lists; paper-scale files name their preset instead of re-listing its fields."""
    listed = yaml.safe_load(path.read_text())["model"]["init_args"]
    printed = print_config("-c", str(path), capsys=capsys)["model"]["init_args"]
    for key in [k for k in PRESET_SECTIONS if isinstance(listed.get(k), dict)]:
        fields, kind = dict(listed[key]), key.removesuffix("_config")
        name = fields.pop("preset", None)
        if not path.name.startswith("tiny"):
            assert name is not None, f"{path.name}: {key} re-lists fields instead of naming a preset"
        base = preset_config(kind, name) if name else DEFAULTS[kind]
        assert printed[key] == dataclasses.asdict(dataclasses.replace(base, **fields))


def test_tiny_presets_are_the_signature_defaults():
    """A tiny config that names no preset runs the tiny preset: the dataclass defaults are that preset."""
    assert preset_config("tokenizer", "tiny") == TokenizerConfig()
    assert preset_config("dit", "tiny") == DiTConfig()


def test_a_preset_override_from_a_later_file_and_the_command_line(tmp_path, capsys):
    override = tmp_path / "wider.yaml"
    override.write_text("model:\n  init_args:\n    tokenizer: {width: 512}\n")
    args = ["-c", str(ROOT / "conf/tokenizer/b.yaml"), "-c", str(override)]
    printed = print_config(*args, "--model.init_args.tokenizer.heads=8", capsys=capsys)
    tokenizer = printed["model"]["init_args"]["tokenizer"]
    expected = dataclasses.replace(preset_config("tokenizer", "b"), width=512, heads=8)
    assert tokenizer == dataclasses.asdict(expected)


@pytest.mark.parametrize(
    ("section", "message"),
    [("{preset: q}",
      r"unknown dit preset 'q'; registered: \['b', 'l', 'lgm-b', 'lgm-xl', 's', 'tiny', 'xl'\]"),
     ("{preset: s, widht: 3}", r"dit preset 's' has no fields \['widht'\]")],
)  # fmt: skip
def test_a_bad_preset_fails_at_parse_naming_it(tmp_path, capsys, section, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "conf/dit/s.yaml").read_text().replace("{preset: s, num_classes: 1000}", section))
    with pytest.raises(SystemExit) as exit_info:
        vlt(["fit", "-c", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("path", TRAINER_CONFIGS, ids=lambda p: p.name)
def test_trainer_partial_composes(path, capsys):
    config = print_config("-c", str(ROOT / "conf/tokenizer/tiny.yaml"), "-c", str(path), capsys=capsys)
    assert config["trainer"]["accelerator"] == yaml.safe_load(path.read_text())["trainer"]["accelerator"]


def test_command_line_override_reaches_interpolated_values(capsys):
    config = print_config("-c", str(ROOT / "conf/dit/tiny.yaml"), "--latents=/elsewhere", capsys=capsys)
    assert config["model"]["init_args"]["cache"] == "/elsewhere"
    assert config["data"]["init_args"]["train"] == "/elsewhere/train-*.tar"


def test_broken_config_fails_at_parse_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "conf/tokenizer/tiny.yaml").read_text().replace("bottleneck: layernorm", "bottleneck: vq")
    )
    with pytest.raises(SystemExit) as exit_info:
        vlt(["fit", "-c", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert "bottleneck" in capsys.readouterr().err


def test_help_lists_tools_and_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "vlt.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "fit" in out and "data" in out and "cache-latents" in out
    out = subprocess.run(
        [sys.executable, "-m", "vlt.cli", "fit", "--help"], capture_output=True, text=True
    ).stdout
    assert "--trainer.max_steps" in out


@pytest.mark.slow
def test_printed_config_reruns_the_same_run(tmp_path, tiny_shards, capsys):
    args = [
        "-c",
        str(ROOT / "conf/tokenizer/tiny.yaml"),
        f"--runs_dir={tmp_path}",
        "--name=again",
        f"--data.init_args.train={tiny_shards['train']}",
        f"--data.init_args.val={tiny_shards['val']}",
        *TINY_TOKENIZER,
        "--trainer.max_steps=2",
    ]
    config = print_config(*args, capsys=capsys)
    saved = tmp_path / "printed.yaml"
    saved.write_text(yaml.safe_dump(config))
    vlt(["fit", "-c", str(saved)])
    resolved = yaml.safe_load((Path(tmp_path) / "again" / "config.yaml").read_text())
    assert resolved["model"] == config["model"] and resolved["trainer"]["max_steps"] == 2
    assert (Path(tmp_path) / "again" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("preset", ["s", "b", "l", "xl"])
def test_paper_dit_configs_carry_the_reference_sampler(preset, capsys):
    """Shift 0.3 on the 25-point grid (24 Euler steps), CFG interval [0.1, 1], w = 10.5 / 8.0 / 6.5."""
    flow = print_config("-c", str(ROOT / f"conf/dit/{preset}.yaml"), capsys=capsys)["model"]["init_args"][
        "flow"
    ]
    assert (flow["timestep_shift"], flow["sample_steps"], flow["sampler"]) == (0.3, 24, "euler")
    assert {int(k): w for k, w in flow["cfg_scales"].items()} == {32: 10.5, 64: 8.0, 128: 6.5}
    assert list(flow["cfg_interval"]) == [0.1, 1.0]


@pytest.mark.parametrize("command", ["test", "predict"])
def test_test_and_predict_are_refused_with_the_commands_that_exist(command, capsys):
    from vlt.lit.cli import VLTCLI

    with pytest.raises(SystemExit, match=rf"vlt {command}: not available: no vlt stage has a {command}_step"):
        vlt([command, "-c", str(ROOT / "conf/tokenizer/tiny.yaml")])
    assert set(VLTCLI.subcommands()) == {"fit", "validate"}
    with pytest.raises(SystemExit):
        vlt(["--help"])
    assert "{fit,validate}" in capsys.readouterr().out
