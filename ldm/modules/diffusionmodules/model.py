"""The KL autoencoder's encoder and decoder (keys match the reference ``diffusionmodules.model``)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.winograd import Conv2d
from ldm.util import check_supported


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:  # noqa: N802 - reference name
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


def nonlinearity_of_temporary(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a tensor nothing else holds (a norm's output): in place when no gradient is recorded, which saves
    one full-resolution activation at the VAE's 512 px levels (the decode's memory peak)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class Upsample(nn.Module):
    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Stride-2 conv with the reference's asymmetric (right/bottom) zero padding."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """The VAE's residual block (no timestep input): x [B, in_channels, H, W] -> [B, out_channels, H, W], a 1x1
    ``nin_shortcut`` when the widths differ."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 num_groups: int = 32):  # fmt: skip
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels, num_groups)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity_of_temporary(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity_of_temporary(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv projections. x [B, C, H, W]."""

    def __init__(self, in_channels: int, num_groups: int = 32):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels, num_groups)
        self.q = Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (proj(h).reshape(b, 1, c, hh * ww).transpose(2, 3) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")  # the reference's xformers variant computes the same


def check_attention(owner: str, use_linear_attn: bool, attn_type: str) -> None:
    """``ValueError`` naming the parameter for the reference's linear attention or an attention type not implemented."""
    check_supported(owner, "use_linear_attn", use_linear_attn, False)
    check_supported(owner, "attn_type", attn_type, *ATTN_TYPES)


def make_attn(in_channels: int, attn_type: str = "vanilla", num_groups: int = 32) -> nn.Module:
    """The self-attention block of ``attn_type`` (one of :data:`ATTN_TYPES`, checked by :func:`check_attention`)."""
    return nn.Identity() if attn_type == "none" else AttnBlock(in_channels, num_groups)


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2*z_channels (double_z) or z_channels, H/f, W/f].

    Takes the autoencoder's whole ``ddconfig``, as the reference: ``ignore_kwargs`` holds the Decoder's keys.
    ``ValueError`` naming the parameter for an attention type not implemented (:func:`check_attention`).
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        norm_num_groups: int = 32,
        **ignore_kwargs: object,
    ):
        super().__init__()
        check_attention(type(self).__name__, use_linear_attn, attn_type)
        res_block = partial(ResnetBlock, dropout=dropout, num_groups=norm_num_groups)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(res_block(in_channels=block_in, out_channels=block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type, norm_num_groups))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = res_block(in_channels=block_in, out_channels=block_in)
        self.mid.attn_1 = make_attn(block_in, attn_type, norm_num_groups)
        self.mid.block_2 = res_block(in_channels=block_in, out_channels=block_in)
        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity_of_temporary(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f] (``give_pre_end``: the features before the
    output norm and conv; ``tanh_out``: squashed by tanh).

    Takes the autoencoder's whole ``ddconfig``, as the reference: ``ignore_kwargs`` holds the Encoder's keys.
    ``ValueError`` naming the parameter for an attention type not implemented (:func:`check_attention`).
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        norm_num_groups: int = 32,
        **ignore_kwargs: object,
    ):
        super().__init__()
        check_attention(type(self).__name__, use_linear_attn, attn_type)
        res_block = partial(ResnetBlock, dropout=dropout, num_groups=norm_num_groups)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = res_block(in_channels=block_in, out_channels=block_in)
        self.mid.attn_1 = make_attn(block_in, attn_type, norm_num_groups)
        self.mid.block_2 = res_block(in_channels=block_in, out_channels=block_in)
        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(res_block(in_channels=block_in, out_channels=block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type, norm_num_groups))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity_of_temporary(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
