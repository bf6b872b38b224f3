"""Inference paths: the project's fast default and the reference's schedule of work, as switches of one code.

``fast``: SDPA attention (the CPU flash kernel), the ControlNet hint encoded once per run, the
conditional and unconditional passes batched with the work before the first cross-attention done once
for both, and the VAE decoder's activations in channels-last layout
(NCHW makes oneDNN copy full-resolution activations; the weights stay as mapped).
``channels_last`` for the whole model is a further switch (no faster for the UNet on the 2-core AVX2
machine, and converting memory-mapped weights costs RAM).
``reference``: plain softmax attention, the hint re-encoded at every step, separate
conditional and unconditional passes (what ``cldm/ddim_hacked.py`` does). Both give the same
images up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.attention import set_attention_backend


@dataclass(frozen=True)
class InferencePath:
    attention: str = "sdpa"
    reuse_hint: bool = True
    batch_cfg: bool = True
    share_prefix: bool = True
    channels_last: bool = False
    vae_channels_last: bool = False


PATHS = {
    "fast": InferencePath(vae_channels_last=True),
    "reference": InferencePath(attention="math", reuse_hint=False, batch_cfg=False, share_prefix=False),
}


def use_path(model: torch.nn.Module, path: InferencePath | str) -> DDIMSampler:
    """Switch ``model`` to ``path`` (attention kernel, memory format); returns a sampler that follows it."""
    if isinstance(path, str):
        if path not in PATHS:
            raise ValueError(f"unknown inference path '{path}' (choose from {', '.join(PATHS)})")
        path = PATHS[path]
    set_attention_backend(model, path.attention)
    model.to(memory_format=torch.channels_last if path.channels_last else torch.contiguous_format)
    model.decode_channels_last = path.vae_channels_last
    return DDIMSampler(model, reuse_hint=path.reuse_hint, batch_cfg=path.batch_cfg, share_prefix=path.share_prefix)
