"""Create the images in ``test_imgs/``.

Always writes ``circle.png``: a seeded, fill50k-style condition image (white circle outline
on black, 512 x 512), and ``disc.png``: the tiny demo's input, an orange disc on a dark gray
background (512 x 512) whose Canny edge map at 64 px is one clean circle outline, and ``disc_mask.png``:
its inpainting mask (the disc white on black, docs/img2img.md). With
``--skimage-wheel`` it also extracts public-domain / CC0 photos from a scikit-image wheel
(``pip download --no-deps scikit-image``), strips their metadata and stores them as RGB PNG with
the short side at most 512 px:

    python -m tools.make_test_imgs --skimage-wheel /tmp/dl/scikit_image-0.26.0-*.whl
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT_DIR = Path(__file__).resolve().parents[1] / "test_imgs"
CIRCLE_SIZE = 512
CIRCLE_SEED = 50_000
MAX_SHORT_SIDE = 512
# skimage data file -> output name; all public domain or CC0 per skimage.data docstrings.
SKIMAGE_PHOTOS = {
    "skimage/data/chelsea.png": "chelsea.png",
    "skimage/data/coffee.png": "coffee.png",
    "skimage/data/astronaut.png": "astronaut.png",
}


def make_circle(size: int = CIRCLE_SIZE, seed: int = CIRCLE_SEED) -> Image.Image:
    """Draw a white circle outline of seeded centre, radius and width on black."""
    rng = np.random.default_rng(seed)
    radius = int(rng.integers(size // 8, size // 3))
    cx, cy = (int(v) for v in rng.integers(radius + 8, size - radius - 8, size=2))
    width = int(rng.integers(2, 5))
    img = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(img).ellipse(
        (cx - radius, cy - radius, cx + radius, cy + radius), outline=(255, 255, 255), width=width
    )
    return img


def make_disc(
    size: int = CIRCLE_SIZE, disc: tuple[int, int, int] = (255, 140, 0), background: tuple[int, int, int] = (40, 40, 40)
) -> Image.Image:
    """A disc (centre (296, 216), radius 136 at 512 px; orange) on a background (dark gray), scaled to ``size``."""
    scale = size / 512
    cx, cy, radius = 296 * scale, 216 * scale, 136 * scale
    img = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(img).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=disc)
    return img


def limit_short_side(img: Image.Image, max_short: int = MAX_SHORT_SIDE) -> Image.Image:
    """Downscale (Lanczos) so the short side is at most ``max_short``."""
    short = min(img.size)
    if short <= max_short:
        return img
    scale = max_short / short
    size = (round(img.width * scale), round(img.height * scale))
    return img.resize(size, Image.Resampling.LANCZOS)


def save_png(img: Image.Image, path: Path) -> None:
    """Save as optimised PNG with no metadata (pixels only)."""
    clean = Image.fromarray(np.asarray(img.convert("RGB")))
    clean.save(path, format="PNG", optimize=True)
    print(f"wrote {path} {clean.size[0]}x{clean.size[1]}")


def extract_photos(wheel: Path, out_dir: Path) -> None:
    """Copy the selected scikit-image sample photos out of the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        for member, name in SKIMAGE_PHOTOS.items():
            with Image.open(io.BytesIO(zf.read(member))) as img:
                save_png(limit_short_side(img), out_dir / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skimage-wheel", type=Path, help="scikit-image wheel to take photos from")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    save_png(make_circle(), args.out / "circle.png")
    save_png(make_disc(), args.out / "disc.png")
    save_png(make_disc(disc=(255, 255, 255), background=(0, 0, 0)), args.out / "disc_mask.png")
    if args.skimage_wheel is not None:
        extract_photos(args.skimage_wheel, args.out)


if __name__ == "__main__":
    main()
