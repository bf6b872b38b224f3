"""Checkpoints, resume and logs of a training run (``tutorial_train.py``), on Lightning's public hooks.

- :class:`AtomicCheckpointIO` writes each checkpoint into a ``.partial`` file in the checkpoint folder, flushes it
  to disk and renames it into place: a killed run never leaves a half-written ``last.ckpt``.
- :class:`StepCheckpoint` is ``ModelCheckpoint`` that also saves the step training ends on, and always
  overwrites ``last.ckpt`` (never ``last-v1.ckpt``), so ``last.ckpt`` is the newest state.
- :class:`AppendingCSVLogger` continues ``metrics.csv`` when a run is resumed instead of deleting it.
- :func:`read_resume_checkpoint` checks a ``--resume`` file before the model is built.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only

from cldm.checkpoint import PARTIAL_SUFFIX, CheckpointError, read_checkpoint, replace_atomically
from cldm.checkpoint import save_checkpoint as write_checkpoint

# What Lightning needs in a checkpoint to continue a run (weights, optimizer, loop counters).
RESUME_KEYS = ("pytorch-lightning_version", "state_dict", "optimizer_states", "loops", "global_step")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, writing through :func:`cldm.checkpoint.save_checkpoint` (``flat``): the
    file is torch-saved straight into ``<path>.partial`` next to ``path`` (no copy of the checkpoint in memory, no
    temp folder on another filesystem), flushed, then renamed over ``path``. A failed write (full disk,
    read-only folder) raises ``OSError`` with one line naming ``path``, and leaves the old file as it was."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:  # fmt: skip
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_checkpoint(checkpoint, path, flat=True)


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(every_n_train_steps=every, save_top_k=-1, save_last=True)`` writing ``step=NNNNNN.ckpt``
    and ``last.ckpt`` into ``dirpath``, plus:

    - the step training ends on is saved too (``--max-steps 5`` with ``every=2`` saves steps 2, 4 and 5);
    - ``last.ckpt`` is always overwritten (no ``last-v1.ckpt`` when a resumed run finds it), so it holds the
      newest state; a step file of the same name is overwritten likewise;
    - ``*.partial`` files that a killed save left in ``dirpath`` are deleted when training starts.
    """

    def __init__(self, dirpath: str | os.PathLike, every: int, resuming: bool = False):
        """``resuming``: the run continues from a checkpoint (its folder holds the run's own files: Lightning's
        "exists and is not empty" warning is not given)."""
        super().__init__(dirpath=dirpath, filename="{step:06d}", every_n_train_steps=every, save_top_k=-1,
                         save_last=True, enable_version_counter=False)  # fmt: skip
        self.resuming = resuming

    @property
    def state_key(self) -> str:
        """Lightning's state-key format (class name, then the keys' repr) without ``every_n_train_steps``: a run
        resumed with another ``--ckpt-every`` gets this state back."""
        return f"{type(self).__qualname__}{repr({'monitor': self.monitor, 'mode': self.mode})}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():  # a resumed run finds its own checkpoints there: nothing to warn of
            if self.resuming:
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        self.saved_step = 0  # the global step of the newest checkpoint this run wrote (0: none)
        if trainer.is_global_zero and self.dirpath is not None and Path(self.dirpath).is_dir():
            for leftover in Path(self.dirpath).glob(f"*.ckpt{PARTIAL_SUFFIX}"):
                leftover.unlink(missing_ok=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        """Lightning's periodic save, then the step ``max_steps`` stops on: saved here, mid-epoch, its loop state
        is that of the batch (saved at the end of training, the unfinished epoch would count as done)."""
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if 0 < trainer.max_steps <= trainer.global_step:
            self.save_final_step(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The step of a run that ends otherwise (``max_epochs``: its last epoch is whole)."""
        self.save_final_step(trainer)

    def save_final_step(self, trainer: pl.Trainer) -> None:
        """Save the current step as a step file and ``last.ckpt`` unless it is saved already (or no step ran, or
        this is not a fit, or ``fast_dev_run``)."""
        step = trainer.global_step
        if trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING or step == self.saved_step:
            return
        metrics = {"step": torch.tensor(step), "epoch": torch.tensor(trainer.current_epoch)}
        # each path is set before its save: the checkpoint holds this callback's state (as Lightning's saves)
        self.best_model_path = self.format_checkpoint_name(metrics)
        trainer.save_checkpoint(self.best_model_path, weights_only=self.save_weights_only)
        self.last_model_path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(self.last_model_path, weights_only=self.save_weights_only)


def _kept_rows(path: Path, keep_before_step: int) -> tuple[list[dict], list[str]]:
    """The rows of the ``metrics.csv`` at ``path`` logged before step ``keep_before_step``, and its header (both
    empty without a file)."""
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    return [row for row in rows if _step_of(row) < keep_before_step], header


def _step_of(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


def appending_writer(log_dir: str, keep_before_step: int) -> ExperimentWriter:
    """Lightning's CSV writer for ``log_dir``. A resumed run (``keep_before_step`` > 0) keeps the ``metrics.csv``
    it finds: the rows logged before step ``keep_before_step`` stay, later ones (steps the resumed checkpoint does
    not hold) are dropped. Without rows to keep the file starts afresh, as Lightning's writer does (and says)."""
    path = Path(log_dir) / ExperimentWriter.NAME_METRICS_FILE
    aside = path.with_name(path.name + ".resuming")  # the kept rows while Lightning's writer is made
    if aside.is_file() and not path.exists():  # a run killed while they were aside
        os.replace(aside, path)
    kept, header = _kept_rows(path, keep_before_step) if keep_before_step > 0 else ([], [])
    keys = sorted(header)  # the writer appends with sorted columns
    if kept:

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as out:
                rows = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore")  # a ragged row's extra cells go
                rows.writeheader()
                rows.writerows(kept)

        replace_atomically(aside, write)  # metrics.csv stays whole if this fails
        path.unlink()  # Lightning's writer would delete it (and warn that it will)
    with warnings.catch_warnings():
        if not path.is_file():  # nothing it would delete: its warning (any file in the folder) would mislead
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        writer = ExperimentWriter(log_dir)
    if kept:
        os.replace(aside, path)
        writer.metrics_keys = keys
    return writer


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger(save_dir, name="", version="")``: ``metrics.csv`` and ``hparams.yaml`` directly in
    ``save_dir``. A resumed run (``resume_step``: the checkpoint's global step) appends to the ``metrics.csv``
    it finds, keeping the rows of the steps before ``resume_step``; a new run (``resume_step=0``) starts it
    afresh, as Lightning does."""

    def __init__(self, save_dir: str | os.PathLike, resume_step: int = 0):
        super().__init__(save_dir, name="", version="")
        self.resume_step = resume_step
        self.writer: ExperimentWriter | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The run's :func:`appending_writer`, made on first use (rank zero only, as Lightning's)."""
        if self.writer is None:
            self.writer = appending_writer(self.log_dir, keep_before_step=self.resume_step)
        return self.writer

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Write the rows not yet written; a process that made no writer (another rank) has none."""
        if self.writer is not None:
            self.save()


def read_resume_checkpoint(path: str | os.PathLike, flag: str = "--resume") -> Mapping[str, Any]:
    """The Lightning checkpoint at ``path`` (tensors memory-mapped, nothing run from the file) after checking
    that a run can continue from it. Raises :class:`CheckpointError` with one line naming ``flag`` and the file
    when it is missing, a folder, empty, truncated or corrupt, or not a Lightning training checkpoint (e.g.
    plain weights: ``--init-ckpt`` takes those)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{flag} {path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: checkpoint to resume from not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{flag} {path}: is empty (0 bytes): a save was cut off; resume from an older step file")
    try:
        data = read_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{flag} {err}") from None
    missing = [key for key in RESUME_KEYS if key not in data]
    if missing:
        raise CheckpointError(f"{flag} {path}: not a Lightning training checkpoint (it has no {', '.join(missing)}); "
                              "to start from plain weights use --init-ckpt")  # fmt: skip
    return data
