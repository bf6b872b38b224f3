"""Training callbacks: the reference's ``ImageLogger`` (PNG grids), and a weights digest for DDP checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only


def make_grid(images: torch.Tensor, nrow: int = 4, padding: int = 2) -> np.ndarray:
    """Tile images [N, C, H, W] in [-1, 1] into one HWC uint8 grid, ``nrow`` images per row."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = img
    return grid


class ImageLogger(Callback):
    """Every ``batch_frequency`` optimizer steps, save ``pl_module.log_images(batch)`` as PNG grids in
    ``<save_dir>/image_log/train/<key>_gs-<step>_e-<epoch>_b-<batch>.png`` (the reference's names)."""

    def __init__(self, batch_frequency: int = 2000, max_images: int = 4, log_images_kwargs: dict | None = None,
                 save_dir: str | os.PathLike | None = None):  # fmt: skip
        super().__init__()
        if batch_frequency < 1:
            raise ValueError(f"batch_frequency must be at least 1, got {batch_frequency}")
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.save_dir = save_dir
        self._last_step = -1

    @rank_zero_only
    def log_local(self, save_dir: str | os.PathLike, split: str, images: dict[str, torch.Tensor], global_step: int,
                  current_epoch: int, batch_idx: int) -> list[Path]:  # fmt: skip
        root = Path(save_dir) / "image_log" / split
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        for key, value in images.items():
            path = root / f"{key}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            tmp = path.with_name(path.name + ".partial")
            Image.fromarray(make_grid(value)).save(tmp, format="PNG")
            os.replace(tmp, path)
            paths.append(path)
        return paths

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step
        if self.max_images <= 0 or step % self.batch_freq != 0 or step == self._last_step:
            return
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, N=self.max_images, **self.log_images_kwargs)
        if was_training:
            pl_module.train()
        save_dir = self.save_dir or trainer.default_root_dir
        self.log_local(save_dir, "train", images, step, trainer.current_epoch, batch_idx)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names and exact bytes of all parameters."""
    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class WeightsDigest(Callback):
    """At the end of training each process writes ``weights_digest_rank<R>.txt`` into ``out_dir``: DDP
    replicas that stayed in sync write the same digest."""

    def __init__(self, out_dir: str | os.PathLike):
        super().__init__()
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        text = f"{trainer.global_step} {weights_digest(pl_module)}\n"
        (self.out_dir / f"weights_digest_rank{trainer.global_rank}.txt").write_text(text)
