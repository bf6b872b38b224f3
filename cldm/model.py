"""Model construction from a yaml config: ``create_model`` (the reference's API, fresh weights) and
``load_model``, the fast path the scripts use: the model is built on the meta device and the memory-mapped
checkpoint tensors become its parameters, so the weights are never held twice in RAM.

Checkpoint files and key layouts live in :mod:`cldm.checkpoint`, memory measures in :mod:`ldm.memory`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from cldm.checkpoint import CheckpointError, check_folder_config, check_state_dict
from cldm.checkpoint import load_state_dict as load_state_dict  # the reference API: from cldm.model import ...
from ldm.memory import LOW_MEMORY_DTYPE, compute_in_float32
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


def create_model(config_path: str | os.PathLike, base: bool = False) -> nn.Module:
    """Build the model of a yaml config with freshly initialised weights, on the CPU (reference API);
    ``base``: the config's base model without the ControlNet. Raises
    :class:`~cldm.checkpoint.CheckpointError` naming the file and the field for a config that cannot be built."""
    return build_model(model_config(config_path, base), config_path).cpu()


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


def matching_configs(state_dict: Mapping[str, torch.Tensor], config_path: Path, base: bool = False) -> list[Path]:
    """The yaml configs next to ``config_path`` (e.g. the other ``models/*.yaml``), itself excluded, whose model
    (built on the meta device; ``base`` as :func:`load_model`) has exactly ``state_dict``'s keys and shapes."""
    found = []
    for candidate in sorted(config_path.parent.glob("*.yaml")):
        if candidate.resolve() == config_path.resolve():
            continue
        try:
            with torch.device("meta"):
                model = instantiate_from_config(model_config(candidate, base))
            check_state_dict(model, state_dict)
        except Exception:  # noqa: BLE001 - a hint only: a yaml that is no model config, or does not match, is skipped
            continue
        found.append(candidate)
    return found


def load_model(
    config_path: str | os.PathLike,
    ckpt_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    low_memory: bool = False,
    base: bool = False,
) -> nn.Module:
    """Build the config's model (``base``: its base model without the ControlNet) and load ``ckpt_path``
    into it without a second copy of the weights.

    The model is created on the meta device, the checkpoint is memory-mapped and its tensors become
    the parameters (cast to float32 where the file holds another precision). With ``low_memory`` the
    parameters are held in bfloat16 (half the RAM; a bfloat16 checkpoint is mapped as is) and every
    layer computes in float32 (:func:`ldm.memory.compute_in_float32`); buffers stay float32. Returns the model
    in eval mode on ``device``. The noise schedule is always the config's (float64 -> float32), whatever the
    file holds. Raises :class:`~cldm.checkpoint.CheckpointError` on any config or checkpoint problem, including
    a NaN or infinite weight (:func:`check_finite`, which reads the whole file once); when the checkpoint's keys
    and shapes do not fit the config but fit another yaml next to it (:func:`matching_configs`), the message
    names that config.
    """
    config = model_config(config_path, base)
    check_folder_config(ckpt_path, config, str(config_path))  # a diffusers folder's config.json vs the yaml
    state_dict = load_state_dict(ckpt_path)
    with torch.device("meta"):
        model = build_model(config, config_path)
    try:
        check_state_dict(model, state_dict, str(ckpt_path))
    except CheckpointError as err:
        matches = matching_configs(state_dict, Path(config_path), base)
        if not matches:
            raise
        shown = _shown(matches[0])
        raise CheckpointError(f"{err}; it matches {shown}: pass --config {shown}") from None
    check_finite(state_dict, str(ckpt_path))
    params = {name for name, _ in model.named_parameters()}

    def target(name: str) -> torch.dtype:
        return LOW_MEMORY_DTYPE if low_memory and name in params else torch.float32

    state_dict = {
        k: v.to(target(k)) if v.is_floating_point() and v.dtype != target(k) else v for k, v in state_dict.items()
    }
    model.load_state_dict(state_dict, strict=True, assign=True)  # keeps the config's schedule, not the file's
    _materialize_nonpersistent(model)
    if low_memory:
        compute_in_float32(model)
    return model.to(torch.device(device)).eval()
