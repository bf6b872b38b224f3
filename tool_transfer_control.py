"""Move a ControlNet onto another SD1.5-family base model (a community fine-tune), as the reference's tool does.

    python tool_transfer_control.py        # the reference's four paths under ./models/
    python tool_transfer_control.py --path_sd15 ./models/v1-5-pruned.ckpt \
        --path_sd15_with_control ./models/control_sd15_canny.pth \
        --path_input ./models/anything-v3-full.safetensors --path_output ./models/control_any3_canny.pth

A ControlNet's encoder is a trained copy of the SD1.5 UNet's encoder. On another base the copy is moved by that
base's own change from SD1.5: for every ``control_model.X`` whose UNet tensor ``model.diffusion_model.X`` both bases
hold, ``control + (new base - SD1.5)``. The text encoder and the VAE are the new base's; the file's UNet (and the
other non-ControlNet tensors) becomes ``new base + (file - SD1.5)``, which is exactly the new base's for a ControlNet
trained with its UNet locked. The hint encoder and the zero convolutions, which no base has, are the ControlNet's.
The output has the keys (and, per key, the dtype) of the ControlNet file: a 1.0 whole-model file gives a whole
model, a 1.1 ControlNet-only file a ControlNet-only file. Each base's ``model.diffusion_model.*`` tensors are used
(in ``v1-5-pruned.ckpt`` the non-EMA weights, the ones the reference's ``tool_add_control.py`` copies into a new
ControlNet); ``model_ema.*`` keys are ignored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tool_add_control import summarize

# The reference's paths (relative to the working directory, as its script ran from the repo root).
DEFAULTS = {
    "path_sd15": "./models/v1-5-pruned.ckpt",
    "path_sd15_with_control": "./models/control_sd15_openpose.pth",
    "path_input": "./models/anything-v3-full.safetensors",
    "path_output": "./models/control_any3_openpose.pth",
}
HELP = {
    "path_sd15": "the SD1.5 checkpoint the ControlNet was made from",
    "path_sd15_with_control": "the ControlNet: a 1.0 whole-model file or a 1.1 ControlNet-only file (control_model.*)",
    "path_input": "the new base model (an SD1.5 fine-tune, .ckpt or .safetensors, or a diffusers pipeline folder)",
    "path_output": "the ControlNet for the new base to write (.pth/.ckpt, or .safetensors); must not exist",
}
# Parts of a whole model taken from the new base as they are (the reference's first and cond stages).
BASE_ONLY = ("first_stage_model.", "cond_stage_model.")


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def _check_shapes(tensors: Iterable[tuple[str, str, torch.Tensor]]) -> None:
    """``ValueError`` naming the file and the key when the ``(file, key, tensor)`` triples differ in shape."""
    (name0, key0, t0), *rest = tensors
    for name, other_key, t in rest:
        if t.shape != t0.shape:
            raise ValueError(f"{name}: {other_key} has shape {tuple(t.shape)} where {name0}'s {key0} has "
                             f"{tuple(t0.shape)} (a model of another family or size?)")  # fmt: skip


def transfer_control(
    control: Mapping[str, torch.Tensor],
    old: Mapping[str, torch.Tensor],
    new: Mapping[str, torch.Tensor],
    names: tuple[str, str, str] = ("the ControlNet", "the SD1.5 base", "the new base"),
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(state dict, keys kept from control)``: the ControlNet state dict ``control`` (reference keys) moved from
    base ``old`` to base ``new`` (both Stable Diffusion state dicts, reference keys).

    - ``control_model.X`` with ``model.diffusion_model.X`` in both bases: ``control + (new - old)``;
    - ``first_stage_model.*``/``cond_stage_model.*``: the new base's tensor;
    - any other key both bases hold: ``new + (control - old)`` (``new`` itself when ``control == old``);
    - the rest (hint encoder, zero convs, a part the new base lacks): ``control``'s tensor, listed in the result.

    Arithmetic is in float32; each output tensor has ``control``'s dtype for its key. ``names`` (the three
    files) go into messages. Raises ``ValueError`` naming a file and a key when shapes differ or a key the new
    base has is missing from the old one."""
    from cldm.checkpoint import control_source_key

    out: dict[str, torch.Tensor] = {}
    kept: list[str] = []
    for key, p in tqdm(control.items(), desc="transfer", disable=not progress, total=len(control)):
        source = control_source_key(key)
        if key.startswith(BASE_ONLY) and key in new:
            _check_shapes([(names[0], key, p), (names[2], key, new[key])])
            value = new[key]
        elif source in new:
            if source not in old:
                raise ValueError(f"{names[1]}: has no {source}, which {names[2]} has (not the SD1.5 base?)")
            _check_shapes([(names[0], key, p), (names[1], source, old[source]), (names[2], source, new[source])])
            if key != source:
                value = _float32(p) + (_float32(new[source]) - _float32(old[source]))
            elif p.dtype == old[source].dtype and torch.equal(p, old[source]):
                value = new[source]
            else:
                value = _float32(new[source]) + (_float32(p) - _float32(old[source]))
        else:
            value = p
            kept.append(key)
        out[key] = value.to(p.dtype) if value.is_floating_point() else value
    return out, kept


def _load(path: str | Path, flag: str, must_have: str, what: str) -> dict[str, torch.Tensor]:
    """The state dict of ``path`` (``--flag``); ``ValueError`` unless some key starts with ``must_have``."""
    from cldm.checkpoint import load_state_dict

    state_dict = load_state_dict(path)
    if not any(k.startswith(must_have) for k in state_dict):
        raise ValueError(f"{path}: no {must_have}* tensors: not {what} (--{flag})")
    return state_dict


def transfer_control_file(
    path_sd15: str | Path,
    path_sd15_with_control: str | Path,
    path_input: str | Path,
    path_output: str | Path,
    progress: bool = False,
) -> tuple[int, list[str]]:
    """Write to ``path_output`` the ControlNet of ``path_sd15_with_control`` moved from base ``path_sd15`` to
    ``path_input`` (:func:`transfer_control`); returns ``(tensors written, keys kept from the ControlNet)``.
    The output's folder is checked (and created) before anything is read; the write is atomic.

    Each input is a checkpoint file or a diffusers folder (``cldm.checkpoint.load_state_dict``).
    Raises ``ValueError`` for a missing input (naming its flag), an existing output, a file that is not the
    expected kind (no ``control_model.*`` in the ControlNet, no ``model.diffusion_model.*`` in a base, a
    "difference" ControlNet) or a shape mismatch (naming the key); :class:`~cldm.checkpoint.CheckpointError` for
    an unreadable file or an output name without a checkpoint suffix; ``OSError`` when the output cannot be written."""
    from cldm.checkpoint import check_checkpoint_name, check_writable_dir, save_checkpoint

    inputs = {"path_sd15": path_sd15, "path_sd15_with_control": path_sd15_with_control, "path_input": path_input}
    for flag, path in inputs.items():
        if not Path(path).exists():  # a file, or a diffusers folder (load_state_dict reads both)
            raise ValueError(f"{path}: not found (--{flag})")
    output = Path(path_output)
    if output.exists():
        raise ValueError(f"{output}: output file already exists (--path_output)")
    check_checkpoint_name(output, " (--path_output)")
    check_writable_dir(output.parent)
    print(f"reading {path_sd15_with_control}, {path_sd15}, {path_input}", file=sys.stderr)
    control = _load(path_sd15_with_control, "path_sd15_with_control", "control_model.", "a ControlNet checkpoint")
    if "difference" in control:
        raise ValueError(f"{path_sd15_with_control}: a 'difference' ControlNet: it applies to any base as it is, "
                         "there is nothing to transfer")  # fmt: skip
    old = _load(path_sd15, "path_sd15", "model.diffusion_model.", "a Stable Diffusion checkpoint")
    new = _load(path_input, "path_input", "model.diffusion_model.", "a Stable Diffusion checkpoint")
    names = (str(path_sd15_with_control), str(path_sd15), str(path_input))
    state_dict, kept = transfer_control(control, old, new, names, progress)
    print(f"writing {output}", file=sys.stderr)
    save_checkpoint(state_dict, output)
    return len(state_dict), kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Move a ControlNet made from SD1.5 onto another SD1.5-family base: "
        "control + (new base - SD1.5); VAE and text encoder from the new base.")  # fmt: skip
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=default,
                            help=f"{HELP[name]} (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)

    from cldm.checkpoint import CheckpointError

    try:
        written, kept = transfer_control_file(args.path_sd15, args.path_sd15_with_control, args.path_input,
                                              args.path_output, progress=sys.stderr.isatty())  # fmt: skip
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{written} tensors; kept from the ControlNet as they are: {summarize(kept) or 'none'}", file=sys.stderr)
    print(f"Transferred model saved at {args.path_output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
