"""Kept for scripts written against the reference: ``from cldm.ddim_hacked import DDIMSampler``."""

from ldm.models.diffusion.ddim import DDIMSampler

__all__ = ["DDIMSampler"]
