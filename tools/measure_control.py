"""Measure how well a ControlNet follows its condition on held-out fill50k-style circles.

    python -m tools.measure_control --data training/tiny_demo/heldout \\
        --base training/tiny_demo/tiny_sd.ckpt --ckpt models/control_tiny_circles.ckpt

For every held-out condition (an outline, its filled target and a prompt "<circle color> circle with
<background color> background") the model draws one image from a fixed seed. The image is segmented by
the prompt's colors (a pixel is "circle" when it is nearer in RGB to the named circle color than to the
named background color) and scored against the condition's filled disc:

- IoU: |segment AND disc| / |segment OR disc|;
- color accuracy: the mean color inside the condition's disc is nearest (among the demo's colors) to the
  named circle color and the mean color outside it is nearest to the named background color.

``--base`` scores the base model alone (an SD-layout checkpoint, no ControlNet); ``--ckpt`` (repeatable)
scores ControlNet checkpoints; ``--curve DIR`` scores every training checkpoint ``step=N.ckpt`` in DIR
and plots IoU against step (``--plot``). Results are printed and written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.models.diffusion.sampling import SAMPLERS, check_steps
from share import DEMO_COLORS, repo_relative
from tools.make_fill50k import COLORS

REPO = Path(__file__).resolve().parents[1]

PROMPT = re.compile(r"^(?P<circle>.+) circle with (?P<background>.+) background$")
STEP_CKPT = re.compile(r"step=(\d+)\.ckpt$")
SMALL_DISC = 14 / 64  # radius, as a fraction of the image side, below which a disc counts as small (demo: 10..20 px)


@dataclass
class Condition:
    """One held-out sample: hint (H, W, 3) float32 in [0, 1], its filled disc (H, W) bool and its prompt."""

    hint: np.ndarray
    disc: np.ndarray
    prompt: str
    circle: str
    background: str


def parse_prompt(prompt: str) -> tuple[str, str]:
    """(circle color, background color) named by a fill50k prompt; ``ValueError`` if it is not one."""
    match = PROMPT.match(prompt)
    if match is None or match["circle"] not in COLORS or match["background"] not in COLORS:
        raise ValueError(f"prompt {prompt!r} is not '<color> circle with <color> background'")
    return match["circle"], match["background"]


def load_conditions(folder: str | Path, n: int | None = None) -> list[Condition]:
    """The first ``n`` samples of a fill50k-style folder; the disc is where the target has the circle color."""
    from cldm.data import read_prompt_lines, read_rgb

    root = Path(folder)
    conditions = []
    for entry in read_prompt_lines(root / "prompt.json")[:n]:
        circle, background = parse_prompt(entry["prompt"])
        target = read_rgb(root / entry["target"])
        disc = np.all(target == np.array(COLORS[circle], dtype=np.uint8), axis=-1)
        hint = read_rgb(root / entry["source"]).astype(np.float32) / 255.0
        conditions.append(Condition(hint, disc, entry["prompt"], circle, background))
    return conditions


def segment(image: np.ndarray, circle_rgb: tuple[int, int, int], background_rgb: tuple[int, int, int]) -> np.ndarray:
    """(H, W) bool: pixels of the (H, W, 3) image nearer to ``circle_rgb`` than to ``background_rgb``."""
    pixels = image.astype(np.float64)
    to_circle = np.linalg.norm(pixels - np.array(circle_rgb, dtype=np.float64), axis=-1)
    to_background = np.linalg.norm(pixels - np.array(background_rgb, dtype=np.float64), axis=-1)
    return to_circle < to_background


def nearest_color(rgb: np.ndarray, palette: tuple[str, ...]) -> str:
    """The palette color name nearest (RGB distance) to ``rgb``."""
    values = np.array([COLORS[name] for name in palette], dtype=np.float64)
    return palette[int(np.argmin(np.linalg.norm(values - rgb, axis=1)))]


def score(images: np.ndarray, conditions: list[Condition], palette: tuple[str, ...] = DEMO_COLORS) -> dict:
    """IoU and color accuracy of (N, H, W, 3) uint8 images against their conditions (means and per sample),
    and the mean IoU over the images with both colors right: all, small discs (radius < ``SMALL_DISC``), large."""
    ious, correct = [], []
    for image, cond in zip(images, conditions):
        mask = segment(image, COLORS[cond.circle], COLORS[cond.background])
        union = np.logical_or(mask, cond.disc).sum()
        ious.append(float(np.logical_and(mask, cond.disc).sum() / union) if union else 1.0)
        inside = nearest_color(image[cond.disc].mean(axis=0), palette) == cond.circle
        outside = nearest_color(image[~cond.disc].mean(axis=0), palette) == cond.background
        correct.append(bool(inside and outside))
    right = np.array(correct)
    small = np.array([np.sqrt(c.disc.sum() / np.pi) < SMALL_DISC * c.disc.shape[0] for c in conditions])

    def mean_iou(rows: np.ndarray) -> float | None:
        return float(np.mean(np.array(ious)[rows])) if rows.any() else None

    return {"iou": float(np.mean(ious)), "color_accuracy": float(np.mean(correct)), "ious": ious,
            "iou_colors_right": mean_iou(right), "iou_colors_right_small": mean_iou(right & small),
            "iou_colors_right_large": mean_iou(right & ~small)}  # fmt: skip


@torch.no_grad()
def generate(
    model: Any, conditions: list[Condition], control: bool, steps: int = 20, scale: float = 9.0, seed: int = 0,
    batch_size: int = 50, uncond_hint: bool = True, strength: float = 1.0, sampler: str = "ddim",
) -> np.ndarray:  # fmt: skip
    """(N, H, W, 3) uint8 images, ``sampler`` (a name of ``SAMPLERS``, DDIM by default) with classifier-free
    guidance ("" as the unconditional prompt).

    ``control``: the model is a ControlLDM and gets each condition's hint, also in the unconditional pass (as
    the reference demo) unless ``uncond_hint`` is False (as the reference's guess mode: guidance then amplifies
    the control's effect with the prompt's); otherwise it is the base LatentDiffusion and sees the prompt only
    (run with the same batching of the two passes, so a ControlNet at init reproduces it exactly).
    Sample ``i`` starts from the noise of ``(seed, i)``, so a model and its base start from the same noise (and
    every sampler too); the step noise of ``euler_a``/``lcm`` has its own seed per batch.
    ``strength``: the control scale of every block.
    """
    from cldm.control import Control, control_scales_for
    from cldm.guidance import CFGDenoiser
    from ldm.models.diffusion.sampling import sample

    out = []
    for start in range(0, len(conditions), batch_size):
        chunk = conditions[start : start + batch_size]
        n = len(chunk)
        height, width = chunk[0].hint.shape[:2]
        shape = (model.channels, height // 8, width // 8)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + i))
                             for i in range(n)])  # fmt: skip
        c_txt = model.get_learned_conditioning([c.prompt for c in chunk])
        u_txt = model.get_learned_conditioning([""] * n)
        controls = []
        if control:
            hint = torch.from_numpy(np.stack([c.hint for c in chunk])).permute(0, 3, 1, 2).contiguous()
            scales = control_scales_for(strength, False)
            controls = [Control(model.control_model, hint, scales, uncond_hint=uncond_hint)]
        # Without the hint in the unconditional pass the two passes cannot share one batch; the base model then
        # runs them apart too, so the ControlNet at init (zero control) gives its images bit for bit.
        denoise = CFGDenoiser(model, c_txt, u_txt, scale, controls, batch_cfg=uncond_hint)
        step_noise = torch.Generator().manual_seed(seed * 1_000_003 + len(conditions) + start)  # no sample's seed
        samples = sample(sampler, denoise, noise, model.alphas_cumprod, steps, generator=step_noise, progress=False)
        images = model.decode_first_stage(samples).permute(0, 2, 3, 1) * 127.5 + 127.5
        out.append(images.clamp(0, 255).round().to(torch.uint8).numpy())
    return np.concatenate(out)


def curve_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the ``step=N.ckpt`` files tutorial_train.py wrote to ``folder``, by step."""
    found = [(int(m[1]), p) for p in Path(folder).glob("step=*.ckpt") if (m := STEP_CKPT.search(p.name))]
    return sorted(found)


def plot_curve(points: list[tuple[int, float]], path: str | Path, title: str = "IoU vs training step") -> None:
    """Draw a line plot of (step, IoU) with IoU on a fixed 0..1 axis and write it as PNG."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 640, 400, 60, 20, 40, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    plot_w, plot_h = width - left - right, height - top - bottom
    max_step = max((s for s, _ in points), default=1) or 1

    def xy(step: float, value: float) -> tuple[float, float]:
        return left + plot_w * step / max_step, top + plot_h * (1.0 - value)

    for tick in np.linspace(0.0, 1.0, 6):
        y = xy(0, tick)[1]
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((left - 35, y - 6), f"{tick:.1f}", fill="black")
    for step in np.linspace(0, max_step, 6):
        x = xy(step, 0)[0]
        draw.text((x - 12, height - bottom + 8), f"{int(step)}", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 12), title, fill="black")
    draw.text((width // 2 - 40, height - 22), "training step", fill="black")
    draw.text((8, top - 28), "mean IoU", fill="black")
    coords = [xy(s, v) for s, v in points]
    if len(coords) > 1:
        draw.line(coords, fill=(200, 30, 30), width=3)
    for x, y in coords:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def measure(
    config: str | Path, conditions: list[Condition], base: str | None = None, ckpts: tuple[str, ...] = (),
    curve: str | None = None, curve_init: str | None = None, steps: int = 20, scale: float = 9.0, seed: int = 0,
    progress: bool = True, strength: float = 1.0, uncond_hint: bool = True, sampler: str = "ddim",
) -> dict[str, Any]:  # fmt: skip
    """Score the base model and each ControlNet checkpoint; returns the JSON-ready results. ``curve``: a
    folder of ``step=N.ckpt`` files, scored in step order, after ``curve_init`` (the ControlNet at init) as
    step 0 when given. ``strength``: the control scale of every block (the demo's Control Strength);
    ``uncond_hint``, ``sampler``: see :func:`generate`."""
    from cldm.model import load_model

    def run(path: str | Path, control: bool) -> tuple[np.ndarray, dict]:
        model = load_model(config, path, base=not control)
        images = generate(model, conditions, control=control, steps=steps, scale=scale, seed=seed,
                          uncond_hint=uncond_hint, strength=strength, sampler=sampler)  # fmt: skip
        return images, summary(score(images, conditions))

    results: dict[str, Any] = {"n": len(conditions), "sampler": sampler, "ddim_steps": steps, "scale": scale,
                               "strength": strength,
                               "uncond_hint": uncond_hint, "seed": seed}  # fmt: skip
    base_images = None
    if base is not None:
        base_images, scores = run(base, control=False)
        results["base"] = {"ckpt": str(repo_relative(base)), **scores}
        report("base", results["base"], progress)
    for ckpt in ckpts:
        images, scores = run(ckpt, control=True)
        entry = {"ckpt": str(repo_relative(ckpt)), **scores}
        if base_images is not None:
            entry["max_abs_diff_to_base"] = int(np.abs(images.astype(np.int16) - base_images).max())
        results.setdefault("controlnet", []).append(entry)
        report(Path(ckpt).name, entry, progress)
    if curve is not None:
        results["curve"] = []
        points = curve_checkpoints(curve)
        if curve_init is not None:
            points.insert(0, (0, Path(curve_init)))
        for step, path in points:
            entry = {"step": step, **run(path, control=True)[1]}
            results["curve"].append(entry)
            report(f"step {step}", entry, progress)
    return results


def summary(scores: dict) -> dict:
    return {k: None if v is None else round(v, 4) for k, v in scores.items() if k != "ious"}


def report(name: str, entry: dict, enabled: bool) -> None:
    if enabled:
        extra = f"  max |diff| to base {entry['max_abs_diff_to_base']}" if "max_abs_diff_to_base" in entry else ""
        right = " ".join(f"{entry[k]:.3f}" if entry[k] is not None else "-"
                         for k in ("iou_colors_right", "iou_colors_right_small", "iou_colors_right_large"))  # fmt: skip
        print(f"{name:>28}: IoU {entry['iou']:.3f}  color accuracy {entry['color_accuracy']:.3f}  "
              f"IoU with colors right (all small large) {right}{extra}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "models" / "cldm_tiny.yaml"), help="ControlLDM config")
    p.add_argument("--data", required=True, help="held-out fill50k-style folder (prompt.json, source/, target/)")
    p.add_argument("--n", type=int, default=100, help="held-out conditions to use (default: %(default)s)")
    p.add_argument("--base", default=None, help="base model checkpoint (SD layout) to score alone")
    p.add_argument("--ckpt", action="append", default=[], help="ControlNet checkpoint to score (repeatable)")
    p.add_argument("--curve", default=None, metavar="DIR", help="score every step=N.ckpt in DIR (IoU vs step)")
    p.add_argument("--curve-init", default=None, metavar="CKPT", help="ControlNet at init: step 0 of --curve")
    p.add_argument("--plot", default=None, help="write the IoU-vs-step plot of --curve here (PNG)")
    p.add_argument("--ddim-steps", type=int, default=20, help="sampling steps (default: %(default)s)")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS), help="sampler (default: %(default)s)")
    p.add_argument("--scale", type=float, default=9.0, help="guidance scale (default: %(default)s)")
    p.add_argument("--strength", type=float, default=1.0, help="control strength (default: %(default)s)")
    p.add_argument("--uncond-hint", action=argparse.BooleanOptionalAction, default=True,
                   help="give the hint to the unconditional pass too, as the reference demo (default); "
                        "--no-uncond-hint: the conditional pass only, as the reference's guess mode")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    from cldm.checkpoint import CheckpointError

    try:
        if args.n < 1:
            raise ValueError("--n must be at least 1")
        check_steps(args.sampler, args.ddim_steps)
        if not 0.0 <= args.strength <= 2.0:
            raise ValueError(f"--strength must be between 0 and 2, got {args.strength}")
        if (args.plot or args.curve_init) and not args.curve:
            raise ValueError("--plot and --curve-init need --curve")
        if args.curve and not curve_checkpoints(args.curve):
            raise ValueError(f"{args.curve}: no step=N.ckpt checkpoints found")
        conditions = load_conditions(args.data, args.n)
        results = measure(args.config, conditions, args.base, tuple(args.ckpt), curve=args.curve,
                          curve_init=args.curve_init, steps=args.ddim_steps, scale=args.scale,
                          seed=args.seed, strength=args.strength, uncond_hint=args.uncond_hint,
                          sampler=args.sampler)  # fmt: skip
    except (ValueError, OSError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.plot:
        plot_curve([(e["step"], e["iou"]) for e in results["curve"]], args.plot)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
