"""What the scripts share (the reference's ``share.py`` role): model choice and the tiny demo's settings.

Policy lives here, not in the library: which config and checkpoint the scripts load by default, where the real
checkpoint comes from, and how the tiny circle demo (a 64 px ControlNet trained on this CPU, see
docs/tiny-demo.md) is run when that checkpoint is missing. ``cpu_canny2image.py``, ``gradio_canny2image.py`` and
the tools import it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cldm.checkpoint import CheckpointError
from cldm.pipeline import Canny2Image, CannyParams

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "models" / "cldm_v15.yaml"
DEFAULT_CKPT = REPO / "models" / "control_sd15_canny.pth"
TINY_CONFIG = REPO / "models" / "cldm_tiny.yaml"
DEMO_CKPT = REPO / "models" / "control_tiny_circles.ckpt"
DEMO_IMAGE = REPO / "test_imgs" / "disc.png"
DEMO_PROMPT = "red circle with blue background"
DEMO_COLORS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "black")
# The tiny demo samples with the hint in the conditional pass only: its control then follows the outline better than
# with the reference demo's hint in both passes at 9. Guidance 3 scored best for the shipped checkpoint on a tuning set
# of 100 circles apart from the held-out ones (DDIM 20 IoU: 2 0.885, 3 0.888, 4 0.884, 5 0.878; docs/tiny-demo.md).
DEMO_SCALE = 3.0
DEMO_UNCOND_HINT = False
DEMO_RECIPE = "python -m tools.make_tiny_demo"
CKPT_URL = "https://huggingface.co/lllyasviel/ControlNet/resolve/main/models/control_sd15_canny.pth"


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
        "circle outline is (how closely: docs/tiny-demo.md)."
    )


def missing_checkpoint_message(ckpt: Path) -> str:
    """What is missing, where to get it, and what runs instead."""
    return (
        f"{repo_relative(ckpt)} not found: this needs the ControlNet canny checkpoint (5.7 GB). Download "
        f"control_sd15_canny.pth from {CKPT_URL} into models/. Until then the tiny demo runs instead; "
        f"ask for it explicitly with --demo. {describe_demo()}"
    )


def add_base_arguments(parser: argparse.ArgumentParser) -> None:
    """The scripts' flags for a Stable Diffusion base model: ``--base`` and ``--base-ema``."""
    parser.add_argument("--base", default=None, metavar="SD15_MODEL",
                        help="Stable Diffusion 1.5 model (e.g. v1-5-pruned.ckpt) for a ControlNet-only --ckpt "
                             "(ControlNet 1.1, fp16 .safetensors, difference files); with a whole ControlNet 1.0 "
                             "file its UNet, VAE and text encoder replace the file's")  # fmt: skip
    parser.add_argument("--base-ema", action="store_true",
                        help="use the base's EMA UNet weights (model_ema.*, in v1-5-pruned.ckpt) instead of its "
                             "model.diffusion_model.* (the default, as ControlNet 1.1)")  # fmt: skip


@dataclass(frozen=True)
class ModelChoice:
    """Which config and checkpoint to load (``base``: a Stable Diffusion base for it, ``--base``); ``notice`` says
    why the demo runs when it was not asked for."""

    config: Path
    ckpt: Path
    demo: bool
    notice: str | None = None
    base: Path | None = None


def choose_model(
    ckpt: str | Path | None = None, config: str | Path | None = None, demo: bool = False, base: str | Path | None = None
) -> ModelChoice:
    """The scripts' model choice: ``--demo``, an explicit ``--ckpt`` (with ``--base``), the real checkpoint, else
    the demo.

    ``ValueError`` when ``--demo`` is given with ``--ckpt`` or ``--base`` (the demo has its own checkpoint),
    ``--base`` without ``--ckpt`` while the default checkpoint is missing, or an empty ``--ckpt``, ``--base`` or
    ``--config``."""
    for flag, value in (("--ckpt", ckpt), ("--base", base), ("--config", config)):
        if value is not None and not str(value).strip():
            raise ValueError(f"{flag} is empty: give a file or folder")
        if demo and value is not None and flag != "--config":
            raise ValueError(f"--demo and {flag} {value} cannot be combined: --demo runs "
                             f"{repo_relative(DEMO_CKPT)}; drop one of them")  # fmt: skip
    if demo:
        return ModelChoice(Path(config or TINY_CONFIG), demo_checkpoint(), True)
    base = Path(base) if base is not None else None
    if ckpt is not None:
        return ModelChoice(Path(config or DEFAULT_CONFIG), Path(ckpt), False, base=base)
    if DEFAULT_CKPT.is_file():
        return ModelChoice(Path(config or DEFAULT_CONFIG), DEFAULT_CKPT, False, base=base)
    if base is not None:
        raise ValueError(f"--base {base} is the Stable Diffusion model for a ControlNet: pass the ControlNet file "
                         "with --ckpt (e.g. models/control_v11p_sd15_canny.pth)")  # fmt: skip
    return ModelChoice(Path(config or TINY_CONFIG), demo_checkpoint(), True, missing_checkpoint_message(DEFAULT_CKPT))


def load_pipeline(choice: ModelChoice, args: argparse.Namespace, device: object) -> Canny2Image:
    """The scripts' pipeline: ``choice``'s config, checkpoint and base loaded on ``device`` with the model flags both
    scripts share (``--low-memory``, the inference path's, ``--vae-decoder``, ``--base-ema``, ``--lora``,
    ``--lora-controlnet``). Raises as :meth:`Canny2Image.from_checkpoint`."""
    from cldm.inference import path_from_args

    return Canny2Image.from_checkpoint(choice.config, choice.ckpt, device, low_memory=args.low_memory,
                                       path=path_from_args(args), vae_decoder=args.vae_decoder, base_ckpt=choice.base,
                                       base_ema=args.base_ema, loras=args.lora,
                                       lora_controlnet=args.lora_controlnet)  # fmt: skip
