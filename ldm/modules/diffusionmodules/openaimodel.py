"""The SD UNet (keys match the reference ``ldm.modules.diffusionmodules.openaimodel``).

Only the spatial-transformer variant used by SD1.x/2.x and ControlNet is kept. The encoder half
(``input_blocks`` + ``middle_block``) is built by :func:`build_encoder`, which the ControlNet reuses
to make its trainable copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)
from ldm.util import check_supported, unsupported_parameter


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands ``emb`` to timestep blocks and ``context`` to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 upsampling, then an optional 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``op``) or average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding. x [B, C, H, W], emb [B, E]."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels, norm_num_groups),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, norm_num_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def attention_heads(ch: int, num_heads: int, num_head_channels: int, legacy: bool) -> tuple[int, int]:
    """``(heads, dim_head)`` of a transformer at width ``ch``, resolved as the reference does."""
    if num_head_channels == -1:
        dim_head = ch // num_heads
    else:
        num_heads = ch // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = ch // num_heads
    return num_heads, dim_head


class UNetConfig:
    """Structural hyper-parameters shared by the UNet and the ControlNet, validated once.

    Only the 2-D cross-attention UNet is implemented: ``use_spatial_transformer`` must be true with a
    ``context_dim``, and the reference parameters of its other variants must keep their defaults (``dims`` 2,
    ``num_heads_upsample`` -1, ``use_new_attention_order`` False, ``n_embed`` None); otherwise ``ValueError``
    naming the parameter and ``owner`` (the class it was given to; :func:`ldm.util.check_supported`).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | Sequence[int] | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        norm_num_groups: int = 32,
        num_heads_upsample: int = -1,
        use_new_attention_order: bool = False,
        n_embed: int | None = None,
        owner: str = "UNetModel",
    ):
        check_supported(owner, "use_spatial_transformer", use_spatial_transformer, True)
        if context_dim is None:
            raise unsupported_parameter(owner, "context_dim", context_dim, "cross-attention: an int or a list of ints")
        check_supported(owner, "dims", dims, 2)
        check_supported(owner, "num_heads_upsample", num_heads_upsample, -1)
        check_supported(owner, "use_new_attention_order", use_new_attention_order, False)
        check_supported(owner, "n_embed", n_embed, None)
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        channel_mult = list(channel_mult)
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        elif len(num_res_blocks) != len(channel_mult):
            raise ValueError("num_res_blocks must be an int or have one entry per channel_mult level")
        if disable_self_attentions is not None and len(disable_self_attentions) != len(channel_mult):
            raise ValueError("disable_self_attentions needs one entry per channel_mult level")
        if num_attention_blocks is not None and len(num_attention_blocks) != len(channel_mult):
            raise ValueError("num_attention_blocks needs one entry per channel_mult level")
        if not isinstance(context_dim, int):
            context_dim = list(context_dim)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_res_blocks = list(num_res_blocks)
        self.attention_resolutions = list(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.dims = dims
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.transformer_depth = transformer_depth
        self.context_dim = context_dim
        self.legacy = legacy
        self.disable_self_attentions = disable_self_attentions
        self.num_attention_blocks = num_attention_blocks
        self.disable_middle_self_attn = disable_middle_self_attn
        self.use_linear_in_transformer = use_linear_in_transformer
        self.norm_num_groups = norm_num_groups

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def time_embed(self) -> nn.Sequential:
        dim = self.time_embed_dim
        return nn.Sequential(linear(self.model_channels, dim), nn.SiLU(), linear(dim, dim))

    def res_block(self, ch: int, out_ch: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
        return ResBlock(
            ch,
            self.time_embed_dim,
            self.dropout,
            out_channels=out_ch,
            dims=self.dims,
            use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
            norm_num_groups=self.norm_num_groups,
        )

    def transformer(self, ch: int, disable_self_attn: bool = False) -> SpatialTransformer:
        heads, dim_head = attention_heads(ch, self.num_heads, self.num_head_channels, self.legacy)
        return SpatialTransformer(
            ch,
            heads,
            dim_head,
            depth=self.transformer_depth,
            dropout=self.dropout,
            context_dim=self.context_dim,
            disable_self_attn=disable_self_attn,
            use_linear=self.use_linear_in_transformer,
            use_checkpoint=self.use_checkpoint,
            norm_num_groups=self.norm_num_groups,
        )

    def has_attention(self, level: int, nr: int, ds: int) -> bool:
        if ds not in self.attention_resolutions:
            return False
        return self.num_attention_blocks is None or nr < self.num_attention_blocks[level]

    def self_attn_disabled(self, level: int) -> bool:
        return bool(self.disable_self_attentions[level]) if self.disable_self_attentions is not None else False


def embed_time(time_embed: nn.Module, timesteps: torch.Tensor, model_channels: int) -> torch.Tensor:
    """Timestep embedding [B, 4 * model_channels] of timesteps [B] through the ``time_embed`` MLP."""
    t_emb = timestep_embedding(timesteps, model_channels)
    return time_embed(t_emb)


def build_encoder(cfg: UNetConfig) -> tuple[nn.ModuleList, nn.Module, list[int]]:
    """``(input_blocks, middle_block, block_channels)``: the UNet encoder, also the ControlNet's copy.

    ``block_channels[i]`` is the width of ``input_blocks[i]``'s output (one skip connection each).
    """
    stem = conv_nd(cfg.dims, cfg.in_channels, cfg.model_channels, 3, padding=1)
    blocks = nn.ModuleList([TimestepEmbedSequential(stem)])
    chans = [cfg.model_channels]
    ch, ds = cfg.model_channels, 1
    for level, mult in enumerate(cfg.channel_mult):
        for nr in range(cfg.num_res_blocks[level]):
            layers: list[nn.Module] = [cfg.res_block(ch, mult * cfg.model_channels)]
            ch = mult * cfg.model_channels
            if cfg.has_attention(level, nr, ds):
                layers.append(cfg.transformer(ch, cfg.self_attn_disabled(level)))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            down = cfg.res_block(ch, ch, down=True) if cfg.resblock_updown else Downsample(
                ch, cfg.conv_resample, dims=cfg.dims, out_channels=ch
            )
            blocks.append(TimestepEmbedSequential(down))
            chans.append(ch)
            ds *= 2
    middle = TimestepEmbedSequential(
        cfg.res_block(ch), cfg.transformer(ch, cfg.disable_middle_self_attn), cfg.res_block(ch)
    )
    return blocks, middle, chans


class UNetModel(nn.Module):
    """Noise predictor eps(x_t, t, context). x [B, in_channels, H, W] -> [B, out_channels, H, W]."""

    params_from = (UNetConfig,)  # where **structure goes (ldm.util.check_config reads it)

    def __init__(
        self,
        image_size: int,
        out_channels: int,
        num_classes: int | None = None,
        use_fp16: bool = False,
        **structure: Any,
    ):
        """``structure``: the yaml's shape parameters (``in_channels``, ``model_channels``, ...), see
        :class:`UNetConfig`. ``num_classes`` (a class-conditional UNet) must stay None: ``ValueError`` otherwise."""
        super().__init__()
        check_supported(type(self).__name__, "num_classes", num_classes, None)
        cfg = UNetConfig(**structure, owner=type(self).__name__)
        in_channels, model_channels, dims = cfg.in_channels, cfg.model_channels, cfg.dims
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.time_embed = cfg.time_embed()
        self.input_blocks, self.middle_block, chans = build_encoder(cfg)
        self.output_blocks = self._build_decoder(cfg, chans)
        self.out = nn.Sequential(
            normalization(model_channels, cfg.norm_num_groups),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )

    @staticmethod
    def _build_decoder(cfg: UNetConfig, chans: list[int]) -> nn.ModuleList:
        chans = list(chans)
        blocks = nn.ModuleList()
        ch = chans[-1]
        ds = 2 ** (len(cfg.channel_mult) - 1)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers: list[nn.Module] = [cfg.res_block(ch + chans.pop(), cfg.model_channels * mult)]
                ch = cfg.model_channels * mult
                if cfg.has_attention(level, i, ds):
                    layers.append(cfg.transformer(ch, cfg.self_attn_disabled(level)))
                if level and i == cfg.num_res_blocks[level]:
                    up = cfg.res_block(ch, ch, up=True) if cfg.resblock_updown else Upsample(
                        ch, cfg.conv_resample, dims=cfg.dims, out_channels=ch
                    )
                    layers.append(up)
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        return blocks

    def embed_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        return embed_time(self.time_embed, timesteps, self.model_channels)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None, **kwargs: object
    ) -> torch.Tensor:
        """x [B, C, H, W], timesteps [B], context [B, 77, context_dim] -> eps [B, out_channels, H, W]."""
        emb = self.embed_time(timesteps)
        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h.type(x.dtype))
