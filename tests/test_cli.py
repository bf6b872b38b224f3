"""``cpu_canny2image.py``: outputs, flags, and one-line errors for user mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cpu_canny2image
from cldm.pipeline import CannyParams
from share import DEFAULT_CKPT, DEMO_COLORS
from tests.conftest import REPO, TINY_CONFIG, with_flags
from tools.make_fill50k import COLORS
from tools.measure_control import nearest_color, segment


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cpu_canny2image.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def tiny_args(ckpt: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "-o", str(out_dir), "--image-resolution", "64",
            "--ddim-steps", "2", "--seed", "5", *extra]  # fmt: skip


@pytest.mark.slow
def test_writes_edges_and_samples(capsys: pytest.CaptureFixture, tiny_ckpt: Path, tmp_path: Path) -> None:
    # 451 x 300: the short side goes to 64, the long one to 96.2, rounded to a multiple of 64 as the reference
    image = REPO / "test_imgs" / "chelsea.png"
    code, out, err = run_cli(capsys, *tiny_args(tiny_ckpt, tmp_path, "-i", str(image), "-n", "2"))
    assert code == 0, err
    paths = [Path(p) for p in out.split()]
    assert [p.name for p in paths] == ["chelsea_edges.png", "chelsea_5_0.png", "chelsea_5_1.png"]
    for path in paths:
        with Image.open(path) as img:
            assert img.size == (128, 64)
            assert img.mode == "RGB"
    assert "seed 5: 2 sample(s) at 128x64" in err
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)


@pytest.mark.slow
def test_same_seed_same_pngs(capsys: pytest.CaptureFixture, tiny_ckpt: Path, tmp_path: Path) -> None:
    run_cli(capsys, *tiny_args(tiny_ckpt, tmp_path / "a"))
    run_cli(capsys, *tiny_args(tiny_ckpt, tmp_path / "b"))
    a = np.array(Image.open(tmp_path / "a" / "astronaut_5_0.png"))
    b = np.array(Image.open(tmp_path / "b" / "astronaut_5_0.png"))
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--ckpt", "models/nope.pth"], "models/nope.pth: checkpoint file not found"),
        (["-i", "does/not/exist.png"], "does/not/exist.png: input image not found"),
        (["--strength", "3"], "strength (--strength) must be between 0.0 and 2.0, got 3.0"),
        (["--num-samples", "0"], "num_samples (--num-samples) must be between 1 and 12"),
        (["--low-threshold", "250", "--high-threshold", "100"], "low_threshold (250) must not exceed high_threshold"),
        (["--threads", "0"], "--threads must be between 1 and"),
    ],
)
def test_user_mistakes_are_one_line(
    capsys: pytest.CaptureFixture, tiny_ckpt: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    out_dir = tmp_path / "out"
    args = with_flags(tiny_args(tiny_ckpt, out_dir), extra)
    code, out, err = run_cli(capsys, *args)
    assert code == 1
    assert err.strip().splitlines() == [f"error: {err.strip().removeprefix('error: ')}"]
    assert message in err
    assert out == ""
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_unreadable_image(capsys: pytest.CaptureFixture, tiny_ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    code, _, err = run_cli(capsys, *tiny_args(tiny_ckpt, tmp_path / "out", "-i", str(bad)))
    assert code == 1 and f"error: {bad}: cannot read image" in err


def test_corrupt_checkpoint_from_the_command_line(tmp_path: Path) -> None:
    """A real process: exit code 1, one line on stderr, no traceback."""
    ckpt = tmp_path / "corrupt.pth"
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    proc = subprocess.run(
        [sys.executable, str(REPO / "cpu_canny2image.py"), "--ckpt", str(ckpt), "--config", str(TINY_CONFIG),
         "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert f"error: {ckpt}: not a readable checkpoint" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(DEFAULT_CKPT.is_file(), reason="the real checkpoint is present")
def test_missing_real_checkpoint_falls_back_to_the_trained_demo(tmp_path: Path) -> None:
    """No flags, no real checkpoint: the tiny trained demo runs on test_imgs/disc.png with its own prompt at
    64 px, and says what it did."""
    proc = subprocess.run([sys.executable, str(REPO / "cpu_canny2image.py"), "--seed", "1", "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "control_sd15_canny.pth not found" in proc.stderr
    assert "huggingface.co/lllyasviel/ControlNet" in proc.stderr and "--demo" in proc.stderr
    assert "demo: " in proc.stderr and "disc.png -> prompt 'red circle with blue background' at 64 px" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disc_1_0.png", "disc_edges.png"]
    with Image.open(tmp_path / "disc_1_0.png") as sample, Image.open(tmp_path / "disc_edges.png") as edges:
        assert sample.size == edges.size == (64, 64)
        assert (np.array(edges) < 128).sum() > 50  # the disc's outline was found (black edges on white)
        image, outline = np.array(sample.convert("RGB")), np.argwhere(np.array(edges.convert("L")) < 128)
    # the demo draws the prompt's colors where the outline is: the disc filling the edges, in red on blue
    center = outline.mean(axis=0)
    radius = np.linalg.norm(outline - center, axis=1).mean()
    disc = np.linalg.norm(np.indices((64, 64)).transpose(1, 2, 0) - center, axis=-1) <= radius
    red = segment(image, COLORS["red"], COLORS["blue"])
    assert (red & disc).sum() / (red | disc).sum() > 0.6
    assert nearest_color(image[disc].mean(axis=0), DEMO_COLORS) == "red"
    assert nearest_color(image[~disc].mean(axis=0), DEMO_COLORS) == "blue"


def test_added_prompt_joins_as_the_reference_and_is_left_out_when_empty() -> None:
    assert CannyParams(prompt="a cat", a_prompt="best quality").full_prompt() == "a cat, best quality"
    assert CannyParams(prompt="red circle with blue background", a_prompt="").full_prompt() == (
        "red circle with blue background"
    )


def test_demo_sampling_defaults_and_flags() -> None:
    """The demo's guidance and hint placement by default; the flags override them; SD1.5 keeps the reference's."""
    parse = cpu_canny2image.build_parser().parse_args
    demo, _ = cpu_canny2image.settings(parse([]), demo=True)
    assert (demo.scale, demo.uncond_hint) == (3.0, False)
    given, _ = cpu_canny2image.settings(parse(["--scale", "7", "--uncond-hint"]), demo=True)
    assert (given.scale, given.uncond_hint) == (7.0, True)
    sd, _ = cpu_canny2image.settings(parse([]), demo=False)
    assert (sd.scale, sd.uncond_hint) == (9.0, True)
