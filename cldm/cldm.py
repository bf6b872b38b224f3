"""ControlNet (arXiv 2302.05543): a trainable copy of the SD encoder steering a locked UNet.

Keys and behaviour match the reference ``cldm/cldm.py``: ``control_model.input_hint_block``
(the condition encoder), ``control_model.input_blocks``/``middle_block`` (the copy),
``control_model.zero_convs``/``middle_block_out`` (1x1 convs initialised to zero).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.diffusionmodules.openaimodel import (
    TimestepEmbedSequential,
    UNetConfig,
    UNetModel,
    build_encoder,
    embed_time,
)
from ldm.modules.diffusionmodules.util import conv_nd, zero_module
from ldm.util import instantiate_from_config

GUESS_MODE_DECAY = 0.825


def control_scales_for(strength: float, guess_mode: bool, n: int = 13) -> list[float]:
    """Per-block control scales: ``strength`` everywhere, or the reference's guess-mode ramp
    ``strength * 0.825 ** (12 - i)`` (deep blocks strong, shallow blocks weak)."""
    if guess_mode:
        return [strength * GUESS_MODE_DECAY ** float(n - 1 - i) for i in range(n)]
    return [strength] * n


class ControlledUnetModel(UNetModel):
    """The locked SD UNet, with ControlNet residuals added to its skips and middle block."""

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        control: list[torch.Tensor] | None = None,
        only_mid_control: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        """x [B, 4, h, w]; control: 13 residuals (12 skips then middle), or None -> eps [B, 4, h, w]."""
        control = list(control) if control is not None else None
        hs = []
        with torch.no_grad():
            emb = self.embed_time(timesteps)
            h = x.type(self.dtype)
            for module in self.input_blocks:
                h = module(h, emb, context)
                hs.append(h)
            h = self.middle_block(h, emb, context)
        if control is not None:
            h = h + control.pop()
        for module in self.output_blocks:
            skip = hs.pop()
            if control is not None and not only_mid_control:
                skip = skip + control.pop()
            h = module(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h.type(x.dtype))


class ControlNet(nn.Module):
    """Trainable encoder copy fed with a hint image; returns 13 zero-conv outputs.

    hint [B, hint_channels, 8h, 8w] is encoded by ``input_hint_block`` to [B, model_channels, h, w]
    (convs 16-32-96-256, stride 2 three times) and added after the first input block.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        hint_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | Sequence[int] | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
    ):
        super().__init__()
        cfg = UNetConfig(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult, conv_resample,
            dims, use_checkpoint, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown,
            use_spatial_transformer, transformer_depth, context_dim, legacy, disable_self_attentions,
            num_attention_blocks, disable_middle_self_attn, use_linear_in_transformer,
        )  # fmt: skip
        self.dims = dims
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.time_embed = cfg.time_embed()
        self.input_hint_block = self._hint_block(dims, hint_channels, model_channels)
        self.input_blocks, self.middle_block, chans = build_encoder(cfg)
        self.zero_convs = nn.ModuleList(self.make_zero_conv(ch) for ch in chans)
        self.middle_block_out = self.make_zero_conv(chans[-1])

    @staticmethod
    def _hint_block(dims: int, hint_channels: int, model_channels: int) -> TimestepEmbedSequential:
        widths = [(hint_channels, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2)]
        layers: list[nn.Module] = []
        for c_in, c_out, stride in widths:
            layers += [conv_nd(dims, c_in, c_out, 3, padding=1, stride=stride), nn.SiLU()]
        layers.append(zero_module(conv_nd(dims, 256, model_channels, 3, padding=1)))
        return TimestepEmbedSequential(*layers)

    def make_zero_conv(self, channels: int) -> TimestepEmbedSequential:
        return TimestepEmbedSequential(zero_module(conv_nd(self.dims, channels, channels, 1, padding=0)))

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """hint [B, 3, 8h, 8w] in [0, 1] -> guided hint [B, model_channels, h, w] (independent of t)."""
        return self.input_hint_block(hint.type(self.dtype), None, None)

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor | None,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        guided_hint: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        """x [B, 4, h, w] -> 13 residuals; pass ``guided_hint`` (from :meth:`encode_hint`) to skip the hint encoder."""
        if guided_hint is None:
            guided_hint = self.encode_hint(hint)
        emb = embed_time(self.time_embed, timesteps, self.model_channels)
        outs = []
        h = x.type(self.dtype)
        for i, (module, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = module(h, emb, context)
            if i == 0:
                h = h + guided_hint
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


class ControlLDM(LatentDiffusion):
    """Latent diffusion with a ControlNet branch.

    ``cond`` dicts follow the reference: ``{"c_crossattn": [text emb], "c_concat": [hint] or None}``;
    a ``"c_guided_hint"`` entry (see :meth:`prepare_conditioning`) skips re-encoding the hint.
    """

    def __init__(
        self,
        control_stage_config: Mapping[str, Any],
        control_key: str,
        only_mid_control: bool,
        *args: Any,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.control_model = instantiate_from_config(control_stage_config)
        self.control_key = control_key
        self.only_mid_control = only_mid_control
        self.control_scales = [1.0] * 13

    def prepare_conditioning(self, cond: dict[str, Any] | None) -> dict[str, Any] | None:
        """Return ``cond`` with the hint encoded once (``c_guided_hint``), for a whole sampling run."""
        if not isinstance(cond, dict) or cond.get("c_concat") is None or "c_guided_hint" in cond:
            return cond
        hint = torch.cat(cond["c_concat"], 1)
        return {**cond, "c_guided_hint": self.control_model.encode_hint(hint)}

    def apply_model(
        self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """eps prediction [B, 4, h, w] of the locked UNet plus the scaled ControlNet residuals."""
        if not isinstance(cond, dict):
            raise TypeError("ControlLDM.apply_model expects a cond dict with 'c_crossattn' and 'c_concat'")
        diffusion_model = self.model.diffusion_model
        cond_txt = torch.cat(cond["c_crossattn"], 1)
        if cond.get("c_concat") is None:
            return diffusion_model(x=x_noisy, timesteps=t, context=cond_txt, control=None,
                                   only_mid_control=self.only_mid_control)  # fmt: skip
        hint = torch.cat(cond["c_concat"], 1)
        control = self.control_model(x=x_noisy, hint=hint, timesteps=t, context=cond_txt,
                                     guided_hint=cond.get("c_guided_hint"))  # fmt: skip
        control = [c * scale for c, scale in zip(control, self.control_scales)]
        return diffusion_model(x=x_noisy, timesteps=t, context=cond_txt, control=control,
                               only_mid_control=self.only_mid_control)  # fmt: skip

    @torch.no_grad()
    def get_unconditional_conditioning(self, n: int) -> torch.Tensor:
        return self.get_learned_conditioning([""] * n)
