"""Frozen text encoders (``cond_stage_model``), built offline from local configs.

``FrozenCLIPEmbedder`` is SD1.x's CLIP ViT-L/14 text tower. The reference built it with
``from_pretrained("openai/clip-vit-large-patch14")``; here the architecture comes from the config
below, the weights from the ControlNet checkpoint and the BPE vocabulary from files shipped
with this package, so nothing is downloaded.

``FrozenOpenCLIPEmbedder`` is SD2.x's OpenCLIP ViT-H/14 text tower. The reference wrapped
``open_clip`` (2.0.2) for it; here it is a native module with exactly open_clip's text-tower
parameter names and shapes (``model.token_embedding``, ``model.transformer.resblocks.*``, ...),
so SD2.x checkpoints load as they are, without open_clip or its torchvision dependency.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import ftfy
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.modules.encoders.tokenizer import BOS_ID, EOS_ID, count_tokens, load_clip_tokenizer, tokenize
from ldm.util import check_supported

# Text config of openai/clip-vit-large-patch14 (its config.json ``text_config``).
CLIP_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
}


class CLIPTextTransformer(nn.Module):
    """transformers' ``CLIPTextModel`` held as ``text_model``.

    transformers 4.x nested the text tower under ``text_model``; released SD/ControlNet
    checkpoints spell keys that way (``cond_stage_model.transformer.text_model.*``). transformers 5
    (required here) dropped that level, so this wrapper puts it back.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextModel(config)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> Any:
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states)

    def reset_position_ids(self) -> None:
        """Recreate the non-persistent ``position_ids`` buffer (after loading onto a meta-built model)."""
        embeddings = self.text_model.embeddings
        n = embeddings.position_embedding.weight.shape[0]
        device = embeddings.position_embedding.weight.device
        embeddings.register_buffer(
            "position_ids", torch.arange(n, device=device).expand((1, -1)), persistent=False
        )


def _local_config(
    table: Mapping[str, Mapping[str, Any]], name: str, base: str, overrides: Mapping[str, Any] | None, what: str
) -> dict[str, Any]:
    """Config values for ``name`` from ``table`` (or ``base`` when only overrides are given), overrides applied."""
    if name not in table and not overrides:
        raise ValueError(f"no local text config for {what} '{name}' (known: {', '.join(table)}; or give text_config)")
    return {**table.get(name, table[base]), **(overrides or {})}


def clip_text_config(version: str, overrides: Mapping[str, Any] | None = None) -> CLIPTextConfig:
    """Local CLIP text config for a known ``version`` (hub name), with optional overrides."""
    values = _local_config(CLIP_TEXT_CONFIGS, version, "openai/clip-vit-large-patch14", overrides, "CLIP version")
    config = CLIPTextConfig(**values)
    config._attn_implementation = "sdpa"
    return config


class FrozenCLIPEmbedder(nn.Module):
    """Prompts -> CLIP text hidden states [B, 77, hidden_size] (last layer, or ``layer_idx`` with ``hidden``).

    ``version`` selects the local text config (:data:`CLIP_TEXT_CONFIGS`; ``text_config`` overrides its fields).
    ``device`` is accepted for config compatibility with any value: tokens follow the weights' device.
    ``ValueError`` for an unknown ``layer`` or a ``hidden`` layer without a valid ``layer_idx``.
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str = "cpu",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        text_config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        check_supported(type(self).__name__, "layer", layer, *self.LAYERS)
        if layer == "hidden" and (layer_idx is None or not 0 <= abs(layer_idx) <= 12):
            raise ValueError("layer 'hidden' needs layer_idx in [-12, 12]")
        self.tokenizer = load_clip_tokenizer()
        self.transformer = CLIPTextTransformer(clip_text_config(version, text_config))
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text: list[str]) -> torch.Tensor:
        """Token ids [B, max_length], padded with ``<|endoftext|>`` as the reference."""
        return tokenize(self.tokenizer, text, self.max_length)

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes uncut, start and end included; the encoder reads the first ``max_length``."""
        return count_tokens(self.tokenizer, text)

    def forward(self, text: list[str] | str) -> torch.Tensor:
        if isinstance(text, str):
            text = [text]
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        tokens = self.tokenize(list(text)).to(device)
        outputs = self.transformer(tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]

    def encode(self, text: list[str] | str) -> torch.Tensor:
        return self(text)


# --------------------------------------------------------------------------------------------
# OpenCLIP text tower (SD2.x ``cond_stage_model``)
# --------------------------------------------------------------------------------------------

# Text tower of open_clip's model_configs/<arch>.json (``text_cfg`` plus the shared ``embed_dim``).
OPENCLIP_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-H-14": dict(width=1024, heads=16, layers=24, context_length=77, vocab_size=49408, embed_dim=1024),
}


@dataclasses.dataclass(frozen=True)
class OpenCLIPTextConfig:
    """Architecture of an open_clip text tower (GELU, LayerNorm eps 1e-5, MLP width ``mlp_ratio * width``)."""

    width: int = 512
    heads: int = 8
    layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 512
    mlp_ratio: float = 4.0


def openclip_text_config(arch: str, overrides: Mapping[str, Any] | None = None) -> OpenCLIPTextConfig:
    """Local text config of open_clip model ``arch``, with optional field overrides (e.g. a tiny test tower)."""
    values = _local_config(OPENCLIP_TEXT_CONFIGS, arch, "ViT-H-14", overrides, "open_clip arch")
    fields = {f.name for f in dataclasses.fields(OpenCLIPTextConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown open_clip text config fields {unknown} (known: {sorted(fields)})")
    config = OpenCLIPTextConfig(**values)
    if config.width % config.heads:
        raise ValueError(f"width {config.width} is not divisible by heads {config.heads}")
    return config


class OpenCLIPSelfAttention(nn.Module):
    """Causal multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout.

    Keys: ``in_proj_weight`` [3*width, width] (q, k, v stacked), ``in_proj_bias`` [3*width],
    ``out_proj.weight`` [width, width], ``out_proj.bias`` [width].
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, width] -> [B, L, width]; token i attends to tokens 0..i (open_clip's causal mask)."""
        b, n, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class OpenCLIPResidualBlock(nn.Module):
    """open_clip 2.0.2 ``ResidualAttentionBlock`` (pre-LN; its optional ``ln_attn``/``mlp.ln`` are Identity)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_width = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = OpenCLIPSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        layers = [("c_fc", nn.Linear(width, mlp_width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp_width, width))]
        self.mlp = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, width] -> [B, L, width]."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    """Stack of ``layers`` residual blocks held as ``resblocks`` (open_clip's ``Transformer``)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(OpenCLIPResidualBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, skip_last: int = 0) -> torch.Tensor:
        """[B, L, width] -> [B, L, width], leaving out the last ``skip_last`` blocks."""
        for block in self.resblocks[: len(self.resblocks) - skip_last]:
            x = block(x)
        return x


class OpenCLIPTextModel(nn.Module):
    """open_clip ``CLIP`` without its ``visual`` tower: the parameters SD2.x keeps under ``cond_stage_model.model``.

    The causal attention mask is not stored (open_clip's ``attn_mask`` buffer is non-persistent);
    attention applies it on the fly, so a model built on the meta device needs no buffer fix-up.
    """

    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.text_projection = nn.Parameter(torch.empty(config.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        self.transformer = OpenCLIPTransformer(config.width, config.layers, config.heads, config.mlp_ratio)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.ln_final = nn.LayerNorm(config.width)
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's initialisation (normal weights with its standard deviations, zero attention biases)."""
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, tokens: torch.Tensor, skip_last: int = 0) -> torch.Tensor:
        """Token ids [B, context_length] -> ``ln_final`` of the hidden states [B, context_length, width].

        ``skip_last`` leaves out the last blocks (1 = SD2's "penultimate" layer).
        """
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x, skip_last=skip_last)
        return self.ln_final(x)


def openclip_clean_text(text: str) -> str:
    """open_clip's prompt cleaning: ``ftfy.fix_text``, HTML-unescape twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def openclip_tokenize(tokenizer: CLIPTokenizer, prompts: list[str] | str, context_length: int = 77) -> torch.Tensor:
    """Token ids [B, context_length] as open_clip's ``tokenize``: SOT, BPE, EOT, zero padding.

    Longer prompts are cut to ``context_length`` with EOT in the last slot. Special-token
    strings typed in a prompt (``<|endoftext|>``) are split into ordinary BPE tokens, as open_clip
    does. Known difference: open_clip 2.0.2 maps the literal strings ``<start_of_text>`` /
    ``<end_of_text>`` (its own special-token names) to SOT/EOT; here they are ordinary text.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    result = torch.zeros(len(prompts), context_length, dtype=torch.long)
    if not prompts:
        return result
    cleaned = [openclip_clean_text(p) for p in prompts]
    # open_clip cuts [SOT, *bpe, EOT] to context_length and puts EOT last: the same as keeping
    # context_length - 2 BPE tokens.
    bodies = tokenizer(
        cleaned, add_special_tokens=False, split_special_tokens=True, truncation=True, max_length=context_length - 2
    )["input_ids"]
    for row, body in zip(result, bodies):
        ids = [BOS_ID, *body, EOS_ID]
        row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result


class FrozenOpenCLIPEmbedder(nn.Module):
    """Prompts -> OpenCLIP text hidden states [B, 77, width] after ``ln_final`` (last or penultimate block).

    ``version`` (the reference's pretrained tag) and ``device`` are accepted for config compatibility with any
    value: the weights come from the checkpoint and tokens follow the weights' device. ``text_config`` overrides
    fields of the ``arch`` config. ``ValueError`` for an unknown ``arch`` or ``layer``, or a ``max_length`` other
    than the config's context length.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str = "cpu",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        text_config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        owner = type(self).__name__
        check_supported(owner, "layer", layer, *self.LAYERS)
        config = openclip_text_config(arch, text_config)
        check_supported(owner, "max_length", max_length, config.context_length)
        self.tokenizer = load_clip_tokenizer()
        self.model = OpenCLIPTextModel(config)
        self.max_length = max_length
        if freeze:
            self.freeze()
        self.layer = layer
        self.layer_idx = self.LAYERS.index(layer)

    def freeze(self) -> None:
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text: list[str] | str) -> torch.Tensor:
        """Token ids [B, max_length], zero-padded as open_clip's ``tokenize``."""
        return openclip_tokenize(self.tokenizer, text, self.max_length)

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes uncut, start and end included; the encoder reads the first ``max_length``."""
        body = self.tokenizer(openclip_clean_text(text), add_special_tokens=False, split_special_tokens=True,
                              verbose=False)  # fmt: skip
        return len(body["input_ids"]) + 2

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, 77] -> hidden states [B, 77, width], skipping the last ``layer_idx`` blocks."""
        return self.model(tokens, skip_last=self.layer_idx)

    def forward(self, text: list[str] | str) -> torch.Tensor:
        tokens = self.tokenize(text).to(self.model.token_embedding.weight.device)
        return self.encode_with_transformer(tokens)

    def encode(self, text: list[str] | str) -> torch.Tensor:
        return self(text)
