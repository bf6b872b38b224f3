"""Inputs that used to give a black image with exit 0 (issue 20, items 2 and 7): half-precision noise schedules in
a checkpoint, non-finite weights, and a latent that becomes NaN during sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cpu_canny2image
import tool_add_control
from cldm.checkpoint import CheckpointError, ldm_to_sd, load_state_dict, save_checkpoint
from cldm.model import create_model, load_model
from cldm.pipeline import Canny2Image, CannyParams, read_image
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from ldm.models.diffusion.sampling import NonFiniteError, sample_ddim
from tests.conftest import REPO, TINY_CONFIG
from tools.convert_checkpoint import convert_checkpoint

IMAGE = REPO / "test_imgs" / "disc.png"
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def config_schedule() -> dict[str, torch.Tensor]:
    """The config's schedule buffers (float64 -> float32), from a freshly built model."""
    model = create_model(TINY_CONFIG)
    return {name: getattr(model, name).clone() for name in SCHEDULE_BUFFERS}


def all_half(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every floating tensor in ``dtype``, the schedule buffers included (as some SD files are stored)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def assert_config_schedule(tensors: torch.nn.Module | dict, config_schedule: dict[str, torch.Tensor]) -> None:
    """A model's buffers, or a state dict, hold exactly the config's float32 schedule."""
    found = dict(tensors.named_buffers()) if isinstance(tensors, torch.nn.Module) else tensors
    for name, value in config_schedule.items():
        assert found[name].dtype == torch.float32 and torch.equal(found[name], value), name
    assert found["alphas_cumprod"][0] < 1


def sample(model: torch.nn.Module) -> np.ndarray:
    params = CannyParams(prompt="a red circle", image_resolution=64, ddim_steps=4, seed=3)
    results, _ = Canny2Image(model, torch.device("cpu"))(read_image(IMAGE), params, progress=False)
    return results[1]


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_schedule_in_the_file_is_replaced_by_the_config_one(
    tiny_ckpt: Path, tmp_path: Path, config_schedule: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    path = tmp_path / "half.ckpt"
    save_checkpoint(all_half(load_state_dict(tiny_ckpt), dtype), path)
    if dtype == torch.bfloat16:
        assert load_state_dict(path)["alphas_cumprod"][0] == 1.0  # the file's schedule is broken

    loaded = load_model(TINY_CONFIG, path)  # the scripts' route
    assert_config_schedule(loaded, config_schedule)
    reference = create_model(TINY_CONFIG).eval()  # the reference API's route
    reference.load_state_dict(load_state_dict(path))
    assert_config_schedule(reference, config_schedule)
    a, b = sample(loaded), sample(reference)
    assert a.std() > 5 and np.array_equal(a, b)  # a real image, the same from both routes


@pytest.mark.parametrize("dtype", HALF)
def test_tool_add_control_writes_the_config_schedule_from_a_half_sd_file(
    capsys: pytest.CaptureFixture, tiny_ckpt: Path, tmp_path: Path, config_schedule: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> None:  # fmt: skip
    sd = tmp_path / "sd_half.ckpt"
    save_checkpoint(all_half(ldm_to_sd(load_state_dict(tiny_ckpt)), dtype), sd)
    assert_config_schedule(load_model(TINY_CONFIG, sd, base=True), config_schedule)
    control = tmp_path / "control_ini.ckpt"
    assert tool_add_control.main([str(sd), str(control), "--config", str(TINY_CONFIG)]) == 0
    assert_config_schedule(load_state_dict(control), config_schedule)

    out = tmp_path / "out"
    capsys.readouterr()
    code = cpu_canny2image.main(["--ckpt", str(control), "--config", str(TINY_CONFIG), "-i", str(IMAGE), "-o",
                                 str(out), "--image-resolution", "64", "--ddim-steps", "4", "--seed", "3"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    with Image.open(out / "disc_3_0.png") as img:
        assert np.asarray(img).std() > 5  # not black


@pytest.mark.parametrize("dtype", HALF)
def test_convert_checkpoint_writes_the_config_schedule(
    tmp_path: Path, tiny_ckpt: Path, config_schedule: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    half = tmp_path / "half.ckpt"
    save_checkpoint(all_half(load_state_dict(tiny_ckpt), dtype), half)
    written = convert_checkpoint(half, tmp_path / "out.safetensors", torch.bfloat16, TINY_CONFIG)
    reread = load_state_dict(tmp_path / "out.safetensors")
    assert_config_schedule(written, config_schedule)
    assert_config_schedule(reread, config_schedule)
    assert reread["model.diffusion_model.out.2.weight"].dtype == torch.bfloat16


def test_schedule_of_another_length_is_refused_by_convert_checkpoint(tmp_path: Path, tiny_ckpt: Path) -> None:
    state_dict = load_state_dict(tiny_ckpt)
    state_dict["betas"] = state_dict["betas"][:10]
    path = tmp_path / "short.ckpt"
    save_checkpoint(state_dict, path)
    with pytest.raises(CheckpointError, match=r"short\.ckpt: betas has shape \(10,\).*wrong --config"):
        convert_checkpoint(path, tmp_path / "out.ckpt", torch.bfloat16, TINY_CONFIG)


@pytest.fixture()
def nan_ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    state_dict = load_state_dict(tiny_ckpt)
    state_dict["control_model.input_blocks.1.0.in_layers.2.weight"].view(-1)[7] = float("nan")
    state_dict["model.diffusion_model.out.2.weight"].view(-1)[0] = float("inf")  # the first in the file's order
    path = tmp_path / "nan.ckpt"
    save_checkpoint(state_dict, path)
    return path


def test_non_finite_weight_names_the_file_and_first_key(nan_ckpt: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_model(TINY_CONFIG, nan_ckpt)
    assert str(err.value) == (f"{nan_ckpt}: non-finite weights (NaN or inf) in "
                              "model.diffusion_model.out.2.weight; the file is damaged")  # fmt: skip


def test_non_finite_weight_from_the_command_line(capsys: pytest.CaptureFixture, nan_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = cpu_canny2image.main(["--ckpt", str(nan_ckpt), "--config", str(TINY_CONFIG), "-o", str(out),
                                 "--image-resolution", "64", "--ddim-steps", "2"])  # fmt: skip
    stdout, err = capsys.readouterr()
    assert code == 1 and stdout == ""
    assert err.splitlines() == [f"error: {nan_ckpt}: non-finite weights (NaN or inf) in "
                                "model.diffusion_model.out.2.weight; the file is damaged"]  # fmt: skip
    assert not out.exists() or not any(out.iterdir())


def test_nan_from_the_denoiser_names_the_step() -> None:
    calls = []

    def denoise(x: torch.Tensor, t: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        calls.append(step)
        return torch.full_like(x, float("nan")) if step == 2 else torch.zeros_like(x)

    alphas_cumprod = create_model(TINY_CONFIG).alphas_cumprod
    with pytest.raises(NonFiniteError, match=r"^step 3 of 5: the latent has NaN/inf values") as err:
        sample_ddim(denoise, torch.randn(1, 4, 8, 8), alphas_cumprod, 5, progress=False)
    assert isinstance(err.value, ValueError) and calls == [0, 1, 2]  # stopped at once


@pytest.fixture()
def overflowing_ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """Finite weights (the load check passes) whose noise prediction overflows float32 to inf."""
    state_dict = load_state_dict(tiny_ckpt)
    state_dict["model.diffusion_model.out.2.weight"].fill_(3e38)
    path = tmp_path / "overflow.ckpt"
    save_checkpoint(state_dict, path)
    return path


def test_latent_overflow_from_the_command_line(
    capsys: pytest.CaptureFixture, overflowing_ckpt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code = cpu_canny2image.main(["--ckpt", str(overflowing_ckpt), "--config", str(TINY_CONFIG), "-o", str(out),
                                 "--image-resolution", "64", "--ddim-steps", "2"])  # fmt: skip
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 1
    assert lines == [f"error: {overflowing_ckpt}: step 1 of 2: the latent has NaN/inf values (non-finite weights or "
                     "an overflowing model); no image is written"]  # fmt: skip
    assert "Traceback" not in err and list(out.iterdir()) == []  # no edge map, no black sample


def test_latent_overflow_is_a_page_error(overflowing_ckpt: Path) -> None:
    import gradio as gr

    import gradio_canny2image
    from tests.test_gradio_page import RecordingProgress, page_args

    pipe = Canny2Image(load_model(TINY_CONFIG, overflowing_ckpt), torch.device("cpu"))
    process = gradio_canny2image.make_process(pipe)
    with pytest.raises(gr.Error) as err:
        process(*page_args(image_resolution=64, num_samples=1, ddim_steps=2), progress=RecordingProgress())
    assert err.value.message.startswith("step 1 of 2: the latent has NaN/inf values")
