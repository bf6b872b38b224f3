"""Small helpers shared by the ldm and cldm packages (config instantiation, parameter checks, seeding)."""

from __future__ import annotations

import importlib
import inspect
import os
import random
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def _plain(value: Any) -> Any:
    """``value`` with sequences (tuples, lists, OmegaConf lists) as lists, so that ``()`` and ``[]`` compare equal."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _show(value: Any) -> str:
    """A short ``repr`` of a parameter value (tensors and arrays by their shape)."""
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (int, float)):
        return f"<{type(value).__name__} of shape {tuple(shape)}>"
    text = repr(_plain(value))
    return text if len(text) <= 80 else text[:77] + "..."


def unsupported_parameter(owner: str, name: str, value: Any, implemented: str, hint: str = "") -> ValueError:
    """The one error for a reference parameter set to something this project does not implement:
    ``ValueError("<owner>: parameter '<name>' = <value> is not supported (this project implements only
    <implemented>)")``, then ``: <hint>`` when given."""
    message = f"{owner}: parameter '{name}' = {_show(value)} is not supported"
    return ValueError(f"{message} (this project implements only {implemented})" + (f": {hint}" if hint else ""))


def check_supported(owner: str, name: str, value: Any, *supported: Any, hint: str = "") -> None:
    """Raise :func:`unsupported_parameter` unless ``value`` equals one of ``supported`` (the values this project
    implements; sequences compare as lists). ``owner`` names the class (or function) the parameter was given to."""
    if not any(_plain(value) == _plain(s) for s in supported):
        raise unsupported_parameter(owner, name, value, " or ".join(_show(s) for s in supported), hint)


# The classes a config may name as ``target``: those of models/*.yaml, the reference's SD and ControlNet configs
# and the ones the code builds (cldm.model.base_model_config). Configs are data: nothing else is imported.
ALLOWED_TARGETS = frozenset({
    "cldm.cldm.ControlLDM",
    "cldm.cldm.ControlNet",
    "cldm.cldm.ControlledUnetModel",
    "ldm.models.diffusion.ddpm.LatentDiffusion",
    "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "ldm.models.autoencoder.AutoencoderKL",
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
    "torch.nn.Identity",
})  # fmt: skip
# Opt-in for a user's own classes: a comma-separated list of dotted names, e.g. "mypkg.models.MyUNet,mypkg.X".
ALLOW_TARGETS_ENV = "CONTROLNET_ALLOW_TARGETS"


class ConfigError(ValueError):
    """A config that cannot be built; the message starts with the field (``model.params.unet_config.target``)."""


def allowed_targets() -> frozenset[str]:
    """:data:`ALLOWED_TARGETS` plus the names listed in the ``CONTROLNET_ALLOW_TARGETS`` environment variable."""
    extra = {name.strip() for name in os.environ.get(ALLOW_TARGETS_ENV, "").split(",") if name.strip()}
    return ALLOWED_TARGETS | extra


def get_obj_from_str(string: str, field: str = "target") -> Any:
    """Import ``"package.module.Name"`` and return ``Name``. Raises :class:`ConfigError` naming ``field`` when the
    name is not in :func:`allowed_targets` (nothing is imported then) or cannot be imported."""
    if not isinstance(string, str) or string not in allowed_targets():
        hint = f"to use your own classes, list them in the environment variable {ALLOW_TARGETS_ENV}=module.Class,..."
        raise ConfigError(f"{field}: '{string}' is not one of the project's model classes ({hint})")
    module, _, cls = string.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{field}: cannot import '{string}' ({err})") from err


def _signature_sources(cls: type) -> list[Any]:
    """The callables whose parameters ``cls(**params)`` accepts: its ``__init__``, then while that takes
    ``**kwargs``, the project base classes' ``__init__`` and the classes in ``cls.params_from`` (where the keyword
    arguments go)."""
    sources: list[Any] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if sources and klass.__module__.split(".")[0] not in ("ldm", "cldm"):
            break
        sources.append(init)
        kinds = {p.kind for p in inspect.signature(init).parameters.values()}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            return sources
        for extra in getattr(klass, "params_from", ()):
            sources.append(extra.__init__)
            if inspect.Parameter.VAR_KEYWORD not in {p.kind for p in inspect.signature(extra).parameters.values()}:
                return sources
    return sources + [None]  # None: further keyword arguments are taken unchecked


# The parameters that hold a sub-model's {target, params} config.
SUBMODELS = ("unet_config", "first_stage_config", "cond_stage_config", "control_stage_config")
_SCALARS: dict[Any, tuple[type, ...]] = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` (from yaml) fits ``hint`` (plain scalars, sequences, mappings, None and their unions);
    hints it does not understand accept anything."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint in _SCALARS:
        return isinstance(value, _SCALARS[hint]) and not (hint is not bool and isinstance(value, bool))
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if origin in (list, tuple, Sequence) or hint in (list, tuple, Sequence):
        return isinstance(value, Sequence) and not isinstance(value, str) or _is_list_config(value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping) or _is_dict_config(value)
    return True


def _is_list_config(value: Any) -> bool:
    return type(value).__name__ == "ListConfig"


def _is_dict_config(value: Any) -> bool:
    return type(value).__name__ == "DictConfig"


def check_config(config: Any, field: str = "model") -> None:
    """Check a ``{target, params}`` config tree before anything is built: every ``target`` allowed and importable,
    ``params`` a mapping with every required parameter, no unknown one, and values of the annotated types (ints,
    floats, bools, strings, lists, mappings). Raises :class:`ConfigError` naming the field, e.g.
    ``model.params.unet_config.params.model_channels: expected int, got 'abc'``."""
    if not (isinstance(config, Mapping) or _is_dict_config(config)):
        raise ConfigError(f"{field}: expected a mapping with a 'target', got {_show(config)}")
    if "target" not in config:
        raise ConfigError(f"{field}.target: missing")
    cls = get_obj_from_str(config["target"], f"{field}.target")
    params = config.get("params", {}) or {}
    if not (isinstance(params, Mapping) or _is_dict_config(params)):
        raise ConfigError(f"{field}.params: expected a mapping, got {_show(params)}")
    sources = _signature_sources(cls) if inspect.isclass(cls) else []
    _check_params(params, sources, f"{field}.params", config["target"], getattr(cls, "nested_params", {}))


def _check_params(
    params: Any, sources: list[Any], field: str, owner: str, nested: Mapping[str, Sequence[type]]
) -> None:
    """:func:`check_config` for one ``params`` mapping given to the callables ``sources`` (None: further keyword
    arguments taken unchecked); ``nested``: parameters holding plain mappings of keyword arguments for classes."""
    known: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for source in sources:
        if source is None:
            continue
        signature = inspect.signature(source)
        try:
            source_hints = typing.get_type_hints(source)
        except Exception:  # unresolvable annotations: no type check for this source
            source_hints = {}
        for name, param in list(signature.parameters.items())[1:]:
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and name not in known:
                known[name] = param
                hints[name] = source_hints.get(name, Any)
    for name, value in params.items():
        where = f"{field}.{name}"
        is_mapping = isinstance(value, Mapping) or _is_dict_config(value)
        if sources and None not in sources and name not in known:
            raise ConfigError(f"{where}: unknown parameter of {owner}")
        if name in SUBMODELS or (is_mapping and "target" in value):
            check_config(value, where)
        elif name in hints and not _accepts(hints[name], value):
            raise ConfigError(f"{where}: expected {_hint_text(hints[name])}, got {_show(value)}")
        elif name in nested and is_mapping:
            inner = [s for klass in nested[name] for s in _signature_sources(klass)]
            _check_params(value, inner, where, f"{owner}.{name}", {})
    for name, param in known.items():
        if param.default is inspect.Parameter.empty and name not in params:
            raise ConfigError(f"{field}.{name}: missing (required by {owner})")


def _hint_text(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "").replace("collections.abc.", "")


def instantiate_from_config(config: Mapping[str, Any]) -> Any:
    """Build ``config["target"](**config["params"])`` as the reference's yaml configs expect. The target must be
    one of :func:`allowed_targets`; raises :class:`ConfigError` otherwise, or without a ``target``."""
    if "target" not in config:
        raise ConfigError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def seed_everything(seed: int) -> int:
    """Seed python, numpy and torch (all devices) like Lightning's ``seed_everything``."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def log_txt_as_img(wh: tuple[int, int], texts: list[str], size: int = 10) -> torch.Tensor:
    """Draw each text, wrapped, black on white: [len(texts), 3, h, w] in [-1, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = wh
    font = ImageFont.load_default(size=size)
    chars_per_line = max(1, int(width / (size * 0.6)))
    images = []
    for text in texts:
        canvas = Image.new("RGB", (width, height), color="white")
        lines = [text[i : i + chars_per_line] for i in range(0, len(text), chars_per_line)]
        ImageDraw.Draw(canvas).multiline_text((0, 0), "\n".join(lines), fill="black", font=font)
        images.append(np.asarray(canvas).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.tensor(np.stack(images), dtype=torch.float32)
