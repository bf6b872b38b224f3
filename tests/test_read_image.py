"""``read_image``: every PIL mode maps to the 8-bit image ``HWC3`` expects (by scaling), EXIF orientation,
first frame of animations, and one-line errors (decompression bombs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from annotator.canny import CannyDetector
from annotator.util import HWC3
from cldm.pipeline import image_array, read_image, to_uint8

H, W = 96, 160


def disc(fg: float, bg: float, dtype: type = np.uint8, height: int = H, width: int = W) -> np.ndarray:
    """``height x width`` array: a disc of value ``fg`` (radius 30, centred) on ``bg``."""
    yy, xx = np.mgrid[:height, :width]
    inside = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 <= 30**2
    return np.where(inside, fg, bg).astype(dtype)


def edge_count(image: np.ndarray) -> int:
    return int((CannyDetector()(HWC3(image), 100, 200) > 0).sum())


def rgb(fg: int, bg: int) -> Image.Image:
    return Image.fromarray(np.repeat(disc(fg, bg)[:, :, None], 3, axis=2))


def with_alpha(mode: str) -> Image.Image:
    """A disc of 20, opaque, on a transparent background of 90 (on white: 20 on 255)."""
    alpha = Image.fromarray(disc(255, 0))
    gray = Image.fromarray(disc(20, 90))
    if mode == "LA":
        return Image.merge("LA", (gray, alpha))
    return Image.merge("RGBA", (gray, gray, gray, alpha))


def palette_with_transparency() -> Image.Image:
    img = rgb(20, 90).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    bg_index = img.getpixel((0, 0))
    img.info["transparency"] = bg_index
    return img


def frombytes(mode: str, values: np.ndarray) -> Image.Image:
    return Image.frombytes(mode, (W, H), values.tobytes())


# mode name -> (image maker, the gray levels (disc, background) of the 8-bit RGB original it stands for)
CASES: dict[str, tuple[Callable[[], Image.Image], tuple[int, int]]] = {
    "RGB": (lambda: rgb(230, 20), (230, 20)),
    "L": (lambda: Image.fromarray(disc(230, 20)), (230, 20)),
    "1": (lambda: Image.fromarray(disc(1, 0, bool)), (255, 0)),
    "LA": (lambda: with_alpha("LA"), (20, 255)),
    "P": (lambda: rgb(230, 20).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), (230, 20)),
    "P+transparency": (palette_with_transparency, (20, 255)),
    "RGBA": (lambda: with_alpha("RGBA"), (20, 255)),
    "CMYK": (lambda: rgb(230, 20).convert("CMYK"), (230, 20)),
    "YCbCr": (lambda: rgb(230, 20).convert("YCbCr"), (230, 20)),
    "I (8-bit values)": (lambda: Image.fromarray(disc(230, 20, np.int32)), (230, 20)),
    "I (16-bit values)": (lambda: Image.fromarray(disc(230 * 257, 20 * 257, np.int32)), (230, 20)),
    "I (signed values)": (lambda: Image.fromarray(disc(1000, -3000, np.int32)), (255, 0)),
    "I;16": (lambda: Image.fromarray(disc(230 * 257, 20 * 257, np.uint16)), (230, 20)),
    "I;16B": (lambda: frombytes("I;16B", disc(230 * 257, 20 * 257, ">u2")), (230, 20)),
    "F (0..1)": (lambda: Image.fromarray(disc(230 / 255, 20 / 255, np.float32)), (230, 20)),
    "F (0..255)": (lambda: Image.fromarray(disc(230.0, 20.0, np.float32)), (230, 20)),
    "F (0..65535)": (lambda: Image.fromarray(disc(230.0 * 257, 20.0 * 257, np.float32)), (230, 20)),
}
# a format that keeps the mode on disk (Pillow reads YCbCr JPEGs back as RGB: the mode is covered in memory)
FORMATS = {"CMYK": "TIFF", "YCbCr": "JPEG", "I;16B": "TIFF"}


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_gives_the_edges_of_its_8bit_original(name: str, tmp_path: Path) -> None:
    make, (fg, bg) = CASES[name]
    img = make()
    expected = edge_count(np.array(rgb(fg, bg)))
    assert expected > 100
    in_memory = image_array(img)
    assert in_memory.dtype == np.uint8 and in_memory.shape[:2] == (H, W)
    fmt = FORMATS.get(name, "TIFF" if img.mode in ("I", "F") else "PNG")
    path = tmp_path / f"image.{fmt.lower()}"
    img.save(path, format=fmt)
    from_file = read_image(path)
    for pixels in (in_memory, from_file):
        assert abs(edge_count(pixels) - expected) <= 0.03 * expected, name
        # scaled, not clipped: the disc and the background keep their 8-bit levels after HWC3
        flat = HWC3(pixels)
        assert abs(int(flat[H // 2, W // 2, 0]) - fg) <= 2 and abs(int(flat[0, 0, 0]) - bg) <= 2, name


def test_16bit_rgb_png_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), np.repeat(disc(230 * 257, 20 * 257, np.uint16)[:, :, None], 3, axis=2))
    pixels = read_image(path)
    assert pixels.dtype == np.uint8
    assert tuple(pixels[H // 2, W // 2]) == (230, 230, 230) and tuple(pixels[0, 0]) == (20, 20, 20)
    assert edge_count(pixels) == edge_count(np.array(rgb(230, 20)))


def test_to_uint8_ranges() -> None:
    assert to_uint8(np.array([0, 65535, 257 * 100]), (65535.0,)).tolist() == [0, 255, 100]
    assert to_uint8(np.array([0.0, 0.5, 1.0]), (1.0, 255.0)).tolist() == [0, 128, 255]
    assert to_uint8(np.array([0, 2, 255]), (255.0, 65535.0)).tolist() == [0, 2, 255]
    assert to_uint8(np.array([-10.0, 0.0, 10.0, np.nan]), (1.0, 255.0)).tolist() == [0, 128, 255, 128]


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    # an upright 96 wide x 160 tall picture, stored rotated (160 x 96) with Orientation=6, as a phone does
    upright = np.repeat(disc(230, 20, height=160, width=96)[:, :, None], 3, axis=2)
    upright[10:30, 20:70] = 230  # a bar near the top: tells up from down
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 6 means: rotate 270 to view
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    stored.save(path, format="JPEG", quality=95, exif=exif)
    pixels = read_image(path)
    assert pixels.shape == (160, 96, 3)
    assert CannyDetector()(HWC3(pixels), 100, 200).shape == (160, 96)
    assert np.abs(pixels.astype(int) - upright).mean() < 3


def test_animated_file_uses_the_first_frame_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frames = [rgb(230, 20), rgb(20, 230), rgb(120, 20)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    pixels = read_image(path)
    assert int(pixels[H // 2, W // 2, 0]) == 230 and int(pixels[0, 0, 0]) == 20
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "3 frames" in err
    told: list[str] = []
    read_image(path, notify=told.append)
    assert len(told) == 1 and capsys.readouterr().err == ""


def test_single_frame_says_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "still.gif"
    rgb(230, 20).save(path)
    read_image(path)
    assert capsys.readouterr().err == ""


def test_lab_is_converted_as_colour(tmp_path: Path) -> None:
    path = tmp_path / "lab.tif"
    Image.new("LAB", (8, 8), (128, 128, 128)).save(path)  # L* = 50, a* = b* = 0: a neutral mid gray
    pixels = read_image(path)
    assert pixels.shape == (8, 8, 3) and np.abs(pixels.astype(int) - 119).max() <= 2


def test_unsupported_mode_names_the_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode La is not supported"):
        image_array(Image.new("La", (8, 8)))
    path = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=r"missing\.png: input image not found"):
        read_image(path)


def bomb_png(path: Path, width: int, height: int) -> None:
    """A tiny PNG (a few hundred bytes) whose header declares ``width x height`` pixels."""
    Image.new("1", (width, height)).save(path, optimize=True)


@pytest.mark.parametrize("factor", [1.5, 3.0], ids=["warning", "error"])
def test_decompression_bomb_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, factor: float
) -> None:
    import cpu_canny2image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # over it: Pillow warns; over twice: it refuses
    path = tmp_path / "bomb.png"
    bomb_png(path, 100, int(100 * factor))
    with pytest.raises(ValueError, match=r"bomb\.png: image too large"):
        read_image(path)
    code = cpu_canny2image.main(["--demo", "-i", str(path), "-o", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "bomb.png" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# Ctrl-C in cpu_canny2image.py: one line, exit 130, no image files (issue 20, item 8)


def interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


def test_ctrl_c_during_sampling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import cpu_canny2image
    from ldm.models.diffusion import sampling

    monkeypatch.setitem(sampling.SAMPLERS, "ddim", interrupt)
    out_dir = tmp_path / "out"
    code = cpu_canny2image.main(["--demo", "-o", str(out_dir), "--ddim-steps", "2"])
    out, err = capsys.readouterr()
    assert code == 130 and out == ""
    assert err.splitlines()[-1] == "interrupted: no images written" and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_ctrl_c_while_starting_up_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C while torch is still being imported (inside build_parser) is the same one line, exit 130."""
    import cpu_canny2image

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cpu_canny2image, "build_parser", interrupted)
    assert cpu_canny2image.main(["--demo"]) == 130
    assert capsys.readouterr().err == "interrupted: no images written\n"


def test_ctrl_c_while_writing_leaves_no_partial_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import cpu_canny2image

    real_save = cpu_canny2image.save_png
    calls: list[Path] = []

    def save_then_interrupt(array: np.ndarray, path: Path) -> None:
        calls.append(path)
        if len(calls) == 3:
            interrupt()
        real_save(array, path)

    monkeypatch.setattr(cpu_canny2image, "save_png", save_then_interrupt)
    out_dir = tmp_path / "out"
    code = cpu_canny2image.main(["--demo", "-o", str(out_dir), "--ddim-steps", "2", "-n", "2"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert len(calls) == 3  # the edge map and the first sample were written, then removed
    assert list(out_dir.iterdir()) == []
