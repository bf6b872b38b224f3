"""Checkpoint files and their key layouts: the one place that reads, writes and renames checkpoints.

Files: ``.ckpt``/``.pth``/``.pt``/``.bin`` (torch, read memory-mapped with ``weights_only``) and
``.safetensors``; a Lightning-style ``{"state_dict": ...}`` nesting is unwrapped. Pickles may hold numpy
scalars and classes this project does not have (Lightning callbacks): the latter become inert
:class:`StandIn` records; a pickle naming code (``os.system``, ``builtins.exec``, ...) is refused unloaded.
Every problem is a :class:`CheckpointError` with a one-line message naming the file, without escape codes.

Layouts: :data:`LAYOUTS` is the one table of the key spellings this project converts between. Each row
converts a state dict into the reference's keys (``"ldm"``, what the model's ``state_dict()`` has) and,
where it can, back. :func:`convert` goes from any row to any other through ``"ldm"``. Conversions
rename keys only: the tensors are the same objects (no copy, no dtype change).
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import os
import pickle
import re
import sys
import tempfile
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

# Distinct unknown classes one file may name before it is refused (each costs one more read of its pickle).
MAX_STAND_INS = 32
# Standard-library modules whose classes are plain data; any other standard-library global is taken as code.
DATA_STDLIB_MODULES = ("argparse", "collections", "datetime", "decimal", "enum", "fractions", "pathlib", "uuid")
# Builtins that only build values; the file gets the real type (calling it runs no user code).
DATA_BUILTINS = {"builtins.frozenset": frozenset, "builtins.slice": slice, "builtins.range": range}
# Suffix of a file being written; renamed to its final name once whole (see replace_atomically).
PARTIAL_SUFFIX = ".partial"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_UNKNOWN_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module (\S+) is blocked)")


class StandIn:
    """What a checkpoint gets in place of a class this project does not know (e.g. Lightning's
    ``ModelCheckpoint`` callback): an inert record. Creating or filling one never runs code from the file
    and never imports the named module; ``args`` and ``state`` keep what the pickle passed."""

    stands_for = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        inst = object.__new__(cls)
        inst.args = args
        inst.state = None
        return inst

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.stands_for}>"


def _stand_in(full_name: str) -> tuple[type, str]:
    """A fresh :class:`StandIn` subclass registered under ``full_name`` for torch's safe-globals list."""
    return type("StandIn", (StandIn,), {"stands_for": full_name}), full_name


def _numpy_globals() -> list[Any]:
    """numpy's scalar constructor (under its numpy 1 and 2 paths), ``numpy.dtype`` and its classes: what a
    pickled numpy scalar such as a Lightning ``global_step`` needs. Empty without numpy."""
    try:
        import numpy as np
    except ImportError:
        return []
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [getattr(np.dtypes, name) for name in np.dtypes.__all__] if hasattr(np, "dtypes") else []  # numpy<1.25
    names = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
    return [np.dtype, *dtypes, *((scalar, name) for name in names)]


def _python3_name(full_name: str) -> str:
    """The Python 3 spelling of a global a pickle names: Python 2 module names (``commands``, ``__builtin__``,
    ...) as pickle maps them, and ``posix``/``nt`` (where ``os`` functions live) as ``os``."""
    module, _, attr = full_name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[module, attr]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{'os' if module in ('posix', 'nt') else module}.{attr}"


def _wants_code(full_name: str) -> bool:
    """Whether a global the file names (Python 3 spelling) is something other than data: any name in a
    standard-library module outside :data:`DATA_STDLIB_MODULES` (``os.system``, ``builtins.exec``,
    ``subprocess.Popen``, ...)."""
    top = full_name.split(".", 1)[0]
    return top in sys.stdlib_module_names and top not in DATA_STDLIB_MODULES


def _message(err: BaseException) -> str:
    """The informative line of an exception's text, terminal escape codes removed (torch's weights-only error
    wraps its reason in advice to load the file unsafely; that advice is dropped)."""
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    useful = [
        line for line in lines
        if "weights_only" not in line and not line.startswith(("Weights only load failed", "Check the documentation"))
    ]  # fmt: skip
    reason = (useful or lines or [type(err).__name__])[0]
    return reason.removeprefix("WeightsUnpickler error: ")


def _torch_load(path: Path, location: str) -> Any:
    try:
        return torch.load(path, map_location=location, weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        # legacy (pre-zip) serialization cannot be memory-mapped
        return torch.load(path, map_location=location, weights_only=True)


def _read_pickled(path: Path, location: str) -> Any:
    """torch's weights-only unpickler with numpy scalars allowed and a :class:`StandIn` for each unknown class
    it reports (one more read per class). Raises :class:`CheckpointError` for a file that names code (the
    callable in the message) or too many unknown classes; other errors as torch raises them."""
    allowed = [*_numpy_globals(), *((obj, name) for name, obj in DATA_BUILTINS.items())]
    for _ in range(MAX_STAND_INS + 1):
        try:
            with torch.serialization.safe_globals(allowed):
                return _torch_load(path, location)
        except pickle.UnpicklingError as err:
            found = _UNKNOWN_GLOBAL.search(_ANSI.sub("", str(err)))
            if not found:
                raise
            # torch reports builtins without their module
            name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"
            shown = _python3_name(name)
            if found.group(2) or _wants_code(shown):
                raise CheckpointError(
                    f"{path}: refused: the file wants to run code ({shown}) when it is loaded; it was not loaded"
                ) from None
            allowed.append(_stand_in(name))
    raise CheckpointError(f"{path}: names more than {MAX_STAND_INS} unknown classes; not loaded")


def _read_checkpoint(path: Path, location: str) -> Mapping[str, Any]:
    if path.suffix.lower() == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path), device=location)
    return _read_pickled(path, location)


def _shorten(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def get_state_dict(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """Unwrap a Lightning-style ``{"state_dict": ...}`` checkpoint (anything else is returned as is)."""
    return d.get("state_dict", d)


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


def read_checkpoint(ckpt_path: str | os.PathLike, location: str = "cpu") -> Mapping[str, Any]:
    """The whole mapping a ``.ckpt``/``.pth`` (memory-mapped, weights only: tensors are read when touched) or
    ``.safetensors`` file holds, e.g. a Lightning checkpoint's ``state_dict``, ``global_step`` and
    ``optimizer_states``. Raises :class:`CheckpointError` with a one-line message for a missing, truncated or
    corrupt file, one that is not a mapping, or a pickle that names code or more than :data:`MAX_STAND_INS`
    unknown classes (nothing from such a file is run or returned)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        data = _read_checkpoint(path, location)
    except CheckpointError:
        raise
    except Exception as err:  # torch, zipfile, pickle and safetensors errors all mean "unreadable"
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {_message(err)}") from err
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return data


def load_state_dict(ckpt_path: str | os.PathLike, location: str = "cpu") -> StateDict:
    """Read a ``.ckpt``/``.pth`` (memory-mapped, weights only) or ``.safetensors`` checkpoint.

    Returns the flat state dict (tensors in the file's dtypes, on ``location``) with keys normalised by
    :func:`normalize_keys`; non-tensor entries (numpy counters, Lightning callback state) are dropped. Raises
    :class:`CheckpointError` as :func:`read_checkpoint` does, and for a file holding no tensors.
    """
    state_dict = get_state_dict(read_checkpoint(ckpt_path, location))
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{Path(ckpt_path)}: contains no tensors")
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


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """``folder`` as a ``Path``, created if missing, after writing and deleting a probe file in it, so that an
    output location that cannot be written is found before any slow work. Raises ``OSError`` whose message is
    one line naming the folder (it is a file, sits under a file, is read-only, or cannot be created)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OSError(f"{folder}: output folder is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(f"{folder}: output folder cannot be written ({_reason(err)})") from None
    return folder


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to fill ``tmp`` (``<path>.partial``, in ``path``'s own folder, so the rename never
    crosses filesystems), flush it to disk, and rename it over ``path``: ``path`` is at every moment either
    its old content or the whole new one, also if the process is killed. ``tmp`` is removed if ``write`` or
    the rename fails (errors propagate unchanged); a killed process leaves it behind."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # also when the folder is missing or is a file
            tmp.unlink()
    with contextlib.suppress(OSError):  # the rename itself on disk (POSIX; folders cannot be opened on Windows)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``state_dict`` atomically (:func:`replace_atomically`): a flat ``.safetensors`` file for that
    suffix, else torch.save of ``{"state_dict": ...}``. The parent folder is created; a failed write leaves no
    file. Raises ``OSError`` (one line naming ``path``) when the folder or the file cannot be written, the disk
    being full included."""
    from safetensors import SafetensorError

    path = Path(path)

    def write(tmp: Path) -> None:
        if path.suffix.lower() == ".safetensors":
            import safetensors.torch

            safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
        else:
            torch.save({"state_dict": dict(state_dict)}, tmp)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, write)
    except (OSError, RuntimeError, SafetensorError) as err:  # torch.save reports write failures as RuntimeError
        raise OSError(f"{path}: cannot write the checkpoint ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    """The first line of ``err``'s message without its path (the caller names the path), else its type."""
    text = getattr(err, "strerror", None) or str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


# diffusers ResnetBlock2D names of the parts of an ldm ResBlock (after the block's own prefix).
RESNET_PARTS = (
    ("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."),
)  # fmt: skip


@dataclass(frozen=True)
class ControlNetShape:
    """What the diffusers names of a ControlNet depend on: resolution levels, res blocks per level, hint convs."""

    levels: int
    layers: int
    hint_convs: int

    @property
    def input_blocks(self) -> int:
        """The ldm ``input_blocks`` (and ``zero_convs``): the stem conv, ``layers`` per level, a downsampler
        between levels."""
        return 1 + self.levels * self.layers + self.levels - 1

    def prefixes(self) -> list[tuple[str, str, bool]]:
        """``(ldm prefix, diffusers prefix, is a ResBlock)`` for every part of the ControlNet; ldm prefixes are
        relative to ``control_model.``."""
        pairs = [("time_embed.0.", "time_embedding.linear_1.", False),
                 ("time_embed.2.", "time_embedding.linear_2.", False),
                 ("input_hint_block.0.", "controlnet_cond_embedding.conv_in.", False),
                 (f"input_hint_block.{2 * (self.hint_convs - 1)}.", "controlnet_cond_embedding.conv_out.", False),
                 ("input_blocks.0.0.", "conv_in.", False),
                 ("middle_block.0.", "mid_block.resnets.0.", True),
                 ("middle_block.1.", "mid_block.attentions.0.", False),
                 ("middle_block.2.", "mid_block.resnets.1.", True),
                 ("middle_block_out.0.", "controlnet_mid_block.", False)]  # fmt: skip
        # the hint encoder alternates convs and SiLUs: its inner convs are the even layers between the ends
        pairs += [(f"input_hint_block.{2 * j}.", f"controlnet_cond_embedding.blocks.{j - 1}.", False)
                  for j in range(1, self.hint_convs - 1)]  # fmt: skip
        pairs += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.", False) for i in range(self.input_blocks)]
        for i in range(1, self.input_blocks):
            level, layer = divmod(i - 1, self.layers + 1)
            if layer < self.layers:
                pairs.append((f"input_blocks.{i}.0.", f"down_blocks.{level}.resnets.{layer}.", True))
                pairs.append((f"input_blocks.{i}.1.", f"down_blocks.{level}.attentions.{layer}.", False))
            else:
                pairs.append((f"input_blocks.{i}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", False))
        return pairs

    @classmethod
    def of_ldm(cls, keys: list[str]) -> ControlNetShape:
        """The shape of the ControlNet whose ldm keys (without ``control_model.``) are ``keys``."""
        blocks = _indices(keys, r"input_blocks\.(\d+)\.")
        downsamplers = len(_indices(keys, r"input_blocks\.(\d+)\.0\.op\."))
        levels = downsamplers + 1
        if not blocks or (max(blocks) + 1 - levels) % levels:
            raise CheckpointError(f"control_model: {max(blocks, default=-1) + 1} input blocks and {downsamplers} "
                                  "downsamplers are not the layout of a ControlNet")  # fmt: skip
        return cls(levels, (max(blocks) + 1 - levels) // levels, len(_indices(keys, r"input_hint_block\.(\d+)\.")))

    @classmethod
    def of_diffusers(cls, keys: list[str]) -> ControlNetShape:
        """The shape of the diffusers ControlNetModel whose keys are ``keys``."""
        levels = len(_indices(keys, r"down_blocks\.(\d+)\."))
        layers = len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
        return cls(levels, layers, len(_indices(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")) + 2)


def _indices(keys: list[str], pattern: str) -> set[int]:
    """The distinct numbers that ``pattern``'s group matches at the start of ``keys``."""
    regex = re.compile(pattern)
    return {int(m.group(1)) for m in map(regex.match, keys) if m}


def _rename(
    state_dict: Mapping[str, torch.Tensor],
    pairs: list[tuple[str, str, bool]],
    parts: tuple[tuple[str, str], ...],
    layout: str,
) -> StateDict:
    """Each key's longest matching prefix of ``pairs`` (source, target, is a ResBlock) replaced, and within a
    ResBlock its part renamed by ``parts`` (source, target). Raises :class:`CheckpointError` for a key without
    a counterpart."""
    out = {}
    for key, value in state_dict.items():
        matches = [(src, dst, resnet) for src, dst, resnet in pairs if key.startswith(src)]
        src, dst, resnet = max(matches, key=lambda m: len(m[0]), default=("", None, False))
        rest = key[len(src) :]
        if resnet:
            part = next(((a, b) for a, b in parts if rest.startswith(a)), None)
            rest = part[1] + rest[len(part[0]) :] if part else None
        if dst is None or rest is None:
            raise CheckpointError(f"{key}: not a ControlNet key of the {layout} layout")
        out[dst + rest] = value
    return out


def controlnet_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The ``control_model.*`` tensors of a ControlLDM state dict (reference keys) under the keys of
    diffusers' ``ControlNetModel``: ``controlnet_cond_embedding.*`` (hint encoder), ``conv_in``,
    ``time_embedding``, ``down_blocks.*``, ``mid_block.*``, ``controlnet_down_blocks.*`` (zero convs) and
    ``controlnet_mid_block``. Other keys are left out (they belong to other diffusers models). Shapes
    unchanged. Raises :class:`CheckpointError` for a ``control_model.*`` key the layout has no place for."""
    control = {k: v for k, v in state_dict.items() if k.startswith(CONTROL_PREFIX)}
    if not control:
        return {}
    shape = ControlNetShape.of_ldm([k[len(CONTROL_PREFIX) :] for k in control])
    pairs = [(CONTROL_PREFIX + src, dst, resnet) for src, dst, resnet in shape.prefixes()]
    return _rename(control, pairs, RESNET_PARTS, "ldm")


def diffusers_to_controlnet(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of :func:`controlnet_to_diffusers`: a diffusers ``ControlNetModel`` state dict under the
    reference's ``control_model.*`` keys. Raises :class:`CheckpointError` for a key it has no place for."""
    if not state_dict:
        return {}
    pairs = ControlNetShape.of_diffusers(list(state_dict)).prefixes()
    swapped = [(dst, CONTROL_PREFIX + src, resnet) for src, dst, resnet in pairs]
    return _rename(state_dict, swapped, tuple((b, a) for a, b in RESNET_PARTS), "diffusers")


LAYOUTS: dict[str, Layout] = {
    "ldm": Layout("the reference's keys (ControlNet 1.0 releases, the model's state_dict())", normalize_keys, dict),
    "sd": Layout("a Stable Diffusion checkpoint (ldm keys without control_model.*); into ldm the ControlNet gets "
                 "its copy of the UNet encoder, as tool_add_control.py initialises it", sd_to_ldm, ldm_to_sd),
    "diffusers": Layout("diffusers' ControlNetModel: the ControlNet's tensors only", diffusers_to_controlnet,
                        controlnet_to_diffusers),
}  # fmt: skip


def convert(state_dict: Mapping[str, torch.Tensor], source: str, target: str) -> StateDict:
    """``state_dict`` from the ``source`` layout of :data:`LAYOUTS` to ``target``, through ``"ldm"``. The tensors
    are the same objects. Raises ``ValueError`` for an unknown layout, :class:`CheckpointError` for a key the
    conversion has no place for."""
    for name in (source, target):
        if name not in LAYOUTS:
            raise ValueError(f"unknown checkpoint layout '{name}' (choose from {', '.join(LAYOUTS)})")
    return LAYOUTS[target].from_ldm(LAYOUTS[source].to_ldm(state_dict))
