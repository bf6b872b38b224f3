"""img2img and inpainting inputs of the pipeline: the init image and the mask, checked and brought to the output
size, and the init latents (docs/img2img.md). The sampling side is :class:`ldm.models.diffusion.sampling.InitLatents`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from annotator.util import HWC3, on_black
from ldm.models.diffusion.sampling import InitLatents

LATENT_FACTOR = 8  # pixels per latent cell along each side


class InitInputError(ValueError):
    """An init image or mask that cannot be used (not an image, or a mask of another aspect ratio); the message
    names it."""


@dataclass(frozen=True)
class InitInputs:
    """The init image (uint8 [H, W, 3] at the output size), the latent mask (float32 [1, 1, H/8, W/8], 1 =
    repaint) and the pixels to keep (bool [H, W], the mask's black), both ``None`` for img2img."""

    image: np.ndarray
    mask: torch.Tensor | None
    keep: np.ndarray | None = None

    def overlay(self, samples: np.ndarray) -> np.ndarray:
        """``samples`` (uint8 [B, H, W, 3]) with the kept pixels set to the init image's (when inpainting)."""
        if self.keep is None:
            return samples
        return np.where(self.keep[None, :, :, None], self.image[None], samples)


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` at ``height x width``: ``INTER_AREA`` when shrinking, ``INTER_LANCZOS4`` when enlarging (as the
    reference's ``resize_image``)."""
    shrink = height * width <= image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)


def _as_image(image: object, name: str) -> np.ndarray:
    """``image`` if it is a uint8 H x W or H x W x 1/3/4 array with no empty side, else :class:`InitInputError`."""
    ok = isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3)
    ok = ok and (image.ndim == 2 or image.shape[2] in (1, 3, 4)) and min(image.shape[:2]) > 0
    if not ok:
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InitInputError(f"{name}: not an image (expected uint8 H x W or H x W x 1/3/4 pixels, got {what})")
    return image


def same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether sizes ``a`` and ``b`` (``(height, width)``) have one aspect ratio up to rounding: ``a``'s height
    from its width at ``b``'s ratio, or its width from its height, is within one pixel."""
    (ah, aw), (bh, bw) = a, b
    return abs(ah - aw * bh / bw) <= 1.0 or abs(aw - ah * bw / bh) <= 1.0


def init_inputs(
    input_image: np.ndarray, init_image: np.ndarray | None, mask: np.ndarray | None, size: tuple[int, int],
    init_name: str = "the init image", mask_name: str = "the mask", notify: Callable[[str], None] | None = None,
) -> InitInputs:  # fmt: skip
    """The init image and latent mask of a run at ``size`` (``(H, W)`` in pixels, multiples of 8).

    ``init_image`` (uint8 HWC/HW; ``None``: the control's ``input_image``) is composited on white if it has
    alpha and resized to ``size``; ``notify`` is told when that stretches it (another aspect ratio than
    ``input_image``'s). ``mask`` (uint8 HWC/HW, white = repaint, transparent = keep; ``None``: img2img): gray is
    the channels' mean, resized to ``size``, 128 and above is white, and a latent cell is repainted when any of
    its 8 x 8 pixels is white; after decoding, the pixels outside the white are the init image's
    (:meth:`InitInputs.overlay`). :class:`InitInputError` (a ``ValueError``) naming ``init_name`` or
    ``mask_name`` when one is not an image, or when the mask's aspect ratio is not the init image's
    (:func:`same_aspect`)."""
    height, width = size
    source = input_image if init_image is None else _as_image(init_image, init_name)
    if init_image is not None and notify is not None and not same_aspect(source.shape[:2], input_image.shape[:2]):
        notify(f"{init_name}: {source.shape[1]}x{source.shape[0]} is stretched to the output's {width}x{height}")
    pixels = _resized(HWC3(source), height, width)
    if mask is None:
        return InitInputs(pixels, None)
    mask = _as_image(mask, mask_name)
    if not same_aspect(mask.shape[:2], source.shape[:2]):
        raise InitInputError(f"{mask_name}: {mask.shape[1]}x{mask.shape[0]} has another aspect ratio than "
                         f"{init_name if init_image is not None else 'the input image'} "
                         f"({source.shape[1]}x{source.shape[0]})")  # fmt: skip
    gray = HWC3(on_black(mask)).astype(np.float32).mean(axis=2)  # transparent: keep
    white = _resized(gray, height, width) >= 127.5
    cells = white.reshape(height // LATENT_FACTOR, LATENT_FACTOR, width // LATENT_FACTOR, LATENT_FACTOR)
    return InitInputs(pixels, torch.from_numpy(cells.any(axis=(1, 3)).astype(np.float32))[None, None], ~white)


@torch.no_grad()
def init_latents(model: torch.nn.Module, inputs: InitInputs, noise: torch.Tensor, strength: float) -> InitLatents:
    """:class:`InitLatents` of ``inputs`` for the start ``noise`` [B, 4, H/8, W/8]: the init image encoded once
    (the VAE posterior's sample, from torch's global generator, scaled: ``get_first_stage_encoding`` as ldm's
    img2img) and repeated B times, the mask on the noise's device."""
    x = torch.from_numpy(inputs.image.copy()).float().to(noise.device).permute(2, 0, 1)[None] / 127.5 - 1.0
    latents = model.get_first_stage_encoding(model.encode_first_stage(x)).float()
    mask = None if inputs.mask is None else inputs.mask.to(noise.device)
    return InitLatents(latents.repeat(noise.shape[0], 1, 1, 1), noise, strength, mask)
