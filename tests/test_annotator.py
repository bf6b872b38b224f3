"""Tests for annotator.util (HWC3, resize_image) and the Canny annotator."""

import cv2
import numpy as np
import pytest

from annotator.canny import CannyDetector
from annotator.util import HWC3, resize_image


def test_hwc3_gray_2d_to_three_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = HWC3(gray)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_hwc3_single_channel_to_three_channels():
    gray = np.full((2, 5, 1), 77, dtype=np.uint8)
    out = HWC3(gray)
    assert out.shape == (2, 5, 3)
    assert (out == 77).all()


def test_hwc3_rgb_passthrough():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    assert HWC3(rgb) is rgb


@pytest.mark.parametrize(
    ("color", "alpha", "expected"),
    [
        (200, 255, 200),  # opaque: color kept
        (10, 0, 255),  # transparent: white
        (100, 51, 224),  # 100 * 0.2 + 255 * 0.8
        (100, 128, 177),  # 177.196 truncated
        (0, 128, 126),  # float32 gives 126.99999, truncated like the reference
        (50, 200, 94),  # 94.216 truncated
        (255, 128, 255),
    ],
)
def test_hwc3_rgba_composites_over_white(color, alpha, expected):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = color
    rgba[..., 3] = alpha
    out = HWC3(rgba)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert (out == expected).all()


def test_hwc3_rgba_per_channel():
    rgba = np.array([[[255, 0, 100, 51]]], dtype=np.uint8)
    assert HWC3(rgba).tolist() == [[[255, 204, 224]]]


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4), dtype=np.float32),
        np.zeros((4, 4, 2), dtype=np.uint8),
        np.zeros((4,), dtype=np.uint8),
        np.zeros((2, 4, 4, 3), dtype=np.uint8),
    ],
)
def test_hwc3_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        HWC3(bad)


@pytest.mark.parametrize(
    ("shape", "resolution", "expected_hw"),
    [
        ((300, 451, 3), 512, (512, 768)),  # up: 451 * 512 / 300 = 769.7 -> 768
        ((400, 600, 3), 512, (512, 768)),
        ((512, 512, 3), 512, (512, 512)),
        ((1000, 700, 3), 256, (384, 256)),  # down: short side is W
        ((720, 1280, 3), 512, (512, 896)),  # 910.2 -> 896
        ((160, 64, 3), 64, (128, 64)),  # 160 / 64 = 2.5 rounds half to even -> 2
        ((224, 64, 3), 64, (256, 64)),  # 3.5 -> 4
        ((100, 100), 256, (256, 256)),  # 2-D input stays 2-D
    ],
)
def test_resize_image_shapes(shape, resolution, expected_hw):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = resize_image(img, resolution)
    assert out.shape[:2] == expected_hw
    assert out.shape[0] % 64 == 0 and out.shape[1] % 64 == 0
    assert out.ndim == img.ndim and out.dtype == np.uint8


def test_resize_image_interpolation_choice():
    img = np.random.default_rng(2).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    up = resize_image(img, 512)
    np.testing.assert_array_equal(up, cv2.resize(img, (768, 512), interpolation=cv2.INTER_LANCZOS4))
    down = resize_image(img, 128)  # k < 1: INTER_AREA
    np.testing.assert_array_equal(down, cv2.resize(img, (192, 128), interpolation=cv2.INTER_AREA))
    same = resize_image(np.zeros((256, 320, 3), np.uint8) + 9, 256)  # k == 1: INTER_AREA
    assert same.shape == (256, 320, 3) and (same == 9).all()


def test_resize_image_too_small_resolution():
    with pytest.raises(ValueError):
        resize_image(np.zeros((100, 100, 3), np.uint8), 16)


def square_image() -> np.ndarray:
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[16:48, 16:48] = 255
    return img


def test_canny_matches_cv2_and_is_binary():
    img = square_image()
    edges = CannyDetector()(img, 100, 200)
    assert edges.shape == (64, 64) and edges.dtype == np.uint8
    assert set(np.unique(edges).tolist()) == {0, 255}
    np.testing.assert_array_equal(edges, cv2.Canny(img, 100, 200))
    assert edges[32, 16] == 255 or edges[32, 15] == 255  # left border of the square
    assert (edges[20:44, 20:44] == 0).all()  # flat interior
    assert (edges[:8] == 0).all()  # flat background


def test_canny_flat_image_has_no_edges():
    flat = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert (CannyDetector()(flat, 50, 100) == 0).all()


def test_canny_on_noise_is_binary():
    noise = np.random.default_rng(3).integers(0, 256, (48, 40), dtype=np.uint8)
    edges = CannyDetector()(noise, 100, 200)
    assert edges.shape == (48, 40)
    assert set(np.unique(edges).tolist()) <= {0, 255}
    assert edges.any()
