"""Generate a fill50k-style training set (the ControlNet training tutorial's toy data) offline.

    python -m tools.make_fill50k --out training/fill50k --n 50000 --resolution 512 --seed 0

Layout, as in the reference's ``docs/train.md``::

    OUT/prompt.json      JSON Lines: {"source": "source/N.png", "target": "target/N.png", "prompt": "..."}
    OUT/source/N.png     condition: white circle outline (1-3 px) on black, RGB, resolution x resolution
    OUT/target/N.png     the same circle filled with a named color on a background of another named color

Prompts read "<circle color> circle with <background color> background". Sample ``N`` depends only on
``(seed, N)``, so a smaller set is a prefix of a larger one with the same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

MIN_RESOLUTION = 16
# Minimum Euclidean RGB distance between the circle and the background color.
MIN_COLOR_DISTANCE = 150.0
# X11 / CSS colors, names split into lowercase words as in the reference prompts. Values are unique.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
    "brown": (165, 42, 42),
    "pink": (255, 192, 203),
    "navy": (0, 0, 128),
    "maroon": (128, 0, 0),
    "olive": (128, 128, 0),
    "teal": (0, 128, 128),
    "lime": (0, 255, 0),
    "gold": (255, 215, 0),
    "indigo": (75, 0, 130),
    "violet": (238, 130, 238),
    "salmon": (250, 128, 114),
    "khaki": (240, 230, 140),
    "crimson": (220, 20, 60),
    "coral": (255, 127, 80),
    "tomato": (255, 99, 71),
    "orchid": (218, 112, 214),
    "tan": (210, 180, 140),
    "chocolate": (210, 105, 30),
    "sienna": (160, 82, 45),
    "peru": (205, 133, 63),
    "turquoise": (64, 224, 208),
    "lavender": (230, 230, 250),
    "pale golden rod": (238, 232, 170),
    "old lace": (253, 245, 230),
    "sky blue": (135, 206, 235),
    "steel blue": (70, 130, 180),
    "royal blue": (65, 105, 225),
    "midnight blue": (25, 25, 112),
    "forest green": (34, 139, 34),
    "sea green": (46, 139, 87),
    "light green": (144, 238, 144),
    "olive drab": (107, 142, 35),
    "dark orange": (255, 140, 0),
    "deep pink": (255, 20, 147),
    "fire brick": (178, 34, 34),
    "dark khaki": (189, 183, 107),
    "slate gray": (112, 128, 144),
    "dark slate gray": (47, 79, 79),
    "medium purple": (147, 112, 219),
    "lemon chiffon": (255, 250, 205),
    "misty rose": (255, 228, 225),
}


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that draws sample ``index`` of the set made with ``seed``."""
    return np.random.default_rng([seed, index])


def pick_colors(rng: np.random.Generator, names: Sequence[str] | None = None) -> tuple[str, str]:
    """Draw (circle, background) color names from ``names`` (default: all of ``COLORS``), at least
    ``MIN_COLOR_DISTANCE`` apart in RGB."""
    names = list(names or COLORS)
    unknown = [n for n in names if n not in COLORS]
    if unknown:
        raise ValueError(f"unknown color name(s): {', '.join(unknown)}")
    circle = names[int(rng.integers(len(names)))]
    circle_rgb = np.array(COLORS[circle], dtype=np.float64)
    candidates = [n for n in names if np.linalg.norm(np.array(COLORS[n]) - circle_rgb) >= MIN_COLOR_DISTANCE]
    if not candidates:
        raise ValueError(f"no color in {names} is far enough from '{circle}' to serve as its background")
    background = candidates[int(rng.integers(len(candidates)))]
    return circle, background


def pick_geometry(
    rng: np.random.Generator, resolution: int, radius_range: tuple[float, float] | None = None
) -> tuple[tuple[int, int], int, int]:
    """Draw ((cx, cy), radius, outline thickness); the outlined circle lies fully inside the image.

    ``radius_range``: (min, max) radius as fractions of ``resolution`` (default: 1/10 to 1/3).
    """
    thickness = int(rng.integers(1, min(3, max(1, resolution // 128)) + 1))
    if radius_range is None:
        r_min, r_max = max(2, -(-resolution // 10)), resolution // 3
    else:
        r_min, r_max = max(2, round(radius_range[0] * resolution)), round(radius_range[1] * resolution)
        if not 2 <= r_min <= r_max < resolution // 2 - thickness:
            raise ValueError(f"radius range {radius_range} does not fit a {resolution} px image")
    radius = int(rng.integers(r_min, r_max + 1))
    low, high = radius + thickness, resolution - radius - thickness  # centre in [low, high)
    cx, cy = (int(v) for v in rng.integers(low, high, size=2))
    return (cx, cy), radius, thickness


def circle_window(resolution: int, center: tuple[int, int], extent: int) -> tuple[slice, slice, np.ndarray]:
    """(rows, cols, dist): the image window within ``extent`` px of ``center`` = (cx, cy), clipped to the image,
    and the (h, w) float64 distance of each of its pixel centres (integer x, y) from ``center``."""
    cx, cy = center
    rows = slice(max(0, cy - extent), min(resolution, cy + extent + 1))
    cols = slice(max(0, cx - extent), min(resolution, cx + extent + 1))
    ys, xs = np.mgrid[rows, cols]
    return rows, cols, np.hypot(xs - cx, ys - cy)


def draw_outline(resolution: int, center: tuple[int, int], radius: int, thickness: int) -> np.ndarray:
    """(R, R, 3) uint8: white where ``|dist - radius| <= thickness / 2``, black elsewhere."""
    img = np.zeros((resolution, resolution, 3), dtype=np.uint8)
    rows, cols, dist = circle_window(resolution, center, radius + thickness)
    img[rows, cols][np.abs(dist - radius) <= thickness / 2] = 255
    return img


def draw_filled(resolution: int, center: tuple[int, int], radius: int, circle_rgb: tuple[int, int, int],
                background_rgb: tuple[int, int, int]) -> np.ndarray:
    """(R, R, 3) uint8 RGB: ``circle_rgb`` where ``dist <= radius``, ``background_rgb`` elsewhere."""
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[...] = background_rgb
    rows, cols, dist = circle_window(resolution, center, radius)
    img[rows, cols][dist <= radius] = circle_rgb
    return img


def make_sample(
    rng: np.random.Generator,
    resolution: int,
    colors: Sequence[str] | None = None,
    radius_range: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """Draw one sample: (source, target, prompt, meta); ``colors`` and ``radius_range`` restrict the draw
    (see :func:`pick_colors`, :func:`pick_geometry`).

    source: (R, R, 3) uint8 RGB outline; target: (R, R, 3) uint8 RGB filled circle; meta: ``center`` (cx, cy)
    in pixels, ``radius``, ``thickness``, ``resolution``, ``circle_color`` / ``background_color`` names and
    ``circle_rgb`` / ``background_rgb`` tuples. A pixel (x, y) is inside iff hypot(x - cx, y - cy) <= radius.
    """
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be >= {MIN_RESOLUTION}, got {resolution}")
    center, radius, thickness = pick_geometry(rng, resolution, radius_range)
    circle, background = pick_colors(rng, colors)
    source = draw_outline(resolution, center, radius, thickness)
    target = draw_filled(resolution, center, radius, COLORS[circle], COLORS[background])
    prompt = f"{circle} circle with {background} background"
    meta = {
        "center": center,
        "radius": radius,
        "thickness": thickness,
        "resolution": resolution,
        "circle_color": circle,
        "circle_rgb": COLORS[circle],
        "background_color": background,
        "background_rgb": COLORS[background],
    }
    return source, target, prompt, meta


def write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB array as PNG."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    path.write_bytes(buf.tobytes())


def make_fill50k(
    out_dir: Path,
    n: int,
    resolution: int = 512,
    seed: int = 0,
    *,
    colors: Sequence[str] | None = None,
    radius_range: tuple[float, float] | None = None,
    progress: bool = False,
) -> Path:
    """Write ``n`` samples to ``out_dir`` (source/, target/, then prompt.json last); return prompt.json's path.

    ``colors``/``radius_range`` restrict the draw as in :func:`make_sample`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be >= {MIN_RESOLUTION}, got {resolution}")
    out_dir = Path(out_dir)
    (out_dir / "source").mkdir(parents=True, exist_ok=True)
    (out_dir / "target").mkdir(parents=True, exist_ok=True)
    indices: Any = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="fill50k", unit="img")
    lines = []
    for i in indices:
        source, target, prompt, _ = make_sample(sample_rng(seed, i), resolution, colors, radius_range)
        write_rgb_png(out_dir / "source" / f"{i}.png", source)
        write_rgb_png(out_dir / "target" / f"{i}.png", target)
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": prompt}))
    prompt_path = out_dir / "prompt.json"
    tmp = prompt_path.with_name(prompt_path.name + ".partial")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, prompt_path)
    return prompt_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="training/fill50k", help="output folder")
    parser.add_argument("--n", type=int, default=50000, help="number of samples")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (>= 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    try:
        path = make_fill50k(Path(args.out), args.n, args.resolution, args.seed, progress=True)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.n} samples ({args.resolution}x{args.resolution}, seed {args.seed}) to {path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
