"""Properties of the method (paper + reference behaviour), on the tiny config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cldm.control import control_scales_for
from cldm.pipeline import Canny2Image, CannyParams
from tests.conftest import REPO

IMAGE = np.array(__import__("PIL.Image", fromlist=["Image"]).open(REPO / "test_imgs" / "circle.png").convert("RGB"))


def inputs(model: torch.nn.Module, batch: int = 2, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "x": torch.randn(batch, 4, size, size, generator=g),
        "t": torch.tensor([999, 10][:batch]),
        "hint": torch.rand(batch, 3, 8 * size, 8 * size, generator=g),
        "ctx": model.get_learned_conditioning(["a red circle", "a blue square"][:batch]),
    }


@torch.no_grad()
def test_zero_convs_leave_the_unet_exactly_unchanged(fresh_tiny_model: torch.nn.Module) -> None:
    model = fresh_tiny_model
    assert all(not p.any() for p in model.control_model.zero_convs.parameters())
    d = inputs(model)
    unet = model.model.diffusion_model
    alone = unet(d["x"], d["t"], context=d["ctx"])
    controlled = model.apply_model(d["x"], d["t"], {"c_concat": [d["hint"]], "c_crossattn": [d["ctx"]]})
    assert alone.abs().max() > 1e-3  # the UNet's output conv was filled: a non-trivial prediction
    assert torch.equal(controlled, alone)


@torch.no_grad()
def test_strength_zero_equals_the_unet(tiny_model: torch.nn.Module) -> None:
    model = tiny_model
    d = inputs(model)
    unet = model.model.diffusion_model
    alone = unet(d["x"], d["t"], context=d["ctx"])
    cond = {"c_concat": [d["hint"]], "c_crossattn": [d["ctx"]]}
    try:
        model.control_scales = control_scales_for(0.0, False)
        assert torch.equal(model.apply_model(d["x"], d["t"], cond), alone)
        model.control_scales = control_scales_for(1.0, False)
        assert (model.apply_model(d["x"], d["t"], cond) - alone).abs().max() > 1e-3  # control does act
    finally:
        model.control_scales = [1.0] * 13


def test_guess_mode_scales() -> None:
    scales = control_scales_for(1.5, True)
    assert len(scales) == 13
    assert scales == [1.5 * 0.825 ** float(12 - i) for i in range(13)]
    assert scales[-1] == 1.5 and scales[0] == pytest.approx(1.5 * 0.0994, rel=1e-3)
    assert control_scales_for(0.7, False) == [0.7] * 13


class CallLog:
    """Records the batch size of every forward call of a module."""

    def __init__(self, module: torch.nn.Module):
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else next(iter(kwargs.values()))
        self.batches.append(first.shape[0])

    def close(self) -> list[int]:
        self.handle.remove()
        return self.batches


def run_pipeline(model: torch.nn.Module, **overrides: object) -> tuple[list[np.ndarray], dict[str, list[int]]]:
    pipe = Canny2Image(model, torch.device("cpu"))
    settings = {"prompt": "a red circle", "image_resolution": 64, "ddim_steps": 2, "seed": 7, **overrides}
    params = CannyParams(**settings)
    logs = {
        "control": CallLog(model.control_model),
        "unet": CallLog(model.model.diffusion_model),
        "hint": CallLog(model.control_model.input_hint_block),
    }
    try:
        images, _ = pipe(IMAGE, params, progress=False)
    finally:
        batches = {name: log.close() for name, log in logs.items()}
    return images, batches


def test_guess_mode_drops_the_unconditional_control(tiny_model: torch.nn.Module) -> None:
    _, normal = run_pipeline(tiny_model, num_samples=2)
    assert normal["control"] == [4, 4] and normal["unet"] == [4, 4]  # cond + uncond in one pass of 4 rows per step
    _, guess = run_pipeline(tiny_model, num_samples=2, guess_mode=True)
    assert guess["control"] == [2, 2]  # only the conditional half gets control
    assert guess["unet"] == [2, 2, 2, 2]  # conditional (controlled) and unconditional passes


def test_hint_is_encoded_once_per_run(tiny_model: torch.nn.Module) -> None:
    _, batches = run_pipeline(tiny_model, num_samples=2)
    assert batches["hint"] == [2]


def test_seed_reproducibility(tiny_model: torch.nn.Module) -> None:
    first, _ = run_pipeline(tiny_model)
    again, _ = run_pipeline(tiny_model)
    other, _ = run_pipeline(tiny_model, seed=8)
    assert len(first) == 2 and first[1].shape == (64, 64, 3) and first[1].dtype == np.uint8
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert np.array_equal(first[0], other[0])  # same edges
    assert np.abs(first[1].astype(int) - other[1].astype(int)).max() > 0


def test_edge_map_is_inverted_canny(tiny_model: torch.nn.Module) -> None:
    images, _ = run_pipeline(tiny_model)
    edges = images[0]
    assert set(np.unique(edges)) <= {0, 255}
    assert (edges == 0).any() and (edges == 255).mean() > 0.5  # black edges on white, as the reference shows


@pytest.mark.parametrize("name,value", [("ddim_steps", 0), ("strength", 2.5), ("image_resolution", 32), ("seed", -2)])
def test_params_out_of_range_are_named(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        CannyParams(**{name: value}).validate()
