"""Image helpers shared by the annotators (same behaviour as the reference ``annotator/util.py``)."""

from __future__ import annotations

import cv2
import numpy as np


def HWC3(x: np.ndarray) -> np.ndarray:
    """Return a uint8 ``H x W x 3`` image.

    Gray (``H x W`` or ``H x W x 1``) is repeated to 3 channels, RGB is returned as is, and
    RGBA is composited over white: ``rgb * a + 255 * (1 - a)`` in float32, then truncated.
    """
    if x.dtype != np.uint8:
        raise ValueError(f"HWC3 expects a uint8 image, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(f"HWC3 expects H x W, H x W x 1, 3 or 4, got shape {x.shape}")
    channels = x.shape[2]
    if channels == 3:
        return x
    if channels == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    y = color * alpha + 255.0 * (1.0 - alpha)
    return y.clip(0, 255).astype(np.uint8)


def resized_shape(height: int, width: int, resolution: int) -> tuple[int, int]:
    """``(H, W)`` that :func:`resize_image` gives an image of ``height x width`` pixels: scaled so the short
    side is ``resolution``, then each side rounded to a multiple of 64 (``np.round``, half to even, as in the
    reference). ``ValueError`` for an empty input or a result with a zero side."""
    if height <= 0 or width <= 0:
        raise ValueError(f"empty image ({height} x {width})")
    k = float(resolution) / min(height, width)
    new_h = int(np.round(height * k / 64.0)) * 64
    new_w = int(np.round(width * k / 64.0)) * 64
    if new_h <= 0 or new_w <= 0:
        raise ValueError(f"resolution {resolution} gives an empty {new_h} x {new_w} image")
    return new_h, new_w


def resize_image(input_image: np.ndarray, resolution: int) -> np.ndarray:
    """Scale to :func:`resized_shape` (short side ``resolution``, sides multiples of 64).

    Enlarging uses ``INTER_LANCZOS4``, shrinking or keeping the size uses ``INTER_AREA``.
    """
    height, width = input_image.shape[:2]
    new_h, new_w = resized_shape(height, width, resolution)
    interpolation = cv2.INTER_LANCZOS4 if resolution > min(height, width) else cv2.INTER_AREA
    return cv2.resize(input_image, (new_w, new_h), interpolation=interpolation)


def on_black(x: np.ndarray) -> np.ndarray:
    """An H x W x 4 uint8 image composited over black (``rgb * a``, truncated): transparent means nothing, as for
    a mask (keep) or a ready-made control map (no signal); every other image is returned as is. ``HWC3``, the
    reference's, composites over white (paper) instead."""
    if x.ndim == 3 and x.shape[2] == 4:
        return (x[:, :, :3].astype(np.float32) * (x[:, :, 3:4].astype(np.float32) / 255.0)).astype(np.uint8)
    return x
