"""TAESD's decoder: the tiny autoencoder of madebyollin/taesd, a stand-in for the VAE decoder (about 1.2 M
parameters instead of about 49 M) that decodes Stable Diffusion latents to images.

The model's state-dict keys are those of the public ``taesd_decoder.pth`` / ``taesd_decoder.safetensors``
(``nn.Sequential`` indices: ``1.weight``, ``3.conv.0.weight``, ..., ``19.bias``). A diffusers ``AutoencoderTiny``
(a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``) spells them ``decoder.layers.N...`` with
``N`` one less (diffusers has no module for the clamp at index 0); its encoder keys are ignored.

Latents: TAESD decodes the latent the UNet samples *as is* (diffusers' ``AutoencoderTiny`` has ``scaling_factor``
1.0), not the ``1 / scale_factor`` rescaled one the full VAE decodes; its ``latent_magnitude`` / ``latent_shift``
only serve to store latents as 8-bit images and play no part in decoding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from cldm.checkpoint import CheckpointError, StateDict, load_state_dict

WIDTH = 64  # channels of every hidden layer
DIFFUSERS_PREFIX = "decoder.layers."
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# config.json fields of a diffusers AutoencoderTiny that must hold these values for this decoder to be its decoder.
DIFFUSERS_CONFIG = {
    "out_channels": 3,
    "decoder_block_out_channels": [WIDTH] * 4,
    "num_decoder_blocks": [3, 3, 3, 1],
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}
SPEC_HELP = "full (the model's VAE decoder, the default) or taesd:PATH (a taesd_decoder .pth/.safetensors or a " \
            "diffusers AutoencoderTiny folder)"  # fmt: skip


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3): ``3 tanh(x / 3)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block at constant width: ``relu(x + conv(relu(conv(relu(conv(x))))))``, 3x3 convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))  # fmt: skip
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + x)


class TAESDDecoder(nn.Sequential):
    """TAESD's decoder: clamp, conv ``latent_channels -> 64``, ReLU; three times (3 blocks, nearest x2
    upsampling, conv without bias); one block, conv ``64 -> 3``. Keys as the public ``taesd_decoder.pth``."""

    def __init__(self, latent_channels: int = 4):
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, WIDTH), nn.ReLU()]
        for _ in range(3):
            layers += [Block(WIDTH), Block(WIDTH), Block(WIDTH), nn.Upsample(scale_factor=2, mode="nearest"),
                       _conv(WIDTH, WIDTH, bias=False)]  # fmt: skip
        layers += [Block(WIDTH), _conv(WIDTH, 3)]
        super().__init__(*layers)
        self.latent_channels = latent_channels

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The UNet's latent ``z`` [B, latent_channels, h, w] (float, not rescaled by ``1 / scale_factor``) ->
        image [B, 3, 8h, 8w] roughly in [-1, 1], not clipped (the range of ``decode_first_stage``; the network
        itself outputs [0, 1]). Same dtype and device as ``z``, which must match the decoder's."""
        return self(z) * 2 - 1


def diffusers_to_taesd(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A diffusers ``AutoencoderTiny`` state dict's decoder (``decoder.layers.N.rest``) in the public
    ``taesd_decoder`` keys (``{N + 1}.rest``); other keys (the encoder's) are dropped, a ``decoder.layers.*`` key
    without an index is kept as it is (for the key check to report). Same tensor objects."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith(DIFFUSERS_PREFIX):
            index, _, rest = key[len(DIFFUSERS_PREFIX) :].partition(".")
            out[f"{int(index) + 1}.{rest}" if index.isdigit() else key] = value
    return out


def _diffusers_folder_weights(folder: Path) -> Path:
    """The weights file of a diffusers ``AutoencoderTiny`` folder, after checking its ``config.json`` (when
    present) describes this decoder; :class:`CheckpointError` naming the folder or its config otherwise."""
    config_path = folder / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{config_path}: not a readable JSON config ({err.__class__.__name__})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object")
        wrong = [f"{k}={config[k]!r} (expected {v!r})" for k, v in DIFFUSERS_CONFIG.items()
                 if k in config and config[k] != v]  # fmt: skip
        if wrong:
            raise CheckpointError(f"{config_path}: not a TAESD decoder this project runs: {', '.join(wrong)}")
    for name in DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: a folder without {' or '.join(DIFFUSERS_WEIGHTS)} (not a diffusers "
                          "AutoencoderTiny folder)")  # fmt: skip


def _public_layout(state_dict: Mapping[str, torch.Tensor], name: str) -> StateDict:
    """``state_dict`` in the public keys, from either layout (detected from its keys); :class:`CheckpointError`
    naming ``name`` when it is in neither."""
    if any(k.startswith(DIFFUSERS_PREFIX) for k in state_dict):
        return diffusers_to_taesd(state_dict)
    if all(k.partition(".")[0].isdigit() for k in state_dict):
        if "0.weight" in state_dict:  # the decoder's index 0 is the clamp; the encoder starts with a conv
            raise CheckpointError(f"{name}: a TAESD encoder (key 0.weight), not the decoder (taesd_decoder.*)")
        return dict(state_dict)
    found = ", ".join(sorted(state_dict)[:2])
    raise CheckpointError(f"{name}: not a TAESD decoder (neither the taesd_decoder keys 1.weight, 3.conv.0.weight, "
                          f"... nor a diffusers AutoencoderTiny's decoder.layers.*); found {found}, ...")  # fmt: skip


def load_taesd_decoder(path: str | os.PathLike) -> TAESDDecoder:
    """The TAESD decoder at ``path`` (float32, on the CPU, in eval mode, without gradients): a public
    ``taesd_decoder.pth`` / ``.safetensors``, a diffusers ``AutoencoderTiny`` folder, or its weights file.

    Read with :func:`cldm.checkpoint.load_state_dict` (weights only). Raises :class:`CheckpointError`, one line
    naming the file or folder, when it is missing or unreadable, in neither layout, a TAESD encoder, or has
    missing, unexpected or misshapen tensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: TAESD decoder not found")
    weights = _diffusers_folder_weights(path) if path.is_dir() else path
    state_dict = _public_layout(load_state_dict(weights), str(weights))
    first = state_dict.get("1.weight")
    decoder = TAESDDecoder(first.shape[1] if first is not None and first.dim() == 4 else 4)
    expected = decoder.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{len(keys)} {what} ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})"
                    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                       ("tensors of the wrong shape", wrong)) if keys]  # fmt: skip
        raise CheckpointError(f"{weights}: not a TAESD decoder: {'; '.join(problems)}")
    decoder.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return decoder.eval().requires_grad_(False)


def decoder_from_spec(spec: TAESDDecoder | str | None) -> TAESDDecoder | None:
    """The decoder ``--vae-decoder`` names: ``None`` for ``"full"`` (or ``None``: the model's VAE), the loaded
    TAESD decoder for ``"taesd:PATH"`` (:func:`load_taesd_decoder`), a :class:`TAESDDecoder` as given.
    ``ValueError`` naming the flag for any other value; :class:`CheckpointError` (a ``ValueError``) for a file
    that cannot be used."""
    if isinstance(spec, TAESDDecoder):
        return spec
    if spec is None or spec == "full":
        return None
    kind, sep, path = spec.partition(":")
    if kind != "taesd" or not sep or not path:
        raise ValueError(f"--vae-decoder: expected {SPEC_HELP}, got {spec!r}")
    return load_taesd_decoder(path)
