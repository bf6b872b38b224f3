"""Canny edges -> image with SD1.5 + ControlNet on the CPU (the reference canny demo as a CLI).

    python cpu_canny2image.py --input test_imgs/astronaut.png --prompt "an astronaut, best quality"

Writes the edge map and each sample as PNG to --output-dir. Without models/control_sd15_canny.pth
it explains where to get it and runs the tiny demo instead: a 64 px ControlNet trained here from scratch
(tools/make_tiny_demo.py), run on test_imgs/disc.png with a prompt naming a circle and background color.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent
DEFAULT_IMAGE = REPO / "test_imgs" / "astronaut.png"
DEFAULT_PROMPT = "an astronaut in a white space suit, best quality"


def build_parser() -> argparse.ArgumentParser:
    from cldm.inference import add_inference_arguments
    from cldm.lora import add_lora_arguments
    from cldm.pipeline import CannyParams
    from cldm.units import add_control_arguments
    from ldm.device import DEVICE_CHOICES, DEVICE_ENV
    from ldm.models.diffusion.sampling import MAX_STEPS, SAMPLERS
    from ldm.models.taesd import SPEC_HELP as VAE_DECODER_HELP
    from share import DEFAULT_CKPT, DEFAULT_CONFIG, DEMO_IMAGE, DEMO_PROMPT, DEMO_SCALE, add_base_arguments

    d = CannyParams()
    p = argparse.ArgumentParser(description="Canny edge map -> image with Stable Diffusion 1.5 + ControlNet.")
    p.add_argument("-i", "--input", "--input-image", dest="input", default=None,
                   help=f"input image (default: {DEFAULT_IMAGE.name}; demo: {DEMO_IMAGE.name}, both in test_imgs/)")
    p.add_argument("-p", "--prompt", default=None, help=f"prompt (default: {DEFAULT_PROMPT!r}; demo: {DEMO_PROMPT!r})")
    p.add_argument("--a-prompt", "--added-prompt", dest="a_prompt", default=None,
                   help=f"added prompt (default: {d.a_prompt!r}; demo: none)")
    p.add_argument("--n-prompt", "--negative-prompt", dest="n_prompt", default=None,
                   help="negative prompt (default: the reference's; demo: none)")
    p.add_argument("-n", "--num-samples", type=int, default=d.num_samples, help="images to generate (1-12)")
    p.add_argument("--image-resolution", type=int, default=None,
                   help="short side in pixels, rounded to a multiple of 64 (default 512; demo: 64)")
    p.add_argument("--ddim-steps", "--steps", dest="ddim_steps", type=int, default=d.ddim_steps,
                   help=f"sampling steps (default: {d.ddim_steps}; lcm: 1-{MAX_STEPS['lcm'](1000)})")
    p.add_argument("--sampler", default=d.sampler, choices=list(SAMPLERS),
                   help="sampler (default: %(default)s, the reference's; what each is and its steps: "
                        "docs/samplers.md)")  # fmt: skip
    p.add_argument("--guess-mode", action="store_true", help="guess mode: no prompt needed, control drives")
    p.add_argument("--strength", "--control-strength", dest="strength", type=float, default=d.strength,
                   help="control strength (0-2)")
    p.add_argument("--scale", "--guidance-scale", dest="scale", type=float, default=None,
                   help=f"guidance scale (default: {d.scale:g}; demo: {DEMO_SCALE:g})")
    p.add_argument("--uncond-hint", action=argparse.BooleanOptionalAction, default=None,
                   help="give the hint to the unconditional pass too (default: on, as the reference; demo: off)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed, -1 for a random one")
    p.add_argument("--eta", type=float, default=d.eta, help="DDIM eta (0 = deterministic; ddim only)")
    p.add_argument("--low-threshold", type=int, default=d.low_threshold, help="Canny low threshold (1-255)")
    p.add_argument("--high-threshold", type=int, default=d.high_threshold, help="Canny high threshold (1-255)")
    add_control_arguments(p, d)
    p.add_argument("--ckpt", default=None, help=f"checkpoint (default: {DEFAULT_CKPT.relative_to(REPO)})")
    add_base_arguments(p)
    p.add_argument("--config", default=None, help=f"model config (default: {DEFAULT_CONFIG.relative_to(REPO)})")
    p.add_argument("--demo", action="store_true", help="run the tiny trained circle demo (models/cldm_tiny.yaml)")
    p.add_argument("-o", "--output-dir", default="outputs", help="where PNGs are written (default: %(default)s)")
    p.add_argument("--device", default=None, choices=DEVICE_CHOICES, help=f"device (default: ${DEVICE_ENV} or cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--vae-decoder", default="full", metavar="full|taesd:PATH", help=VAE_DECODER_HELP)
    p.add_argument("--init-image", default=None, help="img2img: start from this image (docs/img2img.md)")
    p.add_argument("--denoise", type=float, default=d.denoise,
                   help="img2img strength in (0, 1]: the share of the steps run (default: %(default)s)")
    p.add_argument("--mask", default=None, help="inpaint: white = repaint, black = keep (init: the input image)")
    add_inference_arguments(p)
    add_lora_arguments(p)
    return p


class UsageError(ValueError):
    """A bad --init-image, --mask or --denoise: one line, exit 2."""


def read_init_inputs(args: argparse.Namespace, params: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(init image, mask)`` read from ``--init-image`` and ``--mask`` (``None`` when not given), after
    checking ``--denoise`` against the steps; :class:`UsageError` naming the flag and file."""
    from cldm.pipeline import ParamError, read_image

    try:
        params.validate()
    except ParamError as err:
        if err.name == "denoise":
            raise UsageError(str(err)) from None
    arrays = []
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        try:
            arrays.append(None if path is None else read_image(path))
        except ValueError as err:
            raise UsageError(f"{flag}: {err}") from None
    return arrays[0], arrays[1]


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a PNG atomically (never a half-written file at ``path``)."""
    tmp = path.with_name(path.name + ".partial")
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_all(arrays: list[np.ndarray], paths: list[Path]) -> None:
    """Write each array to its path with :func:`save_png`; if any write fails or is interrupted (Ctrl-C),
    the ones already written are removed and the error is raised again: the set is whole or absent."""
    written: list[Path] = []
    try:
        for array, path in zip(arrays, paths, strict=True):
            save_png(array, path)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def settings(args: argparse.Namespace, demo: bool) -> tuple[Any, Path]:
    """``(CannyParams, input image path)``: the flags given, the rest from the model's defaults
    (the reference demo's for SD1.5, :func:`share.demo_params` for the tiny demo)."""
    from cldm.pipeline import CannyParams
    from share import DEMO_IMAGE, demo_params

    base = demo_params() if demo else CannyParams(prompt=DEFAULT_PROMPT)
    given = {name: getattr(args, name) for name in ("prompt", "a_prompt", "n_prompt", "image_resolution", "scale",
                                                    "uncond_hint")}  # fmt: skip
    params = CannyParams(**{
        **base.to_dict(), **{k: v for k, v in given.items() if v is not None},
        "num_samples": args.num_samples, "ddim_steps": args.ddim_steps, "guess_mode": args.guess_mode,
        "strength": args.strength, "seed": args.seed, "eta": args.eta, "sampler": args.sampler,
        "low_threshold": args.low_threshold, "high_threshold": args.high_threshold, "denoise": args.denoise,
        "annotator": args.annotator, "control_start": args.control_start, "control_end": args.control_end,
    })  # fmt: skip
    input_path = Path(args.input) if args.input else (DEMO_IMAGE if demo else DEFAULT_IMAGE)
    return params, input_path


def read_control_inputs(specs: list) -> list[np.ndarray | None]:
    """Each ``--control``'s image (``None``: ``--input``'s), after checking that its ControlNet file holds a
    ControlNet: before any model is loaded. :class:`UsageError` naming the ``--control`` at fault."""
    from cldm.pipeline import read_image
    from cldm.units import check_controlnet_file

    images = []
    for spec in specs:
        try:
            if spec.ckpt is not None:
                check_controlnet_file(spec.ckpt)
            images.append(read_image(spec.image) if spec.image else None)
        except (ValueError, OSError) as err:  # CheckpointError is a ValueError
            raise UsageError(f"--control '{spec.text}': {err}") from None
    return images


def control_units(pipe: Any, params: Any, args: argparse.Namespace, config: Path, images: list) -> list:
    """The run's control units: the shorthand's (``--input`` with ``--annotator``, ``--strength``, ...: the
    ``--ckpt`` model's ControlNet), then one per ``--control`` (``images``: their control images, ``None`` for
    ``--input``), each ControlNet file loaded once with the model's config and base."""
    from cldm.units import ControlUnit

    loaded: dict = {}
    units = [ControlUnit.from_params(params)]
    for spec, image in zip(args.control, images):
        if spec.ckpt is not None and spec.ckpt not in loaded:
            loaded[spec.ckpt] = pipe.load_controlnet(config, spec.ckpt, low_memory=args.low_memory)
            print(f"loaded ControlNet {spec.ckpt}", file=sys.stderr)
        units.append(spec.unit(image, loaded.get(spec.ckpt)))
    return units


def run(args: argparse.Namespace) -> int:
    from cldm.checkpoint import check_writable_dir
    from cldm.img2img import InitInputError, init_inputs
    from cldm.pipeline import read_image
    from ldm.device import resolve_device, set_threads
    from ldm.models.diffusion.sampling import NonFiniteError
    from share import choose_model, load_pipeline

    try:
        choice = choose_model(args.ckpt, args.config, args.demo, args.base)
        if choice.notice:
            print(choice.notice, file=sys.stderr)
        config, ckpt = choice.config, choice.ckpt
        params, input_path = settings(args, choice.demo)
        if choice.demo:
            print(f"demo: {input_path} -> prompt {params.prompt!r} at {params.image_resolution} px", file=sys.stderr)
        init_image, mask = read_init_inputs(args, params)
        params.validate()
        image = read_image(input_path)
        size = params.output_size(*image.shape[:2], image_name=str(input_path))  # the bound, before loading
        if mask is not None:  # its aspect ratio, before loading the model
            init_inputs(image, init_image, mask, size, f"--init-image {args.init_image}", f"--mask {args.mask}")
        images = read_control_inputs(args.control)
        device = resolve_device(args.device)
        set_threads(args.threads)
        out_dir = check_writable_dir(args.output_dir)  # before the slow load and sampling
        start = time.perf_counter()
        pipe = load_pipeline(choice, args, device)
        print(f"loaded {ckpt} ({config.name}) on {device} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        for fused in pipe.loras:
            print(f"lora: {fused.summary()}", file=sys.stderr)
        units = control_units(pipe, params, args, config, images)
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (UsageError, InitInputError)) else 1
    start = time.perf_counter()
    try:
        results, seed = pipe(image, params, init_image=init_image, mask=mask, units=units)
    except NonFiniteError as err:  # never write a black image
        print(f"error: {ckpt}: {err}", file=sys.stderr)
        return 1
    stem, k = input_path.stem, len(units)
    paths = ([out_dir / f"{stem}_edges.png"] + [out_dir / f"{stem}_control{i}.png" for i in range(2, k + 1)]
             + [out_dir / f"{stem}_{seed}_{i}.png" for i in range(len(results) - k)])  # fmt: skip
    try:
        save_all(results, paths)
    except OSError as err:  # e.g. a full disk: save_all has removed what it wrote
        print(f"error: {out_dir}: cannot write the images ({err.strerror or err}); none kept", file=sys.stderr)
        return 1
    h, w = results[0].shape[:2]
    took = time.perf_counter() - start
    print(f"seed {seed}: {len(results) - k} sample(s) at {w}x{h} in {took:.1f} s", file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:  # from the start: Ctrl-C while torch is still being imported is one line too
        return run(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        print("interrupted: no images written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
