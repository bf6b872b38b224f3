"""What one ControlNet needs for a sampling run, as an argument (never model state).

A :class:`Control` holds a ControlNet module, its hint image, per-block control scales (strength, or the guess-mode
ramp), whether the unconditional pass of classifier-free guidance gets it, and a step window. Several controls add
their residuals (:func:`control_residuals`), as diffusers' ``MultiControlNetModel`` does; the UNet takes the sum as
a plain forward argument (``ControlledUnetModel.forward(..., control=residuals)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

NUM_CONTROLS = 13  # SD's 12 encoder skips + the middle block (reference cldm/cldm.py)
GUESS_MODE_DECAY = 0.825  # reference gradio_canny2image.py: scales = strength * 0.825 ** (12 - i) in guess mode


def control_scales_for(strength: float, guess_mode: bool, n: int = NUM_CONTROLS) -> list[float]:
    """Per-block control scales: ``strength`` everywhere, or the reference's guess-mode ramp
    ``strength * 0.825 ** (12 - i)`` (deep blocks strong, shallow blocks weak)."""
    if guess_mode:
        return [strength * GUESS_MODE_DECAY ** float(n - 1 - i) for i in range(n)]
    return [strength] * n


@dataclass(eq=False)
class Control:
    """One ControlNet's part in a sampling run.

    - ``model``: the ControlNet (``cldm.cldm.ControlNet``: ``encode_hint`` and ``forward``).
    - ``hint``: [B, hint_channels, 8h, 8w] float in [0, 1] (B: the latent batch, or 1 to serve every row).
    - ``scales``: 13 per-block multipliers (:func:`control_scales_for`).
    - ``uncond_hint``: whether the unconditional pass of classifier-free guidance gets the control too (the
      reference: yes, except in guess mode).
    - ``start``/``end``: the step window as fractions of the run, with diffusers' semantics
      (``control_guidance_start/end``): step i of n runs the ControlNet when ``i / n >= start`` and
      ``(i + 1) / n <= end``; outside it the ControlNet is not run at all.
    - ``cache``: encode the hint once per run (the project's default) or at every call (the reference's schedule).

    Raises ``ValueError`` for a hint that is not 4-D, scales of the wrong length, or a window outside [0, 1].
    """

    model: nn.Module
    hint: torch.Tensor
    scales: Sequence[float] = field(default_factory=lambda: [1.0] * NUM_CONTROLS)
    uncond_hint: bool = True
    start: float = 0.0
    end: float = 1.0
    cache: bool = True
    _encoded: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.hint.dim() != 4:
            raise ValueError(f"control hint must be [B, C, H, W], got shape {tuple(self.hint.shape)}")
        if len(self.scales) != NUM_CONTROLS:
            raise ValueError(f"control scales need {NUM_CONTROLS} values, got {len(self.scales)}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"control window needs 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        self.scales = [float(s) for s in self.scales]

    @classmethod
    def from_strength(
        cls, model: nn.Module, hint: torch.Tensor, strength: float = 1.0, guess_mode: bool = False,
        uncond_hint: bool = True, **window: float | bool,
    ) -> Control:  # fmt: skip
        """The reference demo's control: scales from ``strength`` and ``guess_mode``; the unconditional pass gets it
        when ``uncond_hint`` and not in guess mode. ``window``: ``start``, ``end``, ``cache``."""
        scales = control_scales_for(strength, guess_mode)
        return cls(model, hint, scales, uncond_hint=uncond_hint and not guess_mode, **window)  # type: ignore[arg-type]

    def active(self, step: int, steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``steps`` lies in the window."""
        return step / steps >= self.start and (step + 1) / steps <= self.end

    def encoded_hint(self) -> torch.Tensor | None:
        """The hint through the ControlNet's hint encoder, [B, model_channels, h, w], kept for the run (``cache``);
        None when ``cache`` is off (the ControlNet then encodes it at every call)."""
        if not self.cache:
            return None
        if self._encoded is None:
            self._encoded = self.model.encode_hint(self.hint)
        return self._encoded

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        """The 13 scaled residuals for latents x [N, 4, h, w] at timesteps t [N] with text context [N, 77, D].

        N may be a multiple of the hint's batch (a batched guidance pass): the hint rows are repeated to match.
        """
        hint, guided = self.hint, self.encoded_hint()
        reps = x.shape[0] // hint.shape[0]
        if reps * hint.shape[0] != x.shape[0]:
            raise ValueError(f"latent batch {x.shape[0]} is not a multiple of the hint batch {hint.shape[0]}")
        if reps > 1:
            hint = torch.cat([hint] * reps)
            guided = torch.cat([guided] * reps) if guided is not None else None
        outs = self.model(x=x, hint=hint, timesteps=t, context=context, guided_hint=guided)
        return [out * scale for out, scale in zip(outs, self.scales)]


def control_residuals(
    controls: Sequence[Control], x: torch.Tensor, t: torch.Tensor, context: torch.Tensor
) -> list[torch.Tensor] | None:
    """Sum of the controls' residuals (13 tensors), or None without controls: the UNet then runs uncontrolled."""
    total: list[torch.Tensor] | None = None
    for control in controls:
        res = control.residuals(x, t, context)
        total = res if total is None else [a + b for a, b in zip(total, res)]
    return total
