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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.plugins.io import TorchCheckpointIO

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

    def __init__(self, dirpath: str | os.PathLike, every: int):
        super().__init__(dirpath=dirpath, filename="{step:06d}", every_n_train_steps=every, save_top_k=-1,
                         save_last=True, enable_version_counter=False)  # fmt: skip

    @property
    def state_key(self) -> str:
        """Without ``every_n_train_steps``: a run resumed with another ``--ckpt-every`` gets this state back."""
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath is not None and Path(self.dirpath).is_dir():
            for leftover in Path(self.dirpath).glob(f"*.ckpt{PARTIAL_SUFFIX}"):
                leftover.unlink(missing_ok=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer):  # this step is saved already (or nothing ran)
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps the ``metrics.csv`` it finds: the rows logged before step
    ``keep_before_step`` stay, later ones (steps the resumed checkpoint does not hold) are dropped."""

    def __init__(self, log_dir: str, keep_before_step: int):
        self.keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's hook deletes metrics.csv here
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
        kept = [row for row in rows if _step_of(row) < self.keep_before_step]
        if not kept:  # a new run (or one resumed from before its first logged step) starts the file afresh
            path.unlink()
            return
        self.metrics_keys = sorted(header)  # the writer appends with sorted columns
        if kept == rows and header == self.metrics_keys:
            return

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as out:
                writer = csv.DictWriter(out, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)

        replace_atomically(path, write)


def _step_of(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger(save_dir, name="", version="")``: ``metrics.csv`` and ``hparams.yaml`` directly in
    ``save_dir``. A resumed run (``resume_step``: the checkpoint's global step) appends to the ``metrics.csv``
    it finds, keeping the rows of the steps before ``resume_step``; a new run (``resume_step=0``) starts it
    afresh, as Lightning does."""

    def __init__(self, save_dir: str | os.PathLike, resume_step: int = 0):
        super().__init__(save_dir, name="", version="")
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, keep_before_step=self.resume_step)
        return self._experiment


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
