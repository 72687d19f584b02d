"""``python -m lit_wuerstchen``: LightningCLI (fit / validate / test / predict) plus sample, export, evaluate, data and
sweep."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .callbacks import EMA, CrashCheckpoint, ImageLogger
from .checkpoints import CheckpointError
from .data.cli import main as data_main
from .evaluation.report import main as evaluate_main
from .sample import main_export, main_sample
from .sweep import main as sweep_main

OVERVIEW = """\
usage: python -m lit_wuerstchen <command> [options]

Train and sample Würstchen-style text-to-image models.

training (Lightning; configs compose: -c base.yaml -c override.yaml, later wins):
  fit        train a stage, e.g. fit -c experiments/stage_a.yaml -c experiments/toy/stage_a.yaml
  validate   run the validation loop of a stage (e.g. with --ckpt_path)
  test       run the test loop
  predict    run the prediction loop

inference and tools:
  sample     text -> images from a Stage C checkpoint or exported pipeline (PNGs + samples.jsonl)
  export     a Stage C checkpoint (+ its Stages B and A) -> self-contained safetensors pipeline folder
  evaluate   FID / CLIP score / shapes alignment of a 'sample' output folder -> JSON report
  data       dataset tools: 'data shapes' (synthetic captioned set), 'data folder' (your images -> shards)
  sweep      ablation grids: 'sweep run --grid G.yaml' (Stage B then C per point), 'sweep report' (CSV, table, plots)

'python -m lit_wuerstchen <command> --help' shows the options of each command.
"""

SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Callbacks every run has, each its own config group (`ema: {decay: 0.99}` in a later file changes that one value
# and keeps the rest); evaluation callbacks are listed under trainer.callbacks by the stage configs.
NAMED_CALLBACKS = {
    "checkpoint": ModelCheckpoint,
    "lr_monitor": LearningRateMonitor,
    "ema": EMA,
    "image_logger": ImageLogger,
    "crash_checkpoint": CrashCheckpoint,
}


def experiments_dir() -> Path:
    """The experiment configs: ``experiments/`` of a clone, or the copy an installed wheel carries."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "experiments", package / "experiments"):
        if (candidate / "common").is_dir():
            return candidate
    raise FileNotFoundError(f"no experiments/common/ next to {package} (a broken install?)")


def default_config() -> Path:
    """Trainer, logger and callback defaults of every run, read before any ``-c`` file."""
    return experiments_dir() / "common" / "defaults.yaml"


class WuerstchenCLI(LightningCLI):
    """LightningCLI with our defaults: subclass mode for model and data, omegaconf+ interpolation, the named
    callback groups, and ``experiments/common/defaults.yaml`` as the default config of every subcommand."""

    def add_arguments_to_parser(self, parser) -> None:
        for name, callback in NAMED_CALLBACKS.items():
            parser.add_lightning_class_args(callback, name)

    def _parse_ckpt_path(self) -> None:
        # Lightning would apply the checkpoint's saved hyper-parameters *over* the given configs and flags, so
        # `validate --ckpt_path X --model.init_args.validation_sampling.steps=50` would silently ignore the
        # flag. Here the configs you pass are the configs used; the checkpoint provides weights and state
        # (pass the run's saved config.yaml to reuse its settings).
        return


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> WuerstchenCLI:
    """Run the LightningCLI on ``args`` (None: the command line). ``run=False``: only instantiate model, data
    and trainer from configs given without a subcommand (benchmarks, notebooks)."""
    # Absolute ${model...} interpolations keep working inside nested (subclass) groups.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    # The defaults file belongs to the subcommands' parsers (its keys are theirs), not to the main parser.
    subcommand_settings = {"parser_mode": "omegaconf+", "default_config_files": [str(default_config())]}
    return WuerstchenCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs=(
            {"parser_mode": "omegaconf+", **{command: subcommand_settings for command in SUBCOMMANDS}}
            if run
            else subcommand_settings  # no subcommands: the main parser is the one that reads the configs
        ),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


COMMANDS = {
    "data": lambda argv: data_main(argv, prog="python -m lit_wuerstchen data"),
    "sample": main_sample,
    "export": main_export,
    "evaluate": evaluate_main,
    "sweep": sweep_main,
}


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return 0
    if argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    try:
        run_lightning_cli(None if from_command_line else argv)
    except Exception as error:
        cause = checkpoint_error(error)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    return 0


def checkpoint_error(error: BaseException) -> CheckpointError | None:
    """The CheckpointError behind ``error`` (jsonargparse wraps errors raised while instantiating a model)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, CheckpointError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
