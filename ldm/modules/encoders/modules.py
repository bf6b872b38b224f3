"""Frozen text encoders (``cond_stage_model``), built offline from local configs.

``FrozenCLIPEmbedder`` is SD1.x's CLIP ViT-L/14 text tower. The reference built it with
``from_pretrained("openai/clip-vit-large-patch14")``; here the architecture comes from the config
below, the weights from the ControlNet checkpoint and the BPE vocabulary from files shipped
with this package, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.tokenizer import load_clip_tokenizer, tokenize

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


class AbstractEncoder(nn.Module):
    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


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


def clip_text_config(version: str, overrides: Mapping[str, Any] | None = None) -> CLIPTextConfig:
    """Local CLIP text config for a known ``version`` (hub name), with optional overrides."""
    if version not in CLIP_TEXT_CONFIGS and not overrides:
        known = ", ".join(CLIP_TEXT_CONFIGS)
        raise ValueError(f"no local text config for CLIP version '{version}' (known: {known}; or give text_config)")
    values = dict(CLIP_TEXT_CONFIGS.get(version, CLIP_TEXT_CONFIGS["openai/clip-vit-large-patch14"]))
    values.update(overrides or {})
    config = CLIPTextConfig(**values)
    config._attn_implementation = "sdpa"
    return config


class FrozenCLIPEmbedder(AbstractEncoder):
    """Prompts -> CLIP text hidden states [B, 77, hidden_size] (last layer, or ``layer_idx`` with ``hidden``)."""

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
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}")
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
