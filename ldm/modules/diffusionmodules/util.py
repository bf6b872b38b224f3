"""Building blocks and schedules shared by the UNet, the ControlNet and the samplers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ldm.modules.winograd import Conv2d
from ldm.util import check_supported


def make_beta_schedule(
    schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3
) -> np.ndarray:
    """Noise schedule ``betas`` [n_timestep] as float64 numpy (SD uses ``linear`` = squares of a sqrt-linspace)."""
    if schedule == "linear":
        return np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    raise ValueError(f"schedule '{schedule}' unknown.")


def make_ddim_timesteps(num_ddim_timesteps: int, num_ddpm_timesteps: int, method: str = "uniform") -> np.ndarray:
    """DDPM timesteps visited by DDIM, ascending, as the reference picks them.

    ``uniform`` strides by ``num_ddpm_timesteps // num_ddim_timesteps`` from 0 and adds 1, so some
    step counts (e.g. 30) visit one step more than asked. Where that would reach
    ``num_ddpm_timesteps`` (3, 9, 27, 37 steps: the reference fails with an IndexError), the last
    step is clamped to the final DDPM step instead.
    """
    if method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif method == "quad":
        steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM discretization '{method}'")
    return np.minimum(steps + 1, num_ddpm_timesteps - 1)


def make_ddim_sampling_parameters(
    alphacums: np.ndarray, ddim_timesteps: np.ndarray, eta: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sigmas, alphas, alphas_prev)`` for the DDIM update, each [S] (eq. 16 of Song et al.)."""
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of timesteps [N] (cos half first, as the reference)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int, num_groups: int = 32) -> nn.Module:
    """The UNet's norm layer: ``num_groups`` groups (SD: 32), eps 1e-5."""
    return GroupNorm32(num_groups, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """The reference's convolution factory: a :class:`ldm.modules.winograd.Conv2d`; ``dims`` other than 2 raise
    ``ValueError``."""
    check_supported("conv_nd", "dims", dims, 2)
    return Conv2d(*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Module:
    return nn.Linear(*args, **kwargs)


def checkpoint(func: Callable[..., Any], inputs: tuple, params: Any, flag: bool) -> Any:
    """Activation checkpointing of ``func(*inputs)`` when ``flag`` and gradients are being recorded."""
    if flag and torch.is_grad_enabled():
        return torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: tuple) -> torch.Tensor:
    """Gather ``a[t]`` and shape it [B, 1, 1, ...] to broadcast against ``x_shape``."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def noise_like(shape: tuple, device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``shape`` from torch's global generator."""
    return torch.randn(shape, device=device)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Switch activation checkpointing (``use_checkpoint``/``checkpoint`` flags) on every block; returns the count."""
    count = 0
    for module in model.modules():
        for attr in ("use_checkpoint", "checkpoint"):
            if isinstance(getattr(module, attr, None), bool):
                setattr(module, attr, enabled)
                count += 1
    return count
