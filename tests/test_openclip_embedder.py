"""The native ``FrozenOpenCLIPEmbedder`` (SD2.x text encoder) against the reference's open_clip 2.0.2.

``data/openclip_tiny_reference.pt`` was made with the reference ``FrozenOpenCLIPEmbedder``
(lllyasviel/ControlNet ed85cd1) on open_clip_torch 2.0.2 (torch 2.13 CPU): a tiny model config
registered with ``open_clip.add_model_config`` (its ``text_cfg`` and ``embed_dim`` are stored in the
file), text-tower weights from ``seeded_state_dict(shapes, seed)`` below, and the reference's
``emb(prompts)`` under ``torch.no_grad()`` for ``layer="last"`` and ``"penultimate"``. The same
comparison on the full ViT-H-14 text tower (open_clip's own random init) gave identical outputs.
Pinned token ids are ``open_clip.tokenize`` (2.0.2) outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder, openclip_tokenize
from ldm.modules.encoders.tokenizer import load_clip_tokenizer
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "tests" / "data" / "reference_sd21_keys.json"
REFERENCE = REPO / "tests" / "data" / "openclip_tiny_reference.pt"
V21_CONFIG = REPO / "models" / "cldm_v21.yaml"
PREFIX = "cond_stage_model."
SOT, EOT = 49406, 49407
TINY = dict(width=32, heads=4, layers=2, embed_dim=16)

# prompt -> open_clip.tokenize ids before the zero padding.
PINNED = {
    "a photo of a cat": [SOT, 320, 1125, 539, 320, 2368, EOT],
    "": [SOT, EOT],
    "A PHOTO of a Cat!!": [SOT, 320, 1125, 539, 320, 2368, 748, EOT],
    "I'M HERE, YOU'LL SEE, WE'D": [SOT, 328, 880, 763, 267, 592, 1342, 862, 267, 649, 1896, EOT],
    "don\u2019t \u201cquote\u201d me": [SOT, 847, 713, 257, 4020, 257, 614, EOT],
    "fish &amp;amp; chips": [SOT, 2759, 261, 8855, EOT],
    "a <b>bold</b> &amp; move": [SOT, 320, 283, 321, 285, 8911, 34308, 321, 285, 261, 2783, EOT],
    # a typed "<|endoftext|>" is plain text to open_clip (HF's tokenizer would make it EOT)
    "a <|endoftext|> b": [SOT, 320, 27, 347, 40786, 4160, 91, 285, 321, EOT],
    "word " * 80: [SOT, *[2653] * 75, EOT],
    "x" * 300: [SOT, *[32035] * 74, 22819, EOT],
}


def seeded_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights: LayerNorm scales 1 + 0.1 N, matrices N / sqrt(shape[1]), the rest 0.1 N."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=generator)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight")):
            state[name] = 1 + 0.1 * noise
        elif len(shape) == 2:
            state[name] = noise * shape[1] ** -0.5
        else:
            state[name] = 0.1 * noise
    return state


def shapes_of(module: torch.nn.Module) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def manifest() -> dict[str, list]:
    return json.loads(MANIFEST.read_text())["keys"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder]:
    """Tiny "last" and "penultimate" embedders sharing seeded weights."""
    last = FrozenOpenCLIPEmbedder(layer="last", text_config=TINY)
    penultimate = FrozenOpenCLIPEmbedder(layer="penultimate", text_config=TINY)
    state = seeded_state_dict({k: tuple(v.shape) for k, v in last.model.state_dict().items()}, seed=0)
    last.model.load_state_dict(state)
    penultimate.model.load_state_dict(state)
    return last, penultimate


@pytest.mark.parametrize("prompt", list(PINNED))
def test_tokenize_matches_open_clip(tokenizer, prompt: str) -> None:
    ids = openclip_tokenize(tokenizer, [prompt])
    expected = torch.zeros(1, 77, dtype=torch.long)
    expected[0, : len(PINNED[prompt])] = torch.tensor(PINNED[prompt])
    assert torch.equal(ids, expected)


def test_tokenize_batch_and_str(tokenizer) -> None:
    batch = openclip_tokenize(tokenizer, list(PINNED))
    assert batch.shape == (len(PINNED), 77) and batch.dtype == torch.long
    assert torch.equal(openclip_tokenize(tokenizer, "a photo of a cat"), batch[:1])
    assert openclip_tokenize(tokenizer, []).shape == (0, 77)


def test_full_size_keys_equal_manifest(manifest: dict[str, list]) -> None:
    with torch.device("meta"):
        embedder = FrozenOpenCLIPEmbedder(layer="penultimate")
    expected = {k.removeprefix(PREFIX): v for k, v in manifest.items() if k.startswith(PREFIX)}
    assert len(expected) == 294
    assert shapes_of(embedder) == expected
    assert list(embedder.named_buffers()) == []  # open_clip's attn_mask is non-persistent; none is kept here
    assert embedder.layer_idx == 1 and not any(p.requires_grad for p in embedder.parameters())


def test_v21_config_keys_equal_manifest(manifest: dict[str, list]) -> None:
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(V21_CONFIG).model)
    assert isinstance(model.cond_stage_model, FrozenOpenCLIPEmbedder)
    assert model.cond_stage_model.layer == "penultimate"
    shapes = shapes_of(model)
    assert len(shapes) == len(manifest) == 1581
    assert shapes == manifest


def test_tiny_forward_shape_and_layers(tiny_pair) -> None:
    last, penultimate = tiny_pair
    prompts = ["a photo of a cat", "a dog"]
    with torch.no_grad():
        z_last, z_pen = last(prompts), penultimate.encode(prompts)
    assert z_last.shape == z_pen.shape == (2, 77, TINY["width"])
    assert (z_last - z_pen).abs().max() > 0.1
    with torch.no_grad():
        assert torch.equal(last.encode(prompts), z_last)
        # penultimate = ln_final of the hidden states before the last block
        tokens = last.tokenize(prompts)
        x = last.model.token_embedding(tokens) + last.model.positional_embedding
        x = last.model.transformer.resblocks[0](x)
        assert torch.allclose(last.model.ln_final(x), z_pen, atol=1e-6)


def test_meta_build_then_assign(tiny_pair) -> None:
    last, _ = tiny_pair
    with torch.device("meta"):
        embedder = FrozenOpenCLIPEmbedder(layer="last", text_config=TINY)
    embedder.load_state_dict(last.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in embedder.state_dict().values())
    with torch.no_grad():
        assert torch.equal(embedder(["a photo of a cat"]), last(["a photo of a cat"]))


def test_matches_open_clip_reference() -> None:
    reference = torch.load(REFERENCE)
    text_config = dict(reference["text_cfg"], embed_dim=reference["embed_dim"])
    for layer in FrozenOpenCLIPEmbedder.LAYERS:
        embedder = FrozenOpenCLIPEmbedder(layer=layer, text_config=text_config)
        shapes = {k: tuple(v.shape) for k, v in embedder.model.state_dict().items()}
        embedder.model.load_state_dict(seeded_state_dict(shapes, reference["seed"]), strict=True)
        assert torch.equal(embedder.tokenize(reference["prompts"]), reference["tokens"])
        with torch.no_grad():
            out = embedder(reference["prompts"])
        assert out.shape == reference[layer].shape
        assert (out - reference[layer]).abs().max() < 1e-5, layer


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="layer"):
        FrozenOpenCLIPEmbedder(layer="pooled", text_config=TINY)
    with pytest.raises(ValueError, match="no local text config"):
        FrozenOpenCLIPEmbedder(arch="ViT-bigG-14")
    with pytest.raises(ValueError, match="unknown open_clip text config"):
        FrozenOpenCLIPEmbedder(text_config=dict(TINY, hidden_size=8))
    with pytest.raises(ValueError, match="max_length"):
        FrozenOpenCLIPEmbedder(max_length=64, text_config=TINY)
