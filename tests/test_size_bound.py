"""The output size bound (issue 20 item 9): edge map and samples hold at most ``MAX_OUTPUT_PIXELS`` (2048 x 2048),
whatever the input's size and aspect ratio; beyond it one error naming the image and ``--image-resolution``,
raised before the model is loaded (CLI) or before anything is encoded (Python API)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cpu_canny2image
from annotator.util import resize_image, resized_shape
from cldm.pipeline import MAX_OUTPUT_PIXELS, Canny2Image, CannyParams, ParamError, image_size, read_image
from tests.test_read_image import bomb_png

assert MAX_OUTPUT_PIXELS == 2048 * 2048


@pytest.mark.parametrize(
    "height,width,resolution,expected",
    [
        (512, 512, 2048, (2048, 2048)),  # the largest square: exactly at the bound
        (100, 1600, 512, (512, 8192)),  # 16:1 at 512: exactly at the bound
        (8192, 512, 512, (8192, 512)),  # the same, portrait
        (1, 1024, 64, (64, 65536)),  # the longest side there is: 65536 = MAX_OUTPUT_PIXELS / 64
        (300, 400, 1728, (1728, 2304)),  # 4:3 at the largest multiple of 64 that fits
        (3, 4, 64, (64, 64)),  # a tiny input is enlarged
        (96, 160, 64, (64, 128)),
    ],
)
def test_outputs_within_the_bound(height: int, width: int, resolution: int, expected: tuple[int, int]) -> None:
    params = CannyParams(image_resolution=resolution)
    assert params.output_size(height, width) == expected
    assert expected[0] * expected[1] <= MAX_OUTPUT_PIXELS
    params.validate((height, width))  # no error


@pytest.mark.parametrize(
    "height,width,resolution,output,advice",
    [
        (512, 528, 2048, "2112x2048", "use --image-resolution 1984 or less"),  # just over: one column of 64 more
        (300, 400, 2048, "2752x2048", "use --image-resolution 1728 or less"),  # a 4:3 photo at the largest setting
        (100, 1700, 512, "8704x512", "use --image-resolution 448 or less"),  # 17:1 at the default
        (1700, 100, 512, "512x8704", "use --image-resolution 448 or less"),  # the same, portrait
        (1, 1025, 64, "65600x64", "crop the image: even --image-resolution 64 is over the bound"),
        (4, 3000, 512, "384000x512", "use --image-resolution 64 or less"),  # would be 196 M pixels
        (1, 10**7, 64, "640000000x64", "crop the image"),  # no allocation: only arithmetic
    ],
)
def test_outputs_over_the_bound_are_refused(height: int, width: int, resolution: int, output: str, advice: str) -> None:
    params = CannyParams(image_resolution=resolution)
    with pytest.raises(ValueError) as caught:
        params.output_size(height, width, image_name="wide.png")
    message = str(caught.value)
    assert message.startswith(f"wide.png: {width}x{height} at image_resolution (--image-resolution) "
                              f"{resolution} gives {output} = ")  # fmt: skip
    assert "over the limit of 4194304 (2048x2048)" in message and advice in message
    assert not isinstance(caught.value, ParamError)  # the image's fault, not a parameter's alone
    if advice.startswith("use"):  # the suggestion fits, and the next multiple of 64 does not
        best = int(advice.split()[2])
        assert np.prod(resized_shape(height, width, best)) <= MAX_OUTPUT_PIXELS
        assert np.prod(resized_shape(height, width, best + 64)) > MAX_OUTPUT_PIXELS


def test_the_bound_is_resize_images_size() -> None:
    """``output_size`` is the size ``resize_image`` (the reference's) really gives."""
    for height, width, resolution in [(96, 160, 64), (300, 400, 1000), (37, 501, 130), (1, 1024, 64)]:
        image = np.zeros((height, width, 3), np.uint8)
        out = resize_image(image, resolution)
        assert out.shape[:2] == CannyParams(image_resolution=resolution).output_size(height, width)


def test_empty_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^the input image: empty image \(0 x 5\)$"):
        CannyParams(image_resolution=64).validate((0, 5))


@pytest.mark.parametrize("resolution", [63, 2049])
def test_resolution_range_is_a_param_error(resolution: int) -> None:
    with pytest.raises(ParamError) as caught:
        CannyParams(image_resolution=resolution).validate((64, 64))
    assert caught.value.name == "image_resolution"


def test_python_api_refuses_before_encoding(tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = Canny2Image(tiny_model, torch.device("cpu"))

    def encode(*args: object) -> None:
        raise AssertionError("the prompt was encoded: work started on an oversized request")

    monkeypatch.setattr(tiny_model, "get_learned_conditioning", encode)
    wide = np.zeros((4, 3000, 3), np.uint8)  # at 512: a 384000 x 512 output
    params = CannyParams(image_resolution=512, ddim_steps=1, seed=1)
    with pytest.raises(ValueError, match=r"the input image: 3000x4 at .* over the limit"):
        pipe(wide, params, progress=False)
    with pytest.raises(ValueError, match="over the limit"):
        pipe.edges(wide, params)


def test_cli_refuses_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for an oversized request")

    monkeypatch.setattr(Canny2Image, "from_checkpoint", load)
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((4, 3000), np.uint8)).save(wide)
    out_dir = tmp_path / "out"
    code = cpu_canny2image.main(["--demo", "--input", str(wide), "--image-resolution", "512", "-o", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {wide}: 3000x4 at image_resolution (--image-resolution) 512 gives 384000x512 = "
                      "196608000 pixels, over the limit of 4194304 (2048x2048); use --image-resolution 64 or less, "
                      "or crop the image"]  # fmt: skip
    assert "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_cli_long_narrow_image_within_the_bound_goes_on_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A 4 x 1000 input at 64 px gives 64 x 16000 (1 M pixels), within the bound: the CLI loads the model."""

    def load(*args: object, **kwargs: object) -> None:
        raise ValueError("load reached")

    monkeypatch.setattr(Canny2Image, "from_checkpoint", load)
    narrow = tmp_path / "narrow.png"
    Image.fromarray(np.full((4, 1000), 200, np.uint8)).save(narrow)
    code = cpu_canny2image.main(["--demo", "--input", str(narrow), "-o", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert code == 1 and err.splitlines()[-1] == "error: load reached"


@pytest.mark.parametrize("orientation,expected", [(1, (96, 160)), (6, (160, 96)), (8, (160, 96)), (3, (96, 160))])
def test_image_size_reads_the_header_with_orientation(tmp_path: Path, orientation: int, expected: tuple) -> None:
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.zeros((96, 160, 3), np.uint8)).save(path, exif=exif)
    assert image_size(path) == expected == read_image(path).shape[:2]


def test_image_size_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing\.png: input image not found"):
        image_size(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.png: cannot read image"):
        image_size(bad)


@pytest.mark.parametrize("factor", [1.5, 3.0], ids=["warning", "error"])
def test_image_size_refuses_a_decompression_bomb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factor: float
) -> None:
    """The input's own bound, Pillow's ``MAX_IMAGE_PIXELS``, holds for the header read too."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    path = tmp_path / "bomb.png"
    bomb_png(path, 100, int(100 * factor))
    with pytest.raises(ValueError, match=r"bomb\.png: image too large to decode safely"):
        image_size(path)
