"""The command line: every experiment YAML parses, configs compose, --help works at every level, bad keys fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_wuerstchen.cli import main

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIGS = sorted(p for p in (REPO / "experiments").glob("*.yaml"))


def _print_config(capsys, *configs: Path, extra: tuple[str, ...] = ()) -> dict:
    args = ["fit"]
    for config in configs:
        args += ["-c", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", BASE_CONFIGS, ids=lambda p: p.name)
def test_paper_scale_yaml_parses(config, capsys):
    printed = _print_config(capsys, config)
    assert printed["model"]["class_path"].startswith("lit_wuerstchen.stages.")
    assert printed["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize("config", BASE_CONFIGS, ids=lambda p: p.name)
def test_toy_override_composes(config, capsys):
    toy = REPO / "experiments" / "toy" / config.name
    assert toy.is_file(), f"every paper-scale experiment has a CPU toy override: missing {toy}"
    printed = _print_config(capsys, config, toy)
    assert printed["trainer"]["accelerator"] == "cpu"
    assert printed["trainer"]["precision"] == "32-true"
    # Interpolations resolve after all files are merged (omegaconf+): the toy logger name wins everywhere.
    assert printed["trainer"]["logger"]["init_args"]["name"].startswith("toy_")


def test_later_config_and_flags_win(capsys):
    printed = _print_config(
        capsys,
        REPO / "experiments/stage_a.yaml",
        REPO / "experiments/toy/stage_a.yaml",
        extra=("--model.init_args.vqgan.codebook_size=64",),
    )
    assert printed["model"]["init_args"]["vqgan"]["codebook_size"] == 64
    assert printed["model"]["init_args"]["vqgan"]["channels"] == [48, 96]  # from the toy file
    assert printed["model"]["init_args"]["vqgan"]["latent_channels"] == 4  # from the base file


def test_bad_config_key_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    vqgan:\n      codebok_size: 64\n")
    code = main(["fit", "-c", str(REPO / "experiments/stage_a.yaml"), "-c", str(bad), "--print_config"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) <= 3 and err[0].startswith("error:")  # short: no 80 lines of usage
    assert "codebok_size" in "\n".join(err)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["fit", "--help"],
        ["validate", "--help"],
        ["predict", "--help"],
        ["data", "--help"],
        ["data", "shapes", "--help"],
        ["data", "folder", "--help"],
    ],
    ids=" ".join,
)
def test_help_at_every_level(args, capsys):
    try:
        code = main(args)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "data"):
        assert f"  {command}" in out
