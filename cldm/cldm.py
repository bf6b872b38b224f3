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

from cldm.control import Control, control_residuals
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
        """x [B, 4, h, w], timesteps [B], context [B, 77, D]; control: 13 ControlNet residuals (the 12 skips' then
        the middle block's, each of its block's shape; see ``cldm.control.control_residuals``) or None -> eps
        [B, 4, h, w]."""
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

    params_from = (UNetConfig,)  # where **structure goes (ldm.util.check_config reads it)

    def __init__(
        self,
        image_size: int,
        hint_channels: int,
        use_fp16: bool = False,
        **structure: Any,
    ):
        """``structure``: the yaml's shape parameters, shared with the UNet (see :class:`UNetConfig`)."""
        super().__init__()
        cfg = UNetConfig(**structure, owner=type(self).__name__)
        in_channels, model_channels, dims = cfg.in_channels, cfg.model_channels, cfg.dims
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


HINT_INITS = ("reference", "kaiming")


def kaiming_init_hint_encoder(control: ControlNet) -> int:
    """Re-draw the 7 inner convs of ``control.input_hint_block`` with He-normal weights (fan-in, ReLU gain)
    and zero biases (from the global RNG, as model construction); its last (zero) conv stays zero. Returns the
    number of convs re-drawn.

    With the reference's init (PyTorch's default) each conv + SiLU shrinks the signal about 3.5x, so a hint
    reaches the zero conv ~1e-4 as strong as it entered, and the gradients that could teach the hint path
    are mostly noise until its weights have grown (the long wait before "sudden convergence"). With this
    init the hint keeps its scale through the encoder. Keys and shapes are unchanged.
    """
    convs = [m for m in control.input_hint_block if isinstance(m, nn.Conv2d)][:-1]
    with torch.no_grad():
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
    return len(convs)


class ControlLDM(LatentDiffusion):
    """Latent diffusion with a ControlNet branch.

    ``cond`` dicts follow the reference: ``{"c_crossattn": [text emb], "c_concat": [hint] or None}``. The control
    of a sampling run is an argument (:class:`cldm.control.Control`, given to :meth:`apply_model`); for the
    reference API, a ``c_concat`` hint without it is applied with ``control_scales`` (13 floats, default 1.0).
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
        self.learning_rate = 1e-5  # the training script sets these two, as the reference's does
        self.sd_locked = True

    @torch.no_grad()
    def get_input(
        self, batch: dict[str, Any], k: str, bs: int | None = None
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """``(z, {"c_crossattn": [text emb], "c_concat": [hint [B, 3, H, W] in [0, 1]]})`` from a batch."""
        x, c = super().get_input(batch, self.first_stage_key, bs=bs)
        control = batch[self.control_key][:bs] if bs is not None else batch[self.control_key]
        control = torch.as_tensor(control).to(self.device).permute(0, 3, 1, 2)
        control = control.to(memory_format=torch.contiguous_format).float()
        return x, {"c_crossattn": [c], "c_concat": [control]}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The ControlNet, plus the UNet's decoder half (output blocks and ``out``) when not ``sd_locked``."""
        params = list(self.control_model.parameters())
        if not self.sd_locked:
            unet = self.model.diffusion_model
            params += list(unet.output_blocks.parameters()) + list(unet.out.parameters())
        return params

    def freeze_locked(self) -> list[nn.Parameter]:
        """Make only :meth:`trainable_parameters` require gradients, so no gradient memory is spent on the
        locked model (gradients still flow through it) and DDP syncs only what trains. Returns them."""
        params = self.trainable_parameters()
        keep = {id(p) for p in params}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        return params

    def setup(self, stage: str) -> None:
        """Lightning hook, run before DDP wraps the model: freeze what ``sd_locked`` keeps fixed."""
        if stage == "fit":
            self.freeze_locked()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over :meth:`trainable_parameters` at ``learning_rate``, as the reference."""
        return torch.optim.AdamW(self.freeze_locked(), lr=self.learning_rate)

    @torch.no_grad()
    def log_images(
        self, batch: dict[str, Any], N: int = 4, ddim_steps: int = 50, ddim_eta: float = 0.0,
        unconditional_guidance_scale: float = 9.0, **kwargs: Any,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Images in [-1, 1], [N, 3, H, W]: ``reconstruction`` (VAE round trip), ``control`` (the hint),
        ``conditioning`` (the prompt drawn as text) and guided DDIM ``samples_cfg_scale_<s>``."""
        from ldm.models.diffusion.ddim import DDIMSampler
        from ldm.util import log_txt_as_img

        z, c = self.get_input(batch, self.first_stage_key, bs=N)
        c_cat, c_txt = c["c_concat"][0][:N], c["c_crossattn"][0][:N]
        n = min(z.shape[0], N)
        height, width = c_cat.shape[2:]
        log = {
            "reconstruction": self.decode_first_stage(z),
            "control": c_cat * 2.0 - 1.0,
            "conditioning": log_txt_as_img((width, height), list(batch[self.cond_stage_key])[:n]).to(self.device),
        }
        uc = {"c_concat": [c_cat], "c_crossattn": [self.get_unconditional_conditioning(n)]}
        samples, _ = DDIMSampler(self).sample(
            ddim_steps, n, (self.channels, height // 8, width // 8), {"c_concat": [c_cat], "c_crossattn": [c_txt]},
            verbose=False, eta=ddim_eta, unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=uc, progress=False,
        )  # fmt: skip
        log[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = self.decode_first_stage(samples)
        return log

    def controls_from_cond(self, cond: Mapping[str, Any]) -> list[Control]:
        """The reference API's control: the ``c_concat`` hint at ``control_scales``, encoded at every call (as the
        reference's ``apply_model`` does, also when training); no control for a missing or None ``c_concat``."""
        if cond.get("c_concat") is None:
            return []
        return [Control(self.control_model, torch.cat(cond["c_concat"], 1), self.control_scales, cache=False)]

    def apply_model(
        self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any], *args: Any,
        controls: Sequence[Control] | None = None, **kwargs: Any,
    ) -> torch.Tensor:  # fmt: skip
        """eps [B, 4, h, w] of the locked UNet plus the summed residuals of ``controls`` (default: the reference's,
        :meth:`controls_from_cond`). x_noisy [B, 4, h, w], t [B], cond ``{"c_crossattn": [text [B, 77, D]], ...}``.
        Raises ``TypeError`` when ``cond`` is not a dict."""
        if not isinstance(cond, Mapping):
            raise TypeError("ControlLDM.apply_model expects a cond dict with 'c_crossattn' (and 'c_concat')")
        context = torch.cat(cond["c_crossattn"], 1)
        if controls is None:
            controls = self.controls_from_cond(cond)
        control = control_residuals(controls, x_noisy, t, context)
        return self.model.diffusion_model(x=x_noisy, timesteps=t, context=context, control=control,
                                          only_mid_control=self.only_mid_control)  # fmt: skip

    @torch.no_grad()
    def get_unconditional_conditioning(self, n: int) -> torch.Tensor:
        return self.get_learned_conditioning([""] * n)
