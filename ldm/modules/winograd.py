"""3×3 convolutions by Winograd's minimal filtering F(2×2, 3×3) and F(4×4, 3×3) (Lavin & Gray, arXiv 1509.09308).

Each m×m output tile (m = 2 or 4) is computed from an (m+2)×(m+2) input tile with (m+2)² multiplications
per channel pair instead of 9m², so the convolution's matrix multiplies do 2.25x (m = 2) or 4x (m = 4) less
work; the input, filter and output transforms are sums with small constant weights. The result equals the
direct convolution up to float rounding: max abs error to a float64 reference on unit-scale data ~2e-6 for
m = 2 and ~2e-5 for m = 4, against ~1e-5 for the direct float32 kernel.

:class:`Conv2d` is ``nn.Conv2d`` (same parameters and state-dict keys) with an ``algorithm`` switch:
``"winograd"`` (default, the fast path) or ``"direct"`` (the reference's kernel). Winograd is used for stride-1,
padding-1, 3×3 convolutions when no gradient is recorded, with the tile size chosen by the batch's pixel count
(:func:`winograd_tile`); the smallest batches (a few pixels) run as one matrix multiply over unfolded patches
(:func:`unfold_conv3x3`) instead. Set it on a whole model with :func:`set_conv_algorithm`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV_ALGORITHMS = ("direct", "winograd")
MIN_CHANNELS = 32  # below this the transforms cost more than the multiplies they save (the RGB stems)
# The filter transform reads every weight and writes (m+2)^2 / 9 times as much per call; it pays off only
# when the batch has enough pixels (N * H * W) to share it: below MIN_PIXELS the direct kernel is as fast, and
# F(4x4) overtakes F(2x2) from MIN_PIXELS_TILE4 (thresholds timed on SD's layers; see docs/performance.md).
MIN_PIXELS = 512
MIN_PIXELS_TILE4 = 1024
# Up to this many pixels (SD's 4x4 level at 256 px, batch 2) oneDNN's direct kernel streams the weights slowly;
# one batched matrix multiply over the unfolded 3x3 patches is faster.
MAX_PIXELS_UNFOLD = 32

Tensors = Sequence[torch.Tensor]
Outs = Sequence[torch.Tensor] | None

# Filter transforms G (rows: tile positions); F(m, 3): Y = A^T [(G g G^T) * (B^T d B)] A. Plain numbers: the
# tensors are made on the weights' device and in their dtype (:func:`_filter_matrix`).
_G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
}  # fmt: skip


@lru_cache(maxsize=16)
def _filter_matrix(tile: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``G ⊗ G`` ((tile+2)², 9) of F(tile, 3) on ``device`` in ``dtype``; cached per (tile, device, dtype), made
    as a plain tensor (not an inference tensor) whatever the caller's mode."""
    with torch.inference_mode(False), torch.no_grad():
        g = torch.tensor(_G[tile], dtype=torch.float64, device="cpu").to(device=device, dtype=dtype)  # 1/6 rounded once
        return torch.kron(g, g)


def _input_1d_tile2(d: Tensors, out: Outs = None) -> list[torch.Tensor]:
    """``B^T`` of F(2, 3) along a length-4 axis given as its 4 slices (written into ``out`` if given)."""
    o = out or [None] * 4
    return [torch.sub(d[0], d[2], out=o[0]), torch.add(d[1], d[2], out=o[1]),
            torch.sub(d[2], d[1], out=o[2]), torch.sub(d[1], d[3], out=o[3])]  # fmt: skip


def _input_1d_tile4(d: Tensors, out: Outs = None) -> list[torch.Tensor]:
    """``B^T`` of F(4, 3) along a length-6 axis given as its 6 slices (written into ``out`` if given)."""
    o = out or [None] * 6
    a, b = torch.add(d[4], d[2], alpha=-4), torch.add(d[3], d[1], alpha=-4)
    c, e = torch.sub(d[4], d[2]), torch.sub(d[1], d[3]).mul_(2)
    return [torch.add(d[4], d[0], alpha=4, out=o[0]).add_(d[2], alpha=-5),
            torch.add(a, b, out=o[1]), torch.sub(a, b, out=o[2]),
            torch.sub(c, e, out=o[3]), torch.add(c, e, out=o[4]),
            torch.add(d[5], d[1], alpha=4, out=o[5]).add_(d[3], alpha=-5)]  # fmt: skip


def _output_1d_tile2(m: Tensors, out: Outs = None) -> list[torch.Tensor]:
    """``A^T`` of F(2, 3): 4 slices -> 2 (written into ``out`` if given)."""
    o = out or [None] * 2
    return [torch.add(m[0] + m[1], m[2], out=o[0]), torch.sub(m[1] - m[2], m[3], out=o[1])]


def _output_1d_tile4(m: Tensors, out: Outs = None) -> list[torch.Tensor]:
    """``A^T`` of F(4, 3): 6 slices -> 4 (written into ``out`` if given)."""
    o = out or [None] * 4
    s12, d12, s34, d34 = m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]
    return [torch.add(m[0] + s12, s34, out=o[0]), torch.add(d12, d34, alpha=2, out=o[1]),
            torch.add(s12, s34, alpha=4, out=o[2]), torch.add(d12, d34, alpha=8, out=o[3]).add_(m[5])]  # fmt: skip


_INPUT_1D: dict[int, Callable[..., list[torch.Tensor]]] = {2: _input_1d_tile2, 4: _input_1d_tile4}
_OUTPUT_1D: dict[int, Callable[..., list[torch.Tensor]]] = {2: _output_1d_tile2, 4: _output_1d_tile4}


def filter_transform(weight: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """(Cout, Cin, 3, 3) filters -> ((tile+2)², Cout, Cin) transformed filters ``G g G^T``, tile position first."""
    cout, cin = weight.shape[:2]
    gg = _filter_matrix(tile, weight.device, weight.dtype)
    return (gg @ weight.reshape(cout * cin, 9).t()).view((tile + 2) ** 2, cout, cin)


def _input_transform(x: torch.Tensor, tile: int) -> torch.Tensor:
    """(N, H, W, C), H and W multiples of ``tile`` -> ((tile+2)², N·H/tile·W/tile, C): ``B^T d B`` of every input
    tile (stride ``tile``, zero border)."""
    n, h, w, c = x.shape
    size = tile + 2
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    s = padded.stride()
    th, tw = h // tile, w // tile
    tiles = padded.as_strided((n, th, tw, size, size, c), (s[0], tile * s[1], tile * s[2], s[1], s[2], s[3]))
    transform = _INPUT_1D[tile]
    out = x.new_empty(size, size, n, th, tw, c)
    for a, row in enumerate(transform(tiles.unbind(3))):
        transform(row.unbind(3), out=out[a].unbind(0))
    return out.view(size * size, n * th * tw, c)


def _output_transform(m: torch.Tensor, n: int, h: int, w: int, tile: int) -> torch.Tensor:
    """((tile+2)², N·H/tile·W/tile, Cout) tile products -> (N, H, W, Cout): ``A^T m A`` of every tile."""
    size, th, tw, cout = tile + 2, h // tile, w // tile, m.shape[-1]
    transform = _OUTPUT_1D[tile]
    out = m.new_empty(n, th, tile, tw, tile, cout)
    for i, row in enumerate(transform(m.view(size, size, n, th, tw, cout).unbind(0))):
        transform(row.unbind(0), out=out[:, :, i].unbind(3))
    return out.view(n, h, w, cout)


def winograd_tile(pixels: int) -> int:
    """The output tile size for a batch of ``pixels`` (N·H·W): 4, 2, or 0 (direct convolution is faster)."""
    return 4 if pixels >= MIN_PIXELS_TILE4 else 2 if pixels >= MIN_PIXELS else 0


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     tile: int = 2) -> torch.Tensor:  # fmt: skip
    """``F.conv2d(x, weight, bias, padding=1)`` for (N, Cin, H, W) ``x`` and (Cout, Cin, 3, 3) ``weight``,
    computed with F(tile×tile, 3×3), ``tile`` 2 or 4. Returns (N, Cout, H, W) in ``x``'s memory format."""
    if tile not in _G:
        raise ValueError(f"Winograd tile must be 2 or 4, got {tile}")
    n, _, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    nhwc = x.permute(0, 2, 3, 1)
    eh, ew = -h % tile, -w % tile  # sides not a multiple of the tile: zero rows / columns, cropped from the output
    if eh or ew:
        nhwc = F.pad(nhwc, (0, 0, 0, ew, 0, eh))
    m = torch.bmm(_input_transform(nhwc, tile), filter_transform(weight, tile).transpose(1, 2))
    out = _output_transform(m, n, h + eh, w + ew, tile)[:, :h, :w].permute(0, 3, 1, 2)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def unfold_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for (N, Cin, H, W) ``x`` and (Cout, Cin, 3, 3) ``weight`` as one
    batched matrix multiply of the weights with the unfolded patches (N, Cin·9, H·W). Returns (N, Cout, H, W)."""
    n, _, h, w = x.shape
    patches = F.unfold(x, 3, padding=1)
    flat = weight.reshape(weight.shape[0], -1).expand(n, -1, -1)
    out = torch.bmm(flat, patches) if bias is None else torch.baddbmm(bias.view(1, -1, 1), flat, patches)
    return out.view(n, -1, h, w)


def _layout_of_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` in NCHW if it is channels-last, the (NCHW) weight is larger and has a spatial extent: oneDNN
    converts whichever operand's layout differs on every call, so convert the smaller one (at SD's 8x8
    level: 0.16 M activations instead of 14.7 M weights)."""
    if (weight.shape[-1] * weight.shape[-2] > 1 and weight.numel() > x.numel() and weight.is_contiguous()
            and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):  # fmt: skip
        return x.contiguous()
    return x


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose stride-1, padding-1 3×3 case can run as :func:`winograd_conv3x3`, or for the smallest
    batches :func:`unfold_conv3x3` (``algorithm`` "winograd"; "direct": always oneDNN's kernel)."""

    algorithm: str = "winograd"  # the fast path's default; "direct" for the reference's schedule

    def winograd_applies(self) -> bool:
        """Whether this layer's shape suits Winograd (3×3, stride 1, padding 1, no groups or dilation)."""
        return (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and min(self.in_channels, self.out_channels) >= MIN_CHANNELS)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.algorithm == "winograd" and not torch.is_grad_enabled() and x.dim() == 4:
            pixels = x.shape[0] * x.shape[2] * x.shape[3]
            if self.winograd_applies():
                tile = winograd_tile(pixels)
                if tile:
                    return winograd_conv3x3(x, self.weight, self.bias, tile)
                if pixels <= MAX_PIXELS_UNFOLD:
                    return unfold_conv3x3(x, self.weight, self.bias)
            x = _layout_of_weight(x, self.weight)
        return super().forward(x)


def set_conv_algorithm(model: nn.Module, algorithm: str) -> int:
    """Set the algorithm of every :class:`Conv2d` in ``model``; returns how many layers can use Winograd."""
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(f"unknown convolution algorithm '{algorithm}' (choose from {CONV_ALGORITHMS})")
    count = 0
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.algorithm = algorithm
            count += module.winograd_applies()
    return count
