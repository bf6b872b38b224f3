"""Diagonal Gaussian posterior of the KL autoencoder."""

from __future__ import annotations

import torch


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) from moments [B, 2C, H, W] split along channels (logvar clamped to [-30, 20])."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self) -> torch.Tensor:
        """mean + std * noise [B, C, H, W], the noise from torch's global generator."""
        noise = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean
