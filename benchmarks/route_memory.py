"""Peak RSS of loading a full-size ControlNet-only file with a Stable Diffusion base (the ControlNet 1.1 route),
against the two files' bytes.

    python -m benchmarks.route_memory                      # writes /tmp/routes/*.safetensors, measures, deletes
    python -m benchmarks.route_memory --folder DIR --keep  # keep the files (5.7 GB) for another run
    python -m benchmarks.route_memory --half                # float16 files (cast to float32 while loading)
    python -m benchmarks.route_memory --pickle              # control.pth + base.ckpt (torch's zip pickles)

The files are seeded random weights in the exact layouts (models/cldm_v15.yaml): ``control.safetensors`` holds
``control_model.*`` only (as ``control_v11p_sd15_canny``), ``base.safetensors`` the UNet, VAE and text encoder
(as ``v1-5-pruned-emaonly``); with ``--pickle``, ``control.pth`` and ``base.ckpt``. The load
(``cldm.model.load_model`` with ``base_ckpt``, which reads every tensor once for the finite check) runs in a
fresh process; its peak RSS (VmHWM) is printed with the files' bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "models" / "cldm_v15.yaml"
FILES = {False: ("control.safetensors", "base.safetensors"), True: ("control.pth", "base.ckpt")}


def write_pair(paths: list[Path], half: bool) -> None:
    """Seeded random full-size weights as a ControlNet-only file and a base file (``paths``)."""
    import torch

    from cldm.checkpoint import CONTROL_PREFIX, cast_weights, save_checkpoint
    from cldm.model import create_model

    torch.manual_seed(0)
    weights = cast_weights(create_model(CONFIG).state_dict(), torch.float16 if half else torch.float32)
    save_checkpoint({k: v for k, v in weights.items() if k.startswith(CONTROL_PREFIX)}, paths[0])
    save_checkpoint({k: v for k, v in weights.items() if not k.startswith(CONTROL_PREFIX)}, paths[1])


def measure(control: Path, base: Path) -> dict[str, float]:
    """In this process: RSS after the imports, then peak RSS once the model is loaded (GB)."""
    from benchmarks.bench_canny2image import peak_rss_gb
    from cldm.model import load_model

    before = peak_rss_gb()
    model = load_model(CONFIG, control, base_ckpt=base, notify=lambda message: None)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"rss_before_load_gb": before, "peak_rss_gb": peak_rss_gb(), "param_gb": params / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/routes"), help="where the files are written")
    parser.add_argument("--keep", action="store_true", help="keep the files (default: deleted after the run)")
    parser.add_argument("--half", action="store_true", help="write float16 files")
    parser.add_argument("--pickle", action="store_true", help="write control.pth + base.ckpt, not safetensors")
    parser.add_argument("--measure", nargs=2, type=Path, metavar=("CONTROL", "BASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the child process
        print(json.dumps(measure(*args.measure)))
        return 0
    paths = [args.folder / name for name in FILES[args.pickle]]
    try:
        if not all(p.is_file() for p in paths):
            write_pair(paths, args.half)
        child = subprocess.run([sys.executable, "-m", "benchmarks.route_memory", "--measure", *map(str, paths)],
                               cwd=REPO, capture_output=True, text=True, check=True)  # fmt: skip
        result = json.loads(child.stdout.splitlines()[-1])
        result["files_gb"] = sum(p.stat().st_size for p in paths) / 1e9
    finally:
        if not args.keep:
            for path in paths:
                path.unlink(missing_ok=True)
    result["peak_over_files"] = result["peak_rss_gb"] / result["files_gb"]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
