"""``DDIMSampler``: the reference's sampler signature over :func:`ldm.models.diffusion.sampling.sample_ddim`.

Users' reference-style scripts (``DDIMSampler(model).sample(S, batch_size, shape, cond, ...)`` with
``{"c_concat": [hint], "c_crossattn": [text]}`` dicts and ``model.control_scales``) keep working; a seed gives the
reference's image. The conditioning dicts become a :class:`cldm.guidance.CFGDenoiser` with :class:`cldm.control.Control`
objects; how the work is scheduled (hint encoded once, both guidance passes in one batch) follows the model's
inference path (``cldm.inference.use_path``; the fast path unless the reference's schedule is asked for).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cldm.control import Control
from cldm.guidance import CFGDenoiser
from ldm.models.diffusion.sampling import DDIMSchedule, ddim_schedule, sample_ddim
from ldm.util import check_supported

Cond = Any  # a tensor, a list of tensors, or a dict of lists as in the reference
# Parameters of the reference's DDIMSampler.sample (cldm/ddim_hacked.py) that this sampler does not implement.
UNSUPPORTED_SAMPLE_PARAMETERS = ("normals_sequence", "quantize_x0", "score_corrector", "corrector_kwargs",
                                 "dynamic_threshold", "ucg_schedule")  # fmt: skip


def _context(c: Cond) -> torch.Tensor | None:
    """The text context [B, 77, D] of a reference conditioning (dict, list or tensor)."""
    if c is None:
        return None
    if isinstance(c, dict):
        c = c["c_crossattn"]
    return torch.cat(c, 1) if isinstance(c, list) else c


def _hint(c: Cond) -> list[torch.Tensor] | None:
    return c.get("c_concat") if isinstance(c, dict) else None


class DDIMSampler:
    """``DDIMSampler(model).sample(S, batch_size, shape, cond, ...)`` as in the reference.

    ``reuse_hint`` (encode the ControlNet hint once per run) and ``batch_cfg`` (one batched pass for the conditional
    and unconditional predictions) follow the model's inference path at each ``sample`` call
    (``model.inference_path``, the fast path when unset) unless given; turning them off gives the reference's
    schedule of work. Other reference constructor arguments (``schedule``) are accepted with their reference
    values only.
    """

    def __init__(self, model: Any, schedule: str = "linear", reuse_hint: bool | None = None,
                 batch_cfg: bool | None = None):  # fmt: skip
        check_supported("DDIMSampler", "schedule", schedule, "linear")
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.reuse_hint = reuse_hint
        self.batch_cfg = batch_cfg
        self.ddim: DDIMSchedule | None = None

    def _follows_path(self, name: str) -> bool:
        """The sampler's own setting ``name`` if given, else the model's current inference path's (fast: True)."""
        own = getattr(self, name)
        return own if own is not None else getattr(getattr(self.model, "inference_path", None), name, True)

    @property
    def device(self) -> torch.device:
        return self.model.betas.device

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = False) -> None:  # fmt: skip
        """Pick the DDIM timesteps and coefficients (``ddim_timesteps``, ``ddim_alphas``, ``ddim_alphas_prev``,
        ``ddim_sigmas``, ``ddim_sqrt_one_minus_alphas``: float32 on the model's device), as the reference."""
        self.ddim = ddim_schedule(self.model.alphas_cumprod, ddim_num_steps, ddim_eta, ddim_discretize)
        self.ddim_timesteps = self.ddim.timesteps
        self.ddim_alphas, self.ddim_alphas_prev = self.ddim.alphas, self.ddim.alphas_prev
        self.ddim_sigmas, self.ddim_sqrt_one_minus_alphas = self.ddim.sigmas, self.ddim.sqrt_one_minus_alphas

    def denoiser(
        self, conditioning: Cond, unconditional_conditioning: Cond = None, scale: float = 1.0
    ) -> CFGDenoiser:
        """The :class:`cldm.guidance.CFGDenoiser` of reference conditionings: each ``c_concat`` hint becomes a
        :class:`cldm.control.Control` with ``model.control_scales``; the unconditional pass shares the conditional
        pass's control when its ``c_concat`` holds the very same tensors, gets its own for other tensors, and none
        for ``None``."""
        def control(hints: list[torch.Tensor] | None) -> list[Control]:
            if hints is None:
                return []
            return [Control(self.model.control_model, torch.cat(hints, 1), self.model.control_scales,
                            cache=self._follows_path("reuse_hint"))]  # fmt: skip

        hint, uc_hint = _hint(conditioning), _hint(unconditional_conditioning)
        controls = control(hint)
        same = hint is not None and uc_hint is not None and len(hint) == len(uc_hint) and all(
            a is b for a, b in zip(hint, uc_hint)
        )
        uncond_controls = controls if same else control(uc_hint)
        return CFGDenoiser(self.model, _context(conditioning), _context(unconditional_conditioning), scale, controls,
                           uncond_controls, batch_cfg=self._follows_path("batch_cfg"))  # fmt: skip

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
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        progress: bool = True,
        **unsupported: Any,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample latents [batch_size, *shape] from noise in S DDIM steps.

        Returns ``(samples, {"x_inter": [...], "pred_x0": [...]})`` like the reference. ``progress`` shows a tqdm
        bar over the steps; ``callback(i)`` runs after each step. ``mask`` (broadcastable to the latents, 1 = keep)
        with ``x0`` (clean latents [batch_size, *shape]): ldm's inpainting, before each step ``x = q_sample(x0, t)
        * mask + (1 - mask) * x`` with fresh noise from torch's global generator (the last step's result is not
        blended); one without the other raises ``ValueError``. A reference parameter this sampler does not
        implement (:data:`UNSUPPORTED_SAMPLE_PARAMETERS`: ``quantize_x0``, ...) raises ``ValueError`` naming it when
        given a value other than None or False (:func:`ldm.util.check_supported`); any other unknown keyword raises
        ``TypeError``, as a misspelt argument does.
        """
        unknown = sorted(set(unsupported) - set(UNSUPPORTED_SAMPLE_PARAMETERS))
        if unknown:
            raise TypeError(f"DDIMSampler.sample() got unexpected keyword arguments: {', '.join(unknown)}")
        for name in sorted(unsupported):
            check_supported("DDIMSampler.sample", name, unsupported[name], None, False)
        if (mask is None) != (x0 is None):
            raise ValueError("DDIMSampler.sample: mask and x0 go together (ldm's inpainting: mask 1 = keep x0)")
        keep = None
        if mask is not None:

            def keep(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self.model.q_sample(x0, t, torch.randn_like(x0)) * mask + (1.0 - mask) * x

        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        denoise = self.denoiser(conditioning, unconditional_conditioning, unconditional_guidance_scale)
        x = torch.randn((batch_size, *shape), device=self.device) if x_T is None else x_T
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": [x]}
        total = len(self.ddim_timesteps)

        def on_step(i: int, x_i: torch.Tensor, pred_x0: torch.Tensor) -> None:
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            index = total - i - 1
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(x_i)
                intermediates["pred_x0"].append(pred_x0)

        samples = sample_ddim(denoise, x, self.model.alphas_cumprod, S, eta=eta, temperature=temperature,
                              noise_dropout=noise_dropout, before_step=keep, callback=on_step,
                              progress=progress)  # fmt: skip
        return samples, intermediates
