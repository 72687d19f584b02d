"""``python -m lit_wuerstchen``: LightningCLI (fit / validate / test / predict) plus sample, export, evaluate, data and
sweep."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks import EMA, ImageLogger, ModelCheckpoint, PerfMonitor, RunLifecycle
from .data import ShardDataModule
from .data.cli import main as data_main
from .data.precompute import add_arguments as add_precompute_arguments
from .data.precompute import precompute
from .errors import ConfigError, LitWuerstchenError, PreemptedError, show_tracebacks, user_error
from .evaluation.report import main as evaluate_main
from .interop.convert import main as convert_main
from .runs import SaveRunConfig, check_image_sizes, check_sharded_resume, prepare_fit
from .sample import main_export, main_sample
from .stages.base import Stage
from .strategies import consolidate
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
  export     a Stage C checkpoint (+ its Stages B and A) -> self-contained safetensors pipeline folder, or
             diffusers Würstchen folders (--format diffusers)
  consolidate a sharded checkpoint folder (FSDP runs) -> one checkpoint file
  convert    released Würstchen v2 weights (diffusers folders or official .pt) -> our stage checkpoints
  evaluate   FID / CLIP score / shapes alignment of a 'sample' output folder -> JSON report
  data       dataset tools: 'data shapes' (synthetic captioned set), 'data folder' (your images -> shards),
             'data precompute' (a stage's frozen-model outputs, once, for faster training)
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
    "lifecycle": RunLifecycle,
    "perf": PerfMonitor,
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
    callback groups, ``experiments/common/defaults.yaml`` as the default config of every subcommand, the run-folder
    checks of :mod:`lit_wuerstchen.runs` before anything is built, and errors as one line."""

    def add_arguments_to_parser(self, parser) -> None:
        for name, callback in NAMED_CALLBACKS.items():
            parser.add_lightning_class_args(callback, name)
        parser.add_argument(
            "--overwrite_run", type=bool, default=False, help="fit: replace a run folder that already holds a run"
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model_class = _stage_class((config.get("model") or {}).get("class_path"))
        if model_class is None:
            return
        try:
            check_sharded_resume(config)
            check_image_sizes(config, model_class)
            if self.subcommand == "fit":
                prepare_fit(config, model_class)
        except LitWuerstchenError:
            raise
        except (ValueError, TypeError, KeyError) as error:  # e.g. a config dataclass refusing a value
            raise ConfigError(_root_message(error)) from error

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except LitWuerstchenError:
            raise
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
            # an invalid setting found while building the model, data or trainer: a config error, not a crash
            raise ConfigError(_root_message(error)) from error

    def _run_subcommand(self, subcommand: str) -> None:  # private: lightning_private.CLI_RUN_SUBCOMMAND
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException as error:
            checkpoint = Path(self.trainer.log_dir or ".") / "checkpoints" / "last.ckpt"
            raise PreemptedError(
                f"stopped by a signal after step {self.trainer.global_step}; resume with --ckpt_path {checkpoint}"
            ) from error

    def _parse_ckpt_path(self) -> None:
        # Lightning would apply the checkpoint's saved hyper-parameters *over* the given configs and flags, so
        # `validate --ckpt_path X --model.init_args.validation_sampling.steps=50` would silently ignore the
        # flag. Here the configs you pass are the configs used; the checkpoint provides weights and state
        # (pass the run's saved config.yaml to reuse its settings).
        return


class _ModelAndDataCLI(WuerstchenCLI):
    """Builds model and data only (``data precompute``): a Trainer is not needed, and building one under torchrun
    with the run's device settings could refuse a single-device job."""

    def instantiate_trainer(self, **kwargs):
        return None


def run_lightning_cli(
    args: list[str] | None = None, run: bool = True, cli_class: type[WuerstchenCLI] = WuerstchenCLI
) -> WuerstchenCLI:
    """Run the LightningCLI on ``args`` (None: the command line). ``run=False``: only instantiate model, data
    and trainer from configs given without a subcommand (benchmarks, notebooks)."""
    # Absolute ${model...} interpolations keep working inside nested (subclass) groups.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    # The defaults file belongs to the subcommands' parsers (its keys are theirs), not to the main parser.
    subcommand_settings = {
        "parser_mode": "omegaconf+",
        "default_config_files": [str(default_config())],
        "exit_on_error": False,  # a bad key or value is one short line from main(), not 80 lines of usage
    }
    return cli_class(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs=(
            {
                "parser_mode": "omegaconf+",
                "exit_on_error": False,
                **{command: subcommand_settings for command in SUBCOMMANDS},
            }
            if run
            else subcommand_settings  # no subcommands: the main parser is the one that reads the configs
        ),
        save_config_callback=SaveRunConfig,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main_precompute(argv: list[str]) -> int:
    """``data precompute -c <the stage's configs> [--key=value ...] --out DIR``: the training cache of that stage."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_wuerstchen data precompute",
        description="Run the frozen models of the stage the configs train (Stage B: Stage A; Stage C: the text "
        "encoder and the compressor) once over its training shards and write the cache that "
        "`fit ... --data.init_args.cache DIR` trains from. Give the same -c configs and overrides as the fit. "
        "Resumable (run it again), and shared by processes started with torchrun or srun.",
    )
    parser.add_argument("-c", "--config", action="append", default=[], help="a config of the fit (repeatable)")
    add_precompute_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    if not args.config:
        parser.error("give the fit's configs, e.g. -c experiments/stage_c.yaml -c experiments/toy/stage_c.yaml")
    cli_args = [arg for config in args.config for arg in ("-c", config)] + overrides
    cli = run_lightning_cli(cli_args, run=False, cli_class=_ModelAndDataCLI)
    if not isinstance(cli.datamodule, ShardDataModule):
        raise ConfigError(f"data precompute reads a ShardDataModule's shards, not {type(cli.datamodule).__name__}")
    manifest = precompute(cli.model, cli.datamodule, args.out, args.batch_size, args.device, args.precision,
                          args.overwrite, progress=not args.no_progress)  # fmt: skip
    if manifest["complete"]:
        skipped = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items() if k != "corrupt_samples") or "none"
        print(f"cache complete: {manifest['samples']} samples of Stage {manifest['stage']} in {args.out} "
              f"(skipped: {skipped}); train with --data.init_args.cache {args.out}")  # fmt: skip
    else:
        print(f"this process's shards are done; {manifest['shards_done']} of {len(manifest['source_urls'])} in "
              f"all (the other processes finish the rest)")  # fmt: skip
    return 0


def main_consolidate(argv: list[str]) -> int:
    """``consolidate FOLDER [--out FILE]``: a sharded FSDP checkpoint folder -> one checkpoint file."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_wuerstchen consolidate",
        description="Write the one-file checkpoint of a sharded checkpoint folder (an FSDP run's checkpoints/*.ckpt/): "
        "the same layout as an unsharded run's, for tools outside this package. export, sample and a later stage's "
        "*_checkpoint read the folder directly; resume an FSDP run from the folder.",
    )
    parser.add_argument("folder", help="the sharded checkpoint folder (holds meta.pt and *.distcp files)")
    parser.add_argument(
        "--out", default=None, help="the file to write (default: FOLDER without .ckpt + .consolidated.ckpt)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.folder, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError) as error:
        raise ConfigError(str(error)) from error
    print(f"wrote {out}")
    return 0


def _data_command(argv: list[str]) -> int:
    if argv and argv[0] == "precompute":
        return main_precompute(argv[1:])
    return data_main(argv, prog="python -m lit_wuerstchen data")


COMMANDS = {
    "consolidate": main_consolidate,
    "data": _data_command,
    "sample": main_sample,
    "export": main_export,
    "convert": convert_main,
    "evaluate": evaluate_main,
    "sweep": sweep_main,
}


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return 0
    try:
        if argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        run_lightning_cli(None if from_command_line else argv)
    except argparse.ArgumentError as error:  # a bad key or value in a config or flag
        if show_tracebacks():
            raise
        hint = f"python -m lit_wuerstchen {argv[0]} --help lists the options"
        print(f"error: {_parse_error_message(error)}\n  {hint}", file=sys.stderr)
        return 2
    except BaseException as error:
        found = user_error(error)
        if found is None or show_tracebacks():
            raise
        lines = str(found).strip().splitlines() or [type(found).__name__]
        print("error: " + "\n  ".join(lines[:3]), file=sys.stderr)
        return found.exit_code
    return 0


def _parse_error_message(error: BaseException) -> str:
    """jsonargparse nests the real problem several causes deep ("Parser key "model": ... Union subtypes ...");
    say where (the outer key) and what (the innermost message)."""
    where = str(error).strip().splitlines()[0]
    innermost, seen = error, set()
    while (innermost.__cause__ or innermost.__context__) is not None and id(innermost) not in seen:
        seen.add(id(innermost))
        innermost = innermost.__cause__ or innermost.__context__
    what = str(innermost).strip().splitlines()[-1].strip() if innermost is not error else ""
    if not what or what in where:
        return " ".join(line.strip() for line in str(error).strip().splitlines()[:2])
    return f"{where} {what}" if where.endswith(":") else f"{where}: {what}"


def _stage_class(class_path: object) -> type[Stage] | None:
    """The Stage subclass a model ``class_path`` names (None for anything else)."""
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # jsonargparse reports it
    return found if isinstance(found, type) and issubclass(found, Stage) else None


def _root_message(error: BaseException) -> str:
    """The innermost cause's message (jsonargparse wraps errors raised while building a class several times)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error).strip() or type(error).__name__
