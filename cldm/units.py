"""Control units: what one ControlNet gets in a run of :class:`cldm.pipeline.Canny2Image` (docs/multi-control.md).

A :class:`ControlUnit` names a control image, the annotator that turns it into the ControlNet's hint (``canny``,
``none``: the image is the hint, ``scribble``: the reference's scribble app), the ControlNet (``None``: the loaded
model's own), its strength, guess mode and step window. :func:`control_maps` makes each unit's map as the reference
resizes (``resize_image(HWC3(image), image_resolution)``); maps of another size than the first unit's are resized
to it. :func:`parse_control_spec` reads the scripts' ``--control`` option.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn as nn

from annotator.canny import CannyDetector
from annotator.util import HWC3, on_black, resize_image
from cldm.checkpoint import UNET_PREFIX, CheckpointError, Contents, load_state_dict
from cldm.inference import InferencePath
from cldm.model import load_controlnet
from ldm.modules.attention import set_attention_backend
from ldm.modules.winograd import set_conv_algorithm

ANNOTATORS = ("canny", "none", "scribble")
SCRIBBLE_THRESHOLD = 127  # reference gradio_scribble2image.py: hint white where min over channels < 127
MAIN = "main"  # --control's name for the loaded model's own ControlNet
CONTROL_SYNTAX = ("CKPT|main[,image=PATH][,annotator=canny|none|scribble][,strength=S][,start=F][,end=F][,guess]"
                  "[,low=N][,high=N]")  # fmt: skip


@dataclass
class ControlUnit:
    """One ControlNet's part in a run.

    - ``image``: the control image, HWC (or HW) uint8 as :func:`cldm.pipeline.read_image` returns it; ``None``: the
      call's input image.
    - ``annotator``: ``canny`` (edges, thresholds ``low_threshold``/``high_threshold``), ``none`` (the image is the
      hint), ``scribble`` (black lines on white -> the scribble ControlNet's white lines on black).
    - ``controlnet``: a ControlNet module (``cldm.cldm.ControlNet``, e.g. from :func:`cldm.model.load_controlnet`);
      ``None``: the pipeline model's ``control_model``.
    - ``strength`` (0-2), ``guess_mode``: the control scales (:func:`cldm.control.control_scales_for`).
    - ``start``/``end``: the step window, fractions of the run with diffusers' semantics
      (:class:`cldm.control.Control`); outside it the ControlNet is not run.
    """

    image: np.ndarray | None = None
    annotator: str = "canny"
    controlnet: nn.Module | None = None
    strength: float = 1.0
    guess_mode: bool = False
    start: float = 0.0
    end: float = 1.0
    low_threshold: int = 100
    high_threshold: int = 200

    @classmethod
    def from_params(cls, params: Any, image: np.ndarray | None = None) -> ControlUnit:
        """The single unit of :class:`cldm.pipeline.CannyParams` (``annotator``, ``strength``, ``guess_mode``,
        ``control_start``/``control_end``, the Canny thresholds): the model's own ControlNet."""
        return cls(image, params.annotator, None, params.strength, params.guess_mode, params.control_start,
                   params.control_end, params.low_threshold, params.high_threshold)  # fmt: skip

    def check(self, name: str = "control") -> None:
        """``ValueError`` "<name>: <problem>" (just the problem for an empty ``name``) for an image that is not an
        array, a ControlNet that is not a module (e.g. a path), an unknown annotator, a
        strength outside [0, 2], a window outside 0 <= start <= end <= 1, or thresholds outside 1-255 or low above
        high."""
        problems = [
            (self.image is not None and not isinstance(self.image, np.ndarray),
             f"image must be an HWC uint8 array (read a file with cldm.pipeline.read_image), got "
             f"{type(self.image).__name__}"),
            (self.controlnet is not None and not isinstance(self.controlnet, nn.Module),
             f"controlnet must be a loaded ControlNet module (Canny2Image.load_controlnet) or None, got "
             f"{type(self.controlnet).__name__}"),
            (self.annotator not in ANNOTATORS, f"annotator must be one of {', '.join(ANNOTATORS)}, got "
                                               f"{self.annotator!r}"),
            (not 0.0 <= self.strength <= 2.0, f"strength must be between 0 and 2, got {self.strength:g}"),
            (not 0.0 <= self.start <= self.end <= 1.0, f"the window needs 0 <= start <= end <= 1, got start="
                                                       f"{self.start:g}, end={self.end:g}"),
            (not 1 <= self.low_threshold <= self.high_threshold <= 255,
             f"Canny thresholds need 1 <= low <= high <= 255, got {self.low_threshold}, {self.high_threshold}"),
        ]  # fmt: skip
        for bad, message in problems:
            if bad:
                raise ValueError(f"{name}: {message}" if name else message)


def annotate(image: np.ndarray, annotator: str, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """The hint map (HWC uint8, the ControlNet's input x 255) of an already resized HWC uint8 ``image``:
    ``canny``: edges white on black; ``none``: the image; ``scribble``: 255 where the darkest channel is below
    127 (black lines on white paper), else 0. ``ValueError`` for another annotator."""
    if annotator == "canny":
        return HWC3(CannyDetector()(image, low_threshold, high_threshold))
    if annotator == "none":
        return image
    if annotator == "scribble":
        hint = np.zeros_like(image)
        hint[image.min(axis=2) < SCRIBBLE_THRESHOLD] = 255
        return hint
    raise ValueError(f"unknown annotator {annotator!r} (choose from {', '.join(ANNOTATORS)})")


def display_map(hint: np.ndarray, annotator: str) -> np.ndarray:
    """How a unit's map is shown (the pipeline's first images): ``255 - hint`` for ``canny`` and ``scribble``
    (black lines on white, as the reference's pages), the hint itself for ``none``."""
    return hint if annotator == "none" else 255 - hint


def control_maps(
    units: Sequence[ControlUnit], input_image: np.ndarray | None, image_resolution: int,
    notify: Callable[[str], None],
) -> list[np.ndarray]:  # fmt: skip
    """Each unit's hint map (HWC uint8). The first unit's image is resized as the reference resizes
    (``resize_image(HWC3(image), image_resolution)``); every other image is resized so (same rule) and, when
    that gives another size, scaled to the first map's size instead (its aspect ratio then changes): ``notify``
    is told once, naming those units. A unit's ``image`` of ``None`` is ``input_image``. ``ValueError`` for
    no units, a unit without an image, or a unit :meth:`ControlUnit.check` refuses (named "control N")."""
    if not units:
        raise ValueError("no control unit: give at least one")
    maps: list[np.ndarray] = []
    resized = []
    for i, unit in enumerate(units, 1):
        unit.check(f"control {i}")
        image = input_image if unit.image is None else unit.image
        if image is None:
            raise ValueError(f"control {i}: no control image")
        image = HWC3(on_black(image) if unit.annotator == "none" else image)  # a map's transparency: no signal
        img = resize_image(image, image_resolution)
        if maps and img.shape[:2] != maps[0].shape[:2]:
            height, width = maps[0].shape[:2]
            resized.append(f"control {i} ({img.shape[1]}x{img.shape[0]})")
            grow = height * width > image.shape[0] * image.shape[1]
            img = cv2.resize(image, (width, height), interpolation=cv2.INTER_LANCZOS4 if grow else cv2.INTER_AREA)
        maps.append(annotate(img, unit.annotator, unit.low_threshold, unit.high_threshold))
    if resized:
        height, width = maps[0].shape[:2]
        notify(f"{', '.join(resized)} resized to the first control's map, {width}x{height}")
    return maps


def hint_tensor(hint: np.ndarray, n: int, device: torch.device) -> torch.Tensor:
    """A hint map (HWC uint8) as the ControlNet's input: [n, 3, H, W] float32 in [0, 1] on ``device``."""
    tensor = torch.from_numpy(hint.copy()).float().to(device) / 255.0
    return tensor.permute(2, 0, 1)[None].repeat(n, 1, 1, 1)


def load_extra_controlnet(
    model: nn.Module, config: str | os.PathLike, ckpt: str | os.PathLike, path: InferencePath,
    low_memory: bool = False,
) -> nn.Module:  # fmt: skip
    """A further ControlNet for ``model`` (a loaded ``ControlLDM``), from any layout
    :func:`cldm.model.load_controlnet` reads, on the model's device, with the model's base: a difference file is
    made whole against ``model``'s UNet. Its layers follow ``path`` (attention kernel, convolution algorithm,
    compilation) as the model's. ``CheckpointError`` as ``load_controlnet``."""
    unet = {UNET_PREFIX + k: v for k, v in model.model.diffusion_model.state_dict().items()}
    device = next(model.parameters()).device
    net = load_controlnet(config, ckpt, device=device, low_memory=low_memory, unet=unet)
    set_attention_backend(net, path.attention)
    set_conv_algorithm(net, path.conv)
    if path.compile:
        net.compile(backend=path.compile)
    return net


@dataclass
class ControlSpec:
    """One ``--control`` option: the ControlNet (``ckpt``: a path, or ``None`` for the loaded model's own), the
    control image's path (``None``: ``--input``) and the unit's settings."""

    ckpt: Path | None
    image: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # the option as given, for messages

    def unit(self, image: np.ndarray | None, controlnet: nn.Module | None) -> ControlUnit:
        """The :class:`ControlUnit` of this spec with its image and ControlNet."""
        return ControlUnit(image=image, controlnet=controlnet, **self.settings)


_NUMBERS: dict[str, tuple[str, type]] = {
    "strength": ("strength", float), "start": ("start", float), "end": ("end", float),
    "low": ("low_threshold", int), "high": ("high_threshold", int),
}  # fmt: skip


def parse_control_spec(text: str) -> ControlSpec:
    """``--control`` :data:`CONTROL_SYNTAX`: a ControlNet file or folder (``main``: the ``--ckpt`` model's own), then
    ``key=value`` parts and the flag ``guess``. ``ValueError`` "--control 'TEXT': <problem>" naming the missing,
    unknown, repeated or bad part, or a unit :meth:`ControlUnit.check` refuses (files are checked when read)."""

    def fail(problem: str) -> ValueError:
        return ValueError(f"--control '{text}': {problem} (syntax: {CONTROL_SYNTAX})")

    head, *parts = [p.strip() for p in text.split(",")]
    if not head or "=" in head:
        raise fail("the ControlNet part (CKPT or main) is missing: it comes first")
    spec = ControlSpec(None if head == MAIN else Path(head).expanduser(), text=text)  # "~": the shell leaves it
    seen = set()
    for part in parts:
        key, sep, value = (s.strip() for s in part.partition("="))
        if key in seen:
            raise fail(f"part '{key}' is given twice")
        seen.add(key)
        if key == "guess" and not sep:
            spec.settings["guess_mode"] = True
        elif key not in (*_NUMBERS, "image", "annotator"):
            raise fail(f"unknown part '{part}'")
        elif not value:
            raise fail(f"part '{key}' has no value ({key}=...)")
        elif key == "image":
            spec.image = Path(value).expanduser()
        elif key == "annotator":
            spec.settings["annotator"] = value
        else:
            name, kind = _NUMBERS[key]
            try:
                spec.settings[name] = kind(value)
            except ValueError:
                wanted = "a number" if kind is float else "an integer"
                raise fail(f"part '{key}' needs {wanted}, got '{value}'") from None
    if seen & {"low", "high"} and spec.settings.get("annotator", "canny") != "canny":
        raise fail("parts 'low' and 'high' are Canny thresholds: they need annotator=canny")
    try:
        spec.unit(None, None).check("")
    except ValueError as err:
        raise fail(str(err)) from None
    return spec


def check_controlnet_file(path: str | os.PathLike) -> None:
    """Before any model is built: ``path`` exists and holds a ControlNet (``control_model.*`` keys once read as
    :func:`cldm.checkpoint.load_state_dict` reads it: memory-mapped, no weight data touched). Raises
    :class:`~cldm.checkpoint.CheckpointError` naming the file otherwise."""
    if not Contents.of(load_state_dict(path)).control:
        raise CheckpointError(f"{path}: no ControlNet in it (no control_model.* keys)")


class _ControlOption(argparse.Action):
    """``--control``: each value parsed by :func:`parse_control_spec` and appended; a bad spec ends the parse with
    its one-line message and exit status 2 (argparse's status for bad options), without the usage text."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        try:
            spec = parse_control_spec(values)
        except ValueError as err:
            parser.exit(2, f"error: {err}\n")
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), spec])


def add_control_arguments(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """The scripts' control flags: ``--annotator``, ``--control-start``/``--control-end`` (the single unit's, from
    ``defaults``, a :class:`~cldm.pipeline.CannyParams`) and the repeatable ``--control`` (a list of
    :class:`ControlSpec` in ``args.control``)."""
    parser.add_argument("--annotator", default=defaults.annotator, choices=ANNOTATORS,
                        help="what the input image is turned into: canny edges (default), none (the image is the "
                             "control map), scribble (black lines on white)")  # fmt: skip
    parser.add_argument("--control-start", type=float, default=defaults.control_start,
                        help="fraction of the run where the ControlNet starts (0-1, default %(default)s)")
    parser.add_argument("--control-end", type=float, default=defaults.control_end,
                        help="fraction of the run where it stops (0-1, default %(default)s; 0: never run)")
    parser.add_argument("--control", action=_ControlOption, default=[], metavar="SPEC",
                        help=f"one more ControlNet, repeatable: {CONTROL_SYNTAX}; image defaults to --input, main "
                             "is --ckpt's ControlNet (docs/multi-control.md)")  # fmt: skip
