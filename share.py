"""What the scripts share (the reference's ``share.py`` role): model choice and the tiny demo's settings.

Policy lives here, not in the library: which config and checkpoint the scripts load by default, where the real
checkpoint comes from, and how the tiny circle demo (a 64 px ControlNet trained on this CPU, see
docs/tiny-demo.md) is run when that checkpoint is missing. ``cpu_canny2image.py``, ``gradio_canny2image.py`` and
the tools import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cldm.checkpoint import CheckpointError
from cldm.pipeline import CannyParams

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "models" / "cldm_v15.yaml"
DEFAULT_CKPT = REPO / "models" / "control_sd15_canny.pth"
TINY_CONFIG = REPO / "models" / "cldm_tiny.yaml"
DEMO_CKPT = REPO / "models" / "control_tiny_circles.ckpt"
DEMO_IMAGE = REPO / "test_imgs" / "disc.png"
DEMO_PROMPT = "red circle with blue background"
DEMO_COLORS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "black")
# The tiny demo samples with the hint in the conditional pass only, at guidance 5: its control then follows the
# outline better than with the reference demo's hint in both passes at 9 (docs/tiny-demo.md).
DEMO_SCALE = 5.0
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


@dataclass(frozen=True)
class ModelChoice:
    """Which config and checkpoint to load; ``notice`` says why the demo runs when it was not asked for."""

    config: Path
    ckpt: Path
    demo: bool
    notice: str | None = None


def choose_model(ckpt: str | Path | None = None, config: str | Path | None = None, demo: bool = False) -> ModelChoice:
    """The scripts' model choice: ``--demo``, an explicit ``--ckpt``, the real checkpoint, else the demo.

    ``ValueError`` when both ``--demo`` and ``--ckpt`` are given (the demo has its own checkpoint)."""
    if demo and ckpt is not None:
        raise ValueError(f"--demo and --ckpt {ckpt} cannot be combined: --demo runs {repo_relative(DEMO_CKPT)}; "
                         "drop one of them")  # fmt: skip
    if demo:
        return ModelChoice(Path(config or TINY_CONFIG), demo_checkpoint(), True)
    if ckpt is not None:
        return ModelChoice(Path(config or DEFAULT_CONFIG), Path(ckpt), False)
    if DEFAULT_CKPT.is_file():
        return ModelChoice(Path(config or DEFAULT_CONFIG), DEFAULT_CKPT, False)
    return ModelChoice(Path(config or TINY_CONFIG), demo_checkpoint(), True, missing_checkpoint_message(DEFAULT_CKPT))
