"""Samplers as functions over a denoiser, in the manner of k-diffusion's ``sampling.py``.

A sampler is ``sample_NAME(denoise, x, alphas_cumprod, steps, *, callback=None, progress=True, **options)``:
``denoise(x, t, step, steps) -> eps`` is the guided noise prediction (``cldm.guidance.CFGDenoiser``), ``x`` the
start latents [B, 4, h, w] (unit-variance noise), ``alphas_cumprod`` the model's DDPM schedule [T], ``steps`` the
number of steps asked for. It returns the final latents, or raises :class:`NonFiniteError` (a ``ValueError``)
naming the step where they stop being finite, or ``ValueError`` for a step count outside the sampler's range
(:data:`MAX_STEPS`). ``callback(i, x, pred_x0)`` runs after each step. A sampler that draws noise between steps
takes ``generator`` (a ``torch.Generator``; default: torch's global one). Every sampler takes ``init``
(:class:`InitLatents`): img2img (start part-way from noised init latents) and latent-blending inpainting, the
same way for all (:class:`_Run`). Register a new sampler with one line in
:data:`SAMPLERS` and one in :data:`MAX_STEPS`; :func:`sample` runs one by name.

The samplers other than ``ddim`` follow diffusers' schedulers configured as SD1.5's ``scheduler_config``
(``scaled_linear`` betas, ``timestep_spacing="leading"``, ``steps_offset=1``): the same timesteps, the same
updates. Their schedule arithmetic is float64 here (diffusers keeps float32 sigmas); the tests hold the final
latents within 1e-4 of diffusers' loop.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

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


def denoise_steps(total: int, strength: float) -> int:
    """How many of a grid of ``total`` timesteps an img2img run of ``strength`` takes: ``int(total * strength)``,
    the last ones (diffusers' ``get_timesteps``). ``ValueError`` when ``strength`` is outside (0, 1] or none run."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"the denoise strength must be in (0, 1], got {strength}")
    run = min(int(total * strength), total)
    if run < 1:
        raise ValueError(f"denoise {strength} of {total} steps runs no step: use a denoise of at least "
                         f"{1 / total:.3g} or more steps")  # fmt: skip
    return run


@dataclass(frozen=True)
class InitLatents:
    """img2img / inpainting start of a sampler run, diffusers' semantics (``StableDiffusionControlNetImg2Img``
    and the legacy latent-blending ``StableDiffusionControlNetInpaintPipeline`` with a 4-channel UNet).

    ``latents``: the clean init latents [B, 4, h, w] (scaled, as ``get_first_stage_encoding`` gives them);
    ``noise``: unit noise of the same shape (the pipelines' start noise); ``strength`` in (0, 1]: of a grid of
    ``n`` timesteps the sampler runs the last ``int(n * strength)`` (:func:`denoise_steps`), from the init
    latents noised to the first of them; ``mask``: ``None`` (img2img) or [B or 1, 1, h, w] float, 1 = repaint,
    0 = keep: after each step the kept part is replaced by the init latents noised to the next timestep (the
    clean ones after the last step), and at ``strength`` 1 the run starts from the noise alone (as diffusers'
    inpaint pipeline).
    """

    latents: torch.Tensor
    noise: torch.Tensor
    strength: float = 1.0
    mask: torch.Tensor | None = None

    def noised(self, sigma: float) -> torch.Tensor:
        """The init latents at noise level ``sigma`` (VE, ``sqrt((1 - a) / a)``) in the VP scale:
        ``sqrt(a) latents + sqrt(1 - a) noise`` (diffusers' ``add_noise``, the reference's ``q_sample``)."""
        alpha, sigma_vp = alpha_sigma(sigma)
        return alpha * self.latents + sigma_vp * self.noise


class _Run:
    """The part of a sampler's grid that runs, its start latents and the inpainting blend after each step, for
    any sampler: built from the grid's noise levels ``sigmas`` (VE, float64, descending, one per timestep) and
    whether the sampler's latents are in the VE scale (``x0 + sigma eps``, Euler's) or the VP scale."""

    def __init__(self, init: InitLatents | None, sigmas: np.ndarray, ve: bool = False):
        self.init, self.ve = init, ve
        self.skip = 0 if init is None else len(sigmas) - denoise_steps(len(sigmas), init.strength)
        self.sigmas = np.asarray(sigmas, dtype=np.float64)[self.skip :]

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """The start latents in the VP scale: the noise ``x`` itself without init (or when inpainting at full
        strength), else the init latents noised to the first timestep that runs."""
        init = self.init
        if init is None or (init.mask is not None and init.strength == 1.0):
            return x
        return init.noised(float(self.sigmas[0]))

    def blend(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """After step ``step`` (0-based, of those that run): ``(1 - mask) * init noised to the next timestep (clean
        after the last) + mask * x``, in the sampler's scale; ``x`` unchanged without a mask."""
        init = self.init
        if init is None or init.mask is None:
            return x
        if step + 1 < len(self.sigmas):
            sigma = float(self.sigmas[step + 1])
            kept = init.noised(sigma) * (math.sqrt(sigma * sigma + 1.0) if self.ve else 1.0)
        else:
            kept = init.latents
        return (1.0 - init.mask) * kept + init.mask * x


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
    init: InitLatents | None = None,
    before_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DDIM (the reference's ``cldm/ddim_hacked.py`` update and timesteps; ``eta`` 0 is deterministic).
    ``before_step(x, t)`` (``t``: int64 [B]) returns the latents each step starts from (ldm's ``mask``/``x0``
    blend, :class:`ldm.models.diffusion.ddim.DDIMSampler`). Raises :class:`NonFiniteError` naming the step after
    which the latent is not finite."""
    schedule = ddim_schedule(alphas_cumprod, steps, eta, discretize)
    alphas = np.flip(schedule.alphas.double().cpu().numpy())
    run = _Run(init, np.sqrt((1.0 - alphas) / alphas))
    timesteps = np.flip(schedule.timesteps)[run.skip :]  # the schedule's arrays are indexed from the end
    x = run.start(x)
    total = len(timesteps)
    for i, step in enumerate(tqdm(timesteps, desc="DDIM Sampler", total=total, disable=not progress)):
        t = torch.full((x.shape[0],), int(step), device=x.device, dtype=torch.long)
        x = x if before_step is None else before_step(x, t)
        e_t = denoise(x, t, i, total)
        x, pred_x0 = ddim_step(x, e_t, schedule, total - i - 1, temperature, noise_dropout)
        x = _done(x, pred_x0, i, total, callback, run)
    return x


LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps: the distillation's grid of timesteps
LCM_TIMESTEP_SCALING = 10.0  # LCMScheduler's timestep_scaling of the boundary condition
LCM_SIGMA_DATA = 0.5
KARRAS_RHO = 7.0


def ve_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """Noise levels ``sqrt((1 - a) / a)`` of the DDPM schedule [T] (the VE view of the VP process), float64 [T]."""
    a = alphas_cumprod.detach().cpu().double().numpy()
    return np.sqrt((1.0 - a) / a)


def leading_timesteps(steps: int, total: int, points: int) -> np.ndarray:
    """diffusers' ``timestep_spacing="leading"`` with ``steps_offset=1`` (SD1.5's scheduler config), descending
    int64 [steps]: the grid ``k * (total // points)`` for ``k < points``, largest first, its first ``steps`` values,
    plus 1. DPM-Solver and UniPC lay ``points = steps + 1`` (their grid stops short of 0), Euler ``points = steps``
    (as DDIM's ``leading``; the reference's ``uniform`` DDIM equals it when ``steps`` divides ``total``)."""
    return (np.arange(points, dtype=np.int64) * (total // points))[::-1][:steps] + 1


def karras_sigmas(sigmas: np.ndarray, steps: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. (arXiv 2206.00364, eq. 5) noise levels [steps], float64, from ``sigmas.max()`` down to
    ``sigmas.min()`` evenly in ``sigma ** (1 / rho)``; ``sigmas`` ascending [T] (:func:`ve_sigmas`)."""
    high, low = sigmas[-1] ** (1 / rho), sigmas[0] ** (1 / rho)
    return (high + np.linspace(0.0, 1.0, steps) * (low - high)) ** rho


def multistep_schedule(alphas_cumprod: torch.Tensor, steps: int, karras: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps, sigmas)`` of DPM-Solver and UniPC: int64 [steps] descending and float64 noise levels
    [steps + 1] ending at 0. ``leading`` timesteps and their noise levels, or (``karras``) Karras noise levels and
    the timesteps nearest them (interpolated in log sigma, rounded), as diffusers' ``use_karras_sigmas``."""
    all_sigmas = ve_sigmas(alphas_cumprod)
    if karras:
        sigmas = karras_sigmas(all_sigmas, steps)
        positions = np.interp(np.log(sigmas), np.log(all_sigmas), np.arange(len(all_sigmas), dtype=np.float64))
        timesteps = positions.round().astype(np.int64)
    else:
        timesteps = leading_timesteps(steps, len(all_sigmas), steps + 1)
        sigmas = all_sigmas[timesteps]
    return timesteps, np.append(sigmas, 0.0)


def lcm_timesteps(steps: int, total: int) -> np.ndarray:
    """LCMScheduler's timesteps, descending int64 [steps]: ``steps`` evenly spaced picks (by index, from the top)
    of the distillation grid ``k * (total // LCM_ORIGINAL_STEPS) - 1``, k = 1..LCM_ORIGINAL_STEPS."""
    grid = (np.arange(1, LCM_ORIGINAL_STEPS + 1, dtype=np.int64) * (total // LCM_ORIGINAL_STEPS) - 1)[::-1]
    return grid[np.floor(np.linspace(0, len(grid), steps, endpoint=False)).astype(np.int64)]


def alpha_sigma(sigma: float) -> tuple[float, float]:
    """``(alpha_t, sigma_t)`` of the VP process at noise level ``sigma`` (x_vp = alpha_t * x0 + sigma_t * eps)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def draw_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped as ``x``, from ``generator`` (on its device, then moved to ``x``'s) or torch's
    global generator."""
    if generator is None:
        return torch.randn(x.shape, dtype=x.dtype, device=x.device)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


def _steps(timesteps: np.ndarray, desc: str, progress: bool) -> Iterator[tuple[int, int]]:
    return enumerate(tqdm(timesteps.tolist(), desc=desc, disable=not progress))


def _eps(denoise: Denoise, x: torch.Tensor, t: int, step: int, steps: int) -> torch.Tensor:
    return denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), step, steps)


def _done(
    x: torch.Tensor, pred_x0: torch.Tensor, step: int, steps: int, callback: StepCallback | None, run: _Run
) -> torch.Tensor:
    """End of a step: the inpainting blend, the finiteness check, the callback; returns the (blended) latents."""
    x = run.blend(x, step)
    check_latent(x, step + 1, steps)
    if callback is not None:
        callback(step, x, pred_x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoise,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    karras: bool = False,
    init: InitLatents | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., arXiv 2211.01095): multistep, second order in the data prediction, first order
    at the first and the last step. Equals diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
    solver_order=2)`` (midpoint, ``final_sigmas_type="zero"``); ``karras``: its ``use_karras_sigmas=True``
    (A1111's "DPM++ 2M Karras"). Steps: 1 to T - 2. Deterministic."""
    check_steps("dpmpp_2m_karras" if karras else "dpmpp_2m", steps, len(alphas_cumprod))
    timesteps, sigmas = multistep_schedule(alphas_cumprod, steps, karras)
    run = _Run(init, sigmas[:-1])
    timesteps, sigmas, x = timesteps[run.skip :], sigmas[run.skip :], run.start(x)
    total = len(timesteps)
    prev_x0 = None
    for i, t in _steps(timesteps, "DPM++ 2M", progress):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        alpha, sigma = alpha_sigma(s)
        x0 = (x - sigma * _eps(denoise, x, t, i, total)) / alpha
        if s_next == 0.0:
            x = x0
        else:
            alpha_next, sigma_next = alpha_sigma(s_next)
            h = math.log(s / s_next)  # lambda_next - lambda, lambda = -log(sigma)
            d = x0
            if prev_x0 is not None:
                r = math.log(float(sigmas[i - 1]) / s) / h
                d = x0 + (x0 - prev_x0) / (2.0 * r)
            x = (sigma_next / sigma) * x - (alpha_next * math.expm1(-h)) * d
        prev_x0 = x0
        x = _done(x, x0, i, total, callback, run)
    return x


def _unipc_predict(x: torch.Tensor, x0s: list[torch.Tensor], sigmas: np.ndarray, i: int, order: int) -> torch.Tensor:
    """UniP-bh2 from noise level ``sigmas[i]`` to ``sigmas[i + 1]``; ``x0s`` ends with the data predictions at
    ``i - 1`` (order 2) and ``i``."""
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    m0 = x0s[-1]
    if s_next == 0.0:
        return m0
    alpha_next, sigma_next = alpha_sigma(s_next)
    h = math.log(s / s_next)
    b_h = math.expm1(-h)  # bh2: B(h) = h phi_1(h) = e^-h - 1
    x = (sigma_next / alpha_sigma(s)[1]) * x - (alpha_next * b_h) * m0
    if order == 2:
        r = math.log(s / float(sigmas[i - 1])) / h
        x = x - (alpha_next * b_h * 0.5 / r) * (x0s[-2] - m0)
    return x


def _unipc_correct(
    x_prev: torch.Tensor, x0s: list[torch.Tensor], x0: torch.Tensor, sigmas: np.ndarray, i: int, order: int
) -> torch.Tensor:
    """UniC-bh2 of the step ``i - 1 -> i`` that UniP took at ``order`` from ``x_prev``, with the new data
    prediction ``x0`` at ``i``; ``x0s`` ends with those at ``i - 2`` (order 2) and ``i - 1``."""
    s_prev, s = float(sigmas[i - 1]), float(sigmas[i])
    alpha, sigma = alpha_sigma(s)
    m0 = x0s[-1]
    h = math.log(s_prev / s)
    b_h = math.expm1(-h)
    x = (sigma / alpha_sigma(s_prev)[1]) * x_prev - (alpha * b_h) * m0
    if order == 1:
        return x - (alpha * b_h * 0.5) * (x0 - m0)
    r = math.log(s_prev / float(sigmas[i - 2])) / h
    phi_1 = b_h / -h - 1.0  # the b(h) terms of UniC (Zhao et al., arXiv 2302.04867, eq. 8), rho from R rho = b
    phi_2 = phi_1 / -h - 0.5
    b1, b2 = phi_1 / b_h, 2.0 * phi_2 / b_h
    rho_0 = (b1 - b2) / (1.0 - r)
    rho_1 = b1 - rho_0
    return x - (alpha * b_h) * ((rho_0 / r) * (x0s[-2] - m0) + rho_1 * (x0 - m0))


@torch.no_grad()
def sample_unipc(
    denoise: Denoise,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    karras: bool = False,
    init: InitLatents | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """UniPC (Zhao et al., arXiv 2302.04867), B(h) = e^h - 1 ("bh2"), data prediction, order 2 with the first and
    the last step at order 1, the corrector after every step but the last (one denoiser call per step). Equals
    diffusers' ``UniPCMultistepScheduler`` defaults (``solver_type="bh2"``, ``predict_x0=True``, ``solver_order=2``,
    ``lower_order_final``); ``karras``: its ``use_karras_sigmas=True``. Steps: 1 to T - 2. Deterministic."""
    check_steps("unipc_karras" if karras else "unipc", steps, len(alphas_cumprod))
    timesteps, sigmas = multistep_schedule(alphas_cumprod, steps, karras)
    run = _Run(init, sigmas[:-1])
    timesteps, sigmas, x = timesteps[run.skip :], sigmas[run.skip :], run.start(x)
    total = len(timesteps)
    x0s: list[torch.Tensor] = []
    x_prev, order = x, 0
    for i, t in _steps(timesteps, "UniPC", progress):
        alpha, sigma = alpha_sigma(float(sigmas[i]))
        x0 = (x - sigma * _eps(denoise, x, t, i, total)) / alpha  # at the predicted x, before its correction
        if i > 0:
            x = _unipc_correct(x_prev, x0s, x0, sigmas, i, order)
        x0s = [*x0s[-1:], x0]
        order = min(2, total - i, i + 1)
        x_prev = x
        x = _unipc_predict(x, x0s, sigmas, i, order)
        x = _done(x, x0, i, total, callback, run)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoise: Denoise,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    init: InitLatents | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``, eta 1): an Euler step down to
    ``sigma_down = sigma_next^2 / sigma``, then fresh noise of ``sigma_up = sigma_next sqrt(sigma^2 -
    sigma_next^2) / sigma`` from ``generator``, at every step (the last adds none but still draws). Equals
    diffusers' ``EulerAncestralDiscreteScheduler`` (``leading``, ``steps_offset=1``: x_T scaled by
    ``sqrt(sigma_max^2 + 1)``). Steps: 1 to T - 1."""
    check_steps("euler_a", steps, len(alphas_cumprod))
    all_sigmas = ve_sigmas(alphas_cumprod)
    timesteps = leading_timesteps(steps, len(all_sigmas), steps)
    sigmas = np.append(all_sigmas[timesteps], 0.0)
    run = _Run(init, sigmas[:-1], ve=True)
    timesteps, sigmas = timesteps[run.skip :], sigmas[run.skip :]
    total = len(timesteps)
    x = run.start(x) * math.sqrt(float(sigmas[0]) ** 2 + 1.0)
    for i, t in _steps(timesteps, "Euler a", progress):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        eps = _eps(denoise, x / math.sqrt(s * s + 1.0), t, i, total)
        x0 = x - s * eps
        sigma_up = s_next * math.sqrt(s * s - s_next * s_next) / s
        x = x + (s_next * s_next / s - s) * eps + sigma_up * draw_noise(x, generator)
        x = _done(x, x0, i, total, callback, run)
    return x


@torch.no_grad()
def sample_lcm(
    denoise: Denoise,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    init: InitLatents | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Latent consistency model sampling (Luo et al., arXiv 2310.04378): at each step the consistency function
    ``c_skip x + c_out x0`` (boundary condition at t: ``c_skip = s_d^2 / ((10 t)^2 + s_d^2)``, ``c_out =
    10 t / sqrt((10 t)^2 + s_d^2)``, s_d = 0.5), then, before every step but the last, re-noised to the next
    timestep with fresh noise from ``generator``. Equals diffusers' ``LCMScheduler`` (timesteps from the
    50-step distillation grid). For LCM-distilled weights (e.g. LCM-LoRA), usually 2 to 8 steps at guidance 1;
    steps: 1 to 50."""
    check_steps("lcm", steps, len(alphas_cumprod))
    acp = alphas_cumprod.detach().cpu().double().numpy()
    timesteps = lcm_timesteps(steps, len(acp))
    run = _Run(init, np.sqrt((1.0 - acp[timesteps]) / acp[timesteps]))
    timesteps, x = timesteps[run.skip :], run.start(x)
    total = len(timesteps)
    for i, t in _steps(timesteps, "LCM", progress):
        a = float(acp[t])
        x0 = (x - math.sqrt(1.0 - a) * _eps(denoise, x, t, i, total)) / math.sqrt(a)
        c = t * LCM_TIMESTEP_SCALING
        c_skip = LCM_SIGMA_DATA**2 / (c * c + LCM_SIGMA_DATA**2)
        c_out = c / math.sqrt(c * c + LCM_SIGMA_DATA**2)
        denoised = c_out * x0 + c_skip * x
        if i + 1 < total:
            a_next = float(acp[timesteps[i + 1]])
            x = math.sqrt(a_next) * denoised + math.sqrt(1.0 - a_next) * draw_noise(x, generator)
        else:
            x = denoised
        x = _done(x, denoised, i, total, callback, run)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": partial(sample_dpmpp_2m, karras=True),
    "unipc": sample_unipc,
    "unipc_karras": partial(sample_unipc, karras=True),
    "euler_a": sample_euler_ancestral,
    "lcm": sample_lcm,
}

# The most steps each sampler takes for a DDPM schedule of T timesteps (the least is 1): where its grid of
# timesteps stays inside [0, T - 1] without repeats; LCM picks from its 50-step distillation grid.
MAX_STEPS: dict[str, Callable[[int], int]] = {
    "ddim": lambda total: total,
    "dpmpp_2m": lambda total: total - 2,
    "dpmpp_2m_karras": lambda total: total - 2,
    "unipc": lambda total: total - 2,
    "unipc_karras": lambda total: total - 2,
    "euler_a": lambda total: total - 1,
    "lcm": lambda total: LCM_ORIGINAL_STEPS,
}


def check_sampler(sampler: str) -> None:
    """Raise ``ValueError`` listing the names unless ``sampler`` is one of :data:`SAMPLERS`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")


def check_steps(sampler: str, steps: int, num_timesteps: int = 1000) -> None:
    """Raise ``ValueError`` unless ``sampler`` is known and takes ``steps`` steps (1 to :data:`MAX_STEPS`) on a
    schedule of ``num_timesteps``."""
    check_sampler(sampler)
    most = MAX_STEPS[sampler](num_timesteps)
    if not 1 <= steps <= most:
        raise ValueError(f"the {sampler} sampler takes 1 to {most} steps, got {steps}")


def sampling_steps(sampler: str, steps: int, num_timesteps: int = 1000) -> int:
    """How many denoiser steps ``sampler`` takes for ``steps`` (DDIM's uniform schedule visits 31 for 30; the
    others take ``steps``). Raises ``ValueError`` as :func:`check_steps`."""
    check_steps(sampler, steps, num_timesteps)
    if sampler == "ddim":
        return len(make_ddim_timesteps(steps, num_timesteps))
    return steps


def sample(
    sampler: str,
    denoise: Denoise,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    init: InitLatents | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Run the sampler named ``sampler`` (a key of :data:`SAMPLERS`) from the start noise ``x`` [B, 4, h, w];
    returns the final latents [B, 4, h, w]. ``eta``: DDIM's only (a non-zero ``eta`` for another sampler raises
    ``ValueError``); ``generator``: the step noise of the samplers that draw it (``euler_a``, ``lcm``; others
    ignore it); ``init``: img2img / inpainting (:class:`InitLatents`; ``x`` is then its noise). Raises
    ``ValueError`` for an unknown name or a step count outside the sampler's range, and
    :class:`NonFiniteError`."""
    check_sampler(sampler)
    fn = SAMPLERS[sampler]
    accepted = inspect.signature(fn).parameters
    options: dict[str, object] = {}
    if eta:
        if "eta" not in accepted:
            raise ValueError(f"eta applies to the ddim sampler only, not to {sampler}")
        options["eta"] = eta
    if generator is not None and "generator" in accepted:
        options["generator"] = generator
    return fn(denoise, x, alphas_cumprod, steps, init=init, callback=callback, progress=progress, **options)
