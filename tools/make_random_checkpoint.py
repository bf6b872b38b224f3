"""Write a random-weight checkpoint in the exact reference key layout of a model config.

    python -m tools.make_random_checkpoint --config models/cldm_tiny.yaml --out models/control_tiny_random.ckpt \
        --fill-zeros 0.02 --half
    python -m tools.make_random_checkpoint --config models/cldm_v15.yaml --out /tmp/control_sd15_random.pth

Full-size checkpoints (5.7 GB) serve key/shape checks and benchmarks; the tiny one runs the whole
pipeline in seconds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from cldm.checkpoint import CheckpointError, cast_weights, save_checkpoint
from cldm.model import create_model

REPO = Path(__file__).resolve().parents[1]


def fill_zero_parameters(model: nn.Module, std: float, generator: torch.Generator) -> int:
    """Give every all-zero floating parameter N(0, std) values (in place, in the parameter's dtype); returns how
    many tensors changed.

    Zero-initialised layers (zero convs, ``proj_out``, the UNet's output conv) make a random model
    ignore its control and predict zero noise; filling them gives checkpoints that exercise every path.
    """
    changed = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
                changed += 1
    return changed


def make_random_checkpoint(
    config_path: str | os.PathLike,
    out_path: str | os.PathLike,
    seed: int = 0,
    fill_zeros_std: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[int, ...]]:
    """Write a seeded random-weight checkpoint in the exact reference layout of ``config_path``.

    With ``fill_zeros_std > 0`` the zero-initialised layers get small random values too. Floating
    tensors are stored as ``dtype`` (``torch.float16`` halves the file; loading casts back), the diffusion
    schedule as float32. Returns the written keys and shapes. Raises ``CheckpointError`` for a bad config,
    ``OSError`` when the file cannot be written.
    """
    torch.manual_seed(seed)
    model = create_model(config_path)
    if fill_zeros_std > 0:
        fill_zero_parameters(model, fill_zeros_std, torch.Generator().manual_seed(seed + 1))
    state_dict = cast_weights(model.state_dict(), dtype)
    save_checkpoint(state_dict, out_path)
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "models" / "cldm_tiny.yaml"),
                        help="model yaml config (default: the repo's models/cldm_tiny.yaml)")
    parser.add_argument("--out", required=True, help="output .ckpt/.pth/.safetensors path")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--fill-zeros", type=float, default=0.0, metavar="STD",
        help="give zero-initialised layers (zero convs, output convs) N(0, STD) weights",
    )  # fmt: skip
    parser.add_argument("--half", action="store_true", help="store floating tensors as float16 (half the size)")
    args = parser.parse_args(argv)
    try:
        keys = make_random_checkpoint(args.config, args.out, seed=args.seed, fill_zeros_std=args.fill_zeros,
                                    dtype=torch.float16 if args.half else torch.float32)
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    values = sum(math.prod(s) for s in keys.values())
    print(f"wrote {args.out}: {len(keys)} tensors, {values / 1e6:.1f} M values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
