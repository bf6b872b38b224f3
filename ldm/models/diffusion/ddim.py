"""DDIM sampler with classifier-free guidance: the one sampler of this project.

Behaves as the reference's ``cldm/ddim_hacked.py`` (same timesteps, same update, same random
draws per step, so a seed gives the reference's image) with three exact savings: the ControlNet
hint is encoded once per run, the conditional and unconditional passes run as one batch
when they share the same kind of conditioning, and in that batch the work before the first
cross-attention (which depends only on x, t and the hint, the same for both halves) runs once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.modules.diffusionmodules.util import (
    expand_batch,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    noise_like,
)

Cond = Any  # a tensor, a list of tensors, or a dict of lists as in the reference


def _cat_cond(c: Cond, uc: Cond) -> Cond:
    """Stack conditional and unconditional conditioning along the batch (uncond first)."""
    if isinstance(c, dict):
        return {k: _cat_cond(c[k], uc[k]) for k in c}
    if isinstance(c, list):
        return [torch.cat([u, ci]) for ci, u in zip(c, uc)]
    return torch.cat([uc, c])


def _same_structure(c: Cond, uc: Cond) -> bool:
    """True when c and uc can be batched: same dict keys with no ``None`` values, or same type."""
    if isinstance(c, dict):
        return (
            isinstance(uc, dict)
            and c.keys() == uc.keys()
            and all(c[k] is not None and uc[k] is not None and _same_structure(c[k], uc[k]) for k in c)
        )
    if isinstance(c, list):
        return isinstance(uc, list) and len(c) == len(uc)
    return isinstance(c, torch.Tensor) and isinstance(uc, torch.Tensor)


class DDIMSampler:
    """``DDIMSampler(model).sample(S, batch_size, shape, cond, ...)`` as in the reference.

    ``reuse_hint`` (encode the ControlNet hint once per run), ``batch_cfg`` (one batched pass for
    the conditional and unconditional predictions) and ``share_prefix`` (in that pass, x, t and a
    shared hint go in once, and the model tiles its rows at the first layer that reads the text) are
    exact savings; turning them off gives the reference's schedule of work.
    """

    def __init__(self, model: Any, schedule: str = "linear", reuse_hint: bool = True, batch_cfg: bool = True,
                 share_prefix: bool = True, **kwargs: Any):  # fmt: skip
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.reuse_hint = reuse_hint
        self.batch_cfg = batch_cfg
        self.share_prefix = share_prefix

    @property
    def device(self) -> torch.device:
        return self.model.betas.device

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = False) -> None:  # fmt: skip
        """Pick the DDIM timesteps and per-step coefficients (float32 on the model's device)."""
        if ddim_num_steps < 1 or ddim_num_steps > self.ddpm_num_timesteps:
            raise ValueError(f"ddim steps must be in [1, {self.ddpm_num_timesteps}], got {ddim_num_steps}")
        self.ddim_timesteps = make_ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps, ddim_discretize)
        alphacums = self.model.alphas_cumprod.detach().cpu().double().numpy().astype(np.float32)
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphacums, self.ddim_timesteps, ddim_eta)

        def to_torch(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32, device=self.device)

        self.ddim_sigmas = to_torch(sigmas)
        self.ddim_alphas = to_torch(alphas)
        self.ddim_alphas_prev = to_torch(alphas_prev)
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - self.ddim_alphas)

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: Cond = None,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        eta: float = 0.0,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Cond = None,
        progress: bool = True,
        **unsupported: Any,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample latents [batch_size, *shape] from noise in S DDIM steps.

        Returns ``(samples, {"x_inter": [...], "pred_x0": [...]})`` like the reference. ``progress``
        shows a tqdm bar over the steps; ``callback(i)`` runs after each step.
        """
        used = {k: v for k, v in unsupported.items() if v not in (None, False, 0, 0.0)}
        if used:
            raise NotImplementedError(f"DDIMSampler.sample does not support: {', '.join(sorted(used))}")
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        prepare = getattr(self.model, "prepare_conditioning", None)
        if prepare is not None and self.reuse_hint:
            conditioning = prepare(conditioning)
            unconditional_conditioning = self._reuse_hint(conditioning, unconditional_conditioning)
            unconditional_conditioning = prepare(unconditional_conditioning)
        x = torch.randn((batch_size, *shape), device=self.device) if x_T is None else x_T
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": [x]}
        timesteps = np.flip(self.ddim_timesteps)
        total = len(timesteps)
        for i, step in enumerate(tqdm(timesteps, desc="DDIM Sampler", total=total, disable=not progress)):
            index = total - i - 1
            ts = torch.full((batch_size,), int(step), device=self.device, dtype=torch.long)
            x, pred_x0 = self.p_sample_ddim(
                x, conditioning, ts, index, temperature=temperature, noise_dropout=noise_dropout,
                unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning,
            )  # fmt: skip
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
        return x, intermediates

    @staticmethod
    def _reuse_hint(c: Cond, uc: Cond) -> Cond:
        """Give ``uc`` the already-encoded hint of ``c`` when both use the very same hint tensors."""
        if not (isinstance(c, dict) and isinstance(uc, dict) and "c_guided_hint" in c):
            return uc
        same = uc.get("c_concat") is not None and len(uc["c_concat"]) == len(c["c_concat"]) and all(
            a is b for a, b in zip(uc["c_concat"], c["c_concat"])
        )
        return {**uc, "c_guided_hint": c["c_guided_hint"]} if same else uc

    def predict_eps(self, x: torch.Tensor, c: Cond, t: torch.Tensor, scale: float, uc: Cond) -> torch.Tensor:
        """Classifier-free guided eps: uncond + scale * (cond - uncond). x [B, 4, h, w]."""
        if uc is None or scale == 1.0:
            return self.model.apply_model(x, t, c)
        if self.batch_cfg and _same_structure(c, uc):
            both = _cat_cond(c, uc)
            if self.share_prefix:
                if isinstance(c, dict) and "c_guided_hint" in c and uc.get("c_guided_hint") is c["c_guided_hint"]:
                    both["c_guided_hint"] = c["c_guided_hint"]  # one copy for both halves
                e_both = expand_batch(self.model.apply_model(x, t, both), 2 * x.shape[0])
            else:
                e_both = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), both)
            e_uncond, e_cond = e_both.chunk(2)
        else:
            e_cond = self.model.apply_model(x, t, c)
            e_uncond = self.model.apply_model(x, t, uc)
        return e_uncond + scale * (e_cond - e_uncond)

    def p_sample_ddim(
        self,
        x: torch.Tensor,
        c: Cond,
        t: torch.Tensor,
        index: int,
        repeat_noise: bool = False,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Cond = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update x_t -> x_{t-1}; returns ``(x_prev, pred_x0)``."""
        b = x.shape[0]
        e_t = self.predict_eps(x, c, t, unconditional_guidance_scale, unconditional_conditioning)

        def at(a: torch.Tensor) -> torch.Tensor:
            return torch.full((b, 1, 1, 1), float(a[index]), device=x.device, dtype=torch.float32)

        a_t, a_prev = at(self.ddim_alphas), at(self.ddim_alphas_prev)
        sigma_t, sqrt_one_minus_at = at(self.ddim_sigmas), at(self.ddim_sqrt_one_minus_alphas)
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        noise = sigma_t * noise_like(x.shape, x.device, repeat_noise) * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0
