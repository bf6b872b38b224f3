"""Rewrite a checkpoint with its weights in another precision (keys unchanged; the schedule stays float32).

    python -m tools.convert_checkpoint models/control_sd15_canny.pth models/control_sd15_canny_bf16.safetensors

A bfloat16 copy (2.9 GB for SD1.5 + ControlNet) is what ``--low-memory`` maps straight into the
model, so loading touches half the bytes of the float32 file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cldm.checkpoint import CheckpointError, cast_weights, load_state_dict, save_checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Write the weights of checkpoint ``src`` to ``dst`` (replaced if it exists) with every floating tensor in
    ``dtype`` except the diffusion schedule buffers (float32); keys unchanged. ``.safetensors`` for that suffix,
    else a torch pickle. Returns the state dict written. Raises ``CheckpointError`` for an unreadable ``src`` and
    ``OSError`` when ``dst`` cannot be written."""
    state_dict = cast_weights(load_state_dict(src), dtype)
    save_checkpoint(state_dict, dst)
    return state_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="checkpoint to read (.ckpt/.pth/.safetensors)")
    parser.add_argument("output", help="checkpoint to write (.safetensors or .ckpt/.pth)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="precision to store (default bf16)")
    args = parser.parse_args(argv)
    try:
        if Path(args.output).exists():
            raise ValueError(f"{args.output}: output file already exists")
        state_dict = convert_checkpoint(args.input, args.output, DTYPES[args.dtype])
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size = sum(v.numel() * v.element_size() for v in state_dict.values())
    print(f"wrote {args.output}: {len(state_dict)} tensors, {size / 1e9:.2f} GB of {args.dtype} weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
