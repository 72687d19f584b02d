"""Run folders: checks at the door of ``fit``, resuming into the same folder, and the config each run keeps.

A run lives in ``<save_dir>/<name>/<version>/`` (the TensorBoard logger's folder). Before any model is built:

- a fresh ``fit`` into a folder that already holds a run is refused (resume it, choose another version, or pass
  ``--overwrite_run=true`` to replace it);
- ``fit --ckpt_path <run>/checkpoints/x.ckpt`` with no version given resumes *into that run's folder*, so the
  TensorBoard curves continue (events the interrupted run logged after the checkpoint's step are purged);
- the checkpoint to resume from must exist and belong to the stage being trained; the checkpoints a stage builds on
  (Stage B's Stage A, Stage C's Stage B) must exist and be of the right stage; the training and validation
  resolutions must be sizes the model can encode and decode.

Only ``fit`` writes ``config.yaml``: ``validate``, ``test`` and ``predict`` pointed at a run never replace it. A resumed
run keeps its ``config.yaml`` and adds ``config.resume-<n>.yaml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import SaveConfigCallback

from .checkpoints import STAGE_NAMES, read_stage_checkpoint
from .errors import ConfigError
from .strategies import FSDP, is_sharded_checkpoint

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


def _plain(value: Any) -> Any:
    return value.as_dict() if isinstance(value, Namespace) else value


def run_folder(logger: Any) -> Path | None:
    """The folder of a TensorBoard logger config whose version is set, else None."""
    if not isinstance(logger, (dict, Namespace)) or logger.get("class_path") != TENSORBOARD:
        return None
    args = logger.get("init_args") or {}
    if args.get("version") is None:
        return None
    return Path(args.get("save_dir") or ".") / (args.get("name") or "lightning_logs") / str(args["version"])


def holds_a_run(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def check_sharded_resume(config: Namespace) -> None:
    """A sharded checkpoint folder (an FSDP run's) is restored only by the FSDP strategy: said before anything runs."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path in (None, "last", "hpc", "best", "registry") or not is_sharded_checkpoint(ckpt_path):
        return
    strategy = config.trainer.get("strategy")
    class_path = strategy.get("class_path") if isinstance(strategy, (dict, Namespace)) else strategy
    if class_path != f"{FSDP.__module__}.{FSDP.__name__}":
        raise ConfigError(
            f"{ckpt_path} is a sharded checkpoint (an FSDP run's): add -c experiments/strategies/fsdp.yaml, or write "
            f"one file with `python -m lit_wuerstchen consolidate {ckpt_path}` and pass that"
        )


def prepare_fit(config: Namespace, model_class: type) -> None:
    """The checks at the door of ``fit`` (see the module docstring); may set the logger's version and purge step."""
    ckpt_path = config.get("ckpt_path")
    logger = config.trainer.get("logger")
    if ckpt_path not in (None, "last", "hpc", "best", "registry"):
        needed_by = f"resuming {model_class.__name__}"
        checkpoint, _ = read_stage_checkpoint(ckpt_path, model_class.stage, needed_by=needed_by, metadata_only=True)
        resumed = Path(ckpt_path).resolve().parent.parent
        if isinstance(logger, Namespace) and logger.get("class_path") == TENSORBOARD:
            args = logger.init_args
            parent = (Path(args.get("save_dir") or ".") / (args.get("name") or "lightning_logs")).resolve()
            if args.get("version") is None and resumed.parent == parent:
                args.version = resumed.name
            if run_folder(logger) is not None and run_folder(logger).resolve() == resumed:
                args.purge_step = int(checkpoint.get("global_step", 0))  # drop events logged after the checkpoint
        return
    folder = run_folder(logger)
    if folder is not None and holds_a_run(folder):
        if not config.get("overwrite_run"):
            last = folder / "checkpoints" / "last.ckpt"
            resume = f"resume it with --ckpt_path {last}, " if last.exists() else ""
            raise ConfigError(
                f"{folder} already holds a run: {resume}choose another --trainer.logger.init_args.version, or pass "
                f"--overwrite_run=true to replace it"
            )
        shutil.rmtree(folder)


def check_image_sizes(config: Namespace, model_class: type) -> None:
    """Training and validation sizes the model can encode and decode (read from the configs and the checkpoints the
    stage builds on, before anything is built)."""
    multiple_of = getattr(model_class, "image_multiple", None)
    data = config.get("data")
    if multiple_of is None or not isinstance(data, Namespace):
        return
    multiple = multiple_of(_plain(config.model.get("init_args") or {}))
    args = data.get("init_args") or {}
    for key in ("resolution", "val_resolution"):
        size = args.get(key)
        if size is not None and (size < multiple or size % multiple):
            raise ConfigError(
                f"data.init_args.{key}={size} is not a size this {STAGE_NAMES[model_class.stage]} model can make: "
                f"use a positive multiple of {multiple}"
            )


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's config saving, for ``fit`` only; a resumed run adds ``config.resume-<n>.yaml`` instead of
    replacing the config it started with."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.already_saved:
            return
        resuming = self.config.get("ckpt_path") is not None
        if resuming and trainer.log_dir and (Path(trainer.log_dir) / "config.yaml").exists():
            n = 1
            while (Path(trainer.log_dir) / f"config.resume-{n}.yaml").exists():
                n += 1
            self.config_filename = f"config.resume-{n}.yaml"
        super().setup(trainer, pl_module, stage)


def claim_output(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> Path:
    """An output folder a command may write: refused when it is a file, or holds anything and ``overwrite`` was not
    asked (then its old contents are removed first, so no stale file survives next to the new ones)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a folder: give a folder for the output")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"{path} already holds output: choose another folder or pass {flag} to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def claim_output_file(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> Path:
    """An output file a command may write: refused when it exists and ``overwrite`` was not asked."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a file")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists: choose another path or pass {flag} to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
