"""Canny edge annotator (OpenCV), as in the reference."""

from __future__ import annotations

import cv2
import numpy as np


class CannyDetector:
    """Callable wrapper around ``cv2.Canny``."""

    def __call__(self, img: np.ndarray, low_threshold: float, high_threshold: float) -> np.ndarray:
        """Return the uint8 edge map (0 or 255) of ``img``."""
        return cv2.Canny(img, low_threshold, high_threshold)
