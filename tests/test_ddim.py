"""DDIM schedule and sampler behave as the reference's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import SAMPLERS, sampling_steps
from ldm.modules.diffusionmodules.util import make_ddim_timesteps


def test_reference_timesteps() -> None:
    assert make_ddim_timesteps(20, 1000).tolist() == list(range(1, 1000, 50))
    assert len(make_ddim_timesteps(30, 1000)) == 31  # the reference's stride 33 visits 31 steps
    assert make_ddim_timesteps(3, 1000).tolist() == [1, 334, 667, 999]  # the reference would index 1000
    assert make_ddim_timesteps(1, 1000).tolist() == [1]


def test_schedule_values(tiny_model: torch.nn.Module) -> None:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    assert torch.allclose(tiny_model.betas, torch.tensor(betas, dtype=torch.float32))
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(20, ddim_eta=0.0)
    acp = np.cumprod(1 - betas)
    assert np.allclose(sampler.ddim_alphas.numpy(), acp[list(range(1, 1000, 50))], rtol=1e-6)
    assert sampler.ddim_alphas_prev[0].item() == np.float32(acp[0])
    assert not sampler.ddim_sigmas.any()


@torch.no_grad()
def test_batched_guidance_equals_separate_passes(tiny_model: torch.nn.Module) -> None:
    model = tiny_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500, 500])
    hint = torch.rand(2, 3, 64, 64, generator=g)
    c = {"c_concat": [hint], "c_crossattn": [model.get_learned_conditioning(["a", "b"])]}
    uc = {"c_concat": [hint], "c_crossattn": [model.get_learned_conditioning(["", ""])]}
    denoise = DDIMSampler(model).denoiser(c, uc, 9.0)
    assert denoise.controls == denoise.uncond_controls and len(denoise.controls) == 1  # the same hint: one control
    batched = denoise(x, t)
    separate = model.apply_model(x, t, uc) + 9.0 * (model.apply_model(x, t, c) - model.apply_model(x, t, uc))
    # The random tiny net amplifies float rounding ~100x (a 1e-6 input change moves eps by ~3e-4), and
    # guidance scales that by 9; swapping cond/uncond would move the result by ~2.8, so 1e-2 is decisive.
    assert (batched - separate).abs().max() < 1e-2
    assert (separate - model.apply_model(x, t, c)).abs().max() > 0.2  # guidance does move eps (here by ~0.46)


@torch.no_grad()
def test_sample_shapes_and_intermediates(tiny_model: torch.nn.Module) -> None:
    model = tiny_model
    cond = {"c_concat": [torch.rand(1, 3, 64, 64)], "c_crossattn": [model.get_learned_conditioning(["x"])]}
    torch.manual_seed(0)
    steps: list[int] = []
    samples, inter = DDIMSampler(model).sample(4, 1, (4, 8, 8), cond, verbose=False, callback=steps.append,
                                               progress=False)  # fmt: skip
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()
    assert steps == [0, 1, 2, 3]
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) >= 2
    assert model.decode_first_stage(samples).shape == (1, 3, 64, 64)


def test_unsupported_reference_parameters_are_named(tiny_model: torch.nn.Module) -> None:
    cond = {"c_concat": None, "c_crossattn": [tiny_model.get_learned_conditioning(["x"])]}
    with pytest.raises(ValueError, match=r"DDIMSampler.sample: parameter 'quantize_x0' = True"):
        DDIMSampler(tiny_model).sample(2, 1, (4, 8, 8), cond, quantize_x0=True, progress=False)
    with pytest.raises(ValueError, match="mask and x0 go together"):
        DDIMSampler(tiny_model).sample(2, 1, (4, 8, 8), cond, mask=torch.ones(1), progress=False)
    with pytest.raises(ValueError, match="parameter 'schedule' = 'cosine'"):
        DDIMSampler(tiny_model, schedule="cosine")
    with pytest.raises(TypeError, match="unexpected keyword arguments: unconditional_guidance_scal"):
        DDIMSampler(tiny_model).sample(2, 1, (4, 8, 8), cond, unconditional_guidance_scal=9.0, progress=False)


def test_sampler_follows_the_models_current_path(tiny_model: torch.nn.Module) -> None:
    """``use_path`` after the sampler was made still decides hint reuse and batched guidance."""
    from cldm.inference import use_path

    hint = torch.rand(1, 3, 64, 64)
    c = {"c_concat": [hint], "c_crossattn": [tiny_model.get_learned_conditioning(["a"])]}
    uc = {"c_concat": [hint], "c_crossattn": [tiny_model.get_learned_conditioning([""])]}
    sampler = DDIMSampler(tiny_model)
    try:
        use_path(tiny_model, "reference")
        reference = sampler.denoiser(c, uc, 9.0)
        assert not reference.batch_cfg and not reference.controls[0].cache
    finally:
        use_path(tiny_model, "fast")
    fast = sampler.denoiser(c, uc, 9.0)
    assert fast.batch_cfg and fast.controls[0].cache
    assert not DDIMSampler(tiny_model, batch_cfg=False).denoiser(c, uc, 9.0).batch_cfg  # an explicit setting wins


@torch.no_grad()
def test_sampler_registry_runs_ddim_over_any_denoiser() -> None:
    """A sampler is a function over ``denoise(x, t, step, steps)``: with a denoiser that predicts the noise a
    clean x0 = 0.5 was mixed with, DDIM (eta 0) predicts x0 at every step and ends at sqrt(a_0) x0 + sqrt(1 - a_0)
    eps (the reference's last step goes to alphas_cumprod[0], not 1)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    acp = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)
    calls: list[tuple[int, int]] = []

    def denoise(x: torch.Tensor, t: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        calls.append((step, steps))
        a = acp[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * 0.5) / (1 - a).sqrt()

    x_T = torch.randn(2, 4, 8, 8)
    pred: list[torch.Tensor] = []
    x = SAMPLERS["ddim"](denoise, x_T, acp, 10, callback=lambda i, x, x0: pred.append(x0), progress=False)
    assert calls == [(i, 10) for i in range(10)] and len(pred) == 10
    assert all((p - 0.5).abs().max() < 1e-4 for p in pred)
    eps = (x_T - acp[901].sqrt() * 0.5) / (1 - acp[901]).sqrt()  # first step t = 901; eps stays constant
    assert torch.allclose(x, acp[0].sqrt() * 0.5 + (1 - acp[0]).sqrt() * eps, atol=1e-4)
    assert sampling_steps("ddim", 30) == 31
