"""Equivalence with an independent implementation: diffusers' ControlNetModel, UNet2DConditionModel, AutoencoderKL.

The tiny config's random model (zero-initialised layers filled with random values, so every path matters) is
converted with diffusers' own single-file conversion utilities; the diffusers configs are built locally from the
project yaml with diffusers' ``create_*_diffusers_config_from_ldm`` helpers (no hub access). Both sides run in
float32 on the CPU (the project's modules cast inputs to float32, so float64 is not an option) and must agree
within 1e-4 max abs difference. diffusers is a test-only dependency: the module is skipped without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from cldm.control import Control
from cldm.model import create_model
from tests.diffusers_port import convert_to_diffusers
from tools.make_random_checkpoint import fill_zero_parameters

diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils", reason="diffusers has no single_file_utils")

CONFIG = Path(__file__).resolve().parents[1] / "models" / "cldm_tiny.yaml"
TOL = 1e-4
MIN_STD = 1e-3
BATCH = 2
LATENT = 16  # latent 16x16 <-> image 128x128
TIMESTEPS = (1, 500, 999)
UNET_PREFIX = "model.diffusion_model."
CONTROLNET_PREFIX = "control_model."
VAE_PREFIX = "first_stage_model."


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Max abs difference within TOL, and a non-trivial output (std above MIN_STD)."""
    diff = max_diff(ours, theirs)
    assert diff <= TOL, f"{what}: max abs diff {diff:.3g} > {TOL}"
    assert ours.std().item() > MIN_STD, f"{what}: trivial output (std {ours.std().item():.3g})"


def unused_weights(state_dict: dict[str, torch.Tensor], prefix: str, converted: dict[str, torch.Tensor]) -> list[str]:
    """Project keys under ``prefix`` whose tensor (storage) the conversion did not carry over."""
    used = {v.untyped_storage().data_ptr() for v in converted.values()}
    return [k for k, v in state_dict.items() if k.startswith(prefix) and v.untyped_storage().data_ptr() not in used]


@pytest.fixture(scope="module")
def original_config() -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(CONFIG), resolve=True)


@pytest.fixture(scope="module")
def ldm() -> torch.nn.Module:
    """The project's tiny ControlLDM with random weights and no all-zero layers, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(CONFIG)
    assert fill_zero_parameters(model, 0.05, torch.Generator().manual_seed(1)) > 0
    return model.eval()


@pytest.fixture(scope="module")
def state_dict(ldm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return ldm.state_dict()


@pytest.fixture(scope="module")
def converted(original_config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[Any, dict]]:
    """name -> (diffusers model, converted state dict), for "unet", "controlnet" and "vae"."""
    with torch.random.fork_rng():
        return convert_to_diffusers(original_config, state_dict)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    """Latents x [2, 4, 16, 16], hint [2, 3, 128, 128] in [0, 1], context [2, 77, 32], latents z to decode."""
    g = torch.Generator().manual_seed(2)
    return {
        "x": torch.randn(BATCH, 4, LATENT, LATENT, generator=g),
        "hint": torch.rand(BATCH, 3, 8 * LATENT, 8 * LATENT, generator=g),
        "context": torch.randn(BATCH, 77, 32, generator=g),
        "z": torch.randn(BATCH, 4, LATENT, LATENT, generator=g),
    }


def timesteps(t: int) -> torch.Tensor:
    """A batch with two different timesteps, ``t`` and ``999 - t``."""
    return torch.tensor([t, 999 - t], dtype=torch.long)


def diffusers_eps(converted: dict, inputs: dict, t: torch.Tensor, scale: float | None) -> torch.Tensor:
    """diffusers noise prediction: UNet fed by the ControlNet at ``scale``, or the bare UNet for ``scale=None``."""
    unet = converted["unet"][0]
    kwargs = {}
    if scale is not None:
        down, mid = converted["controlnet"][0](
            inputs["x"], t, encoder_hidden_states=inputs["context"], controlnet_cond=inputs["hint"],
            conditioning_scale=scale, return_dict=False,
        )  # fmt: skip
        kwargs = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    return unet(inputs["x"], t, encoder_hidden_states=inputs["context"], **kwargs).sample


def project_eps(ldm: torch.nn.Module, inputs: dict, t: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The project's ``apply_model`` with one control at ``scale`` on all 13 blocks (no control for None)."""
    controls = [] if scale is None else [Control(ldm.control_model, inputs["hint"], [scale] * 13)]
    return ldm.apply_model(inputs["x"], t, {"c_crossattn": [inputs["context"]]}, controls=controls)


@pytest.mark.parametrize(
    ("name", "prefix"), [("unet", UNET_PREFIX), ("controlnet", CONTROLNET_PREFIX), ("vae", VAE_PREFIX)]
)
def test_conversion_carries_every_weight(converted: dict, state_dict: dict, name: str, prefix: str) -> None:
    """Strict loading (in the fixture) covers the diffusers side; here no project weight may be left behind."""
    assert not unused_weights(state_dict, prefix, converted[name][1])


@pytest.mark.parametrize("t", TIMESTEPS)
@torch.no_grad()
def test_controlnet_residuals_match(ldm: torch.nn.Module, converted: dict, inputs: dict, t: int) -> None:
    ours = ldm.control_model(x=inputs["x"], hint=inputs["hint"], timesteps=timesteps(t), context=inputs["context"])
    down, mid = converted["controlnet"][0](
        inputs["x"], timesteps(t), encoder_hidden_states=inputs["context"], controlnet_cond=inputs["hint"],
        return_dict=False,
    )  # fmt: skip
    theirs = [*down, mid]
    assert len(ours) == len(theirs) == 13
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, f"control residual {i}")


@pytest.mark.parametrize("t", TIMESTEPS)
@torch.no_grad()
def test_unet_without_control_matches(ldm: torch.nn.Module, converted: dict, inputs: dict, t: int) -> None:
    assert_close(project_eps(ldm, inputs, timesteps(t), None), diffusers_eps(converted, inputs, timesteps(t), None),
                 "eps without control")  # fmt: skip


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("t", TIMESTEPS)
@torch.no_grad()
def test_controlled_noise_prediction_matches(
    ldm: torch.nn.Module, converted: dict, inputs: dict, t: int, scale: float
) -> None:
    ours = project_eps(ldm, inputs, timesteps(t), scale)
    assert_close(ours, diffusers_eps(converted, inputs, timesteps(t), scale), f"eps with control scale {scale}")
    effect = max_diff(ours, diffusers_eps(converted, inputs, timesteps(t), None))
    assert effect > MIN_STD, f"control does not change the noise prediction (max change {effect:.3g})"


@torch.no_grad()
def test_vae_decode_matches(ldm: torch.nn.Module, converted: dict, inputs: dict) -> None:
    vae = converted["vae"][0]
    assert vae.config.scaling_factor == pytest.approx(float(ldm.scale_factor))
    ours = ldm.decode_first_stage(inputs["z"])
    assert ours.shape == (BATCH, 3, 8 * LATENT, 8 * LATENT)
    assert_close(ours, vae.decode(inputs["z"] / vae.config.scaling_factor).sample, "VAE decode")
