"""Inference paths: the project's fast default and the reference's schedule of work, as switches of one code.

``fast``: SDPA attention (the CPU flash kernel), 3×3 convolutions by Winograd's F(4×4, 3×3) or F(2×2, 3×3)
(4x or 2.25x fewer multiplies, by the layer's pixel count; same result up to float rounding), the ControlNet
hint encoded once per run, the conditional and unconditional passes batched with the work before the first
cross-attention done once for both, and the VAE decoder's activations in channels-last layout (NCHW makes
oneDNN copy full-resolution activations; the weights stay as mapped).
``channels_last`` for the whole model is a further switch (no faster for the UNet on the 2-core AVX2
machine, and converting memory-mapped weights costs RAM).
``reference``: plain softmax attention, direct convolutions, the hint re-encoded at every step, separate
conditional and unconditional passes (what ``cldm/ddim_hacked.py`` does), the whole model kept in RAM.
Both give the same images up to float rounding. ``page_out`` (fast): the pipeline drops each stage's
memory-mapped weights from RAM once the stage is done (text encoder, then UNet + ControlNet before the VAE
decode), so the peak holds one stage's weights, not all of them.
``compiled`` (opt-in, ``--compile``): the fast path with the UNet and ControlNet under ``torch.compile``
(inductor; needs a C++ compiler). The first sampling run compiles for minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.attention import set_attention_backend
from ldm.modules.winograd import set_conv_algorithm


@dataclass(frozen=True)
class InferencePath:
    attention: str = "sdpa"
    conv: str = "winograd"  # 3x3 convolutions: "winograd" (F(4x4) / F(2x2), ldm/modules/winograd.py) or "direct"
    reuse_hint: bool = True
    batch_cfg: bool = True
    share_prefix: bool = True
    channels_last: bool = False
    vae_channels_last: bool = False
    page_out: bool = True  # callers drop each stage's memory-mapped weights once used (release_mapped_weights)
    compile: str | None = None  # torch.compile backend for the UNet and the ControlNet (None: eager)


FAST = InferencePath(vae_channels_last=True)
PATHS = {
    "fast": FAST,
    "compiled": replace(FAST, compile="inductor"),
    "reference": InferencePath(attention="math", conv="direct", reuse_hint=False, batch_cfg=False, share_prefix=False,
                               page_out=False),  # fmt: skip
}


def get_path(path: InferencePath | str) -> InferencePath:
    """The named path of :data:`PATHS` (``ValueError`` if unknown), or ``path`` itself."""
    if isinstance(path, InferencePath):
        return path
    if path not in PATHS:
        raise ValueError(f"unknown inference path '{path}' (choose from {', '.join(PATHS)})")
    return PATHS[path]


def use_path(model: torch.nn.Module, path: InferencePath | str) -> DDIMSampler:
    """Switch ``model`` to ``path`` (attention kernel, convolution algorithm, memory format); returns a sampler
    that follows it."""
    path = get_path(path)
    set_attention_backend(model, path.attention)
    set_conv_algorithm(model, path.conv)
    model.to(memory_format=torch.channels_last if path.channels_last else torch.contiguous_format)
    model.decode_channels_last = path.vae_channels_last
    for module in (model.model.diffusion_model, getattr(model, "control_model", None)):
        if module is None:
            continue
        if path.compile:
            module.compile(backend=path.compile)  # in place: state-dict keys unchanged
        else:
            module._compiled_call_impl = None  # what nn.Module.compile set: back to eager
    return DDIMSampler(model, reuse_hint=path.reuse_hint, batch_cfg=path.batch_cfg, share_prefix=path.share_prefix)


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The scripts' shared flags ``--low-memory`` and ``--compile`` (read back with :func:`path_from_args`)."""
    parser.add_argument("--low-memory", action="store_true",
                        help="hold the weights in bfloat16 (half the RAM), compute in float32; slower steps")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet and ControlNet (inductor; the first image compiles for minutes)")


def path_from_args(args: argparse.Namespace) -> str:
    """The inference path the scripts' ``--compile`` flag asks for."""
    return "compiled" if args.compile else "fast"
