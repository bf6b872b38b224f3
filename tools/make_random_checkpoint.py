"""Write a random-weight checkpoint in the exact reference key layout of a model config.

    python tools/make_random_checkpoint.py --config models/cldm_tiny.yaml --out models/control_tiny_random.ckpt \
        --fill-zeros 0.02 --half
    python tools/make_random_checkpoint.py --config models/cldm_v15.yaml --out /tmp/control_sd15_random.pth

Full-size checkpoints (5.7 GB) serve key/shape checks and benchmarks; the tiny one runs the whole
pipeline in seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cldm.checkpoint import CheckpointError  # noqa: E402
from cldm.model import make_random_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="models/cldm_tiny.yaml", help="model yaml config")
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
