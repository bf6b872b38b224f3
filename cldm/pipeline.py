"""Canny-to-image generation: the pipeline shared by ``cpu_canny2image.py`` and the Gradio page.

Same steps and defaults as the reference ``gradio_canny2image.py``'s ``process``: resize, Canny,
CLIP text encoding, DDIM with classifier-free guidance over UNet + ControlNet, VAE decode.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from annotator.canny import CannyDetector
from annotator.util import HWC3, resize_image
from cldm.control import Control
from cldm.guidance import CFGDenoiser
from cldm.inference import InferencePath, use_path
from cldm.model import load_model
from ldm.memory import release_mapped_weights
from ldm.models.diffusion.sampling import SAMPLERS, sampling_steps
from ldm.util import seed_everything

MAX_SEED = 2**31 - 1


@dataclass
class CannyParams:
    """The reference demo's controls, with its defaults and ranges."""

    prompt: str = ""
    a_prompt: str = "best quality, extremely detailed"
    n_prompt: str = (
        "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
        "worst quality, low quality"
    )
    num_samples: int = 1
    image_resolution: int = 512
    ddim_steps: int = 20
    guess_mode: bool = False
    uncond_hint: bool = True  # the hint also in the unconditional pass (the reference); off in guess mode
    strength: float = 1.0
    scale: float = 9.0
    seed: int = -1
    eta: float = 0.0
    low_threshold: int = 100
    high_threshold: int = 200

    RANGES = {
        "num_samples": (1, 12),
        "image_resolution": (64, 2048),
        "ddim_steps": (1, 1000),
        "strength": (0.0, 2.0),
        "scale": (0.1, 30.0),
        "seed": (-1, MAX_SEED),
        "eta": (0.0, 1.0),
        "low_threshold": (1, 255),
        "high_threshold": (1, 255),
    }

    def full_prompt(self) -> str:
        """``"prompt, a_prompt"`` as the reference builds it; without an added prompt, just the prompt (the
        reference would leave a trailing ", ", which the tiny demo's text encoder never saw in training)."""
        return f"{self.prompt}, {self.a_prompt}" if self.a_prompt else self.prompt

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first out-of-range parameter."""
        for name, (lo, hi) in self.RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be between {lo} and {hi}, got {value}")
        if self.low_threshold > self.high_threshold:
            raise ValueError(
                f"low_threshold ({self.low_threshold}) must not exceed high_threshold ({self.high_threshold})"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def read_image(path: str | Path) -> np.ndarray:
    """HWC uint8 array (L, RGB or RGBA) of the image at ``path``; ``ValueError`` naming it if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: input image not found")
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "RGB", "RGBA"):
                img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
            return np.array(img)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot read image ({err.__class__.__name__})") from err


class Canny2Image:
    """Loaded model + inference path; call with an image and :class:`CannyParams`.

    With the path's ``page_out`` (the fast path's default), each stage's memory-mapped weights (text encoder,
    UNet + ControlNet, VAE) leave RAM once the stage is done (:func:`release_mapped_weights`) and are read back
    from the page cache on the next call, so the process holds one stage's weights at a time.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, path: InferencePath | str = "fast"):
        self.model = model
        self.device = device
        self.path = use_path(model, path)
        self.apply_canny = CannyDetector()

    @classmethod
    def from_checkpoint(
        cls, config: str | Path, ckpt: str | Path, device: torch.device, low_memory: bool = False,
        path: InferencePath | str = "fast",
    ) -> Canny2Image:  # fmt: skip
        """Load the model (``low_memory``: bfloat16 weights, float32 compute) and wrap it (``path``: see
        :mod:`cldm.inference`)."""
        return cls(load_model(config, ckpt, device=device, low_memory=low_memory), device, path)

    def _done_with(self, *modules: torch.nn.Module) -> None:
        if self.path.page_out:
            release_mapped_weights(*modules)

    def sampling_steps(self, ddim_steps: int) -> int:
        """Denoiser steps a run of ``ddim_steps`` takes (the reference's DDIM schedule visits 31 for 30)."""
        return sampling_steps("ddim", ddim_steps, self.model.num_timesteps)

    def edges(self, input_image: np.ndarray, params: CannyParams) -> np.ndarray:
        """Resized HWC uint8 Canny edge map (white edges on black), as fed to the ControlNet."""
        img = resize_image(HWC3(input_image), params.image_resolution)
        return HWC3(self.apply_canny(img, params.low_threshold, params.high_threshold))

    @torch.no_grad()
    def __call__(
        self,
        input_image: np.ndarray,
        params: CannyParams,
        callback: Callable[[int], None] | None = None,
        progress: bool = True,
    ) -> tuple[list[np.ndarray], int]:
        """Return ``([255 - edge map, sample_1, ...], seed)``: HWC uint8 images, as the reference demo."""
        params.validate()
        detected_map = self.edges(input_image, params)
        height, width = detected_map.shape[:2]
        n = params.num_samples
        hint = torch.from_numpy(detected_map.copy()).float().to(self.device) / 255.0
        hint = hint.permute(2, 0, 1)[None].repeat(n, 1, 1, 1)
        seed = random.randint(0, 65535) if params.seed == -1 else params.seed
        seed_everything(seed)
        model = self.model
        cond = model.get_learned_conditioning([params.full_prompt()] * n)
        uncond = model.get_learned_conditioning([params.n_prompt] * n)
        self._done_with(model.cond_stage_model)
        control = Control.from_strength(model.control_model, hint, params.strength, params.guess_mode,
                                        uncond_hint=params.uncond_hint, cache=self.path.reuse_hint)  # fmt: skip
        denoise = CFGDenoiser(model, cond, uncond, params.scale, [control], batch_cfg=self.path.batch_cfg)
        x_t = torch.randn((n, 4, height // 8, width // 8), device=self.device)
        samples = SAMPLERS["ddim"](denoise, x_t, model.alphas_cumprod, params.ddim_steps, eta=params.eta,
                                   callback=None if callback is None else lambda i, x, x0: callback(i),
                                   progress=progress)  # fmt: skip
        self._done_with(model.model, model.control_model)
        x_samples = model.decode_first_stage(samples)
        self._done_with(model.first_stage_model)
        x_samples = (x_samples.permute(0, 2, 3, 1) * 127.5 + 127.5).cpu().numpy().clip(0, 255).astype(np.uint8)
        return [255 - detected_map] + [x_samples[i] for i in range(n)], seed
