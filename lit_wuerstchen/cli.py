"""``python -m lit_wuerstchen``: LightningCLI (fit / validate / test / predict) plus the dataset tools."""

from __future__ import annotations

import sys

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

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


class WuerstchenCLI(LightningCLI):
    """LightningCLI with our defaults: subclass mode for model and data, omegaconf+ interpolation."""

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
    return WuerstchenCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return 0
    if argv[0] == "data":
        from .data.cli import main as data_main

        return data_main(argv[1:], prog="python -m lit_wuerstchen data")
    if argv[0] in ("sample", "export"):
        from .sample import main_export, main_sample

        return (main_sample if argv[0] == "sample" else main_export)(argv[1:])
    if argv[0] == "evaluate":
        from .evaluation.report import main as evaluate_main

        return evaluate_main(argv[1:])
    if argv[0] == "sweep":
        from .sweep import main as sweep_main

        return sweep_main(argv[1:])
    run_lightning_cli(None if from_command_line else argv)
    return 0
