"""Rewrite a checkpoint (a file or a diffusers folder): every key in another precision, the ControlNet alone in
the ControlNet 1.1 layout, or the ControlNet as a diffusers folder.

    python -m tools.convert_checkpoint models/control_sd15_canny.pth models/control_sd15_canny_bf16.safetensors
    python -m tools.convert_checkpoint models/control_sd15_canny.pth control_sd15_canny.pth --to controlnet
    python -m tools.convert_checkpoint models/control_sd15_canny.pth sd-controlnet-canny --to diffusers

``--to whole`` (default) keeps every key; the noise schedule written is the config's, in float32, whatever the
input holds. A bfloat16 copy (2.9 GB for SD1.5 + ControlNet) is what ``--low-memory`` maps straight into the
model, so loading touches half the bytes of the float32 file. ``--to controlnet`` writes only the
``control_model.*`` tensors, flat, as the ControlNet 1.1 release files (``control_v11p_sd15_canny.pth``) hold
them. ``--to diffusers`` writes a folder that diffusers reads with ``ControlNetModel.from_pretrained(folder)``
(``variant="fp16"`` for ``--dtype fp16``). Each output is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cldm.checkpoint import (
    CHECKPOINT_SUFFIXES,
    CONTROL_PREFIX,
    DIFFERENCE_KEY,
    CheckpointError,
    cast_weights,
    check_checkpoint_name,
    check_folder_config,
    check_state_dict,
    check_writable_dir,
    load_state_dict,
    save_checkpoint,
    save_diffusers_controlnet,
)
from cldm.model import build_model, check_with_hint, model_config
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "models" / "cldm_v15.yaml"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGETS = {
    "whole": "every key of the input, reference layout (default; default dtype bf16)",
    "controlnet": "control_model.* only, the ControlNet 1.1 layout (.pth/.ckpt/.safetensors; default dtype fp32)",
    "diffusers": "a diffusers ControlNet folder: config.json + diffusion_pytorch_model.safetensors "
    "(default dtype fp32)",
}
DEFAULT_DTYPE = {"whole": "bf16", "controlnet": "fp32", "diffusers": "fp32"}
DEFAULT_HINT = " [the default config, as no --config was given: pass --config for another model]"


def _meta_model(config: str | Path) -> torch.nn.Module:
    """The model of yaml ``config`` built on the meta device (no weights allocated)."""
    with torch.device("meta"):
        return build_model(model_config(config), config)


def config_schedule(config: str | Path) -> dict[str, torch.Tensor]:
    """The schedule buffers (``SCHEDULE_BUFFERS``, float32 [T]) of the model of yaml ``config``, as the model
    computes them (float64, then float32); the model's weights are never allocated. Raises ``CheckpointError``
    for an unreadable config."""
    return {name: buffer for name, buffer in _meta_model(config).named_buffers() if name in SCHEDULE_BUFFERS}


def control_part(state_dict: dict[str, torch.Tensor], src: str | Path, config: str | Path) -> dict[str, torch.Tensor]:
    """The ``control_model.*`` tensors of ``state_dict`` after checking their keys and shapes against the
    ControlNet of yaml ``config`` (built on the meta device). Raises ``CheckpointError`` naming ``src`` when it
    holds no ControlNet or one of another shape (incomplete included)."""
    control = {k: v for k, v in state_dict.items() if k.startswith(CONTROL_PREFIX)}
    if not control:
        raise CheckpointError(f"{src}: holds no control_model.* tensors (not a ControlNet checkpoint)")
    model = _meta_model(config)
    if not hasattr(model, "control_model"):
        raise CheckpointError(f"{config}: the config's model has no ControlNet (control_stage_config)")
    check_state_dict(model.control_model, {k[len(CONTROL_PREFIX) :]: v for k, v in control.items()},
                     f"{src} (ControlNet of {config})")  # fmt: skip
    return control


def convert_checkpoint(
    src: str | Path, dst: str | Path, dtype: torch.dtype, config: str | Path = DEFAULT_CONFIG, to: str = "whole"
) -> dict[str, torch.Tensor]:
    """Write the weights of checkpoint ``src`` (a file or a diffusers folder) to ``dst`` with every floating
    tensor in ``dtype``. ``to`` (a key of :data:`TARGETS`): ``"whole"`` writes every key of the model of
    ``config`` (which ``src`` must hold exactly, as ``check_state_dict`` checks), the diffusion schedule
    buffers being those of ``config`` in float32 (the file's may be rounded to half precision), ``.safetensors``
    for that suffix, else a torch pickle (replaced if it exists); ``"controlnet"`` writes the ``control_model.*``
    tensors alone as a flat dict; ``"diffusers"`` writes them as the diffusers ControlNet folder ``dst`` (which
    must not exist) with a ``config.json`` built from ``config``. A diffusers folder's ``config.json`` files must
    agree with ``config`` (``check_folder_config``). Returns the state dict written (reference keys). Raises
    ``CheckpointError`` for an unreadable ``src`` or ``config``, a schedule whose length differs from the
    config's, or a ``src`` that lacks part of what ``to`` writes or does not match the config (naming another
    yaml beside ``config`` that it matches); ``OSError`` when ``dst`` cannot be written; ``ValueError`` for an
    unknown ``to``."""
    if to not in TARGETS:
        raise ValueError(f"unknown target '{to}' (choose from {', '.join(TARGETS)})")
    check_writable_dir(Path(dst).parent)  # before the (large) input is read
    check_folder_config(src, model_config(config), str(config))
    state_dict = load_state_dict(src)
    if DIFFERENCE_KEY in state_dict:  # its control_model.* are (ControlNet - SD1.5 UNet): only a base completes it
        raise CheckpointError(f"{src}: a \"difference\" ControlNet (its weights minus the SD1.5 UNet's); converting "
                              "it would drop that mark: load it with its base instead (cpu_canny2image.py --base)")
    if to != "whole":
        state_dict = cast_weights(control_part(state_dict, src, config), dtype)
        if to == "diffusers":
            params = model_config(config).params.control_stage_config.params
            save_diffusers_controlnet(state_dict, dst, params, variant="" if dtype == torch.float32 else _name(dtype))
        else:
            save_checkpoint(state_dict, dst, flat=True)
        return state_dict
    state_dict = cast_weights(state_dict, dtype)
    for name, value in config_schedule(config).items():
        if name in state_dict:
            if state_dict[name].shape != value.shape:
                raise CheckpointError(f"{src}: {name} has shape {tuple(state_dict[name].shape)}, the config "
                                      f"{config} gives {tuple(value.shape)} (wrong --config?)")  # fmt: skip
            state_dict[name] = value
    check_with_hint(_meta_model(config), state_dict, f"{src} (model of {config})", Path(config))
    save_checkpoint(state_dict, dst)
    return state_dict


def _name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def check_output(output: Path, to: str) -> None:
    """``ValueError``/``CheckpointError`` (one line naming ``output``) when it exists or its name does not fit
    ``to``."""
    if output.exists():
        raise ValueError(f"{output}: output already exists")
    if to != "diffusers":
        check_checkpoint_name(output, "; for a diffusers folder pass --to diffusers")
    elif output.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise ValueError(f"{output}: --to diffusers writes a folder; give a folder name without {output.suffix}")


def main(argv: list[str] | None = None) -> int:
    targets = "targets (--to):\n" + "\n".join(f"  {name:<11} {what}" for name, what in TARGETS.items())
    parser = argparse.ArgumentParser(description=" ".join(__doc__.splitlines()[:2]), epilog=targets,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("input", help="checkpoint to read: .ckpt/.pth/.bin/.safetensors, or a diffusers folder "
                        "(ControlNet, pipeline, or hub cache models--ORG--NAME)")  # fmt: skip
    parser.add_argument("output", help="file to write (.safetensors, .pth or .ckpt), or the folder for --to diffusers")
    parser.add_argument("--to", choices=list(TARGETS), default="whole", help="what to write (default whole; see below)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="precision to store (default bf16 for --to whole, fp32 otherwise)")  # fmt: skip
    parser.add_argument("--config", default=None,
                        help="model config: its noise schedule (--to whole), the ControlNet the input must match "
                        "and the diffusers config.json (default: the repo's models/cldm_v15.yaml)")  # fmt: skip
    args = parser.parse_args(argv)
    dtype = args.dtype or DEFAULT_DTYPE[args.to]
    try:
        check_output(Path(args.output), args.to)
        state_dict = convert_checkpoint(args.input, args.output, DTYPES[dtype], args.config or DEFAULT_CONFIG, args.to)
    except (CheckpointError, ValueError, OSError) as err:
        hint = DEFAULT_HINT if args.config is None and str(DEFAULT_CONFIG) in str(err) else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        return 1
    size = sum(v.numel() * v.element_size() for v in state_dict.values())
    print(f"wrote {args.output}: {len(state_dict)} tensors, {size / 1e9:.2f} GB of {dtype} weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
