"""Small helpers shared by the ldm and cldm packages (config instantiation, seeding)."""

from __future__ import annotations

import importlib
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    if exists(val):
        return val
    return d() if callable(d) else d


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``."""
    module, cls = string.rsplit(".", 1)
    mod = importlib.import_module(module)
    if reload:
        mod = importlib.reload(mod)
    return getattr(mod, cls)


def instantiate_from_config(config: Mapping[str, Any]) -> Any:
    """Build ``config["target"](**config["params"])`` as the reference's yaml configs expect."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seed_everything(seed: int) -> int:
    """Seed python, numpy and torch (all devices) like Lightning's ``seed_everything``."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def log_txt_as_img(wh: tuple[int, int], texts: list[str], size: int = 10) -> torch.Tensor:
    """Draw each text, wrapped, black on white: [len(texts), 3, h, w] in [-1, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = wh
    font = ImageFont.load_default(size=size)
    chars_per_line = max(1, int(width / (size * 0.6)))
    images = []
    for text in texts:
        canvas = Image.new("RGB", (width, height), color="white")
        lines = [text[i : i + chars_per_line] for i in range(0, len(text), chars_per_line)]
        ImageDraw.Draw(canvas).multiline_text((0, 0), "\n".join(lines), fill="black", font=font)
        images.append(np.asarray(canvas).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.tensor(np.stack(images), dtype=torch.float32)
