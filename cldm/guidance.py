"""Classifier-free guidance: the one place where conditional and unconditional predictions are made and mixed.

A :class:`CFGDenoiser` turns a latent diffusion model, its text conditioning and its controls into the function
``denoise(x, t, step, steps) -> eps`` that every sampler of :mod:`ldm.models.diffusion.sampling` takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from cldm.control import Control


class CFGDenoiser:
    """Guided noise prediction ``eps_u + scale * (eps_c - eps_u)`` (Ho & Salimans, arXiv 2207.12598).

    - ``model``: a ``LatentDiffusion`` or ``ControlLDM`` (its ``apply_model(x, t, cond, controls=...)``).
    - ``cond``/``uncond``: text contexts [B, 77, D] (``uncond`` None: no guidance, one pass per step).
    - ``controls``: the controls of the conditional pass; ``uncond_controls`` those of the unconditional pass
      (default: the controls whose ``uncond_hint`` is set).
    - ``batch_cfg``: run both passes as one batch of 2B rows (unconditional rows first) when they use the same
      controls; otherwise, or when off (the reference's schedule), two passes.
    """

    def __init__(
        self,
        model: nn.Module,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        scale: float = 1.0,
        controls: Sequence[Control] = (),
        uncond_controls: Sequence[Control] | None = None,
        batch_cfg: bool = True,
    ):
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)
        self.controls = list(controls)
        if uncond_controls is None:
            uncond_controls = [c for c in controls if c.uncond_hint]
        self.uncond_controls = list(uncond_controls)
        self.batch_cfg = batch_cfg

    def eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, controls: Sequence[Control]) -> torch.Tensor:
        """One unguided prediction: x [N, 4, h, w], t [N], context [N, 77, D] -> eps [N, 4, h, w]. A
        v-prediction model's output becomes eps here (linear in v for a given x, so guidance may mix either)."""
        out = self.model.apply_model(x, t, {"c_crossattn": [context]}, controls=controls)
        if getattr(self.model, "parameterization", "eps") == "v":
            out = self.model.predict_eps_from_z_and_v(x, t, out)
        return out

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int = 0, steps: int = 1) -> torch.Tensor:
        """eps [B, 4, h, w] for latents x [B, 4, h, w] at timesteps t [B], at step ``step`` of ``steps`` (which
        selects the controls whose window is open)."""
        controls = [c for c in self.controls if c.active(step, steps)]
        if self.uncond is None or self.scale == 1.0:
            return self.eps(x, t, self.cond, controls)
        uncond_controls = [c for c in self.uncond_controls if c.active(step, steps)]
        same = len(controls) == len(uncond_controls) and all(a is b for a, b in zip(controls, uncond_controls))
        if self.batch_cfg and same and self.cond.shape[1:] == self.uncond.shape[1:]:
            both = self.eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.uncond, self.cond]), controls)
            e_uncond, e_cond = both.chunk(2)
        else:
            e_cond = self.eps(x, t, self.cond, controls)
            e_uncond = self.eps(x, t, self.uncond, uncond_controls)
        return e_uncond + self.scale * (e_cond - e_uncond)
