"""Checkpoint files and their key layouts: the one place that reads, writes and renames checkpoints.

Files: ``.ckpt``/``.pth``/``.pt``/``.bin`` (torch, read memory-mapped with ``weights_only``) and
``.safetensors``; a Lightning-style ``{"state_dict": ...}`` nesting is unwrapped. Pickles may hold numpy
scalars and classes this project does not have (Lightning callbacks): the latter become inert
:class:`StandIn` records; a pickle naming code (``os.system``, ``builtins.exec``, ...) is refused unloaded.
Every problem is a :class:`CheckpointError` with a one-line message naming the file, without escape codes.

Folders (:func:`load_folder`): a diffusers ControlNet, UNet, VAE or transformers CLIP text encoder folder, a
Stable Diffusion (+ ControlNet) pipeline folder, and the hub cache's ``models--ORG--NAME`` layout; their
``config.json`` is checked against a yaml by :func:`check_folder_config`, and :func:`save_diffusers_controlnet`
writes a ControlNet folder.

Layouts: :data:`LAYOUTS` is the one table of the key spellings this project converts between. Each row
converts a state dict into the reference's keys (``"ldm"``, what the model's ``state_dict()`` has) and,
where it can, back. :func:`convert` goes from any row to any other through ``"ldm"``. Conversions
rename keys only: the tensors are the same objects (no copy, no dtype change), except the VAE attention
weights, which diffusers holds as linear weights: they are reshaped views of the same memory.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import OmegaConf

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
VAE_PREFIX = "first_stage_model."
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


def shorten_keys(keys: list[str], n: int = 2) -> str:
    """The first ``n`` of ``keys`` and how many more, for one-line messages: ``"a, b, ... (5 more)"``."""
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
    if path.suffix.lower() == ".json":
        raise CheckpointError(f"{path}: a JSON file, not a checkpoint: for a diffusers folder pass the folder "
                              f"({path.parent})")  # fmt: skip
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
    """Read a ``.ckpt``/``.pth``/``.bin`` (memory-mapped, weights only) or ``.safetensors`` checkpoint, or a
    diffusers folder (:func:`load_folder`: a ControlNet, a pipeline, a hub cache folder).

    Returns the flat state dict (tensors in the file's dtypes, on ``location``) with keys normalised by
    :func:`normalize_keys`; non-tensor entries (numpy counters, Lightning callback state) are dropped. Raises
    :class:`CheckpointError` as :func:`read_checkpoint` does, for a file holding no tensors, and for a folder
    :func:`load_folder` cannot read.
    """
    path = Path(ckpt_path)
    if path.is_dir():
        return load_folder(path, location)
    return normalize_keys(_read_tensors(path, location))


def _read_tensors(path: Path, location: str) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint file, keys as stored (see :func:`load_state_dict` for the errors)."""
    state_dict = get_state_dict(read_checkpoint(path, location))
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return tensors


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` (``name``: the file, for the message) unless ``state_dict`` has exactly the
    model's keys and shapes (:data:`OPTIONAL_KEYS` and the schedule buffers, which the model computes from its
    config, may be absent; dtypes are not compared)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and k not in OPTIONAL_KEYS + SCHEDULE_BUFFERS]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({shorten_keys(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({shorten_keys(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} tensors with the wrong shape ({shorten_keys(wrong)})")
    if problems:
        raise CheckpointError(f"{name}: does not match the model config: " + "; ".join(problems))


def cast_weights(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> StateDict:
    """Floating tensors cast to ``dtype``, except the diffusion schedule buffers, which stay float32
    (bfloat16 would round alphas_cumprod[0] to 1.0 and break the DDIM coefficients). Keys unchanged;
    integer tensors and tensors already in ``dtype`` are the same objects."""
    return {
        k: v.to(dtype) if v.is_floating_point() and k not in SCHEDULE_BUFFERS else v for k, v in state_dict.items()
    }


def check_checkpoint_name(path: str | os.PathLike, advice: str = "") -> None:
    """Raise :class:`CheckpointError` "<path>: not a checkpoint file name (.ckpt, ...)<advice>" unless ``path``
    ends in one of :data:`CHECKPOINT_SUFFIXES` (case-insensitive): an output name is checked before any work."""
    if Path(path).suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{path}: not a checkpoint file name ({', '.join(CHECKPOINT_SUFFIXES)}){advice}")


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """``folder`` as a ``Path``, created if missing, after writing and deleting a probe file in it, so that an
    output location that cannot be written is found before any slow work. Raises ``OSError`` whose message is
    one line naming the folder (it is a file, sits under a file, is read-only, is on a filesystem that refuses
    new files such as ``/proc``, or cannot be created)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OSError(f"{folder}: output folder is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = _reason(err)
        if err.errno == errno.ENOENT and folder.is_dir():  # the folder is there: its filesystem refuses new files
            reason = f"its filesystem does not allow new files, e.g. /proc or /sys: {reason}"
        raise OSError(f"{folder}: output folder cannot be written ({reason})") from None
    return folder


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to fill ``tmp`` (``<path>.partial``, in ``path``'s own folder, so the rename never
    crosses filesystems), flush it to disk, and rename it over ``path``: ``path`` is at every moment either
    its old content or the whole new one, also if the process is killed. ``tmp`` is removed if ``write`` or
    the rename fails (errors propagate unchanged); a killed process leaves it behind."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as an ordinary new file (safetensors writes its files 0600)
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


def save_checkpoint(state_dict: Mapping[str, Any], path: str | os.PathLike, flat: bool = False) -> None:
    """Write ``state_dict`` atomically (:func:`replace_atomically`): a flat ``.safetensors`` file for that
    suffix (tensors only), else torch.save of ``{"state_dict": ...}`` (the reference's nesting) or, with
    ``flat``, of the mapping itself (as the ControlNet 1.1 files hold it, or a whole Lightning checkpoint). The
    parent folder is created; a failed write leaves no file. Raises ``OSError`` (one line naming ``path``) when
    the folder or the file cannot be written, the disk being full included."""
    from safetensors import SafetensorError

    path = Path(path)

    def write(tmp: Path) -> None:
        if path.suffix.lower() == ".safetensors":
            import safetensors.torch

            safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
        else:
            with open(tmp, "wb") as f:
                torch.save(dict(state_dict) if flat else {"state_dict": dict(state_dict)}, f)

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


# Parts of a block after the block's own prefix, (ldm name, diffusers name): a UNet ResBlock as diffusers'
# ResnetBlock2D, a VAE ResnetBlock, and the VAE's single-head attention (1x1 convs in ldm, linear layers in
# diffusers; diffusers before 0.14 named them query/key/value/proj_attn).
Parts = tuple[tuple[str, str], ...]
RESNET_PARTS: Parts = (
    ("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."),
)  # fmt: skip
VAE_RESNET_PARTS: Parts = (
    ("norm1.", "norm1."), ("conv1.", "conv1."), ("norm2.", "norm2."), ("conv2.", "conv2."),
    ("nin_shortcut.", "conv_shortcut."),
)  # fmt: skip
VAE_ATTENTION_PARTS: Parts = (
    ("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0."),
)  # fmt: skip
LEGACY_VAE_ATTENTION = (("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0."))
# (ldm prefix, diffusers prefix, the parts table of the block, or None when the rest of the key is kept)
Pair = tuple[str, str, Parts | None]


def _encoder_pairs(levels: int, layers: int) -> list[Pair]:
    """The pairs of what a UNet and its ControlNet copy share: time embedding, stem conv, ``input_blocks`` (a
    ResBlock, a transformer where the level has attention, a downsampler between levels) and ``middle_block``."""
    pairs: list[Pair] = [("time_embed.0.", "time_embedding.linear_1.", None),
                         ("time_embed.2.", "time_embedding.linear_2.", None),
                         ("input_blocks.0.0.", "conv_in.", None),
                         ("middle_block.0.", "mid_block.resnets.0.", RESNET_PARTS),
                         ("middle_block.1.", "mid_block.attentions.0.", None),
                         ("middle_block.2.", "mid_block.resnets.1.", RESNET_PARTS)]  # fmt: skip
    for i in range(1, _input_blocks(levels, layers)):
        level, layer = divmod(i - 1, layers + 1)
        if layer < layers:
            pairs.append((f"input_blocks.{i}.0.", f"down_blocks.{level}.resnets.{layer}.", RESNET_PARTS))
            pairs.append((f"input_blocks.{i}.1.", f"down_blocks.{level}.attentions.{layer}.", None))
        else:
            pairs.append((f"input_blocks.{i}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", None))
    return pairs


def _input_blocks(levels: int, layers: int) -> int:
    """The ldm ``input_blocks`` (and ``zero_convs``): the stem conv, ``layers`` per level, a downsampler between
    levels."""
    return 1 + levels * layers + levels - 1


def _encoder_shape_of_ldm(keys: list[str]) -> tuple[int, int]:
    """(levels, res blocks per level) of a UNet or ControlNet whose ldm keys (without prefix) are ``keys``."""
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downsamplers = len(_indices(keys, r"input_blocks\.(\d+)\.0\.op\."))
    levels = downsamplers + 1
    if not blocks or (max(blocks) + 1 - levels) % levels:
        raise CheckpointError(f"{max(blocks, default=-1) + 1} input blocks and {downsamplers} downsamplers are not "
                              "the layout of a UNet encoder")  # fmt: skip
    return levels, (max(blocks) + 1 - levels) // levels


def _encoder_shape_of_diffusers(keys: list[str]) -> tuple[int, int]:
    """(levels, res blocks per level) of a diffusers UNet or ControlNet whose keys are ``keys``."""
    return len(_indices(keys, r"down_blocks\.(\d+)\.")), len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))


@dataclass(frozen=True)
class ControlNetShape:
    """What the diffusers names of a ControlNet depend on: resolution levels, res blocks per level, hint convs."""

    levels: int
    layers: int
    hint_convs: int
    what = "ControlNet"

    @property
    def input_blocks(self) -> int:
        """The ldm ``input_blocks`` (and ``zero_convs``)."""
        return _input_blocks(self.levels, self.layers)

    def prefixes(self) -> list[Pair]:
        """The :data:`Pair` of every part of the ControlNet; ldm prefixes are relative to ``control_model.``."""
        pairs = _encoder_pairs(self.levels, self.layers)
        pairs += [("input_hint_block.0.", "controlnet_cond_embedding.conv_in.", None),
                  (f"input_hint_block.{2 * (self.hint_convs - 1)}.", "controlnet_cond_embedding.conv_out.", None),
                  ("middle_block_out.0.", "controlnet_mid_block.", None)]  # fmt: skip
        # the hint encoder alternates convs and SiLUs: its inner convs are the even layers between the ends
        pairs += [(f"input_hint_block.{2 * j}.", f"controlnet_cond_embedding.blocks.{j - 1}.", None)
                  for j in range(1, self.hint_convs - 1)]  # fmt: skip
        pairs += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.", None) for i in range(self.input_blocks)]
        return pairs

    @classmethod
    def of_ldm(cls, keys: list[str]) -> ControlNetShape:
        """The shape of the ControlNet whose ldm keys (without ``control_model.``) are ``keys``."""
        return cls(*_encoder_shape_of_ldm(keys), len(_indices(keys, r"input_hint_block\.(\d+)\.")))

    @classmethod
    def of_diffusers(cls, keys: list[str]) -> ControlNetShape:
        """The shape of the diffusers ControlNetModel whose keys are ``keys``."""
        hint_convs = len(_indices(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")) + 2
        return cls(*_encoder_shape_of_diffusers(keys), hint_convs)


@dataclass(frozen=True)
class UNetShape:
    """What the diffusers names of a UNet depend on: levels, res blocks per level, and for each up level (lowest
    resolution first) whether it has attention (its upsampler follows the transformer, else the ResBlock)."""

    levels: int
    layers: int
    attention: tuple[bool, ...]
    what = "UNet"

    def prefixes(self) -> list[Pair]:
        """The :data:`Pair` of every part of the UNet; ldm prefixes are relative to ``model.diffusion_model.``."""
        pairs = _encoder_pairs(self.levels, self.layers)
        pairs += [("out.0.", "conv_norm_out.", None), ("out.2.", "conv_out.", None)]
        for level, attention in enumerate(self.attention):
            for layer in range(self.layers + 1):
                i, up = level * (self.layers + 1) + layer, f"up_blocks.{level}."
                pairs.append((f"output_blocks.{i}.0.", f"{up}resnets.{layer}.", RESNET_PARTS))
                if attention:
                    pairs.append((f"output_blocks.{i}.1.", f"{up}attentions.{layer}.", None))
                if layer == self.layers and level < self.levels - 1:
                    pairs.append((f"output_blocks.{i}.{1 + attention}.conv.", f"{up}upsamplers.0.conv.", None))
        return pairs

    @classmethod
    def of_ldm(cls, keys: list[str]) -> UNetShape:
        """The shape of the UNet whose ldm keys (without ``model.diffusion_model.``) are ``keys``."""
        levels, layers = _encoder_shape_of_ldm(keys)
        firsts = [f"output_blocks.{level * (layers + 1)}.1." for level in range(levels)]
        return cls(levels, layers, tuple(any(k.startswith(p) and not k.startswith(p + "conv.") for k in keys)
                                         for p in firsts))  # fmt: skip

    @classmethod
    def of_diffusers(cls, keys: list[str]) -> UNetShape:
        """The shape of the diffusers UNet2DConditionModel whose keys are ``keys``."""
        levels, layers = _encoder_shape_of_diffusers(keys)
        return cls(levels, layers, tuple(any(k.startswith(f"up_blocks.{level}.attentions.") for k in keys)
                                         for level in range(levels)))  # fmt: skip


@dataclass(frozen=True)
class VAEShape:
    """What the diffusers names of the autoencoder depend on: levels and ResBlocks per decoder level (the
    encoder has one fewer). ldm numbers the decoder's levels from the highest resolution, diffusers from the
    lowest."""

    levels: int
    blocks: int
    what = "VAE"

    def prefixes(self) -> list[Pair]:
        """The :data:`Pair` of every part of the autoencoder; ldm prefixes are relative to ``first_stage_model.``."""
        pairs: list[Pair] = [("quant_conv.", "quant_conv.", None), ("post_quant_conv.", "post_quant_conv.", None)]
        for half in ("encoder.", "decoder."):
            pairs += [(half + "conv_in.", half + "conv_in.", None), (half + "conv_out.", half + "conv_out.", None),
                      (half + "norm_out.", half + "conv_norm_out.", None),
                      (half + "mid.block_1.", half + "mid_block.resnets.0.", VAE_RESNET_PARTS),
                      (half + "mid.attn_1.", half + "mid_block.attentions.0.", VAE_ATTENTION_PARTS),
                      (half + "mid.block_2.", half + "mid_block.resnets.1.", VAE_RESNET_PARTS)]  # fmt: skip
        for level in range(self.levels):
            down, up = f"encoder.down_blocks.{level}.", f"decoder.up_blocks.{self.levels - 1 - level}."
            pairs += [(f"encoder.down.{level}.downsample.conv.", down + "downsamplers.0.conv.", None),
                      (f"decoder.up.{level}.upsample.conv.", up + "upsamplers.0.conv.", None)]  # fmt: skip
            for j in range(self.blocks):
                pairs += [(f"encoder.down.{level}.block.{j}.", f"{down}resnets.{j}.", VAE_RESNET_PARTS),
                          (f"decoder.up.{level}.block.{j}.", f"{up}resnets.{j}.", VAE_RESNET_PARTS)]  # fmt: skip
        return pairs

    @classmethod
    def of_ldm(cls, keys: list[str]) -> VAEShape:
        """The shape of the autoencoder whose ldm keys (without ``first_stage_model.``) are ``keys``."""
        return cls(len(_indices(keys, r"decoder\.up\.(\d+)\.")), len(_indices(keys, r"decoder\.up\.0\.block\.(\d+)\.")))

    @classmethod
    def of_diffusers(cls, keys: list[str]) -> VAEShape:
        """The shape of the diffusers AutoencoderKL whose keys are ``keys``."""
        return cls(len(_indices(keys, r"decoder\.up_blocks\.(\d+)\.")),
                   len(_indices(keys, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.")))  # fmt: skip


def _indices(keys: list[str], pattern: str) -> set[int]:
    """The distinct numbers that ``pattern``'s group matches at the start of ``keys``."""
    regex = re.compile(pattern)
    return {int(m.group(1)) for m in map(regex.match, keys) if m}


def _rename(state_dict: Mapping[str, torch.Tensor], pairs: list[Pair], what: str) -> StateDict:
    """Each key's longest matching prefix of ``pairs`` replaced, and the rest of the key renamed by the pair's
    parts table when it has one. Raises :class:`CheckpointError` "<key>: not a <what>" for a key without a
    counterpart."""
    out = {}
    for key, value in state_dict.items():
        matches = [pair for pair in pairs if key.startswith(pair[0])]
        src, dst, parts = max(matches, key=lambda m: len(m[0]), default=("", None, None))
        rest: str | None = key[len(src) :]
        if parts is not None:
            part = next(((a, b) for a, b in parts if rest.startswith(a)), None)
            rest = part[1] + rest[len(part[0]) :] if part else None
        if dst is None or rest is None:
            raise CheckpointError(f"{key}: not a {what}")
        out[dst + rest] = value
    return out


def _swapped(pairs: list[Pair], prefix: str) -> list[Pair]:
    """``pairs`` (ldm -> diffusers) turned around, with ``prefix`` put before the ldm side."""
    return [(dst, prefix + src, None if parts is None else tuple((b, a) for a, b in parts))
            for src, dst, parts in pairs]  # fmt: skip


def _ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], prefix: str, shape: Any) -> StateDict:
    """The ``prefix`` tensors of an ldm state dict under diffusers keys (``shape``: the model's shape class)."""
    part = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not part:
        return {}
    try:
        relative = shape.of_ldm([k[len(prefix) :] for k in part]).prefixes()
    except CheckpointError as err:
        raise CheckpointError(f"{prefix.rstrip('.')}: {err}") from None
    pairs = [(prefix + src, dst, parts) for src, dst, parts in relative]
    return _rename(part, pairs, f"{shape.what} key of the ldm layout")


def _diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str, shape: Any) -> StateDict:
    """A diffusers model's state dict under ldm keys starting with ``prefix``."""
    if not state_dict:
        return {}
    pairs = _swapped(shape.of_diffusers(list(state_dict)).prefixes(), prefix)
    return _rename(state_dict, pairs, f"{shape.what} key of the diffusers layout")


def controlnet_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The ``control_model.*`` tensors of a ControlLDM state dict (reference keys) under the keys of
    diffusers' ``ControlNetModel``: ``controlnet_cond_embedding.*`` (hint encoder), ``conv_in``,
    ``time_embedding``, ``down_blocks.*``, ``mid_block.*``, ``controlnet_down_blocks.*`` (zero convs) and
    ``controlnet_mid_block``. Other keys are left out (they belong to other diffusers models). Shapes
    unchanged. Raises :class:`CheckpointError` for a ``control_model.*`` key the layout has no place for."""
    return _ldm_to_diffusers(state_dict, CONTROL_PREFIX, ControlNetShape)


def diffusers_to_controlnet(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of :func:`controlnet_to_diffusers`: a diffusers ``ControlNetModel`` state dict under the
    reference's ``control_model.*`` keys. Raises :class:`CheckpointError` for a key it has no place for."""
    return _diffusers_to_ldm(state_dict, CONTROL_PREFIX, ControlNetShape)


def unet_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The ``model.diffusion_model.*`` tensors under the keys of diffusers' ``UNet2DConditionModel``
    (``down_blocks``, ``mid_block``, ``up_blocks``, ``conv_norm_out``, ``conv_out``, ...); other keys left out.
    Shapes unchanged. Raises :class:`CheckpointError` for a UNet key the layout has no place for."""
    return _ldm_to_diffusers(state_dict, UNET_PREFIX, UNetShape)


def diffusers_to_unet(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of :func:`unet_to_diffusers`. Raises :class:`CheckpointError` for a key it has no place for."""
    return _diffusers_to_ldm(state_dict, UNET_PREFIX, UNetShape)


def _vae_attention(state_dict: StateDict, linear: bool) -> StateDict:
    """The VAE attention projections (``to_q/to_k/to_v/to_out.0.weight``, diffusers keys) as linear weights
    [C, C] (``linear``) or as ldm's 1x1 conv weights [C, C, 1, 1]: views of the same storage."""
    ends = tuple(f"attentions.0.{name}weight" for _, name in VAE_ATTENTION_PARTS[1:])
    for key, value in state_dict.items():
        if key.endswith(ends) and linear and value.ndim == 4:
            state_dict[key] = value[:, :, 0, 0]
        elif key.endswith(ends) and not linear and value.ndim == 2:
            state_dict[key] = value[:, :, None, None]
    return state_dict


def vae_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The ``first_stage_model.*`` tensors under the keys of diffusers' ``AutoencoderKL``; the mid-block
    attention's 1x1 conv weights [C, C, 1, 1] become linear weights [C, C] (views, no copy). Other keys left
    out. Raises :class:`CheckpointError` for a VAE key diffusers has no place for (e.g. attention in the levels)."""
    return _vae_attention(_ldm_to_diffusers(state_dict, VAE_PREFIX, VAEShape), linear=True)


def diffusers_to_vae(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of :func:`vae_to_diffusers` (also for the attention names of diffusers before 0.14:
    ``query``, ``key``, ``value``, ``proj_attn``). Raises :class:`CheckpointError` for a key it has no place for."""
    renamed = {}
    for key, value in state_dict.items():
        head, dot, last = key.rpartition("attentions.0.")
        old = next(((a, b) for a, b in LEGACY_VAE_ATTENTION if last.startswith(a)), None) if dot else None
        renamed[head + dot + old[1] + last[len(old[0]) :] if old else key] = value
    return _diffusers_to_ldm(_vae_attention(renamed, linear=False), VAE_PREFIX, VAEShape)


def clip_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The CLIP text encoder's tensors (``cond_stage_model.transformer.text_model.*``) under the keys of
    transformers' ``CLIPTextModel`` as diffusers pipelines store it (``text_model.*``); other keys left out."""
    prefix = CLIP_PREFIX + "text_model."
    return {"text_model." + k[len(prefix) :]: v for k, v in normalize_keys(state_dict).items() if k.startswith(prefix)}


def transformers_to_clip(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A ``CLIPTextModel`` state dict (``text_model.*`` as transformers 4 saves it, or without that level as
    transformers 5 does) under ``cond_stage_model.transformer.text_model.*``, without ``position_ids``."""
    return normalize_keys({CLIP_PREFIX + k: v for k, v in state_dict.items()})


LAYOUTS: dict[str, Layout] = {
    "ldm": Layout("the reference's keys (ControlNet 1.0 releases, the model's state_dict())", normalize_keys, dict),
    "sd": Layout("a Stable Diffusion checkpoint (ldm keys without control_model.*); into ldm the ControlNet gets "
                 "its copy of the UNet encoder, as tool_add_control.py initialises it", sd_to_ldm, ldm_to_sd),
    "diffusers": Layout("diffusers' ControlNetModel: the ControlNet's tensors only", diffusers_to_controlnet,
                        controlnet_to_diffusers),
    "diffusers_unet": Layout("diffusers' UNet2DConditionModel (a pipeline's unet/): model.diffusion_model.*",
                             diffusers_to_unet, unet_to_diffusers),
    "diffusers_vae": Layout("diffusers' AutoencoderKL (a pipeline's vae/): first_stage_model.*", diffusers_to_vae,
                            vae_to_diffusers),
    "diffusers_clip": Layout("transformers' CLIPTextModel (a pipeline's text_encoder/): "
                             "cond_stage_model.transformer.*", transformers_to_clip, clip_to_transformers),
}  # fmt: skip


def convert(state_dict: Mapping[str, torch.Tensor], source: str, target: str) -> StateDict:
    """``state_dict`` from the ``source`` layout of :data:`LAYOUTS` to ``target``, through ``"ldm"``. The tensors
    are the same objects, except the VAE attention weights, which are reshaped views. Raises ``ValueError`` for
    an unknown layout, :class:`CheckpointError` for a key the conversion has no place for."""
    for name in (source, target):
        if name not in LAYOUTS:
            raise ValueError(f"unknown checkpoint layout '{name}' (choose from {', '.join(LAYOUTS)})")
    return LAYOUTS[target].from_ldm(LAYOUTS[source].to_ldm(state_dict))


# --- diffusers folders ---------------------------------------------------------------------------------------

# The model class a folder's config.json names (diffusers' _class_name, transformers' architectures) -> its row.
FOLDER_LAYOUTS = {"ControlNetModel": "diffusers", "UNet2DConditionModel": "diffusers_unet",
                  "AutoencoderKL": "diffusers_vae", "CLIPTextModel": "diffusers_clip"}  # fmt: skip
PIPELINE_PARTS = ("unet", "vae", "text_encoder")  # what a Stable Diffusion pipeline folder must hold
PIPELINE_OPTIONAL = ("controlnet",)  # a StableDiffusionControlNetPipeline's folder also has it
# Weight file names in a model folder (diffusers, then transformers), the variants diffusers writes, formats:
# preferred in this order (full precision before a half-precision variant, safetensors before pickles).
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_VARIANTS = ("", ".fp16", ".bf16")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SHARD_INDEX = ".index.json"  # <weights name>.index.json: {"weight_map": {key: shard file}} of sharded weights
CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors")
FOLDER_EXPECTED = ("a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors or .bin), a "
                   "Stable Diffusion pipeline folder (model_index.json, unet/, vae/, text_encoder/) or a hub cache "
                   "folder models--ORG--NAME")  # fmt: skip


def hub_snapshot(folder: str | os.PathLike) -> Path:
    """The folder holding the files: for a hub cache folder ``models--ORG--NAME`` the snapshot ``refs/main``
    names (or its only snapshot), else ``folder`` itself. Raises :class:`CheckpointError` for a cache folder
    without a usable snapshot."""
    folder = Path(folder)
    snapshots = folder / "snapshots"
    if not folder.name.startswith("models--") or not snapshots.is_dir():
        return folder
    ref = folder / "refs" / "main"
    if ref.is_file():
        snapshot = snapshots / ref.read_text().strip()
        if not snapshot.is_dir():
            raise CheckpointError(f"{ref}: names snapshot {snapshot.name}, which is not in {snapshots}")
        return snapshot
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) != 1:
        raise CheckpointError(f"{folder}: hub cache folder without refs/main and with {len(found)} snapshots; "
                              "pass one snapshots/HASH folder")  # fmt: skip
    return found[0]


def _weight_names() -> list[str]:
    """The weight file names of a model folder in the order of preference (see :data:`WEIGHT_STEMS`)."""
    return [f"{stem}{variant}{suffix}" for suffix in WEIGHT_SUFFIXES for variant in WEIGHT_VARIANTS
            for stem in WEIGHT_STEMS]  # fmt: skip


def weights_file(folder: Path) -> Path | None:
    """The weight file of a diffusers or transformers model folder (see :data:`WEIGHT_STEMS`), else the index
    (``<name>.index.json``) of its sharded weights, or None."""
    names = _weight_names()
    return next((folder / n for n in [*names, *(n + SHARD_INDEX for n in names)] if (folder / n).is_file()), None)


def _read_weights(path: Path, location: str) -> dict[str, torch.Tensor]:
    """The tensors of weight file ``path``, or of every shard its ``.index.json`` names (``weight_map``: key ->
    shard file in the same folder), keys as stored. Raises :class:`CheckpointError` naming the file."""
    if not path.name.endswith(SHARD_INDEX):
        return _read_tensors(path, location)
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: no weight_map (key -> shard file) in the index")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        shard_path = path.parent / shard
        if shard_path.is_symlink() and not shard_path.exists():
            raise CheckpointError(_dangling(shard_path))
        tensors.update(_read_tensors(shard_path, location))
    missing = [k for k in weight_map if k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors it lists are in no shard ({shorten_keys(missing)})")
    return tensors


def _dangling(link: Path) -> str:
    return (f"{link}: the file it links to ({os.readlink(link)}) is missing: an incomplete download; download the "
            "model again")  # fmt: skip


def _no_weights(folder: Path) -> str:
    """Why model folder ``folder`` has no weight file :func:`weights_file` reads: a dangling hub-cache symlink
    (its blob was never downloaded), or none of the names."""
    links = [folder / n for n in _weight_names() for n in (n, n + SHARD_INDEX)]
    dangling = next((link for link in links if link.is_symlink() and not link.exists()), None)
    if dangling is not None:
        return _dangling(dangling)
    return (f"{folder}: has config.json but no weights (expected diffusion_pytorch_model.safetensors or .bin, or "
            "model.safetensors, their .fp16. variants, or a sharded <name>.index.json)")  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({_reason(err)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def model_class(folder: Path) -> str:
    """The class a model folder's ``config.json`` names: diffusers' ``_class_name`` or transformers' first
    ``architectures`` entry ("" when it names none). Raises :class:`CheckpointError` for unreadable JSON."""
    config = _read_json(folder / "config.json")
    architectures = config.get("architectures") or [""]
    return str(config.get("_class_name") or architectures[0])


def _read_model_folder(folder: Path, location: str) -> StateDict:
    """The tensors of one diffusers/transformers model folder under reference keys."""
    cls = model_class(folder)
    if cls not in FOLDER_LAYOUTS:
        raise CheckpointError(f"{folder / 'config.json'}: model class '{cls}' is not one this project reads "
                              f"(expected {', '.join(FOLDER_LAYOUTS)})")  # fmt: skip
    path = weights_file(folder)
    if path is None:
        raise CheckpointError(_no_weights(folder))
    tensors = _read_weights(path, location)
    try:
        return LAYOUTS[FOLDER_LAYOUTS[cls]].to_ldm(tensors)
    except CheckpointError as err:  # a key without a place: name the file
        raise CheckpointError(f"{path}: {err}") from None


def _pipeline_parts(folder: Path) -> list[Path]:
    """The model folders of a pipeline folder to read (required parts, then optional ones present). Raises
    :class:`CheckpointError` for a required part without weights, or any part present without ``config.json``."""
    missing = [name for name in PIPELINE_PARTS if weights_file(folder / name) is None]
    if missing:
        raise CheckpointError(f"{folder}: pipeline folder (model_index.json) without weights in "
                              f"{', '.join(name + '/' for name in missing)}")  # fmt: skip
    parts = [folder / name for name in PIPELINE_PARTS + PIPELINE_OPTIONAL if (folder / name).is_dir()]
    for part in parts:
        if not (part / "config.json").is_file():
            raise CheckpointError(f"{folder}: pipeline folder without {part.name}/config.json")
    return parts


def load_folder(folder: str | os.PathLike, location: str = "cpu") -> StateDict:
    """Read a diffusers folder into reference keys, each file memory-mapped (safetensors) or read with torch's
    weights-only memory-mapped loader (``.bin``); renamed tensors are the file's (no copy).

    ``folder``: a model folder (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors|.bin``; its class
    chooses the row of :data:`LAYOUTS`: a ControlNet gives ``control_model.*``), a pipeline folder
    (``model_index.json``: ``unet/``, ``vae/``, ``text_encoder/`` and, if present, ``controlnet/`` give
    ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``,
    ``control_model.*``; no schedule buffers), or either inside a hub cache folder (:func:`hub_snapshot`; files
    may be symlinks into ``blobs/``). Raises :class:`CheckpointError` (one line naming the folder or file) for a
    folder that is none of these, a missing part, an unknown model class, or a key the layout has no place for.
    """
    folder = Path(folder)
    files = hub_snapshot(folder)
    if (files / "model_index.json").is_file():
        state_dict: StateDict = {}
        for part in _pipeline_parts(files):
            state_dict.update(_read_model_folder(part, location))
        return state_dict
    if (files / "config.json").is_file():
        return _read_model_folder(files, location)
    held = sorted(p.name for p in files.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
    hint = f"; it holds {shorten_keys(held)}: pass the file" if held else ""
    raise CheckpointError(f"{folder}: not a checkpoint folder: expected {FOLDER_EXPECTED}{hint}")


# --- diffusers configs ---------------------------------------------------------------------------------------

# UNet/ControlNet yaml parameters diffusers' blocks have no counterpart for, with the value that has one.
NO_DIFFUSERS_COUNTERPART = {"use_scale_shift_norm": False, "resblock_updown": False, "num_attention_blocks": None,
                            "disable_self_attentions": None, "disable_middle_self_attn": False}  # fmt: skip
HINT_CHANNELS = [16, 32, 96, 256]  # the ControlNet hint encoder's conv widths (cldm.cldm.ControlNet)


def _structure(params: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """The diffusers config fields of a UNet/ControlNet's yaml ``params`` (what shapes and computes the same)."""
    for name, value in NO_DIFFUSERS_COUNTERPART.items():
        if params.get(name, value) != value:
            raise CheckpointError(f"{owner}.{name}: {params[name]!r} has no diffusers counterpart")
    mult = list(params.get("channel_mult", (1, 2, 4, 8)))
    blocks, context = params["num_res_blocks"], params["context_dim"]
    if not isinstance(blocks, int) and len(set(blocks)) == 1:
        blocks = blocks[0]
    for name, value in (("num_res_blocks", blocks), ("context_dim", context)):
        if not isinstance(value, int):
            raise CheckpointError(f"{owner}.{name}: {list(value)} (one value per level) has no diffusers counterpart")
    channels = [params["model_channels"] * m for m in mult]
    per_head = params.get("num_head_channels", -1)
    heads = [params["num_heads"] if per_head == -1 else c // per_head for c in channels]
    return {
        "in_channels": params["in_channels"],
        "block_out_channels": channels,
        "layers_per_block": blocks,
        "down_block_types": [_block("Down", 2**i in params["attention_resolutions"]) for i in range(len(mult))],
        "cross_attention_dim": context,
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,  # diffusers' name for the head count
        "use_linear_projection": bool(params.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": params.get("transformer_depth", 1),
        "norm_num_groups": params.get("norm_num_groups", 32),
    }


def _block(kind: str, attention: bool) -> str:
    return f"CrossAttn{kind}Block2D" if attention else f"{kind}Block2D"


def diffusers_controlnet_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of diffusers' ``ControlNetModel`` for the yaml's ``control_stage_config.params``
    (diffusers' defaults, which the project's ControlNet computes, are left out). Raises
    :class:`CheckpointError` naming a parameter diffusers has no counterpart for."""
    return {"_class_name": "ControlNetModel", **_structure(params, "control_stage_config"),
            "conditioning_channels": params["hint_channels"],
            "conditioning_embedding_out_channels": HINT_CHANNELS}  # fmt: skip


def diffusers_unet_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of diffusers' ``UNet2DConditionModel`` config for the yaml's ``unet_config.params``."""
    structure = _structure(params, "unet_config")
    ups = [kind.replace("Down", "Up") for kind in reversed(structure["down_block_types"])]
    return {"_class_name": "UNet2DConditionModel", **structure, "out_channels": params["out_channels"],
            "up_block_types": ups}  # fmt: skip


def diffusers_vae_config(ddconfig: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of diffusers' ``AutoencoderKL`` config for the yaml's ``first_stage_config.params.ddconfig``."""
    if ddconfig.get("attn_resolutions"):
        raise CheckpointError(f"ddconfig.attn_resolutions: {list(ddconfig['attn_resolutions'])} has no diffusers "
                              "counterpart")  # fmt: skip
    levels = len(ddconfig["ch_mult"])
    return {"_class_name": "AutoencoderKL", "in_channels": ddconfig["in_channels"], "out_channels": ddconfig["out_ch"],
            "block_out_channels": [ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": ddconfig["num_res_blocks"], "latent_channels": ddconfig["z_channels"],
            "norm_num_groups": ddconfig.get("norm_num_groups", 32)}  # fmt: skip


def _expected_configs(model_config: Any) -> dict[str, Callable[[], dict[str, Any]]]:
    """model class -> the diffusers config the yaml ``model`` section gives it (for the parts it has)."""
    config = OmegaConf.to_container(model_config, resolve=True) if OmegaConf.is_config(model_config) else model_config
    params = config.get("params", {})
    builders = {"ControlNetModel": ("control_stage_config", diffusers_controlnet_config),
                "UNet2DConditionModel": ("unet_config", diffusers_unet_config)}  # fmt: skip
    out = {cls: (lambda b=build, p=params[section]["params"]: b(p))
           for cls, (section, build) in builders.items() if section in params}  # fmt: skip
    if "first_stage_config" in params:
        out["AutoencoderKL"] = lambda: diffusers_vae_config(params["first_stage_config"]["params"]["ddconfig"])
    return out


def _comparable(field: str, value: Any, levels: int) -> Any:
    """A config value in one spelling: per-level fields as lists, sequences as lists."""
    if field in ("attention_head_dim", "transformer_layers_per_block") and isinstance(value, int):
        return [value] * levels
    return list(value) if isinstance(value, (list, tuple)) else value


def check_folder_config(path: str | os.PathLike, model_config: Any, config_name: str = "the config") -> None:
    """For a diffusers folder ``path`` (nothing for a file): each ``config.json`` of a ControlNet, UNet or VAE
    in it must agree with the yaml ``model`` section ``model_config`` (OmegaConf or dict; ``config_name``: its
    file, for the message) on every field the yaml sets, head counts and norm groups included (which no
    tensor shape shows). Raises :class:`CheckpointError` "<config.json>: <field> is X, <config> gives Y"."""
    path = Path(path)
    if not path.is_dir():
        return
    files = hub_snapshot(path)
    pipeline = (files / "model_index.json").is_file()
    parts = [files / name for name in PIPELINE_PARTS + PIPELINE_OPTIONAL] if pipeline else [files]
    expected = _expected_configs(model_config)
    for part in parts:
        if not (part / "config.json").is_file() or model_class(part) not in expected:
            continue
        theirs, ours = _read_json(part / "config.json"), expected[model_class(part)]()
        if theirs.get("num_attention_heads"):  # diffusers takes it over attention_head_dim when set
            theirs["attention_head_dim"] = theirs["num_attention_heads"]
        levels = len(ours["block_out_channels"])
        for field, value in ours.items():
            if field in theirs and _comparable(field, theirs[field], levels) != _comparable(field, value, levels):
                raise CheckpointError(f"{part / 'config.json'}: {field} is {theirs[field]}, {config_name} gives "
                                      f"{value} (a config.json for another model?)")  # fmt: skip


def save_diffusers_controlnet(
    state_dict: Mapping[str, torch.Tensor], folder: str | os.PathLike, control_params: Mapping[str, Any],
    variant: str = "",
) -> Path:  # fmt: skip
    """Write the ``control_model.*`` tensors of ``state_dict`` as a diffusers ``ControlNetModel`` folder:
    ``config.json`` (:func:`diffusers_controlnet_config` of ``control_params``, the yaml's
    ``control_stage_config.params``) and ``diffusion_pytorch_model[.VARIANT].safetensors`` (tensors as they
    are; diffusers names ``fp16`` files by ``variant="fp16"``). Atomic: both files go to a temporary folder
    next to ``folder`` that is then renamed, so a failure leaves no ``folder``. Returns ``folder``. Raises
    :class:`CheckpointError` without ControlNet tensors or for a config diffusers cannot express, ``OSError``
    (one line naming ``folder``) when it exists or cannot be written."""
    import safetensors.torch
    from safetensors import SafetensorError

    config = diffusers_controlnet_config(control_params)
    tensors = controlnet_to_diffusers(state_dict)
    if not tensors:
        raise CheckpointError("no control_model.* tensors to write as a diffusers ControlNet")
    folder = Path(folder)
    name = f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors"
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
        os.chmod(tmp, 0o777 & ~_umask())  # as an ordinary new folder (mkdtemp makes it 0700)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name),
                                    metadata={"format": "pt"})  # fmt: skip
        os.chmod(tmp / name, 0o666 & ~_umask())
        os.rename(tmp, folder)  # refuses an existing non-empty folder
    except (OSError, SafetensorError) as err:
        raise OSError(f"{folder}: cannot write the diffusers folder ({_reason(err)})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --- key families: what a file holds, and files this project cannot use ---------------------------------------

EMA_PREFIX = "model_ema."
# A "difference" ControlNet: this scalar key, and control_model.X stored as (ControlNet - SD1.5 UNet) for every X
# the UNet also has (time_embed, input_blocks, middle_block); the UNet in use is added back when loading.
DIFFERENCE_KEY = "difference"
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."
# The Stable Diffusion parts a ControlLDM needs besides its ControlNet: (name for messages, key prefix).
SD_PARTS = (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX), ("text encoder", TEXT_PREFIX))
# label_emb inputs of SDXL's base UNet (and its ControlNets): pooled text embedding + size/crop embeddings.
SDXL_ADM_CHANNELS = 2816
# Cross-attention widths (the text encoder's hidden size) of the public model families.
FAMILY_OF_WIDTH = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
INPAINT_CHANNELS = 9  # latent 4 + mask 1 + masked-image latent 4
# LoRA files: kohya-style key prefixes (UNet, text encoders), and the low-rank pairs of other trainers (PEFT).
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LORA_MARKS = (".lora_up.", ".lora_down.", ".lora_A.", ".lora_B.", ".lora.up.", ".lora.down.")


def ema_key(key: str) -> str:
    """The key under which the reference's ``LitEma`` stores the EMA copy of UNet weight ``key``:
    ``model.diffusion_model.X`` -> ``model_ema.diffusion_modelX`` with every ``.`` removed (buffer names cannot
    hold dots), e.g. ``model_ema.diffusion_modelinput_blocks00weight``."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def _any(keys: list[str], test: Callable[[str], bool]) -> bool:
    return any(map(test, keys))


def foreign_kind(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """When a file holds weights of a kind this project does not run: what it is, the keys that show it, and
    what to pass instead (e.g. ``"a T2I-Adapter (keys body.*, conv_in.*), not a ControlNet: ..."``); ``None``
    for anything else. Kinds: Control-LoRA, LoRA, T2I-Adapter, IP-Adapter, diffusers-keyed ControlNet weights
    (a single file), SDXL (ControlNet or base)."""
    keys = list(state_dict)
    other = "not a ControlNet: --ckpt takes a ControlNet file (control_model.* keys)"
    if "lora_controlnet" in state_dict:
        return "a Control-LoRA (key lora_controlnet, low-rank *.up/*.down weights), which this project does not run"
    if _any(keys, lambda k: k.startswith(LORA_PREFIXES) or any(mark in k for mark in LORA_MARKS)):
        return f"a LoRA (keys lora_unet_*/lora_te_* or *.lora_A/*.lora_B), changes to a base model, {other}"
    if "controlnet_cond_embedding.conv_in.weight" in state_dict:
        return ("a diffusers ControlNet's weights (keys controlnet_cond_embedding.*): pass the folder that holds "
                "them with their config.json")
    if _any(keys, lambda k: k.removeprefix("adapter.").startswith("body.") or k == "style_embedding"):
        return f"a T2I-Adapter (keys body.*, conv_in.*), {other}"
    if _any(keys, lambda k: k.startswith(("ip_adapter.", "image_proj."))):
        return f"an IP-Adapter (keys ip_adapter.*, image_proj.*), {other}"
    family = model_family(state_dict)
    if family is not None and family[0] == "SDXL":
        return f"an SDXL model ({family[1]}); this project runs SD1.x and SD2.x models"
    return None


def cross_attention_width(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The width of the text embedding the cross-attention layers read (``attn2.to_k`` input features: 768
    for SD1.x, 1024 for SD2.x, 2048 for SDXL), or ``None`` when the state dict has no such layer."""
    key = next((k for k in state_dict if k.endswith("attn2.to_k.weight")), None)
    return None if key is None else int(state_dict[key].shape[-1])


def model_family(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """``(family, evidence)``: which model family the keys show ("SD1.x", "SD2.x" or "SDXL") and the keys or
    shapes that show it, from the text encoder's keys first, else the label embedding and cross-attention
    width; ``None`` when nothing tells (e.g. a small test model's ControlNet alone)."""
    keys = list(state_dict)
    if _any(keys, lambda k: k.startswith(SDXL_PREFIX)):
        return "SDXL", f"keys {SDXL_PREFIX}*"
    for prefix in (UNET_PREFIX, CONTROL_PREFIX):
        label = state_dict.get(prefix + "label_emb.0.0.weight")
        if label is not None and label.shape[-1] == SDXL_ADM_CHANNELS:
            return "SDXL", f"label_emb with {SDXL_ADM_CHANNELS} inputs"
    if _any(keys, lambda k: k.startswith(OPENCLIP_PREFIX)):
        return "SD2.x", f"OpenCLIP text encoder {OPENCLIP_PREFIX}*"
    if _any(keys, lambda k: k.startswith(CLIP_PREFIX)):
        return "SD1.x", f"CLIP text encoder {CLIP_PREFIX}*"
    width = cross_attention_width(state_dict)
    if width in FAMILY_OF_WIDTH:
        return FAMILY_OF_WIDTH[width], f"{width}-dim cross-attention"
    return None


def input_channels(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The latent channels the UNet (else the ControlNet) takes: its first conv's input channels (4; 9 for an
    inpainting UNet), or ``None`` when the state dict has neither."""
    for prefix in (UNET_PREFIX, CONTROL_PREFIX):
        weight = state_dict.get(prefix + "input_blocks.0.0.weight")
        if weight is not None and weight.dim() == 4:
            return int(weight.shape[1])
    return None


@dataclass(frozen=True)
class Contents:
    """Which parts of a ControlLDM a state dict (reference keys) holds."""

    control: bool  # control_model.*
    unet: bool  # model.diffusion_model.*
    ema: bool  # model_ema.* (the reference's EMA copy of the UNet)
    vae: bool  # first_stage_model.*
    text: bool  # cond_stage_model.*
    difference: bool  # the "difference" key: control_model.* hold ControlNet - UNet

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> Contents:
        keys = list(state_dict)

        def has(prefix: str) -> bool:
            return _any(keys, lambda k: k.startswith(prefix))

        return cls(has(CONTROL_PREFIX), has(UNET_PREFIX), has(EMA_PREFIX + "diffusion_model"), has(VAE_PREFIX),
                   has(TEXT_PREFIX), DIFFERENCE_KEY in state_dict)  # fmt: skip

    @property
    def stable_diffusion(self) -> bool:
        """Whether it holds a Stable Diffusion UNet (plain or EMA)."""
        return self.unet or self.ema


def add_difference(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A "difference" ControlNet made whole: every ``control_model.X`` whose ``model.diffusion_model.X`` is in
    ``state_dict`` (the UNet in use) becomes their sum, computed and returned in float32; the other keys are
    the same objects and the ``difference`` key is dropped. The keys added are those the ControlNet copies from
    the UNet (``time_embed``, ``input_blocks``, ``middle_block``); the hint encoder and zero convs are kept."""
    out = {}
    for key, value in state_dict.items():
        if key == DIFFERENCE_KEY:
            continue
        unet = state_dict.get(control_source_key(key)) if key.startswith(CONTROL_PREFIX) else None
        out[key] = value if unet is None else value.float() + unet.float()
    return out
