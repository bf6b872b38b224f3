"""Samplers as functions over a denoiser, in the manner of k-diffusion's ``sampling.py``.

A sampler is ``sample_NAME(denoise, x, alphas_cumprod, steps, *, callback=None, progress=True, **options)``:
``denoise(x, t, step, steps) -> eps`` is the guided noise prediction (``cldm.guidance.CFGDenoiser``), ``x`` the
start latents [B, 4, h, w] (noise), ``alphas_cumprod`` the model's DDPM schedule [T], ``steps`` the number of steps
asked for. It returns the final latents, or raises :class:`NonFiniteError` (a ``ValueError``) naming the step
where they stop being finite. ``callback(i, x, pred_x0)`` runs after each step. Register a new sampler
with one line in :data:`SAMPLERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps, noise_like

Denoise = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class NonFiniteError(ValueError):
    """The latent became NaN or infinite during sampling (damaged weights, or a schedule or settings that
    overflow): an error rather than a black image. The message names the step."""


def check_latent(x: torch.Tensor, step: int, steps: int) -> None:
    """Raise :class:`NonFiniteError` unless every value of latent ``x`` is finite after step ``step`` (1-based)
    of ``steps``. One ``isfinite`` reduction over ``x``."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"step {step} of {steps}: the latent has NaN/inf values (non-finite weights or "
                             "an overflowing model); no image is written")  # fmt: skip


@dataclass(frozen=True)
class DDIMSchedule:
    """DDIM timesteps (ascending int array [S]) and per-step coefficients (float32 tensors [S]), as the reference's
    ``DDIMSampler.make_schedule`` computes them (from the float32 ``alphas_cumprod``)."""

    timesteps: np.ndarray
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor


def ddim_schedule(
    alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0, discretize: str = "uniform"
) -> DDIMSchedule:
    """The DDIM schedule for ``steps`` steps (Song et al., arXiv 2010.02502, eq. 16; reference ``ddim.py``).

    Raises ``ValueError`` when ``steps`` is not in [1, T]."""
    total = int(alphas_cumprod.shape[0])
    if steps < 1 or steps > total:
        raise ValueError(f"ddim steps must be in [1, {total}], got {steps}")
    timesteps = make_ddim_timesteps(steps, total, discretize)
    alphacums = alphas_cumprod.detach().cpu().double().numpy().astype(np.float32)
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphacums, timesteps, eta)

    def to_torch(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32, device=alphas_cumprod.device)

    alphas_t = to_torch(alphas)
    return DDIMSchedule(timesteps, alphas_t, to_torch(alphas_prev), to_torch(sigmas), torch.sqrt(1.0 - alphas_t))


def ddim_step(
    x: torch.Tensor, e_t: torch.Tensor, schedule: DDIMSchedule, index: int, temperature: float = 1.0,
    noise_dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One DDIM update x_t -> x_{t-1} at schedule position ``index``; returns ``(x_prev, pred_x0)``. Draws the
    noise from torch's global generator at every step (also at eta 0), as the reference does."""
    b = x.shape[0]

    def at(a: torch.Tensor) -> torch.Tensor:
        return torch.full((b, 1, 1, 1), float(a[index]), device=x.device, dtype=torch.float32)

    a_t, a_prev = at(schedule.alphas), at(schedule.alphas_prev)
    sigma_t, sqrt_one_minus_at = at(schedule.sigmas), at(schedule.sqrt_one_minus_alphas)
    pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
    noise = sigma_t * noise_like(x.shape, x.device) * temperature
    if noise_dropout > 0.0:
        noise = torch.nn.functional.dropout(noise, p=noise_dropout)
    return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0


@torch.no_grad()
def sample_ddim(
    denoise: Denoise,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    temperature: float = 1.0,
    noise_dropout: float = 0.0,
    discretize: str = "uniform",
    callback: StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DDIM (the reference's ``cldm/ddim_hacked.py`` update and timesteps; ``eta`` 0 is deterministic).
    Raises :class:`NonFiniteError` naming the step after which the latent is not finite."""
    schedule = ddim_schedule(alphas_cumprod, steps, eta, discretize)
    timesteps = np.flip(schedule.timesteps)
    total = len(timesteps)
    for i, step in enumerate(tqdm(timesteps, desc="DDIM Sampler", total=total, disable=not progress)):
        t = torch.full((x.shape[0],), int(step), device=x.device, dtype=torch.long)
        e_t = denoise(x, t, i, total)
        x, pred_x0 = ddim_step(x, e_t, schedule, total - i - 1, temperature, noise_dropout)
        check_latent(x, i + 1, total)
        if callback is not None:
            callback(i, x, pred_x0)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
}


def sampling_steps(sampler: str, steps: int, num_timesteps: int = 1000) -> int:
    """How many denoiser steps ``sampler`` takes for ``steps`` (DDIM's uniform schedule visits 31 for 30)."""
    if sampler == "ddim":
        return len(make_ddim_timesteps(steps, num_timesteps))
    return steps
