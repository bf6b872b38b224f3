"""Checkpoint files and their key layouts: the one place that reads, writes and renames checkpoints.

Files: ``.ckpt``/``.pth``/``.pt``/``.bin`` (torch, read memory-mapped with ``weights_only``) and
``.safetensors``; a Lightning-style ``{"state_dict": ...}`` nesting is unwrapped. Every problem is a
:class:`CheckpointError` with a one-line message naming the file.

Layouts: :data:`LAYOUTS` is the one table of the key spellings this project converts between. Each row
converts a state dict into the reference's keys (``"ldm"``, what the model's ``state_dict()`` has) and,
where it can, back. :func:`convert` goes from any row to any other through ``"ldm"``. Conversions
rename keys only: the tensors are the same objects (no copy, no dtype change).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS

StateDict = dict[str, torch.Tensor]
Conversion = Callable[[Mapping[str, torch.Tensor]], StateDict]

# Buffers some checkpoints carry that the model recreates itself (transformers 4.x saved it).
IGNORED_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
# Buffers the reference code saves but that a checkpoint may lack; the model's own value is used.
OPTIONAL_KEYS = ("logvar",)
CLIP_PREFIX = "cond_stage_model.transformer."
CONTROL_PREFIX = "control_model."
UNET_PREFIX = "model.diffusion_model."
# The UNet's decoder half: the ControlNet copies every other UNet tensor (time_embed, input_blocks, middle_block).
UNET_DECODER = ("output_blocks.", "out.")


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be used; the message is one line naming the file."""


# --- files ---------------------------------------------------------------------------------------------------


def _shorten(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def get_state_dict(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """Unwrap a Lightning-style ``{"state_dict": ...}`` checkpoint (anything else is returned as is)."""
    return d.get("state_dict", d)


def _read_checkpoint(path: Path, location: str) -> Mapping[str, Any]:
    if path.suffix.lower() == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path), device=location)
    try:
        return torch.load(path, map_location=location, weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        # legacy (pre-zip) serialization cannot be memory-mapped
        return torch.load(path, map_location=location, weights_only=True)


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The reference's own spelling of a state dict's keys: the CLIP text encoder under
    ``cond_stage_model.transformer.text_model.*`` (as transformers 4 saved it; transformers 5 drops the
    ``text_model.`` level) and without the ``position_ids`` buffer the model recreates. Values unchanged."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key in IGNORED_KEYS:
            continue
        if key.startswith(CLIP_PREFIX) and not key.startswith(CLIP_PREFIX + "text_model."):
            key = CLIP_PREFIX + "text_model." + key[len(CLIP_PREFIX) :]
            if key in IGNORED_KEYS:
                continue
        out[key] = value
    return out


def load_state_dict(ckpt_path: str | os.PathLike, location: str = "cpu") -> StateDict:
    """Read a ``.ckpt``/``.pth`` (memory-mapped, weights only) or ``.safetensors`` checkpoint.

    Returns the flat state dict (tensors in the file's dtypes, on ``location``) with keys normalised by
    :func:`normalize_keys`; non-tensor entries are dropped. Raises :class:`CheckpointError` with a one-line
    message for a missing, truncated or corrupt file, or one holding no tensors.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        data = _read_checkpoint(path, location)
    except Exception as err:  # torch, zipfile, pickle and safetensors errors all mean "unreadable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {reason}") from err
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    state_dict = get_state_dict(data)
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return normalize_keys(tensors)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` (``name``: the file, for the message) unless ``state_dict`` has exactly the
    model's keys and shapes (:data:`OPTIONAL_KEYS` may be absent; dtypes are not compared)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and k not in OPTIONAL_KEYS]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_shorten(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_shorten(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} tensors with the wrong shape ({_shorten(wrong, 2)})")
    if problems:
        raise CheckpointError(f"{name}: does not match the model config: " + "; ".join(problems))


def cast_weights(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> StateDict:
    """Floating tensors cast to ``dtype``, except the diffusion schedule buffers, which stay float32
    (bfloat16 would round alphas_cumprod[0] to 1.0 and break the DDIM coefficients). Keys unchanged;
    integer tensors and tensors already in ``dtype`` are the same objects."""
    return {
        k: v.to(dtype) if v.is_floating_point() and k not in SCHEDULE_BUFFERS else v for k, v in state_dict.items()
    }


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``state_dict`` atomically: a flat ``.safetensors`` file for that suffix, else torch.save of
    ``{"state_dict": ...}``. The parent folder is created; a failed write leaves no file. Raises ``OSError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        if path.suffix.lower() == ".safetensors":
            import safetensors.torch

            safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
        else:
            torch.save({"state_dict": dict(state_dict)}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- layouts -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One row of :data:`LAYOUTS`: a spelling of checkpoint keys and its conversions to and from ``"ldm"``."""

    description: str
    to_ldm: Conversion  # a state dict in this layout -> the same tensors under reference keys
    from_ldm: Conversion  # a state dict in reference keys -> this layout (the tensors the layout holds)


def control_source_key(key: str) -> str:
    """The Stable Diffusion key a ControlLDM key is initialised from: ``control_model.X`` <-
    ``model.diffusion_model.X`` (the ControlNet is a copy of the UNet's encoder); other keys are their own."""
    if key.startswith(CONTROL_PREFIX):
        return UNET_PREFIX + key[len(CONTROL_PREFIX) :]
    return key


def sd_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A Stable Diffusion checkpoint (LatentDiffusion keys; ``control_model.*`` keys in it are ignored) plus the
    ControlNet's copy of its UNet: ``control_model.X`` is the tensor of ``model.diffusion_model.X`` for every
    UNet key outside the decoder half (``output_blocks``, ``out``). What a ControlNet has beyond that copy
    (hint encoder, zero convs) is absent."""
    out = ldm_to_sd(normalize_keys(state_dict))
    for key, value in list(out.items()):
        if key.startswith(UNET_PREFIX) and not key[len(UNET_PREFIX) :].startswith(UNET_DECODER):
            out[CONTROL_PREFIX + key[len(UNET_PREFIX) :]] = value
    return out


def ldm_to_sd(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The Stable Diffusion part of a ControlLDM state dict: every key except ``control_model.*``."""
    return {k: v for k, v in state_dict.items() if not k.startswith(CONTROL_PREFIX)}


LAYOUTS: dict[str, Layout] = {
    "ldm": Layout("the reference's keys (ControlNet 1.0 releases, the model's state_dict())", normalize_keys, dict),
    "sd": Layout("a Stable Diffusion checkpoint (ldm keys without control_model.*); into ldm the ControlNet gets "
                 "its copy of the UNet encoder, as tool_add_control.py initialises it", sd_to_ldm, ldm_to_sd),
}  # fmt: skip


def convert(state_dict: Mapping[str, torch.Tensor], source: str, target: str) -> StateDict:
    """``state_dict`` from the ``source`` layout of :data:`LAYOUTS` to ``target``, through ``"ldm"``. The tensors
    are the same objects. Raises ``ValueError`` for an unknown layout, :class:`CheckpointError` for a key the
    conversion has no place for."""
    for name in (source, target):
        if name not in LAYOUTS:
            raise ValueError(f"unknown checkpoint layout '{name}' (choose from {', '.join(LAYOUTS)})")
    return LAYOUTS[target].from_ldm(LAYOUTS[source].to_ldm(state_dict))
