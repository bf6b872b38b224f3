"""Test helpers for checkpoint routes: one set of tiny random weights, the single-file layouts written from it,
and the image a route gives, to compare routes image for image (tests/test_checkpoint_routes.py; other route
tests, e.g. diffusers folders, reuse :func:`route_image` and :func:`assert_same_image`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from cldm.checkpoint import CONTROL_PREFIX, DIFFERENCE_KEY, UNET_PREFIX, control_source_key, ema_key
from cldm.model import create_model
from cldm.pipeline import Canny2Image, CannyParams, read_image
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from tools.make_random_checkpoint import fill_zero_parameters

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "models" / "cldm_tiny.yaml"
INPUT_IMAGE = REPO / "test_imgs" / "disc.png"
# A short run of the tiny model: 64 px, one DDIM step (two UNet + ControlNet calls), a fixed seed.
PARAMS = CannyParams(prompt="red circle with blue background", a_prompt="", n_prompt="", image_resolution=64,
                     ddim_steps=1, scale=5.0, seed=7)  # fmt: skip
# Weights are multiples of 2**-16 (and below 2**7): sums and differences of two are exact in float32, so a
# "difference" file added back to its base gives the original tensors bit for bit; float16 still rounds them.
GRID = 2.0**-16
SD_PREFIXES = (UNET_PREFIX, "first_stage_model.", "cond_stage_model.")
Weights = dict[str, torch.Tensor]


def quantize(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor / GRID).round() * GRID if tensor.is_floating_point() else tensor


def tiny_weights(seed: int = 0) -> Weights:
    """A ControlLDM state dict of ``models/cldm_tiny.yaml`` in reference keys: seeded random weights, zero-initialised
    layers filled (so the control and the UNet output matter), every float on the :data:`GRID`."""
    torch.manual_seed(seed)
    model = create_model(TINY_CONFIG)
    fill_zero_parameters(model, 0.05, torch.Generator().manual_seed(seed + 1))
    return {k: v if k in SCHEDULE_BUFFERS else quantize(v.detach().clone()) for k, v in model.state_dict().items()}


def perturbed(weights: Weights, prefixes: tuple[str, ...], seed: int = 1) -> Weights:
    """``weights`` with the floating tensors under ``prefixes`` moved by quantized N(0, 0.02) noise."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: quantize(v + 0.02 * torch.randn(v.shape, generator=gen)) if k.startswith(prefixes) and v.is_floating_point()
        else v
        for k, v in weights.items()
    }  # fmt: skip


def controlnet_only(weights: Weights) -> Weights:
    """The ControlNet 1.1 layout: ``control_model.*`` only."""
    return {k: v for k, v in weights.items() if k.startswith(CONTROL_PREFIX)}


def base_model(weights: Weights, ema_unet: Weights | None = None) -> Weights:
    """A Stable Diffusion file: everything but ``control_model.*``; with ``ema_unet`` (UNet tensors under
    ``model.diffusion_model.*``), also its EMA copy under LitEma's keys, as ``v1-5-pruned.ckpt`` has it."""
    base = {k: v for k, v in weights.items() if not k.startswith(CONTROL_PREFIX)}
    if ema_unet is not None:
        base.update({ema_key(k): v for k, v in ema_unet.items() if k.startswith(UNET_PREFIX)})
        base["model_ema.decay"] = torch.tensor(0.9999)
        base["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return base


def difference_file(weights: Weights, base_unet: Weights) -> Weights:
    """A "difference" ControlNet: ``control_model.X - model.diffusion_model.X`` of ``base_unet`` for every X the
    UNet has, the other ``control_model.*`` as they are, and the ``difference`` flag."""
    out = {DIFFERENCE_KEY: torch.tensor(1.0)}
    for key, value in controlnet_only(weights).items():
        unet = base_unet.get(control_source_key(key))
        out[key] = value if unet is None else value - unet
    return out


def quiet(message: str) -> None:
    """A ``notify`` that drops the load's messages."""


def route_image(
    ckpt: str | Path, base_ckpt: str | Path | None = None, config: str | Path = TINY_CONFIG, **load_options: object
) -> np.ndarray:
    """The first sample (HWC uint8) of :data:`PARAMS` on ``test_imgs/disc.png`` through
    ``Canny2Image.from_checkpoint(config, ckpt, base_ckpt=..., **load_options)``."""
    options = {"notify": quiet, **load_options}
    pipe = Canny2Image.from_checkpoint(config, ckpt, torch.device("cpu"), base_ckpt=base_ckpt, **options)
    images, _ = pipe(read_image(INPUT_IMAGE), dataclasses.replace(PARAMS), progress=False)
    return images[1]


def max_difference(image: np.ndarray, reference: np.ndarray) -> int:
    """The largest per-pixel difference of two uint8 images of one shape, in 1/255 steps."""
    assert image.shape == reference.shape and image.dtype == reference.dtype == np.uint8
    return int(np.abs(image.astype(np.int16) - reference.astype(np.int16)).max())


def assert_same_image(image: np.ndarray, reference: np.ndarray, tolerance: int = 0) -> None:
    """Assert ``image`` equals ``reference`` within ``tolerance`` steps of 1/255 per pixel (0: bit for bit)."""
    assert max_difference(image, reference) <= tolerance
