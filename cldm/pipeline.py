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
from cldm.checkpoint import CheckpointError
from cldm.cldm import control_scales_for
from cldm.inference import InferencePath, get_path, use_path
from cldm.model import load_model
from ldm.memory import release_mapped_weights
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.util import seed_everything

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "models" / "cldm_v15.yaml"
DEFAULT_CKPT = REPO / "models" / "control_sd15_canny.pth"
TINY_CONFIG = REPO / "models" / "cldm_tiny.yaml"
DEMO_CKPT = REPO / "models" / "control_tiny_circles.ckpt"
DEMO_IMAGE = REPO / "test_imgs" / "disc.png"
DEMO_PROMPT = "red circle with blue background"
DEMO_COLORS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "black")
# The tiny demo samples with the hint in the conditional pass only, at guidance 5: its control then follows the
# outline (held-out IoU 0.894 vs 0.800 with the reference demo's hint in both passes at 9; README, tiny demo).
DEMO_SCALE = 5.0
DEMO_UNCOND_HINT = False
DEMO_RECIPE = "python tools/make_tiny_demo.py"
CKPT_URL = "https://huggingface.co/lllyasviel/ControlNet/blob/main/models/control_sd15_canny.pth"
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
                raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")
        if self.low_threshold > self.high_threshold:
            raise ValueError(
                f"low_threshold ({self.low_threshold}) must not exceed high_threshold ({self.high_threshold})"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def demo_params(**overrides: object) -> CannyParams:
    """The tiny circle demo's settings: prompts as it was trained (no added or negative prompt), 64 px, guidance
    ``DEMO_SCALE`` with the hint in the conditional pass only (as measured by the recipe)."""
    settings: dict = {"prompt": DEMO_PROMPT, "a_prompt": "", "n_prompt": "", "image_resolution": 64,
                      "scale": DEMO_SCALE, "uncond_hint": DEMO_UNCOND_HINT}  # fmt: skip
    return CannyParams(**{**settings, **overrides})


def demo_checkpoint(path: Path = DEMO_CKPT) -> Path:
    """The shipped demo checkpoint; ``CheckpointError`` saying how to get it back when it is missing."""
    if not path.is_file():
        shown = repo_relative(path)
        raise CheckpointError(f"{shown}: demo checkpoint not found; restore it with 'git checkout -- {shown}' "
                              f"or retrain it with '{DEMO_RECIPE}'")  # fmt: skip
    return path


def repo_relative(path: str | Path) -> Path:
    """``path`` relative to the repository when inside it, for messages and machine-independent records."""
    path = Path(path).resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def describe_demo() -> str:
    """One sentence on what the demo model is and what it can draw."""
    return (
        f"The tiny demo ({repo_relative(DEMO_CKPT)}) is a 64 px model trained on this CPU from scratch "
        f"({DEMO_RECIPE}): it draws a circle in the colors the prompt names "
        f'("COLOR circle with COLOR background", colors: {", ".join(DEMO_COLORS)}) where the input\'s '
        "circle outline is (how closely: see the README)."
    )


def missing_checkpoint_message(ckpt: Path) -> str:
    """What is missing, where to get it, and what runs instead."""
    return (
        f"{repo_relative(ckpt)} not found: this needs the ControlNet canny checkpoint (5.7 GB). Download "
        f"control_sd15_canny.pth from {CKPT_URL} into models/. Until then the tiny demo runs instead; "
        f"ask for it explicitly with --demo. {describe_demo()}"
    )


@dataclass(frozen=True)
class ModelChoice:
    """Which config and checkpoint to load; ``notice`` says why the demo runs when it was not asked for."""

    config: Path
    ckpt: Path
    demo: bool
    notice: str | None = None


def choose_model(ckpt: str | Path | None = None, config: str | Path | None = None, demo: bool = False) -> ModelChoice:
    """The scripts' model choice: ``--demo``, an explicit ``--ckpt``, the real checkpoint, else the demo."""
    if demo:
        return ModelChoice(Path(config or TINY_CONFIG), demo_checkpoint(), True)
    if ckpt is not None:
        return ModelChoice(Path(config or DEFAULT_CONFIG), Path(ckpt), False)
    if DEFAULT_CKPT.is_file():
        return ModelChoice(Path(config or DEFAULT_CONFIG), DEFAULT_CKPT, False)
    return ModelChoice(Path(config or TINY_CONFIG), demo_checkpoint(), True, missing_checkpoint_message(DEFAULT_CKPT))


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
    """Loaded model + sampler; call with an image and :class:`CannyParams`.

    With the path's ``page_out`` (the fast path's default), each stage's memory-mapped weights (text encoder,
    UNet + ControlNet, VAE) leave RAM once the stage is done (:func:`release_mapped_weights`) and are read back
    from the page cache on the next call, so the process holds one stage's weights at a time.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, path: InferencePath | str = "fast"):
        self.model = model
        self.device = device
        self.path = get_path(path)
        self.sampler = use_path(model, self.path)
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
        """DDIM iterations a run of ``ddim_steps`` takes (the reference's schedule visits 31 for 30)."""
        return len(make_ddim_timesteps(ddim_steps, self.model.num_timesteps))

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
        control = torch.from_numpy(detected_map.copy()).float().to(self.device) / 255.0
        control = control.permute(2, 0, 1)[None].repeat(n, 1, 1, 1)
        seed = random.randint(0, 65535) if params.seed == -1 else params.seed
        seed_everything(seed)
        model = self.model
        cond = {"c_concat": [control], "c_crossattn": [model.get_learned_conditioning([params.full_prompt()] * n)]}
        un_cond = {
            "c_concat": [control] if params.uncond_hint and not params.guess_mode else None,
            "c_crossattn": [model.get_learned_conditioning([params.n_prompt] * n)],
        }
        self._done_with(model.cond_stage_model)
        model.control_scales = control_scales_for(params.strength, params.guess_mode)
        samples, _ = self.sampler.sample(
            params.ddim_steps, n, (4, height // 8, width // 8), cond, verbose=False, eta=params.eta,
            unconditional_guidance_scale=params.scale, unconditional_conditioning=un_cond,
            callback=callback, progress=progress,
        )  # fmt: skip
        self._done_with(model.model, model.control_model)
        x_samples = model.decode_first_stage(samples)
        self._done_with(model.first_stage_model)
        x_samples = (x_samples.permute(0, 2, 3, 1) * 127.5 + 127.5).cpu().numpy().clip(0, 255).astype(np.uint8)
        return [255 - detected_map] + [x_samples[i] for i in range(n)], seed
