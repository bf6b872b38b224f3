"""LoRA files fused into a loaded model: the kohya/A1111 layout and the diffusers/PEFT layout.

Layouts (``.safetensors`` read with the ``safetensors`` library; ``.ckpt``/``.pt``/``.bin`` with
:func:`cldm.checkpoint.load_state_dict`'s weights-only reader):

* kohya / A1111: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight`` and an optional ``.alpha``;
  ``lora_te_<module>`` for the text encoder. ``<module>`` is a module path with dots written as underscores:
  diffusers' UNet path (kohya trains SD1.x on diffusers' UNet: ``lora_unet_down_blocks_0_attentions_0_proj_in``)
  or this project's ldm path (``lora_unet_input_blocks_1_1_proj_in``); for the text encoder transformers'
  CLIP path (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).
* diffusers / PEFT: ``unet.<diffusers module path>.lora_A.weight`` / ``.lora_B.weight`` (also spelt
  ``.lora.down.weight`` / ``.lora.up.weight``, ``.lora_linear_layer.down.weight`` / ``.up.weight``, or the
  attention-processor ``.processor.to_q_lora.down.weight``) and ``text_encoder.<module path>``; the alphas
  come from ``.alpha`` keys or the file's ``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``), else alpha = rank.

Fusing: ``W <- W + scale * alpha / rank * up @ down`` (``sqrt(rank)`` with ``use_rslora``) for each matched
linear layer and 1x1 or 3x3 convolution (LoCon), computed in float32 and stored in the layer's dtype (bfloat16
under ``--low-memory``). A touched parameter is replaced by a new tensor: memory-mapped checkpoint weights are
never written (their pages are dropped from RAM once read), untouched parameters stay the same objects, and
RAM grows by the touched layers only. The ControlNet's copies of the UNet encoder layers change only with
``controlnet=True``. A file is checked whole before anything changes: a key of an unknown kind, a layer that
matches nothing in the model, a shape that does not fit or a non-finite value is a :class:`LoraError` naming
the file, and the model is left as it was.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cldm.checkpoint import (
    CLIP_PREFIX,
    CONTROL_PREFIX,
    UNET_PREFIX,
    CheckpointError,
    load_state_dict,
    shorten_keys,
    unet_to_diffusers,
)
from cldm.model import check_finite
from ldm.memory import release_mapped_tensors

KOHYA_UNET, KOHYA_TEXT = "lora_unet_", "lora_te_"
DIFFUSERS_UNET, DIFFUSERS_TEXT = "unet.", "text_encoder."
# How each layout names the parts of one LoRA layer (key endings after the module name).
PARTS = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",  # kohya / A1111
    ".lora_A.weight": "down", ".lora_B.weight": "up",  # PEFT
    ".lora.down.weight": "down", ".lora.up.weight": "up",  # diffusers before PEFT
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",  # diffusers text encoder
}  # fmt: skip
# diffusers' attention-processor spelling (before PEFT): ``<attn>.processor.to_q_lora.down.weight`` in the UNet,
# ``<self_attn>.to_q_lora.down.weight`` in the text encoder; read as ``<module>.lora.down.weight``.
OLD_ATTENTION = re.compile(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
OLD_UNET_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
OLD_TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (the PEFT LoraConfig per component)


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to the model; the message is one line naming the file."""


@dataclass
class LoraLayer:
    """One LoRA layer of a file: ``down`` [rank, in, (kh, kw)], ``up`` [out, rank, (1, 1)], ``alpha`` (None:
    the rank), under the name the file gives it (without the part suffix)."""

    name: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class FusedLora:
    """What :func:`apply_lora` did: the file, its scale, the LoRA layers it holds, the model parameters it replaced
    (names in the model's ``state_dict`` keys) and the bytes of their new tensors."""

    path: Path
    scale: float
    layers: int
    parameters: list[str] = field(default_factory=list)
    bytes: int = 0

    def summary(self) -> str:
        parts = Counter(name.split(".", 1)[0] for name in self.parameters)
        where = ", ".join(f"{n} in {PART_NAMES.get(part, part)}" for part, n in sorted(parts.items()))
        return f"{self.path.name} x{self.scale:g}: {self.layers} LoRA layers fused ({where})"


PART_NAMES = {"model": "the UNet", "cond_stage_model": "the text encoder", "control_model": "the ControlNet"}


# --- reading ---------------------------------------------------------------------------------------------------


def _metadata(path: Path) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata`` of a ``.safetensors`` file (component-prefixed LoraConfig fields,
    e.g. ``unet.lora_alpha``), or {}."""
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError as err:
        raise LoraError(f"{path}: unreadable {METADATA_KEY} metadata ({err.msg})") from None


def read_lora(path: str | os.PathLike) -> dict[str, LoraLayer]:
    """The LoRA layers of a file in either layout, by name (the key without its part suffix), with their alphas
    (from ``.alpha`` keys or diffusers' metadata; None where the file gives none). Tensors in the file's dtypes.
    Raises :class:`LoraError` naming the file when it is missing or unreadable, holds keys of another kind
    (LoHa, LoKr, DoRA, biases), a layer lacks its down or up part, or a value is not finite."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: LoRA file not found")
    try:
        state_dict = load_state_dict(path)
    except CheckpointError as err:
        raise LoraError(str(err)) from None
    check_finite(state_dict, str(path))
    layers: dict[str, LoraLayer] = {}
    unknown = []
    for key, value in state_dict.items():
        key = _current_spelling(key)
        suffix = next((s for s in PARTS if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        name = key[: -len(suffix)]
        layer = layers.setdefault(name, LoraLayer(name))
        if PARTS[suffix] == "alpha":
            layer.alpha = float(value)
        else:
            setattr(layer, PARTS[suffix], value)
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} keys are not LoRA down/up/alpha weights ({shorten_keys(unknown)}); "
                        "LoHa, LoKr, DoRA and LoRA biases are not supported")  # fmt: skip
    incomplete = [name for name, layer in layers.items() if layer.down is None or layer.up is None]
    if incomplete:
        raise LoraError(f"{path}: {len(incomplete)} LoRA layers lack their down or up weight "
                        f"({shorten_keys(incomplete)})")
    _alphas_from_metadata(layers, _metadata(path), path)
    return layers


def _current_spelling(key: str) -> str:
    """``key`` with diffusers' attention-processor spelling (:data:`OLD_ATTENTION`) rewritten to the module's
    own name and ``.lora.down/up.weight``; other keys unchanged."""
    found = OLD_ATTENTION.search(key)
    if found is None:
        return key
    names = OLD_TEXT_NAMES if key.startswith(DIFFUSERS_TEXT) else OLD_UNET_NAMES
    return f"{key[: found.start()]}.{names[found[1]]}.lora.{found[2]}.weight"


def _alphas_from_metadata(layers: dict[str, LoraLayer], metadata: Mapping[str, Any], path: Path) -> None:
    """Set the alpha of each layer without an ``.alpha`` key from diffusers' metadata: the component's
    ``alpha_pattern`` entry that ends the module name (PEFT's rule), else its ``lora_alpha``; ``use_rslora``
    divides by sqrt(rank) instead of rank (kept as an equivalent alpha)."""
    for component in (DIFFUSERS_UNET, DIFFUSERS_TEXT):
        config = {k[len(component) :]: v for k, v in metadata.items() if k.startswith(component)}
        if not config:
            continue
        if config.get("use_dora"):
            raise LoraError(f"{path}: a DoRA adapter ({component}use_dora); DoRA is not supported")
        patterns = config.get("alpha_pattern") or {}
        for name, layer in layers.items():
            if not name.startswith(component) or layer.alpha is not None:
                continue
            module = name[len(component) :]
            found = next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), None)
            alpha = float(found if found is not None else config.get("lora_alpha", layer.rank))
            layer.alpha = alpha * math.sqrt(layer.rank) if config.get("use_rslora") else alpha


# --- the model's layers under LoRA names -----------------------------------------------------------------------


def unet_diffusers_names(unet: nn.Module) -> dict[str, str]:
    """ldm module path -> diffusers ``UNet2DConditionModel`` module path, for every linear and conv layer of an
    ldm ``UNetModel``, from the UNet row of :data:`cldm.checkpoint.LAYOUTS` (:func:`cldm.checkpoint.unet_to_diffusers`,
    which renames keys and keeps the tensors: each parameter is found again by identity)."""
    params = {UNET_PREFIX + k: v for k, v in unet.state_dict(keep_vars=True).items()}
    ldm_key = {id(v): k[len(UNET_PREFIX) :] for k, v in params.items()}
    layers = {name for name, _ in fusable_layers(unet)}
    names = {}
    for key, tensor in unet_to_diffusers(params).items():
        path = ldm_key[id(tensor)].rpartition(".")[0]
        if path in layers:
            names[path] = key.rpartition(".")[0]
    return names


def fusable_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of the linear layers and 2-D convolutions a LoRA can change."""
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            yield name, layer


Target = tuple[str, nn.Module]  # (parameter prefix in the model's state_dict, layer)


def lora_targets(model: nn.Module, controlnet: bool = False) -> dict[str, list[Target]]:
    """Every LoRA layer name this model answers to (both layouts, diffusers and ldm spellings) -> the layers it
    changes: one UNet or text-encoder layer, plus the ControlNet's copy of a UNet encoder layer with
    ``controlnet``. The model is a ``LatentDiffusion``/``ControlLDM`` (``model.diffusion_model``, a CLIP
    ``cond_stage_model``; other text encoders get no names)."""
    table: dict[str, list[Target]] = {}
    unet = model.model.diffusion_model
    copy = getattr(model, "control_model", None) if controlnet else None
    copies = dict(fusable_layers(copy)) if copy is not None else {}
    for path, diffusers in unet_diffusers_names(unet).items():
        targets = [(UNET_PREFIX + path, unet.get_submodule(path))]
        if path in copies:
            targets.append((CONTROL_PREFIX + path, copies[path]))
        for name in (KOHYA_UNET + path.replace(".", "_"), KOHYA_UNET + diffusers.replace(".", "_"),
                     DIFFUSERS_UNET + diffusers):  # fmt: skip
            table[name] = targets
    text = getattr(model.cond_stage_model, "transformer", None)
    if text is not None and hasattr(text, "text_model"):
        for path, layer in fusable_layers(text):
            targets = [(CLIP_PREFIX + path, layer)]
            for name in (KOHYA_TEXT + path.replace(".", "_"), DIFFUSERS_TEXT + path,
                         DIFFUSERS_TEXT + path.removeprefix("text_model.")):  # fmt: skip
                table[name] = targets
    return table


# --- fusing ----------------------------------------------------------------------------------------------------


def lora_fits(layer: LoraLayer, weight_shape: torch.Size) -> bool:
    """Whether ``up @ down`` (each flattened to 2-D) has the shape of a weight of ``weight_shape``: a
    linear-shaped LoRA on a 1x1 conv and the reverse fit too."""
    down, up = layer.down.shape, layer.up.shape
    return (len(up) >= 2 and math.prod(up[1:]) == down[0] and up[0] == weight_shape[0]
            and math.prod(down[1:]) == math.prod(weight_shape[1:]))  # fmt: skip


def lora_delta(layer: LoraLayer, weight_shape: torch.Size, scale: float) -> torch.Tensor:
    """``scale * alpha / rank * up @ down`` in float32, shaped as the weight (which :func:`lora_fits`)."""
    alpha = layer.rank if layer.alpha is None else layer.alpha
    up, down = layer.up.float().flatten(1), layer.down.float().flatten(1)
    return (up @ down).mul_(scale * alpha / layer.rank).reshape(weight_shape)


def _plan(path: Path, layers: Mapping[str, LoraLayer], table: Mapping[str, list[Target]]
          ) -> list[tuple[LoraLayer, list[Target]]]:  # fmt: skip
    """Each LoRA layer with the model layers it changes; raises :class:`LoraError` unless all match and fit."""
    unmatched = [name for name in layers if name not in table]
    if len(unmatched) == len(layers):
        raise LoraError(f"{path}: none of its {len(layers)} LoRA layers matches a layer of this model's UNet or "
                        f"text encoder ({shorten_keys(unmatched)}); a LoRA for another model?")  # fmt: skip
    if unmatched:
        raise LoraError(f"{path}: {len(unmatched)} of its {len(layers)} LoRA layers match no layer of this model "
                        f"({shorten_keys(unmatched)}); nothing applied")  # fmt: skip
    plan = [(layers[name], table[name]) for name in layers]
    wrong = [f"{lora.name} up {tuple(lora.up.shape)}, down {tuple(lora.down.shape)} vs {tuple(weight.shape)}"
             for lora, targets in plan if not lora_fits(lora, (weight := targets[0][1].weight).shape)]  # fmt: skip
    if wrong:
        raise LoraError(f"{path}: {len(wrong)} LoRA layers do not fit the model's layer shapes ({shorten_keys(wrong)})")
    return plan


def apply_lora(model: nn.Module, path: str | os.PathLike, scale: float = 1.0, controlnet: bool = False) -> FusedLora:
    """Fuse the LoRA file at ``path`` into ``model`` (a ``ControlLDM`` or ``LatentDiffusion``) with weight
    ``scale``: every matched UNet and text-encoder layer's weight becomes ``W + scale * alpha / rank * up @ down``
    (float32 arithmetic, stored in ``W``'s dtype), as a new parameter; with ``controlnet`` the ControlNet's
    copies of the UNet encoder layers get the same change. Untouched parameters stay the same objects and the
    replaced ones are not written (pages of memory-mapped ones are dropped from RAM). Returns a
    :class:`FusedLora`. Raises :class:`LoraError` (one line naming the file; the model unchanged) for a missing,
    unreadable or non-LoRA file, layers that match nothing in the model (counts and examples), shapes that do
    not fit, or a non-finite ``scale``."""
    path = Path(path)
    if not math.isfinite(scale):
        raise LoraError(f"{path}: the LoRA scale must be a finite number, got {scale}")
    plan = _plan(path, read_lora(path), lora_targets(model, controlnet))
    report = FusedLora(path, scale, len(plan))
    for lora, targets in plan:
        for prefix, layer in targets:
            old = layer.weight
            new = (old.float() + lora_delta(lora, old.shape, scale).to(old.device)).to(old.dtype)
            layer.weight = nn.Parameter(new, requires_grad=old.requires_grad)
            release_mapped_tensors([old])
            report.parameters.append(prefix + ".weight")
            report.bytes += new.nbytes
    return report


def apply_loras(model: nn.Module, loras: Sequence[tuple[str | os.PathLike, float]], controlnet: bool = False
                ) -> list[FusedLora]:  # fmt: skip
    """:func:`apply_lora` for each ``(path, scale)`` in order; returns their reports."""
    return [apply_lora(model, path, scale, controlnet) for path, scale in loras]


# --- command line ----------------------------------------------------------------------------------------------


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale): the part after the last ``:`` is the scale when it reads as a finite
    number (default 1.0), else part of the path. Raises ``argparse.ArgumentTypeError`` for an empty path."""
    path, sep, tail = text.rpartition(":")
    try:
        scale = float(tail) if sep else None
    except ValueError:
        scale = None
    if scale is None or not math.isfinite(scale):
        if sep and Path(path).is_file() and not Path(text).exists():  # FILE:junk: the scale is at fault
            raise argparse.ArgumentTypeError(f"'{text}': the scale '{tail}' is not a finite number")
        path, scale = text, 1.0
    if not path.strip(":"):
        raise argparse.ArgumentTypeError(f"'{text}': expected PATH[:SCALE]")
    return path, scale


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """``--lora PATH[:SCALE]`` (repeatable) and ``--lora-controlnet``."""
    parser.add_argument("--lora", action="append", type=parse_lora_arg, default=[], metavar="PATH[:SCALE]",
                        help="fuse a LoRA (.safetensors, kohya/A1111 or diffusers layout) into the UNet and text "
                             "encoder at SCALE (default 1); repeatable")  # fmt: skip
    parser.add_argument(
        "--lora-controlnet",
        action="store_true",
        help="also apply the LoRAs' UNet encoder layers to the ControlNet's copies of them",
    )
