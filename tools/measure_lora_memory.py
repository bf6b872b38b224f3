"""RSS growth of fusing a LoRA into a loaded model, against the bytes of the layers it touches (Linux).

    python -m tools.make_random_checkpoint --config models/cldm_v15.yaml --out /tmp/lora/full.ckpt
    python -m tools.measure_lora_memory --ckpt /tmp/lora/full.ckpt --out /tmp/lora/r64.safetensors [--convs]

Loads the checkpoint as the scripts do (memory-mapped; ``--low-memory``: bfloat16), writes a random kohya LoRA
(``--rank``, float16, alpha rank/2) for the layers kohya's trainer targets (every layer of the UNet's
transformer blocks, proj_in/out, the text encoder's attention and MLP; ``--convs``: every UNet conv too, LoCon),
drops the mapped pages, then fuses it and prints the resident set before and after and the peak in between.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from cldm.lora import apply_lora, fusable_layers, unet_diffusers_names
from cldm.model import load_model
from ldm.memory import release_mapped_weights

MIB = 2**20


def status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmRSS``, ``VmHWM``)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def write_random_lora(model: torch.nn.Module, out: Path, rank: int, convs: bool) -> None:
    """A random kohya-layout LoRA (float16, alpha rank/2) for the model's UNet and text encoder at ``out``."""
    import safetensors.torch

    g = torch.Generator().manual_seed(0)
    names = unet_diffusers_names(model.model.diffusion_model)
    modules = [(f"lora_unet_{names[p]}", layer) for p, layer in fusable_layers(model.model.diffusion_model)
               if ".transformer_blocks." in p or p.endswith(("proj_in", "proj_out"))
               or (convs and layer.weight.dim() == 4)]  # fmt: skip
    modules += [(f"lora_te_{p}", layer) for p, layer in fusable_layers(model.cond_stage_model.transformer)]
    tensors = {}
    for name, layer in modules:
        w, name = layer.weight, name.replace(".", "_")
        spatial = (1, 1) if w.dim() == 4 else ()
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, *w.shape[1:], generator=g) * 0.01).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(w.shape[0], rank, *spatial, generator=g) * 0.01).half()
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    safetensors.torch.save_file(tensors, str(out))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="models/cldm_v15.yaml")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True, help="where the random LoRA is written (reused if present)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--convs", action="store_true", help="LoCon: the UNet's convolutions too")
    p.add_argument("--low-memory", action="store_true")
    args = p.parse_args(argv)
    model = load_model(args.config, args.ckpt, low_memory=args.low_memory)
    out = Path(args.out)
    if not out.exists():
        write_random_lora(model, out, args.rank, args.convs)
    release_mapped_weights(model)  # the checkpoint's pages read by the load's finiteness check
    gc.collect()
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    report = apply_lora(model, out, 0.8)
    gc.collect()
    after, peak = status("VmRSS"), status("VmHWM")
    print(report.summary())
    print(f"touched layers {report.bytes / MIB:.1f} MiB (their new tensors); LoRA file {out.stat().st_size / MIB:.1f} "
          f"MiB; RSS {before / MIB:.0f} -> {after / MIB:.0f} MiB: growth {(after - before) / MIB:.1f} MiB, "
          f"peak {(peak - before) / MIB:.1f} MiB above the start")  # fmt: skip


if __name__ == "__main__":
    main()
