"""Model construction from a yaml config: ``create_model`` (the reference's API, fresh weights) and
``load_model``, the fast path the scripts use: the model is built on the meta device and the memory-mapped
checkpoint tensors become its parameters, so the weights are never held twice in RAM.

Checkpoint files and key layouts live in :mod:`cldm.checkpoint`, memory measures in :mod:`ldm.memory`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from cldm.checkpoint import (
    CONTROL_PREFIX,
    EMA_PREFIX,
    INPAINT_CHANNELS,
    SD_PARTS,
    UNET_PREFIX,
    CheckpointError,
    Contents,
    StateDict,
    add_difference,
    check_folder_config,
    check_state_dict,
    cross_attention_width,
    ema_key,
    foreign_kind,
    input_channels,
    model_family,
)
from cldm.checkpoint import load_state_dict as load_state_dict  # the reference API: from cldm.model import ...
from ldm import memory
from ldm.memory import LOW_MEMORY_DTYPE, cast_releasing, compute_in_float32
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from ldm.util import ConfigError, check_config, instantiate_from_config


def read_config(config_path: str | os.PathLike) -> Any:
    """The yaml config as an OmegaConf object. Raises :class:`~cldm.checkpoint.CheckpointError` (a ``ValueError``)
    when the file is missing, not yaml, or has no ``model.target``."""
    path = Path(config_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: config file not found")
    try:
        config = OmegaConf.load(path)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable yaml config: {str(err).splitlines()[0]}") from err
    if "model" not in config or "target" not in config.model:
        raise CheckpointError(f"{path}: config has no model.target")
    return config


# ControlLDM parameters that the plain LatentDiffusion (the base model) does not take.
CONTROL_PARAMS = ("control_stage_config", "control_key", "only_mid_control", "sd_locked")
BASE_MODEL_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
BASE_UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"


def base_model_config(model_config: Any) -> Any:
    """The base Stable-Diffusion-style model of a ControlLDM ``model`` config: the same UNet, VAE and text
    encoder as a ``LatentDiffusion`` without the ControlNet (the layout ``tool_add_control.py`` reads)."""
    config = OmegaConf.create(OmegaConf.to_container(model_config))
    for key in CONTROL_PARAMS:
        config.params.pop(key, None)
    config.target = BASE_MODEL_TARGET
    config.params.unet_config.target = BASE_UNET_TARGET
    return config


def model_config(config_path: str | os.PathLike, base: bool = False) -> Any:
    """The ``model`` section of a yaml config; ``base``: its base model (see :func:`base_model_config`).
    Raises :class:`~cldm.checkpoint.CheckpointError` "<file>: <field>: <problem>" when a target is not one of the
    project's classes (:func:`ldm.util.allowed_targets`) or a parameter is missing, unknown or of the wrong type
    (:func:`ldm.util.check_config`)."""
    config = read_config(config_path).model
    try:
        check_config(config, "model")
    except ConfigError as err:
        raise CheckpointError(f"{config_path}: {err}") from err
    return base_model_config(config) if base else config


# What a model's constructor raises for parameter values it cannot use.
BUILD_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, RuntimeError)


def build_model(config: Any, config_path: str | os.PathLike) -> nn.Module:
    """``instantiate_from_config(config)``, with any error of the constructor as
    :class:`~cldm.checkpoint.CheckpointError` "<file>: model: cannot build <target>: <first line>"."""
    try:
        return instantiate_from_config(config)
    except BUILD_ERRORS as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{config_path}: model: cannot build {config.target}: {first}") from err


def create_model(config_path: str | os.PathLike, base: bool = False, tune_allocator: bool = True) -> nn.Module:
    """Build the model of a yaml config with freshly initialised weights, on the CPU (reference API);
    ``base``: the config's base model without the ControlNet. ``tune_allocator``: have glibc keep freed memory
    for reuse (:func:`ldm.memory.tune_allocator`, process-wide, as :func:`load_model` does): a step allocates
    blocks of 32 MiB and more, which glibc's default maps afresh and the kernel zeroes page by page (slower
    sampling and decoding; docs/performance.md); False leaves the process's setting alone.
    Raises :class:`~cldm.checkpoint.CheckpointError` naming the file and the field for a config that cannot be
    built."""
    config = model_config(config_path, base)
    if tune_allocator:
        memory.tune_allocator(low_memory=False)
    return build_model(config, config_path).cpu()


def _materialize_nonpersistent(model: nn.Module) -> None:
    for module in model.modules():
        reset = getattr(module, "reset_position_ids", None)
        if reset is not None:
            reset()
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"buffers left uninitialised after loading: {leftover[:3]}")


def check_finite(state_dict: Mapping[str, torch.Tensor], name: str = "checkpoint") -> None:
    """Raise :class:`~cldm.checkpoint.CheckpointError` naming ``name`` (the file) and the first key whose floating
    tensor holds a NaN or an infinity. The schedule buffers are skipped (the model never loads them). One pass
    that reads every floating tensor once (a min/max reduction, no temporary the size of the tensor): on a
    memory-mapped checkpoint that reads the whole file from disk."""
    for key, value in state_dict.items():
        if not value.is_floating_point() or key in SCHEDULE_BUFFERS or value.numel() == 0:
            continue
        if not torch.isfinite(torch.stack(torch.aminmax(value))).all():  # NaN or inf reaches min or max
            raise CheckpointError(f"{name}: non-finite weights (NaN or inf) in {key}; the file is damaged")


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when inside it, for messages."""
    relative = Path(os.path.relpath(path.resolve()))
    return path if relative.parts[:1] == ("..",) else relative


def other_configs(config_path: Path, base: bool = False) -> Iterator[tuple[Path, nn.Module]]:
    """``(yaml, its model built on the meta device)`` for each yaml next to ``config_path`` (e.g. the other
    ``models/*.yaml``), itself excluded, that builds (``base`` as :func:`load_model`): the candidates of the
    "pass --config X" hints. A yaml that is no model config is skipped."""
    for candidate in sorted(config_path.parent.glob("*.yaml")):
        if candidate.resolve() == config_path.resolve():
            continue
        try:
            with torch.device("meta"):
                model = instantiate_from_config(model_config(candidate, base))
        except Exception:  # noqa: BLE001 - a hint only: a yaml that is no model config is skipped
            continue
        yield candidate, model


def _fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> bool:
    try:
        check_state_dict(model, state_dict)
    except CheckpointError:
        return False
    return True


def matching_configs(state_dict: Mapping[str, torch.Tensor], config_path: Path, base: bool = False) -> list[Path]:
    """The configs of :func:`other_configs` whose model has exactly ``state_dict``'s keys and shapes."""
    return [candidate for candidate, model in other_configs(config_path, base) if _fits(model, state_dict)]


def check_with_hint(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str, config_path: Path, base: bool = False
) -> None:
    """:func:`~cldm.checkpoint.check_state_dict` of ``state_dict`` (``name``: the file) against ``model``, the model
    of yaml ``config_path``; when it does not fit but fits another yaml next to it (:func:`matching_configs`), the
    :class:`~cldm.checkpoint.CheckpointError` ends "; it matches X: pass --config X"."""
    try:
        check_state_dict(model, state_dict, name)
    except CheckpointError as err:
        matches = matching_configs(state_dict, config_path, base)
        if not matches:
            raise
        shown = _shown(matches[0])
        raise CheckpointError(f"{err}; it matches {shown}: pass --config {shown}") from None


def configs_like(state_dict: Mapping[str, torch.Tensor], config_path: Path) -> list[Path]:
    """The configs of :func:`other_configs` whose model is of the same family
    (:func:`~cldm.checkpoint.model_family`) and cross-attention width as ``state_dict``: the configs a file of
    another family than ``config_path``'s could use."""
    family = model_family(state_dict)
    wanted = (family and family[0], cross_attention_width(state_dict))
    found = []
    for candidate, model in other_configs(config_path):
        expected = model.state_dict()
        theirs = model_family(expected)
        if (theirs and theirs[0], cross_attention_width(expected)) == wanted:
            found.append(candidate)
    return found


def check_usable(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], name: str, config_path: Path
) -> None:
    """Raise :class:`~cldm.checkpoint.CheckpointError`, one line naming ``name`` (the file), when ``state_dict``
    is weights of a kind this project does not run (:func:`~cldm.checkpoint.foreign_kind`: SDXL, LoRA,
    Control-LoRA, T2I-Adapter, ...), of another model family than the config's model (``expected``: its state
    dict; the message says which family the keys show, and a config next to ``config_path`` that fits), or an
    inpainting UNet (9 input channels) for a 4-channel model."""
    kind = foreign_kind(state_dict)
    if kind is not None:
        raise CheckpointError(f"{name}: {kind}")
    found, wanted = model_family(state_dict), model_family(expected)
    if found and wanted and found[0] != wanted[0]:
        fits = configs_like(state_dict, config_path)
        hint = f": pass --config {_shown(fits[0])}" if fits else ""
        raise CheckpointError(f"{name}: the keys show an {found[0]} model ({found[1]}); {_shown(config_path)} is "
                              f"an {wanted[0]} config ({wanted[1]}){hint}")  # fmt: skip
    channels, own = input_channels(state_dict), input_channels(expected)
    if channels == INPAINT_CHANNELS and own != INPAINT_CHANNELS:
        raise CheckpointError(f"{name}: an inpainting UNet (input_blocks.0.0 takes {channels} channels: latent, "
                              f"mask and masked image); this model takes {own}: use a non-inpainting one")  # fmt: skip


def _read(path: str | os.PathLike, expected: Mapping[str, torch.Tensor], config_path: Path) -> StateDict:
    state_dict = load_state_dict(path)
    check_usable(state_dict, expected, str(path), config_path)
    return state_dict


def _base_unet(
    base: Mapping[str, torch.Tensor], unet_keys: list[str], use_ema: bool, name: str
) -> tuple[StateDict, str]:
    """The UNet tensors of a base file under ``model.diffusion_model.*`` (``use_ema``: its EMA copy, ``model_ema.*``,
    where it has one) and a sentence saying which were used."""
    has_ema = any(k.startswith(EMA_PREFIX + "diffusion_model") for k in base)
    if use_ema and has_ema:
        missing = [ema_key(k) for k in unet_keys if ema_key(k) not in base]
        if missing:
            raise CheckpointError(f"{name}: its EMA weights lack {len(missing)} UNet tensors ({missing[0]}, ...)")
        return {k: base[ema_key(k)] for k in unet_keys}, "its EMA weights (model_ema.*, as --base-ema asks)"
    unet = {k: v for k, v in base.items() if k.startswith(UNET_PREFIX)}
    if has_ema:
        return unet, "model.diffusion_model.* (non-EMA weights, the default as in ControlNet 1.1; --base-ema: EMA)"
    if use_ema:
        return unet, "model.diffusion_model.* (--base-ema: the file has no separate EMA copy, model_ema.*)"
    return unet, "model.diffusion_model.* (the file has no separate EMA copy)"


def compose_state_dict(
    expected: Mapping[str, torch.Tensor],
    config_path: str | os.PathLike,
    ckpt_path: str | os.PathLike,
    base_ckpt: str | os.PathLike | None = None,
    base_ema: bool = False,
    notify: Callable[[str], None] | None = None,
) -> tuple[StateDict, str]:
    """The state dict (reference keys) a ControlLDM with state dict ``expected`` loads from ``ckpt_path`` and
    an optional Stable Diffusion ``base_ckpt``, and the name to report problems under.

    Routes, by the keys of the files (both memory-mapped; the tensors are the files', not copies):

    - a whole ControlNet 1.0 file (``control_model.*`` and the UNet, VAE and text encoder) alone: as it is;
    - a whole file with ``base_ckpt``: its ``control_model.*``, the UNet, VAE and text encoder from the base
      (those the base lacks from the whole file);
    - a ControlNet-only file (``control_model.*``: ControlNet 1.1, fp16 re-saves) with ``base_ckpt``: composed;
    - a "difference" ControlNet: its ``control_model.*`` plus the UNet in use
      (:func:`~cldm.checkpoint.add_difference`).

    The base's UNet is ``model.diffusion_model.*`` (non-EMA in ``v1-5-pruned.ckpt``, the default, as ControlNet
    1.1 loads it) or, with ``base_ema``, its ``model_ema.*`` copy (LitEma's dotless keys); ``notify`` (default:
    a line on stderr) is told which. Raises :class:`~cldm.checkpoint.CheckpointError`, one line naming the file,
    for the kinds :func:`check_usable` refuses, a base file given as the ControlNet, a ControlNet-only file
    without a base (naming ``--base``), and a base without a UNet.
    """
    config_path = Path(config_path)
    ckpt = _read(ckpt_path, expected, config_path)
    has = Contents.of(ckpt)
    if not has.control and has.stable_diffusion:
        raise CheckpointError(f"{ckpt_path}: a Stable Diffusion model without a ControlNet (no control_model.* "
                              "keys): pass it as --base and a ControlNet file as --ckpt")  # fmt: skip
    if base_ckpt is None:
        if has.control and not (has.unet or has.vae or has.text):
            raise CheckpointError(f"{ckpt_path}: a ControlNet alone (control_model.* only): it needs a Stable "
                                  "Diffusion 1.5 base model, e.g. v1-5-pruned.ckpt: pass it with --base")  # fmt: skip
        return (add_difference(ckpt) if has.difference else ckpt), str(ckpt_path)
    base = _read(base_ckpt, expected, config_path)
    if not Contents.of(base).stable_diffusion:
        raise CheckpointError(f"{base_ckpt}: no Stable Diffusion UNet in it (model.diffusion_model.* or model_ema.*):"
                              " --base needs a Stable Diffusion model such as v1-5-pruned.ckpt")  # fmt: skip
    unet_keys = [k for k in expected if k.startswith(UNET_PREFIX)]
    unet, which = _base_unet(base, unet_keys, base_ema, str(base_ckpt))
    sd_prefixes = tuple(prefix for _, prefix in SD_PARTS)
    # the ControlNet, and keys of no part (the difference flag; unknown keys, which check_state_dict will name)
    composed = {k: v for k, v in ckpt.items() if k.startswith(CONTROL_PREFIX) or not k.startswith(sd_prefixes)
                and k not in expected}  # fmt: skip
    taken = []
    for part, prefix in SD_PARTS:
        tensors = unet if prefix == UNET_PREFIX else {k: v for k, v in base.items() if k.startswith(prefix)}
        if tensors:
            taken.append(part)
        else:
            tensors = {k: v for k, v in ckpt.items() if k.startswith(prefix)}
        composed.update(tensors)
    # the schedule buffers and other keys of no part: the base's, else the ControlNet file's, else (schedule
    # buffers, which many base files lack) the model's own: it keeps its own values whatever a file holds
    for key in (k for k in expected if not k.startswith((CONTROL_PREFIX, *sd_prefixes))):
        value = base.get(key, ckpt.get(key, expected[key] if key in SCHEDULE_BUFFERS else None))
        if value is not None:
            composed[key] = value
    replaced = f", replacing those of {ckpt_path}" if has.unet or has.vae or has.text else ""
    (notify or _to_stderr)(f"base {base_ckpt}: {', '.join(taken)}{replaced}; UNet from {which}")
    name = f"{ckpt_path} with base {base_ckpt}"
    return (add_difference(composed) if has.difference else composed), name


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_model(
    config_path: str | os.PathLike,
    ckpt_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    low_memory: bool = False,
    base: bool = False,
    base_ckpt: str | os.PathLike | None = None,
    base_ema: bool = False,
    notify: Callable[[str], None] | None = None,
    tune_allocator: bool = True,
) -> nn.Module:
    """Build the config's model (``base``: its base model without the ControlNet) and load ``ckpt_path`` (with a
    Stable Diffusion ``base_ckpt`` for a ControlNet-only file, or to replace a whole file's UNet, VAE and text
    encoder; ``base_ema``: the base's EMA UNet weights; see :func:`compose_state_dict`, which ``notify`` about
    the base) into it without a second copy of the weights. ``tune_allocator``: set glibc's allocator for this
    mode (:func:`ldm.memory.tune_allocator`, process-wide: freed memory kept for reuse, or with ``low_memory``
    given back to the OS at once); False leaves the process's setting alone.

    The model is created on the meta device, the checkpoints are memory-mapped and their tensors become
    the parameters (cast to float32, tensor by tensor, where a file holds another precision). With ``low_memory``
    the parameters are held in bfloat16 (half the RAM; a bfloat16 checkpoint is mapped as is) and every
    layer computes in float32 (:func:`ldm.memory.compute_in_float32`); buffers stay float32. Returns the model
    in eval mode on ``device``. The noise schedule is always the config's (float64 -> float32), whatever the
    file holds. Raises :class:`~cldm.checkpoint.CheckpointError` on any config or checkpoint problem, including
    a file of a kind or model family the config cannot use (:func:`check_usable`), a ControlNet-only file without
    ``base_ckpt``, and a NaN or infinite weight (:func:`check_finite`, which reads the loaded tensors once); when
    the checkpoint's keys and shapes do not fit the config but fit another yaml next to it
    (:func:`matching_configs`), the message names that config. ``ValueError`` for ``base_ckpt`` with ``base``,
    and for ``base_ema`` without ``base_ckpt``.
    """
    if base_ema and base_ckpt is None:
        raise ValueError("--base-ema chooses the EMA UNet of a --base model: give --base too (without one, the "
                         "checkpoint's own UNet is used)")  # fmt: skip
    config = model_config(config_path, base)
    if tune_allocator:
        memory.tune_allocator(low_memory)
    for path in (ckpt_path, base_ckpt):  # a diffusers folder's config.json vs the yaml (nothing for a file)
        if path is not None:
            check_folder_config(path, config, str(config_path))
    with torch.device("meta"):
        model = build_model(config, config_path)
    expected = model.state_dict()
    if base:
        if base_ckpt is not None:
            raise ValueError("base_ckpt is for a ControlNet model; the base model (base=True) loads one file")
        state_dict, name = _read(ckpt_path, expected, Path(config_path)), str(ckpt_path)
    else:
        state_dict, name = compose_state_dict(expected, config_path, ckpt_path, base_ckpt, base_ema, notify)
    check_with_hint(model, state_dict, name, Path(config_path), base)
    return _assign(model, state_dict, name, device, low_memory)


def _assign(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str, device: torch.device | str, low_memory: bool
) -> nn.Module:
    """``state_dict`` (checked finite, cast as :func:`load_model` says) made the parameters of ``model`` (built on the
    meta device), which is returned in eval mode on ``device``."""
    check_finite(state_dict, name)
    params = {name for name, _ in model.named_parameters()}

    def target(name: str) -> torch.dtype:
        return LOW_MEMORY_DTYPE if low_memory and name in params else torch.float32

    state_dict = cast_releasing(state_dict, target)
    model.load_state_dict(state_dict, strict=True, assign=True)  # keeps the config's schedule, not the file's
    _materialize_nonpersistent(model)
    if low_memory:
        compute_in_float32(model)
    return model.to(torch.device(device)).eval()


def load_controlnet(
    config_path: str | os.PathLike,
    ckpt_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    low_memory: bool = False,
    unet: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The ControlNet alone (the config's ``control_stage_config`` module, e.g. ``cldm.cldm.ControlNet``) from any
    file or folder :func:`load_model` reads: a whole ControlNet 1.0 file (its ``control_model.*`` only), a
    ControlNet-only file (1.1, fp16), a diffusers ControlNet folder or hub cache, a difference file.

    ``unet``: the UNet in use, reference keys (``model.diffusion_model.*``), e.g. the main model's: a difference
    file is made whole against it (else against the file's own UNet, if it has one). Weights memory-mapped, cast
    and computed as :func:`load_model` does (``low_memory``); returned in eval mode on ``device``. Raises
    :class:`~cldm.checkpoint.CheckpointError`, one line naming the file, for what :func:`check_usable` refuses,
    a file without ``control_model.*`` keys, a difference file with no UNet to add, a ControlNet of another
    shape than the config's, and non-finite weights."""
    config = model_config(config_path)
    check_folder_config(ckpt_path, config, str(config_path))
    with torch.device("meta"):
        model = build_model(config, config_path)
    state_dict = _read(ckpt_path, model.state_dict(), Path(config_path))
    has = Contents.of(state_dict)
    if not has.control:
        raise CheckpointError(f"{ckpt_path}: no ControlNet in it (no control_model.* keys)")
    if has.difference:
        if unet is None and not has.unet:
            raise CheckpointError(f"{ckpt_path}: a difference ControlNet needs the UNet it was made against")
        state_dict = add_difference({**state_dict, **(unet or {})})
    control = {k.removeprefix(CONTROL_PREFIX): v for k, v in state_dict.items() if k.startswith(CONTROL_PREFIX)}
    check_state_dict(model.control_model, control, str(ckpt_path))
    return _assign(model.control_model, control, str(ckpt_path), device, low_memory)
