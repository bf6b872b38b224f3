"""The KL-regularised autoencoder (``first_stage_model``) of latent diffusion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import check_supported


class AutoencoderKL(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] <-> latent [B, embed_dim, H/8, W/8] (for SD's 4-level config).

    Inference-only port: the reference's VAE training (its GAN/perceptual loss, EMA, learnt logvar, checkpoint
    loading at construction) is not carried. Those parameters raise ``ValueError`` naming the parameter unless they
    keep their defaults, and ``lossconfig`` must be ``torch.nn.Identity``, as in SD's inference configs
    (:func:`ldm.util.check_supported`). ``image_key`` and ``monitor`` only serve that training: any value is accepted.
    """

    nested_params = {"ddconfig": (Encoder, Decoder)}  # ddconfig's keys go to both (ldm.util.check_config reads it)

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        ema_decay: float | None = None,
        learn_logvar: bool = False,
    ):
        super().__init__()
        owner = type(self).__name__
        check_supported(owner, "ckpt_path", ckpt_path, None, hint="load the whole model's checkpoint instead")
        check_supported(owner, "ignore_keys", ignore_keys, ())
        check_supported(owner, "colorize_nlabels", colorize_nlabels, None)
        check_supported(owner, "ema_decay", ema_decay, None)
        check_supported(owner, "learn_logvar", learn_logvar, False)
        check_supported(owner, "lossconfig.target", lossconfig.get("target"), "torch.nn.Identity")
        check_supported(owner, "ddconfig.double_z", ddconfig.get("double_z", True), True)
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
