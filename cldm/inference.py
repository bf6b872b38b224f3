"""Inference paths: the project's fast default and the reference's schedule of work, as public switches of one code.

``fast`` (what every entry point gets: the layers' and samplers' defaults): SDPA attention (the CPU flash kernel),
3x3 convolutions by Winograd's F(4x4, 3x3) or F(2x2, 3x3) (fewer multiplies, same result up to float rounding;
``ldm/modules/winograd.py``), the ControlNet hint encoded once per run, the conditional and unconditional passes in
one batch, and the VAE decoder's activations in channels-last layout.
``channels_last`` for the whole model is a further switch (off: converting memory-mapped weights costs RAM).
``reference``: plain softmax attention, direct convolutions, the hint re-encoded at every step, separate
conditional and unconditional passes (what ``cldm/ddim_hacked.py`` does), the whole model kept in RAM.
Both give the same images up to float rounding. ``page_out`` (fast): the pipeline drops each stage's
memory-mapped weights from RAM once the stage is done (``ldm.memory.release_mapped_weights``).
``compiled`` (opt-in, ``--compile``): the fast path with the UNet and ControlNet under ``torch.compile``
(inductor; needs a C++ compiler; the first sampling run compiles for minutes). Compiling is one-way: a compiled
model cannot be switched back to an eager path (load it again).
Figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ldm.modules.attention import set_attention_backend
from ldm.modules.winograd import set_conv_algorithm


@dataclass(frozen=True)
class InferencePath:
    attention: str = "sdpa"
    conv: str = "winograd"  # 3x3 convolutions: "winograd" (F(4x4) / F(2x2), ldm/modules/winograd.py) or "direct"
    reuse_hint: bool = True
    batch_cfg: bool = True
    channels_last: bool = False
    vae_channels_last: bool = True
    page_out: bool = True  # callers drop each stage's memory-mapped weights once used (release_mapped_weights)
    compile: str | Callable | None = None  # torch.compile backend for the UNet and the ControlNet (None: eager)


FAST = InferencePath()
PATHS = {
    "fast": FAST,
    "compiled": replace(FAST, compile="inductor"),
    "reference": InferencePath(attention="math", conv="direct", reuse_hint=False, batch_cfg=False,
                               vae_channels_last=False, page_out=False),  # fmt: skip
}


def get_path(path: InferencePath | str) -> InferencePath:
    """The named path of :data:`PATHS` (``ValueError`` if unknown), or ``path`` itself."""
    if isinstance(path, InferencePath):
        return path
    if path not in PATHS:
        raise ValueError(f"unknown inference path '{path}' (choose from {', '.join(PATHS)})")
    return PATHS[path]


def use_path(model: torch.nn.Module, path: InferencePath | str) -> InferencePath:
    """Switch ``model`` to ``path`` (attention kernel, convolution algorithm, memory formats, compilation) and record
    it as ``model.inference_path``, which ``DDIMSampler`` and the pipeline follow (hint reuse, batched guidance).
    Returns the path. Raises ``ValueError`` for an unknown path name, or to leave a compiled path."""
    path = get_path(path)
    current = getattr(model, "inference_path", None)
    if current is not None and current.compile and path.compile != current.compile:
        raise ValueError("a compiled model cannot be switched to another path: load it again")
    set_attention_backend(model, path.attention)
    set_conv_algorithm(model, path.conv)
    model.to(memory_format=torch.channels_last if path.channels_last else torch.contiguous_format)
    model.decode_channels_last = path.vae_channels_last
    if path.compile and not (current is not None and current.compile):
        for module in (model.model.diffusion_model, getattr(model, "control_model", None)):
            if module is not None:
                module.compile(backend=path.compile)  # in place: state-dict keys unchanged
    model.inference_path = path
    return path


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The scripts' shared flags ``--low-memory`` and ``--compile`` (read back with :func:`path_from_args`)."""
    parser.add_argument("--low-memory", action="store_true",
                        help="hold the weights in bfloat16 (half the RAM), compute in float32; slower steps")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet and ControlNet (inductor; the first image compiles for minutes)")


def path_from_args(args: argparse.Namespace) -> str:
    """The inference path the scripts' ``--compile`` flag asks for."""
    return "compiled" if args.compile else "fast"
