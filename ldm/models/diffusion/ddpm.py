"""DDPM noise schedule and the latent diffusion model (keys match the reference ``ddpm.py``).

``LatentDiffusion`` holds the denoiser (``model.diffusion_model``), the frozen VAE
(``first_stage_model``) and the frozen text encoder (``cond_stage_model``), plus the schedule
buffers the reference checkpoints carry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import check_supported, instantiate_from_config, unsupported_parameter

SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``.train`` that keeps frozen sub-models in eval mode."""
    return self


def schedule_arrays(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    """The float64 schedule the reference registers as buffers, each [T]."""
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
        1.0 - alphas_cumprod
    ) + v_posterior * betas
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }


class DiffusionWrapper(nn.Module):
    """Holds the denoiser as ``diffusion_model`` (so keys read ``model.diffusion_model.*``); cross-attention
    conditioning (the reference's ``conditioning_key: crossattn``)."""

    def __init__(self, diff_model_config: Mapping[str, Any]):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_crossattn: list[torch.Tensor]) -> torch.Tensor:
        """eps [B, C, h, w] for x [B, C, h, w] at t [B]; the text contexts [B, L, D] are joined along L."""
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class DDPM(pl.LightningModule):
    """Diffusion with a fixed beta schedule, conditioned through cross-attention. The network predicts the noise
    (``parameterization: eps``, SD1.x, SD2.1-base) or the velocity ``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0``
    (``parameterization: v``, SD2.x 768-v; Salimans & Ho, arXiv 2202.00512); samplers get eps either way
    (:meth:`predict_eps_from_z_and_v`, applied by ``cldm.guidance.CFGDenoiser``).

    The reference's parameters are accepted. Those selecting something this project does not implement (EMA
    weights, checkpoint loading at construction, other parameterizations or conditionings, a learnt logvar, an
    LR scheduler, the VLB loss term) raise ``ValueError`` naming the parameter unless they keep their default
    (:func:`ldm.util.check_supported`). ``image_size``, ``monitor``, ``log_every_t`` and ``clip_denoised`` only serve
    the reference's training script and ancestral sampler, which are not part of this project: any value is accepted.
    """

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        load_only_unet: bool = False,
        monitor: str = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Any = None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        scheduler_config: Any = None,
        use_positional_encodings: bool = False,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        make_it_fit: bool = False,
        ucg_training: Any = None,
        reset_ema: bool = False,
        reset_num_ema_updates: bool = False,
    ):
        super().__init__()
        owner = type(self).__name__
        check_supported(owner, "parameterization", parameterization, "eps", "v")
        check_supported(owner, "conditioning_key", conditioning_key, "crossattn")
        check_supported(owner, "use_ema", use_ema, False)
        check_supported(owner, "ckpt_path", ckpt_path, None, hint="load checkpoints with cldm.model.load_state_dict")
        for name, value, default in (
            ("ignore_keys", ignore_keys, ()),
            ("load_only_unet", load_only_unet, False),
            ("make_it_fit", make_it_fit, False),
            ("reset_ema", reset_ema, False),
            ("reset_num_ema_updates", reset_num_ema_updates, False),
            ("scheduler_config", scheduler_config, None),
            ("use_positional_encodings", use_positional_encodings, False),
            ("learn_logvar", learn_logvar, False),
            ("original_elbo_weight", original_elbo_weight, 0.0),
        ):
            check_supported(owner, name, value, default)
        check_supported(owner, "loss_type", loss_type, "l2", "l1")
        self.parameterization = parameterization  # the reference's attribute, which samplers read
        self.first_stage_key = first_stage_key
        self.channels = channels
        self.loss_type = loss_type
        self.l_simple_weight = l_simple_weight
        self.ucg_training = dict(ucg_training or {})
        self.ucg_prng = np.random.RandomState()
        self.ucg_seed: int | None = None  # when set, each process draws its drops from ucg_seed + its rank
        self.model = DiffusionWrapper(unet_config)
        betas = np.asarray(given_betas) if given_betas is not None else make_beta_schedule(
            beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s
        )
        self.register_schedule(betas, v_posterior)
        self.register_buffer("logvar", torch.full((self.num_timesteps,), float(logvar_init), device="cpu"))

    def register_schedule(self, betas: np.ndarray, v_posterior: float = 0.0) -> None:
        """Register the float32 schedule buffers (on CPU, even when built on the meta device)."""
        self.num_timesteps = int(betas.shape[0])
        for name, value in schedule_arrays(betas, v_posterior).items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32, device="cpu"))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module``'s, but the schedule buffers (:data:`SCHEDULE_BUFFERS`) always keep the model's own
        values, computed from the config in float64 and stored in float32: a file's copies are ignored (they may
        be absent, or rounded to half precision, where bfloat16 turns ``alphas_cumprod`` into 1.0 and the last
        DDIM step into NaN). The config is the truth, so nothing is said when a file's values differ."""
        own = {name: getattr(self, name) for name in SCHEDULE_BUFFERS}
        return super().load_state_dict({**state_dict, **own}, strict=strict, assign=assign)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse x_0 to x_t: sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def _signal_noise(self, t: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) at t [B], broadcastable to ``shape``."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, shape),
                extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, shape))  # fmt: skip

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity target of x_0 = ``x`` and ``noise`` [B, C, h, w] at t [B]: sqrt(a_t) noise - sqrt(1 - a_t) x."""
        signal, sigma = self._signal_noise(t, x.shape)
        return signal * noise - sigma * x

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The noise of latents x_t [B, C, h, w] at t [B] with velocity v: sqrt(a_t) v + sqrt(1 - a_t) x_t."""
        signal, sigma = self._signal_noise(t, x_t.shape)
        return signal * v + sigma * x_t

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 of latents x_t [B, C, h, w] at t [B] with velocity v: sqrt(a_t) x_t - sqrt(1 - a_t) v."""
        signal, sigma = self._signal_noise(t, x_t.shape)
        return signal * x_t - sigma * v

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Element-wise loss (``l2`` or ``l1``), not reduced."""
        if self.loss_type == "l2":
            return torch.nn.functional.mse_loss(target, pred, reduction="none")
        return (target - pred).abs()

    def p_losses(
        self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reference's training loss at timesteps t [B] for clean latents x_start [B, C, h, w].

        loss = l_simple_weight * mean(||target - model(x_t, t, c)||^2 / exp(logvar_t) + logvar_t) (the reference's
        loss with ``original_elbo_weight = 0``); the target is the noise, or its velocity (:meth:`get_v`) for
        ``parameterization: v``.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = self.get_v(x_start, noise, t) if self.parameterization == "v" else noise
        loss_simple = self.get_loss(model_output, target).mean(dim=(1, 2, 3))
        logvar_t = self.logvar.to(loss_simple.device)[t]
        loss = self.l_simple_weight * (loss_simple / torch.exp(logvar_t) + logvar_t).mean()
        prefix = "train" if self.training else "val"
        return loss, {f"{prefix}/loss_simple": loss_simple.mean().detach(), f"{prefix}/loss": loss.detach()}

    def apply_ucg(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Unconditional-guidance training: replace ``batch[k][i]`` by ``val`` with probability ``p``.

        ``ucg_training`` maps a batch key to ``{"p": ..., "val": ...}``, e.g. ``{"txt": {"p": 0.5,
        "val": ""}}`` for the paper's 50% empty prompts. Returns a new batch; the input is not changed.
        """
        if not self.ucg_training:
            return batch
        batch = dict(batch)
        for key, spec in self.ucg_training.items():
            p, val = float(spec["p"]), spec["val"]
            values = list(batch[key])
            for i in range(len(values)):
                if self.ucg_prng.choice(2, p=[1 - p, p]):
                    values[i] = val
            batch[key] = values
        return batch

    def on_train_start(self) -> None:
        if self.ucg_seed is not None:
            self.ucg_prng = np.random.RandomState(self.ucg_seed + self.global_rank)

    def shared_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, c = self.get_input(batch, self.first_stage_key)
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device).long()
        return self.p_losses(x, c, t)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, loss_dict = self.shared_step(self.apply_ucg(batch))
        batch_size = len(batch[self.first_stage_key])
        self.log_dict(loss_dict, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss


class LatentDiffusion(DDPM):
    """DDPM in the VAE's latent space, conditioned on text through cross-attention.

    Reference parameters that select something this project does not implement (a trainable or unconditional cond
    stage, ``cond_stage_forward``, ``scale_by_std``, ``num_timesteps_cond`` > 1, concat conditioning) raise
    ``ValueError`` naming the parameter unless they keep their default (:func:`ldm.util.check_supported`).
    """

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any],
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        force_null_conditioning: bool = False,
        *args: Any,
        **kwargs: Any,
    ):
        owner = type(self).__name__
        check_supported(owner, "num_timesteps_cond", num_timesteps_cond, None, 1)
        check_supported(owner, "cond_stage_trainable", cond_stage_trainable, False)
        check_supported(owner, "cond_stage_forward", cond_stage_forward, None)
        check_supported(owner, "scale_by_std", scale_by_std, False, hint="give scale_factor in the config")
        check_supported(owner, "force_null_conditioning", force_null_conditioning, False)
        for name, config in (("first_stage_config", first_stage_config), ("cond_stage_config", cond_stage_config)):
            if isinstance(config, str):  # the reference's "__is_first_stage__" / "__is_unconditional__"
                raise unsupported_parameter(owner, name, config, "a config with a target")
        if conditioning_key is None:  # the reference derives it from concat_mode
            check_supported(owner, "concat_mode", concat_mode, False, hint="set conditioning_key: crossattn")
            conditioning_key = "crossattn"
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.cond_stage_key = cond_stage_key
        self.scale_factor = scale_factor
        self.first_stage_model = self._frozen(instantiate_from_config(first_stage_config))
        self.decode_channels_last = True  # a public switch (the fast path's default), set by cldm.inference.use_path
        self.cond_stage_model = self._frozen(instantiate_from_config(cond_stage_config))

    @staticmethod
    def _frozen(model: nn.Module) -> nn.Module:
        model = model.eval()
        model.train = disabled_train.__get__(model)
        for p in model.parameters():
            p.requires_grad = False
        return model

    @torch.no_grad()
    def get_input(
        self, batch: dict[str, Any], k: str, bs: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents z [B, 4, H/8, W/8] of ``batch[k]`` (images [B, H, W, 3] in [-1, 1]) and text embeddings."""
        x = batch[k][:bs] if bs is not None else batch[k]
        x = torch.as_tensor(x).to(self.device).permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        prompts = list(batch[self.cond_stage_key])
        c = self.get_learned_conditioning(prompts[:bs] if bs is not None else prompts)
        return z, c

    def get_learned_conditioning(self, c: list[str]) -> torch.Tensor:
        """Prompts -> text embeddings [B, 77, context_dim]."""
        return self.cond_stage_model.encode(c)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: DiagonalGaussianDistribution | torch.Tensor) -> torch.Tensor:
        """Scaled latent z [B, 4, H/8, W/8] from the VAE posterior (a sample) or a tensor."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        else:
            z = encoder_posterior
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B, 4, h, w] -> image [B, 3, 8h, 8w], roughly in [-1, 1]."""
        z = z / self.scale_factor
        if self.decode_channels_last:
            z = z.contiguous(memory_format=torch.channels_last)  # activations stay channels-last through the decoder
        return self.first_stage_model.decode(z)

    def apply_model(
        self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, controls: Sequence[Any] = ()
    ) -> torch.Tensor:
        """eps [B, 4, h, w] for x_noisy [B, 4, h, w] at t [B]; ``cond``: a text context [B, 77, D], a list of them,
        or ``{"c_crossattn": [...]}``. ``ValueError`` for ``controls``: this model has no ControlNet."""
        if controls:
            raise ValueError("this model has no ControlNet (a LatentDiffusion config): it takes no controls")
        if not isinstance(cond, dict):
            cond = {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        return self.model(x_noisy, t, c_crossattn=cond["c_crossattn"])
