"""Small helpers shared by the ldm and cldm packages (config instantiation, parameter checks, seeding)."""

from __future__ import annotations

import importlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def _plain(value: Any) -> Any:
    """``value`` with sequences (tuples, lists, OmegaConf lists) as lists, so that ``()`` and ``[]`` compare equal."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _show(value: Any) -> str:
    """A short ``repr`` of a parameter value (tensors and arrays by their shape)."""
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (int, float)):
        return f"<{type(value).__name__} of shape {tuple(shape)}>"
    text = repr(_plain(value))
    return text if len(text) <= 80 else text[:77] + "..."


def unsupported_parameter(owner: str, name: str, value: Any, implemented: str, hint: str = "") -> ValueError:
    """The one error for a reference parameter set to something this project does not implement:
    ``ValueError("<owner>: parameter '<name>' = <value> is not supported (this project implements only
    <implemented>)")``, then ``: <hint>`` when given."""
    message = f"{owner}: parameter '{name}' = {_show(value)} is not supported"
    return ValueError(f"{message} (this project implements only {implemented})" + (f": {hint}" if hint else ""))


def check_supported(owner: str, name: str, value: Any, *supported: Any, hint: str = "") -> None:
    """Raise :func:`unsupported_parameter` unless ``value`` equals one of ``supported`` (the values this project
    implements; sequences compare as lists). ``owner`` names the class (or function) the parameter was given to."""
    if not any(_plain(value) == _plain(s) for s in supported):
        raise unsupported_parameter(owner, name, value, " or ".join(_show(s) for s in supported), hint)


def get_obj_from_str(string: str) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``."""
    module, cls = string.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def instantiate_from_config(config: Mapping[str, Any]) -> Any:
    """Build ``config["target"](**config["params"])`` as the reference's yaml configs expect; ``KeyError`` without
    a ``target``."""
    if "target" not in config:
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


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
