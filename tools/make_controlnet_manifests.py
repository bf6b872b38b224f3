"""Write the key/shape manifests of the two full-size SD1.5 ControlNet files people download, from sources that
are not this project's code:

    python -m tools.make_controlnet_manifests [--out tests/data/manifests]

``control_v11p_sd15_canny.json`` -- the ControlNet 1.1 ControlNet-only file (``control_v11p_sd15_canny.pth``,
lllyasviel/ControlNet-v1-1): its keys are the ``control_model.*`` part of the reference model of
``cldm_v15.yaml`` (the 1.1 release's ``control_v11p_sd15_canny.yaml`` builds the same model and its loader puts
the file into it), stored in float32. Keys, shapes and order are read from ``tests/data/reference_sd15_keys.json``,
the state-dict dump of the reference code itself (lllyasviel/ControlNet ed85cd1, see that file's ``source``).

``diffusers_controlnet_sd15.json`` -- a diffusers ControlNet folder's ``diffusion_pytorch_model.safetensors``
(lllyasviel/sd-controlnet-canny, lllyasviel/control_v11p_sd15_canny): ``diffusers.ControlNetModel`` built on the
meta device with the public ``config.json`` of those repositories (:data:`DIFFUSERS_CONFIG`: SD1.5 encoder
widths 320/640/1280/1280, 2 res blocks per level, 8 heads, 768-wide text context, hint embedding 16/32/96/256),
float32.

Public facts the two manifests are checked against before anything is written (``ValueError`` otherwise):
both hold :data:`TENSORS` tensors and :data:`VALUES` values (x 4 bytes = 1.45 GB, the published size of both
files); diffusers' own single-file conversion (``convert_controlnet_checkpoint``, which diffusers uses to load
1.1 files) maps the first manifest onto exactly the second's keys and shapes. Needs diffusers (a test
dependency); no weights are made or downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE_KEYS = REPO / "tests" / "data" / "reference_sd15_keys.json"
OUT = REPO / "tests" / "data" / "manifests"
LDM_NAME, DIFFUSERS_NAME = "control_v11p_sd15_canny.json", "diffusers_controlnet_sd15.json"
TENSORS = 340
VALUES = 361_279_120  # 1,445,116,480 bytes in float32: the "1.45 GB" of both published files
# config.json of lllyasviel/sd-controlnet-canny (the fields that shape the weights; the rest are diffusers' defaults)
DIFFUSERS_CONFIG: dict[str, Any] = {
    "in_channels": 4,
    "conditioning_channels": 3,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "norm_num_groups": 32,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
}
Manifest = dict[str, list]  # key -> [shape, dtype name]


def ldm_manifest() -> Manifest:
    """The ``control_model.*`` entries of the reference code's state-dict dump, in its order, as float32."""
    keys = json.loads(REFERENCE_KEYS.read_text())["keys"]
    return {k: [shape, "float32"] for k, (shape, _) in keys.items() if k.startswith("control_model.")}


def diffusers_manifest() -> Manifest:
    """The state dict of ``diffusers.ControlNetModel(**DIFFUSERS_CONFIG)`` built on the meta device."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        model = ControlNetModel(**DIFFUSERS_CONFIG)
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}


def meta_tensors(manifest: Manifest) -> dict[str, torch.Tensor]:
    """Meta-device tensors of the manifest's shapes and dtypes (for conversions that only rename)."""
    return {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, (shape, dtype) in manifest.items()}


def shapes(manifest: Manifest) -> dict[str, tuple[int, ...]]:
    return {k: tuple(shape) for k, (shape, _) in manifest.items()}


def check(ldm: Manifest, diffusers: Manifest) -> None:
    """``ValueError`` unless both manifests hold the published counts and diffusers' conversion maps one onto
    the other."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    for name, manifest in ((LDM_NAME, ldm), (DIFFUSERS_NAME, diffusers)):
        values = sum(math.prod(shape) for shape, _ in manifest.values())
        if (len(manifest), values) != (TENSORS, VALUES):
            raise ValueError(f"{name}: {len(manifest)} tensors, {values} values; expected {TENSORS}, {VALUES}")
    config = {"layers_per_block": DIFFUSERS_CONFIG["layers_per_block"]}
    converted = convert_controlnet_checkpoint(meta_tensors(ldm), config)
    if {k: tuple(v.shape) for k, v in converted.items()} != shapes(diffusers):
        raise ValueError(f"diffusers' conversion of {LDM_NAME} does not give {DIFFUSERS_NAME}")


def write(manifest: Manifest, path: Path, source: str) -> None:
    values = sum(math.prod(shape) for shape, _ in manifest.values())
    head = {"source": source, "tensors": len(manifest), "values": values}
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
    keys = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items())
    path.write_text("{\n" + ",\n".join(lines) + ',\n "keys": {\n' + keys + "\n }\n}\n")  # a key per line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the full-size ControlNet key/shape manifests.")
    parser.add_argument("--out", default=str(OUT), help="folder to write them to (default: %(default)s)")
    args = parser.parse_args(argv)
    ldm, diffusers = ldm_manifest(), diffusers_manifest()
    try:
        check(ldm, diffusers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(ldm, out / LDM_NAME, "control_v11p_sd15_canny.pth (ControlNet 1.1, ControlNet only, float32): the "
          "control_model.* keys of tests/data/reference_sd15_keys.json (the reference code's state dict for "
          "cldm_v15.yaml); written by tools/make_controlnet_manifests.py")  # fmt: skip
    write(diffusers, out / DIFFUSERS_NAME, "diffusion_pytorch_model.safetensors of a diffusers SD1.5 ControlNet "
          "(lllyasviel/sd-controlnet-canny config.json): diffusers.ControlNetModel on the meta device; written by "
          "tools/make_controlnet_manifests.py")  # fmt: skip
    print(f"wrote {out / LDM_NAME} and {out / DIFFUSERS_NAME} ({TENSORS} tensors each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
