"""Rewrite a checkpoint with its weights in another precision (keys unchanged; the noise schedule written is the
config's, in float32, whatever the input holds).

    python -m tools.convert_checkpoint models/control_sd15_canny.pth models/control_sd15_canny_bf16.safetensors

A bfloat16 copy (2.9 GB for SD1.5 + ControlNet) is what ``--low-memory`` maps straight into the
model, so loading touches half the bytes of the float32 file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cldm.checkpoint import CheckpointError, cast_weights, check_writable_dir, load_state_dict, save_checkpoint
from cldm.model import build_model, model_config
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "models" / "cldm_v15.yaml"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def config_schedule(config: str | Path) -> dict[str, torch.Tensor]:
    """The schedule buffers (``SCHEDULE_BUFFERS``, float32 [T]) of the model of yaml ``config``, as the model
    computes them (float64, then float32); the model's weights are never allocated. Raises ``CheckpointError``
    for an unreadable config."""
    with torch.device("meta"):
        model = build_model(model_config(config), config)
    return {name: buffer for name, buffer in model.named_buffers() if name in SCHEDULE_BUFFERS}


def convert_checkpoint(
    src: str | Path, dst: str | Path, dtype: torch.dtype, config: str | Path = DEFAULT_CONFIG
) -> dict[str, torch.Tensor]:
    """Write the weights of checkpoint ``src`` to ``dst`` (replaced if it exists) with every floating tensor in
    ``dtype`` except the diffusion schedule buffers, which are those of ``config`` in float32 (the file's may be
    rounded to half precision); keys unchanged. ``.safetensors`` for that suffix, else a torch pickle. Returns the
    state dict written. Raises ``CheckpointError`` for an unreadable ``src`` or ``config`` or a schedule whose
    length differs from the config's, ``OSError`` when ``dst`` cannot be written."""
    check_writable_dir(Path(dst).parent)  # before the (large) input is read
    state_dict = cast_weights(load_state_dict(src), dtype)
    for name, value in config_schedule(config).items():
        if name in state_dict:
            if state_dict[name].shape != value.shape:
                raise CheckpointError(f"{src}: {name} has shape {tuple(state_dict[name].shape)}, the config "
                                      f"{config} gives {tuple(value.shape)} (wrong --config?)")  # fmt: skip
            state_dict[name] = value
    save_checkpoint(state_dict, dst)
    return state_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="checkpoint to read (.ckpt/.pth/.safetensors)")
    parser.add_argument("output", help="checkpoint to write (.safetensors or .ckpt/.pth)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="precision to store (default bf16)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="model config whose noise schedule is written (default: the repo's models/cldm_v15.yaml)")
    args = parser.parse_args(argv)
    try:
        if Path(args.output).exists():
            raise ValueError(f"{args.output}: output file already exists")
        state_dict = convert_checkpoint(args.input, args.output, DTYPES[args.dtype], args.config)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size = sum(v.numel() * v.element_size() for v in state_dict.values())
    print(f"wrote {args.output}: {len(state_dict)} tensors, {size / 1e9:.2f} GB of {args.dtype} weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
