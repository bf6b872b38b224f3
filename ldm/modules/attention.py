"""Transformer blocks of the SD UNet (keys match the reference ``ldm.modules.attention``).

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (``backend="sdpa"``,
the default) or the reference's explicit fp32 softmax (``backend="math"``). Switch a whole model
with :func:`set_attention_backend`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import checkpoint, zero_module

ATTENTION_BACKENDS = ("sdpa", "math")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, backend: str = "sdpa") -> torch.Tensor:
    """Multi-head attention. q [B, N, H*D], k/v [B, M, H*D] -> [B, N, H*D]."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    elif backend == "math":
        sim = torch.matmul(q.float(), k.float().transpose(-1, -2)) * d**-0.5
        out = torch.matmul(sim.softmax(dim=-1).to(v.dtype), v)
    else:
        raise ValueError(f"unknown attention backend '{backend}' (choose from {ATTENTION_BACKENDS})")
    return out.transpose(1, 2).reshape(b, n, inner)


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Set the attention implementation of every attention layer in ``model``."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}' (choose from {ATTENTION_BACKENDS})")
    for module in model.modules():
        if hasattr(module, "attention_backend"):
            module.attention_backend = backend


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(x)  # in place: one large activation fewer (same values as x * gelu(gate))


class FeedForward(nn.Module):
    """GEGLU MLP, ``net.0.proj`` / ``net.2`` as in the reference."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = True, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim_out or dim
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Self-attention (``context=None``) or cross-attention over ``context`` [B, M, context_dim]."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = context_dim or query_dim
        self.heads = heads
        self.attention_backend = "sdpa"
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, query_dim] -> [B, N, query_dim]."""
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.attention_backend)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            dim, context_dim=context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: x [B, C, H, W] -> [B, C, H, W].

    ``use_linear`` selects 1x1 convs (SD1.x) or linear layers (SD2.x) for the in/out projections.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | Sequence[int] | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = True,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        if context_dim is not None and not isinstance(context_dim, (list, tuple)):
            context_dim = [context_dim] * depth
        context_dims = list(context_dim) if context_dim is not None else [None] * depth
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dims[d],
                disable_self_attn=disable_self_attn,
                checkpoint=use_checkpoint,
            )
            for d in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | list[torch.Tensor] | None = None) -> torch.Tensor:
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        _, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block, ctx in zip(self.transformer_blocks, context):
            x = block(x, context=ctx)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
