"""3×3 convolutions by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray, arXiv 1509.09308).

Each 2×2 output tile is computed from a 4×4 input tile with 16 multiplications per channel pair
instead of 36, so the convolution's matrix multiplies do 2.25x less work; the input, filter and
output transforms are additions (and halves, for the filter). The result equals the direct
convolution up to float rounding (max abs error to a float64 reference ~2e-6 on unit-scale data,
against ~1e-5 for the direct float32 kernel).

:class:`Conv2d` is ``nn.Conv2d`` (same parameters and state-dict keys) with an ``algorithm`` switch:
``"direct"`` (default) or ``"winograd"``, which it uses for stride-1, padding-1, 3×3 convolutions when no
gradient is recorded; set it on a whole model with :func:`set_conv_algorithm`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV_ALGORITHMS = ("direct", "winograd")
MIN_CHANNELS = 32  # below this the transforms cost more than the multiplies they save (the RGB stems)
# The filter transform reads every weight per call; it pays off only when the batch has enough pixels
# (N * H * W) to share it: at SD's 1280-channel 8x8 level (batch 2: 128 px) it costs more than it saves.
MIN_PIXELS = 512

# F(2x2, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def filter_transform(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) filters -> (16, Cout, Cin) transformed filters ``G g G^T``, tile position first."""
    cout, cin = weight.shape[:2]
    g = _G.to(weight.dtype)
    return (torch.kron(g, g) @ weight.reshape(cout * cin, 9).t()).view(16, cout, cin)


def _input_transform(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) with H, W even -> (16, N * H/2 * W/2, C): ``B^T d B`` of every 4×4 tile (stride 2, zero border)."""
    n, h, w, c = x.shape
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    s = padded.stride()
    th, tw = h // 2, w // 2
    tiles = padded.as_strided((n, th, tw, 4, 4, c), (s[0], 2 * s[1], 2 * s[2], s[1], s[2], s[3]))
    rows = _combine(tiles, dim=3)
    out = x.new_empty(4, 4, n, th, tw, c)
    for a, row in enumerate(rows):
        torch.sub(row[:, :, :, 0], row[:, :, :, 2], out=out[a, 0])
        torch.add(row[:, :, :, 1], row[:, :, :, 2], out=out[a, 1])
        torch.sub(row[:, :, :, 2], row[:, :, :, 1], out=out[a, 2])
        torch.sub(row[:, :, :, 1], row[:, :, :, 3], out=out[a, 3])
    return out.view(16, n * th * tw, c)


def _combine(tiles: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """``B^T`` applied along ``dim`` (size 4) of ``tiles``: four tensors without that dimension."""
    d = tiles.unbind(dim)
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _output_transform(m: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(16, N * H/2 * W/2, Cout) tile products -> (N, H, W, Cout): ``A^T m A`` of every tile."""
    th, tw, cout = h // 2, w // 2, m.shape[-1]
    m = m.view(4, 4, n, th, tw, cout)
    sums = (m[0] + m[1] + m[2], m[1] - m[2] - m[3])
    out = m.new_empty(n, th, 2, tw, 2, cout)
    for i, s in enumerate(sums):
        torch.add(s[0] + s[1], s[2], out=out[:, :, i, :, 0])
        torch.sub(s[1] - s[2], s[3], out=out[:, :, i, :, 1])
    return out.view(n, h, w, cout)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for (N, Cin, H, W) ``x`` and (Cout, Cin, 3, 3) ``weight``,
    computed with F(2×2, 3×3). Returns (N, Cout, H, W) in ``x``'s memory format."""
    n, _, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    nhwc = x.permute(0, 2, 3, 1)
    eh, ew = h % 2, w % 2  # odd sides: one more zero row / column, cropped from the output
    if eh or ew:
        nhwc = F.pad(nhwc, (0, 0, 0, ew, 0, eh))
    m = torch.bmm(_input_transform(nhwc), filter_transform(weight).transpose(1, 2))
    out = _output_transform(m, n, h + eh, w + ew)[:, :h, :w].permute(0, 3, 1, 2)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose stride-1, padding-1 3×3 case can run as :func:`winograd_conv3x3` (``algorithm``)."""

    algorithm: str = "direct"

    def winograd_applies(self) -> bool:
        """Whether this layer's shape suits F(2×2, 3×3) (3×3, stride 1, padding 1, no groups or dilation)."""
        return (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and min(self.in_channels, self.out_channels) >= MIN_CHANNELS)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.algorithm == "winograd" and not torch.is_grad_enabled() and x.dim() == 4
                and x.shape[0] * x.shape[2] * x.shape[3] >= MIN_PIXELS and self.winograd_applies()):  # fmt: skip
            return winograd_conv3x3(x, self.weight, self.bias)
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
