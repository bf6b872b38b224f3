"""The reference's Python API (README, "Python API") keeps working and gets the fast path; the control is an
argument of the new API and equals the reference API's mutable ``control_scales``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cldm.control import Control, control_residuals, control_scales_for
from cldm.ddim_hacked import DDIMSampler
from cldm.guidance import CFGDenoiser
from cldm.inference import use_path
from cldm.model import create_model, load_state_dict
from ldm.models.diffusion.sampling import sample_ddim
from ldm.modules import winograd
from tests.conftest import TINY_CONFIG


def reference_example(ckpt: Path, scales: list[float]) -> torch.Tensor:
    """The README's example on the tiny config (128 px instead of 512)."""
    model = create_model(str(TINY_CONFIG)).cpu()
    model.load_state_dict(load_state_dict(str(ckpt), location="cpu"))
    sampler = DDIMSampler(model)
    hint = torch.zeros(1, 3, 128, 128)  # edge map in [0, 1], NCHW
    hint[:, :, 32:96, 64] = 1.0
    cond = {"c_concat": [hint], "c_crossattn": [model.get_learned_conditioning(["a house"])]}
    uncond = {"c_concat": [hint], "c_crossattn": [model.get_learned_conditioning([""])]}
    model.control_scales = scales
    torch.manual_seed(0)
    samples, _ = sampler.sample(4, 1, (4, 16, 16), cond, verbose=False, eta=0.0,
                                unconditional_guidance_scale=9.0, unconditional_conditioning=uncond)  # fmt: skip
    return model.decode_first_stage(samples)


def test_reference_example_runs_on_the_fast_path(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = winograd.winograd_conv3x3
    monkeypatch.setattr(winograd, "winograd_conv3x3", lambda *a: calls.append(1) or real(*a))
    images = reference_example(tiny_ckpt, [1.0] * 13)
    assert images.shape == (1, 3, 128, 128) and torch.isfinite(images).all() and images.std() > 0.01
    assert calls  # create_model + DDIMSampler: Winograd convolutions, as the scripts get

    model = create_model(str(TINY_CONFIG)).cpu()
    model.load_state_dict(load_state_dict(str(tiny_ckpt)))
    use_path(model, "fast")
    hint = torch.zeros(1, 3, 128, 128)
    hint[:, :, 32:96, 64] = 1.0
    denoise = CFGDenoiser(model, model.get_learned_conditioning(["a house"]), model.get_learned_conditioning([""]),
                          9.0, [Control(model.control_model, hint)])  # fmt: skip
    torch.manual_seed(0)
    x_t = torch.randn(1, 4, 16, 16)
    explicit = model.decode_first_stage(sample_ddim(denoise, x_t, model.alphas_cumprod, 4, progress=False))
    assert torch.equal(images, explicit)  # the reference API is the new API, bit for bit


@torch.no_grad()
def test_control_scales_state_equals_the_control_argument(tiny_model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 30])
    hint = torch.rand(2, 3, 64, 64, generator=g)
    context = tiny_model.get_learned_conditioning(["a", "b"])
    scales = control_scales_for(0.8, guess_mode=True)
    tiny_model.control_scales = scales
    try:
        by_state = tiny_model.apply_model(x, t, {"c_concat": [hint], "c_crossattn": [context]})
    finally:
        tiny_model.control_scales = [1.0] * 13
    control = Control(tiny_model.control_model, hint, scales)
    by_argument = tiny_model.apply_model(x, t, {"c_crossattn": [context]}, controls=[control])
    assert torch.equal(by_state, by_argument)


@torch.no_grad()
def test_several_controls_add_their_residuals(tiny_model: torch.nn.Module) -> None:
    """Room for several ControlNets: residuals add; half strength twice equals full strength once."""
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400])
    context = tiny_model.get_learned_conditioning(["a"])
    a = Control(tiny_model.control_model, torch.rand(1, 3, 64, 64, generator=g))
    b = Control(tiny_model.control_model, torch.rand(1, 3, 64, 64, generator=g), [0.5] * 13)
    both = control_residuals([a, b], x, t, context)
    alone = control_residuals([a], x, t, context), control_residuals([b], x, t, context)
    assert len(both) == 13 and all(torch.allclose(s, p + q, atol=1e-6) for s, p, q in zip(both, *alone))
    half = Control(tiny_model.control_model, a.hint, [0.5] * 13)
    eps = tiny_model.apply_model(x, t, {"c_crossattn": [context]}, controls=[a])
    eps_halves = tiny_model.apply_model(x, t, {"c_crossattn": [context]}, controls=[half, half])
    assert (eps - eps_halves).abs().max() < 1e-5
    assert control_residuals([], x, t, context) is None


def test_step_window_skips_the_controlnet(tiny_model: torch.nn.Module) -> None:
    """diffusers' control_guidance_start/end semantics; outside the window the ControlNet is not called."""
    control = Control(tiny_model.control_model, torch.zeros(1, 3, 64, 64), start=0.25, end=0.75)
    assert [control.active(i, 4) for i in range(4)] == [False, True, True, False]
    never = Control(tiny_model.control_model, torch.zeros(1, 3, 64, 64), start=0.0, end=0.0)
    assert not any(never.active(i, 10) for i in range(10))
    calls: list[int] = []
    hook = tiny_model.control_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        context = tiny_model.get_learned_conditioning(["a"])
        denoise = CFGDenoiser(tiny_model, context, context, 3.0, [never])
        plain = CFGDenoiser(tiny_model, context, context, 3.0, [])
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        with torch.no_grad():
            assert torch.equal(denoise(x, t, 0, 10), plain(x, t, 0, 10))
    finally:
        hook.remove()
    assert calls == []
    with pytest.raises(ValueError, match="window"):
        Control(tiny_model.control_model, torch.zeros(1, 3, 64, 64), end=1.5)
    with pytest.raises(ValueError, match="start <= end"):
        Control(tiny_model.control_model, torch.zeros(1, 3, 64, 64), start=0.6, end=0.4)
    with pytest.raises(ValueError, match="13 values"):
        Control(tiny_model.control_model, torch.zeros(1, 3, 64, 64), [1.0] * 12)
