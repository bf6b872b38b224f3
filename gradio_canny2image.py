"""The reference canny demo page (Gradio) on the CPU-first core.

    python gradio_canny2image.py                      # serves http://127.0.0.1:7860
    python gradio_canny2image.py --port 8080 --listen --auth-file page.auth  # other machines, with a login

Same controls and output as the reference page: the detected edge map first, then the samples.
It loads the model and samples exactly as ``cpu_canny2image.py`` does (``cldm.pipeline``); without
models/control_sd15_canny.pth it serves the tiny trained circle demo (with its circle image and prompt)
and says so on the page.
Requests are checked before they are queued (inputs in range, the image readable and within the output size
bound, from its header), then run one at a time. Beyond loopback: ``--auth`` / ``--auth-file`` (Gradio's login)
and ``--max-upload-mb`` (Gradio's upload limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gradio
    import numpy as np

    from cldm.pipeline import Canny2Image, CannyParams
    from cldm.units import ControlUnit

TITLE = "Control Stable Diffusion with Canny Edge Maps"
NO_IMAGE = "No input image: upload an image first."
# The page's inputs: the reference's, in its order, then the sampler's name, img2img's (docs/img2img.md), the first
# control unit's annotator and window, and the second control unit (the parameters of ``process``).
INPUTS = ("input_image", "prompt", "a_prompt", "n_prompt", "num_samples", "image_resolution", "ddim_steps",
          "guess_mode", "strength", "scale", "seed", "eta", "low_threshold", "high_threshold", "sampler",
          "denoise", "init_image", "mask", "annotator", "control_start", "control_end", "image2", "annotator2",
          "controlnet2", "strength2", "start2", "end2", "drawing2")  # fmt: skip
SECOND_UNIT = "Control 2"


@dataclass(frozen=True)
class SecondUnit:
    """The page's second control unit as checked: its image's server path (``None``: the drawing, the canvas's
    value as the page sends it), the ControlNet's name (``main``: the loaded model's) and the unit's settings (no
    image, no module yet)."""

    path: str | None
    controlnet: str
    unit: ControlUnit
    drawing: dict | None = None


def build_parser() -> argparse.ArgumentParser:
    from cldm.inference import add_inference_arguments
    from cldm.lora import add_lora_arguments
    from ldm.device import DEVICE_CHOICES, DEVICE_ENV
    from ldm.models.taesd import SPEC_HELP as VAE_DECODER_HELP
    from share import add_base_arguments

    p = argparse.ArgumentParser(description="Gradio page: Canny edge map -> image with SD1.5 + ControlNet.")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default: %(default)s)")
    p.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 instead of 127.0.0.1")
    p.add_argument("--share", action="store_true", help="also ask Gradio for a public share link (needs internet)")
    p.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASSWORD[,USER:PASSWORD...]",
        help="require a login (Gradio's); prefer --auth-file, which keeps the password out of shell history",
    )
    p.add_argument(
        "--auth-file",
        default=None,
        metavar="FILE",
        help="require a login: FILE holds one USER:PASSWORD a line (blank lines and # comments skipped)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=int,
        default=20,
        help="largest upload accepted, in MB (2^20 bytes; default: %(default)s)",
    )
    p.add_argument("--ckpt", default=None, help="checkpoint (default: models/control_sd15_canny.pth)")
    add_base_arguments(p)
    p.add_argument("--config", default=None, help="model config (default: models/cldm_v15.yaml)")
    p.add_argument("--demo", action="store_true", help="serve the tiny trained circle demo (models/cldm_tiny.yaml)")
    p.add_argument("--device", default=None, choices=DEVICE_CHOICES, help=f"device (default: ${DEVICE_ENV} or cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--vae-decoder", default="full", metavar="full|taesd:PATH", help=VAE_DECODER_HELP)
    p.add_argument("--control-net", action="append", default=[], metavar="PATH",
                   help="a ControlNet file or folder offered to the page's second control unit, besides the "
                        "checkpoint files in models/ (repeatable; loaded when first used)")  # fmt: skip
    add_inference_arguments(p)
    add_lora_arguments(p)
    return p


def checked_request(
    uncond_hint: bool, input_image: str | dict | None, prompt: str, a_prompt: str, n_prompt: str, num_samples: float,
    image_resolution: float, ddim_steps: float, guess_mode: bool, strength: float, scale: float, seed: float,
    eta: float, low_threshold: float, high_threshold: float, sampler: str = "ddim", denoise: float = 1.0,
    init_image: str | dict | None = None, mask: str | dict | None = None, annotator: str = "canny",
    control_start: float = 0.0, control_end: float = 1.0, image2: str | dict | None = None, annotator2: str = "none",
    controlnet2: str = "main", strength2: float = 1.0, start2: float = 0.0, end2: float = 1.0,
    drawing2: dict | None = None,
    *, limits: Mapping[str, tuple[float, float]] | None = None, controlnets: Collection[str] = (),
) -> tuple[str, CannyParams, SecondUnit | None]:  # fmt: skip
    """The page's inputs (:data:`INPUTS`) as ``(image path, CannyParams, second unit or None)``, checked without
    decoding the images (the second unit counts when it has an image, else a drawing ``drawing2``, read as a
    scribble; ``controlnet2``: ``main`` or one of
    ``controlnets``, the page's choices): values of the right type, within the page's ``limits`` (its sliders'
    ``(minimum, maximum)`` by input name) and in range, the image present and readable, its output within the
    size bound (from the file's header: :func:`cldm.pipeline.image_size`), the init image and mask as
    :func:`check_init_uploads` checks them, the second image readable (from its header; its map is scaled to the
    first's size). The values come as the page sends them (Gradio does not
    preprocess them: its own checks would refuse before the validator, with no message on the input): the
    images as Gradio's FileData dicts or paths, numbers as JSON numbers. ``ValueError`` with the message the
    page shows; :class:`~cldm.pipeline.ParamError` (naming the input) for a parameter's fault."""
    from cldm.pipeline import CannyParams, ParamError, image_size
    from cldm.units import ANNOTATORS, MAIN, ControlUnit

    path = upload_path(input_image)
    if not path:
        raise ValueError(NO_IMAGE)
    limits = limits or {}

    def number(name: str, value: object) -> float:
        return page_number(name, value, limits.get(name))

    params = CannyParams(
        prompt=page_text("prompt", prompt), a_prompt=page_text("a_prompt", a_prompt),
        n_prompt=page_text("n_prompt", n_prompt), num_samples=round(number("num_samples", num_samples)),
        image_resolution=round(number("image_resolution", image_resolution)),
        ddim_steps=round(number("ddim_steps", ddim_steps)), guess_mode=bool(guess_mode), uncond_hint=uncond_hint,
        strength=number("strength", strength), scale=number("scale", scale), seed=round(number("seed", seed)),
        eta=number("eta", 0.0 if eta is None else eta), low_threshold=round(number("low_threshold", low_threshold)),
        high_threshold=round(number("high_threshold", high_threshold)), sampler=page_text("sampler", sampler) or "ddim",
        denoise=number("denoise", denoise),
        annotator=page_text("annotator", annotator) or "canny", control_start=number("control_start", control_start),
        control_end=number("control_end", control_end),
    )  # fmt: skip
    params.validate()
    try:
        size = image_size(path)
    except ValueError as err:
        raise ValueError(shown(str(err), path)) from None
    params.output_size(*size, image_name=Path(path).name)
    check_init_uploads(size, init_image, mask)
    second_path = upload_path(image2)
    drawn = isinstance(drawing2, dict) and bool(drawing2.get("id") or drawing2.get("composite"))
    if not second_path and not drawn:
        return path, params, None
    name = page_text("controlnet2", controlnet2) or MAIN
    if name != MAIN and name not in controlnets:
        raise ParamError("controlnet2", f"{SECOND_UNIT}: unknown ControlNet {name!r} (choose from "
                                        f"{', '.join((MAIN, *controlnets))})")  # fmt: skip
    unit = ControlUnit(annotator=page_text("annotator2", annotator2),
                       strength=page_number("strength2", strength2, limits.get("strength2", (0.0, 2.0))),
                       start=page_number("start2", start2, (0.0, 1.0)), end=page_number("end2", end2, (0.0, 1.0)))
    if unit.annotator not in ANNOTATORS:
        raise ParamError("annotator2", f"{SECOND_UNIT}: annotator must be one of {', '.join(ANNOTATORS)}, got "
                                       f"{unit.annotator!r}")  # fmt: skip
    if unit.start > unit.end:
        raise ParamError("start2", f"{SECOND_UNIT}: start ({unit.start:g}) must not exceed end ({unit.end:g})")
    if not second_path:  # the drawing: black strokes on white, a scribble
        return path, params, SecondUnit(None, name, dataclasses.replace(unit, annotator="scribble"), drawing2)
    try:
        image_size(second_path)
    except ValueError as err:
        raise ParamError("image2", shown(str(err), second_path)) from None
    return path, params, SecondUnit(second_path, name, unit)


def check_init_uploads(size: tuple[int, int], init_image: object, mask: object) -> None:
    """The optional init image and mask uploads, from their headers: readable, and the mask of the init image's
    aspect ratio (the input image's, ``size`` = ``(height, width)``, without one); :class:`ParamError` naming the
    input."""
    from cldm.img2img import same_aspect
    from cldm.pipeline import ParamError, image_size

    sizes = {"init_image": size}
    for name, upload in (("init_image", init_image), ("mask", mask)):
        if (path := upload_path(upload)) is not None:
            try:
                sizes[name] = image_size(path)
            except ValueError as err:
                raise ParamError(name, shown(str(err), path)) from None
    if "mask" in sizes and not same_aspect(sizes["mask"], sizes["init_image"]):
        (mh, mw), (ih, iw) = sizes["mask"], sizes["init_image"]
        raise ParamError("mask", f"mask: {mw}x{mh} has another aspect ratio than the init image ({iw}x{ih})")


def upload_path(input_image: object) -> str | None:
    """The server path of the image input: given as a path (a direct call) or in Gradio's FileData dict."""
    path = input_image.get("path") if isinstance(input_image, dict) else input_image
    return path if isinstance(path, str) else None


def page_number(name: str, value: object, limits: tuple[float, float] | None = None) -> float:
    """``value`` of the input ``name`` as a finite float within ``limits`` (``(minimum, maximum)``, if given);
    :class:`~cldm.pipeline.ParamError` naming the input otherwise."""
    from cldm.pipeline import ParamError

    try:
        got = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        got = math.nan
    if not math.isfinite(got):
        raise ParamError(name, f"{name} must be a number, got {value!r}")
    if limits is not None and not limits[0] <= got <= limits[1]:
        raise ParamError(name, f"{name} must be between {limits[0]:g} and {limits[1]:g} on this page, got {got:g}")
    return got


def page_text(name: str, value: object) -> str:
    """``value`` of the text input ``name`` (``None``: empty); :class:`~cldm.pipeline.ParamError` if not text."""
    from cldm.pipeline import ParamError

    if value is None or isinstance(value, str):
        return value or ""
    raise ParamError(name, f"{name} must be text, got {value!r}")


def shown(message: str, *paths: str | None) -> str:
    """``message`` as the page shows it: each upload's server path (in Gradio's cache folder) as its file name."""
    for path in paths:
        message = message.replace(str(Path(path)), Path(path).name) if path else message
    return message


def make_validator(
    uncond_hint: bool = True, limits: Mapping[str, tuple[float, float]] | None = None, controlnets: Collection[str] = ()
) -> Callable[..., list[dict]]:
    """Gradio's ``validator`` for the Run event: :func:`checked_request` on the page's inputs, run when a
    request arrives, before it is queued (so a bad or oversized request never waits for, nor blocks, the
    single worker). Returns one ``gr.validate`` per input: the message on the parameter at fault, or on the
    image for the image's own faults (missing, unreadable, over the size bound). ``limits``, ``controlnets``: as
    :func:`checked_request`'s."""
    import gradio as gr

    from cldm.pipeline import ParamError

    def validate(*inputs: object) -> list[dict]:
        at, message = None, ""
        try:
            checked_request(uncond_hint, *inputs, limits=limits, controlnets=controlnets)  # type: ignore[arg-type]
        except ParamError as err:
            at, message = INPUTS.index(err.name), str(err)
        except ValueError as err:
            at, message = 0, str(err)
        return [gr.validate(i != at, message if i == at else "") for i in range(len(inputs))]

    return validate


def make_process(
    pipe: Canny2Image, uncond_hint: bool = True, limits: Mapping[str, tuple[float, float]] | None = None,
    controlnets: Mapping[str, Path] | None = None, config: Path | None = None,
    read_drawing: Callable[[dict], np.ndarray | None] | None = None,
) -> Callable[..., list]:  # fmt: skip
    """The page's ``process`` (the inputs of :data:`INPUTS`, in that order), bound to ``pipe``; ``uncond_hint``:
    whether the unconditional pass gets the hint too (the reference: yes; the tiny demo: no). It checks the
    request again (:func:`checked_request`, with the page's ``limits``), for calls that skip the validator.
    ``controlnets``: the second unit's ControlNet choices (name -> file, read with ``config`` when first used);
    ``read_drawing``: the canvas's value -> its drawing (HWC uint8, strokes flattened on white) or None."""
    import gradio as gr

    from cldm.pipeline import read_image
    from cldm.units import MAIN, ControlUnit

    controlnets = dict(controlnets or {})
    loaded: dict[str, object] = {}

    def units_of(params: CannyParams, second: SecondUnit | None, notify: Callable[[str], None]
                 ) -> list[ControlUnit] | None:  # fmt: skip
        """The run's control units: ``None`` (the single unit of ``params``) without a second image or drawing
        (a blank canvas counts as none)."""
        if second is None:
            return None
        if second.path is None:
            image = read_drawing(second.drawing) if read_drawing and second.drawing else None
            if image is None or (image == 255).all():
                return None
        else:
            image = read_image(second.path, notify=lambda message: notify(shown(message, second.path)))
        if second.controlnet != MAIN and second.controlnet not in loaded:
            loaded[second.controlnet] = pipe.load_controlnet(config, controlnets[second.controlnet])
        unit = dataclasses.replace(second.unit, image=image, controlnet=loaded.get(second.controlnet))
        return [ControlUnit.from_params(params), unit]

    def process(
        input_image: str | dict | None, prompt: str, a_prompt: str, n_prompt: str, num_samples: float,
        image_resolution: float, ddim_steps: float, guess_mode: bool, strength: float, scale: float,
        seed: float, eta: float, low_threshold: float, high_threshold: float, sampler: str = "ddim",
        denoise: float = 1.0, init_image: str | dict | None = None, mask: str | dict | None = None,
        annotator: str = "canny", control_start: float = 0.0, control_end: float = 1.0,
        image2: str | dict | None = None, annotator2: str = "none", controlnet2: str = "main",
        strength2: float = 1.0, start2: float = 0.0, end2: float = 1.0, drawing2: dict | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to inject the page's progress bar
    ) -> list:  # fmt: skip
        """Returns ``[shown map(s), sample_1, ...]`` as HWC uint8 arrays (one map per control unit, see
        :meth:`cldm.pipeline.Canny2Image.__call__`), or shows an error on the page."""
        try:
            path, params, second = checked_request(
                uncond_hint, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                guess_mode, strength, scale, seed, eta, low_threshold, high_threshold, sampler, denoise, init_image,
                mask, annotator, control_start, control_end, image2, annotator2, controlnet2, strength2, start2,
                end2, drawing2, limits=limits, controlnets=controlnets,
            )  # fmt: skip
            # an animation: the page says the first frame is used
            image = read_image(path, notify=lambda message: gr.Info(shown(message, path)))
            init = {name: read_image(p) for name, p in (("init_image", upload_path(init_image)),
                                                         ("mask", upload_path(mask))) if p is not None}  # fmt: skip
            units = units_of(params, second, gr.Info)
        except ValueError as err:  # CheckpointError (the second ControlNet's file) included
            paths = (upload_path(input_image), upload_path(init_image), upload_path(mask), upload_path(image2))
            raise gr.Error(shown(str(err), *paths), print_exception=False) from None
        steps = pipe.steps_run(params)
        desc = f"{params.sampler.upper()} sampling"
        progress((0, steps), desc=desc, unit="steps")

        def on_step(i: int) -> None:
            progress((i + 1, steps), desc=desc, unit="steps")

        try:
            results, _ = pipe(image, params, callback=on_step, notify=gr.Warning, units=units, **init)
        except ValueError as err:  # NonFiniteError; or the size bound on the decoded image
            raise gr.Error(str(err), print_exception=False) from None
        return results

    return process


def build_page(
    pipe: Canny2Image, notice: str | None = None, defaults: CannyParams | None = None, image: Path | None = None,
    controlnets: Mapping[str, Path] | None = None, config: Path | None = None,
) -> gradio.Blocks:  # fmt: skip
    """The Gradio Blocks page: the reference's layout, plus ``notice`` (e.g. the demo model) on top;
    ``defaults`` fill the controls and ``image`` the input (the demo's circle). A second control unit (its own
    image, annotator, ControlNet: the model's own or one of ``controlnets``, name -> file read with ``config``;
    strength and window) sits in the "Control 2" accordion."""
    import gradio as gr
    from gradio.components.image_editor import EditorData

    from cldm.pipeline import MAX_SEED, CannyParams
    from cldm.units import ANNOTATORS, MAIN
    from ldm.models.diffusion.sampling import SAMPLERS

    d = defaults or CannyParams()
    with gr.Blocks(title="ControlNet canny", analytics_enabled=False) as page:
        gr.Markdown(f"## {TITLE}")
        if notice:
            gr.Markdown(notice, elem_id="notice")
        with gr.Row():
            with gr.Column():
                # image_mode=None: the upload reaches read_image as the user's file (Gradio's default "RGB" would
                # decode and convert it first: 16-bit images clipped, huge ones decoded before any check)
                input_image = gr.Image(value=str(image) if image else None, sources=["upload"], type="filepath",
                                       image_mode=None, label="Input image")  # fmt: skip
                prompt = gr.Textbox(label="Prompt", value=d.prompt)
                run_button = gr.Button("Run", variant="primary")
                with gr.Accordion("Advanced options", open=False):
                    num_samples = gr.Slider(label="Images", minimum=1, maximum=12, value=d.num_samples, step=1)
                    image_resolution = gr.Slider(label="Image Resolution", minimum=min(256, d.image_resolution),
                                                 maximum=768, value=d.image_resolution, step=64)  # fmt: skip
                    strength = gr.Slider(label="Control Strength", minimum=0.0, maximum=2.0, value=d.strength,
                                         step=0.01)  # fmt: skip
                    guess_mode = gr.Checkbox(label="Guess Mode", value=d.guess_mode)
                    low_threshold = gr.Slider(label="Canny low threshold", minimum=1, maximum=255,
                                              value=d.low_threshold, step=1)  # fmt: skip
                    high_threshold = gr.Slider(label="Canny high threshold", minimum=1, maximum=255,
                                               value=d.high_threshold, step=1)  # fmt: skip
                    annotator = gr.Dropdown(label="Annotator", choices=list(ANNOTATORS), value=d.annotator)
                    control_start = gr.Slider(label="Control start", minimum=0.0, maximum=1.0,
                                              value=d.control_start, step=0.05)  # fmt: skip
                    control_end = gr.Slider(label="Control end", minimum=0.0, maximum=1.0, value=d.control_end,
                                            step=0.05)  # fmt: skip
                    ddim_steps = gr.Slider(label="Steps", minimum=1, maximum=100, value=d.ddim_steps, step=1)
                    sampler = gr.Dropdown(label="Sampler", choices=list(SAMPLERS), value=d.sampler)
                    scale = gr.Slider(label="Guidance Scale", minimum=0.1, maximum=30.0, value=d.scale, step=0.1)
                    seed = gr.Slider(label="Seed", minimum=-1, maximum=MAX_SEED, step=1, randomize=True)
                    eta = gr.Number(label="eta (DDIM)", value=d.eta)
                    a_prompt = gr.Textbox(label="Added Prompt", value=d.a_prompt)
                    n_prompt = gr.Textbox(label="Negative Prompt", value=d.n_prompt)
                with gr.Accordion("img2img / inpainting (docs/img2img.md)", open=False):
                    denoise = gr.Slider(label="Denoise", minimum=0.01, maximum=1.0, value=d.denoise, step=0.01)
                    init_image = gr.Image(sources=["upload"], type="filepath", image_mode=None,
                                          label="Init image (none: the input image, with a mask or Denoise < 1)")
                    mask = gr.Image(sources=["upload"], type="filepath", image_mode=None,
                                    label="Mask (white = repaint)")  # fmt: skip
                with gr.Accordion(SECOND_UNIT, open=False):
                    image2 = gr.Image(sources=["upload"], type="filepath", image_mode=None,
                                      label="Control 2 image (empty: off)")  # fmt: skip
                    annotator2 = gr.Dropdown(label="Control 2 annotator", choices=list(ANNOTATORS), value="none")
                    controlnet2 = gr.Dropdown(label="Control 2 ControlNet", choices=[MAIN, *(controlnets or {})],
                                              value=MAIN)  # fmt: skip
                    strength2 = gr.Slider(label="Control 2 strength", minimum=0.0, maximum=2.0, value=1.0,
                                          step=0.01)  # fmt: skip
                    start2 = gr.Slider(label="Control 2 start", minimum=0.0, maximum=1.0, value=0.0, step=0.05)
                    end2 = gr.Slider(label="Control 2 end", minimum=0.0, maximum=1.0, value=1.0, step=0.05)
                    # the reference's interactive scribble app, as a drawing: black strokes flattened on white
                    drawing2 = gr.Sketchpad(label="Control 2 drawing (a scribble; used without a Control 2 image)",
                                            type="numpy", image_mode="RGB", format="png", canvas_size=(512, 512),
                                            brush=gr.Brush(colors=["#000000"], default_color="#000000",
                                                           color_mode="fixed"), elem_id="drawing2")  # fmt: skip
            with gr.Column():
                gallery = gr.Gallery(label="Output", show_label=False, elem_id="gallery", columns=2, height="auto",
                                     format="png")  # fmt: skip
        inputs = [input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps, guess_mode,
                  strength, scale, seed, eta, low_threshold, high_threshold, sampler, denoise, init_image,
                  mask, annotator, control_start, control_end, image2, annotator2, controlnet2, strength2, start2,
                  end2, drawing2]  # fmt: skip
        # the inputs reach the validator unprocessed (checked_request converts them), so that Gradio's own checks
        # (a slider's limits, a number's type, a readable image) do not refuse first with no message on the input;
        # Gradio still refuses a file that was not uploaded (a server path) before anything runs
        limits = {name: (c.minimum, c.maximum) for name, c in zip(INPUTS, inputs, strict=True)
                  if isinstance(c, gr.Slider)}  # fmt: skip
        def read_drawing(value: dict) -> np.ndarray | None:
            return (drawing2.preprocess(EditorData.model_validate(value)) or {}).get("composite")

        process = make_process(pipe, d.uncond_hint, limits, controlnets, config, read_drawing)
        run_button.click(fn=process, inputs=inputs,
                         outputs=[gallery], concurrency_limit=1, preprocess=False,
                         validator=make_validator(d.uncond_hint, limits, list(controlnets or {})))  # fmt: skip
    page.queue(default_concurrency_limit=1)
    return page


def parse_auth(entries: list[str], source: str) -> list[tuple[str, str]]:
    """``USER:PASSWORD`` entries (blank ones skipped) as ``(user, password)`` pairs; the password is everything
    after the first colon. ``ValueError`` naming ``source`` (the flag or file) and the entry's number, never
    the password."""
    pairs = []
    for number, entry in enumerate((e.strip() for e in entries if e.strip()), 1):
        user, _, password = entry.partition(":")
        if not user or not password:
            raise ValueError(f"{source}: entry {number} is not USER:PASSWORD (both non-empty)")
        pairs.append((user, password))
    if not pairs:
        raise ValueError(f"{source}: no USER:PASSWORD entry")
    return pairs


def launch_options(args: argparse.Namespace) -> dict:
    """``Blocks.launch`` keywords from the flags: host, port, share link, login, upload limit. ``ValueError``
    naming the flag or file at fault."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_upload_mb < 1:
        raise ValueError(f"--max-upload-mb must be at least 1, got {args.max_upload_mb}")
    if args.auth is not None and args.auth_file is not None:
        raise ValueError("--auth and --auth-file cannot be combined: give one of them")
    auth = None
    if args.auth is not None:
        auth = parse_auth(args.auth.split(","), "--auth")
    elif args.auth_file is not None:
        try:
            text = Path(args.auth_file).read_text(encoding="utf-8-sig")  # a BOM (e.g. Windows Notepad) is dropped
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--auth-file {args.auth_file}: cannot read it ({getattr(err, 'strerror', None) or err})"
                             ) from None  # fmt: skip
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        auth = parse_auth(lines, f"--auth-file {args.auth_file}")
    return {
        "server_name": "0.0.0.0" if args.listen else "127.0.0.1", "server_port": args.port, "share": args.share,
        "auth": auth, "max_file_size": args.max_upload_mb * 2**20,
    }  # fmt: skip


def page_controlnets(given: list[str], *loaded: Path | None) -> dict[str, Path]:
    """The second unit's ControlNet choices, name -> path: the ``--control-net`` paths as given, then the
    checkpoint files and folders of ``models/`` other than the ``loaded`` ones (the model's checkpoint and
    base), by file name. ``ValueError`` for a ``--control-net`` path that does not exist; whether a file holds a
    usable ControlNet is found when it is first used."""
    from cldm.checkpoint import CHECKPOINT_SUFFIXES

    models = Path(__file__).resolve().parent / "models"
    skip = {Path(p).resolve() for p in loaded if p is not None}
    missing = [path for path in given if not Path(path).exists()]
    if missing:
        raise ValueError(f"--control-net {missing[0]}: file or folder not found")
    found = {path: Path(path) for path in given}
    for path in sorted(models.iterdir()) if models.is_dir() else []:
        if path.suffix.lower() in CHECKPOINT_SUFFIXES and path.resolve() not in skip:
            found.setdefault(path.name, path)
    return found


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    try:
        options = launch_options(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if (args.listen or args.share) and options["auth"] is None:
        exposed = " and ".join(f for f, on in (("--listen", args.listen), ("--share", args.share)) if on)
        print(f"warning: {exposed} without --auth or --auth-file: anyone who can reach the page can use it",
              file=sys.stderr)  # fmt: skip
    try:
        import gradio as gr
    except ImportError:
        print("error: gradio is not installed; run: pip install -r requirements-gradio.txt", file=sys.stderr)
        return 1

    from cldm.pipeline import CannyParams
    from ldm.device import resolve_device, set_threads
    from share import DEMO_IMAGE, choose_model, demo_params, describe_demo, load_pipeline

    try:
        choice = choose_model(args.ckpt, args.config, args.demo, args.base)
        controlnets = page_controlnets(args.control_net, choice.ckpt, choice.base)
        notice = None
        if choice.demo:
            notice = choice.notice or describe_demo()
            print(notice, file=sys.stderr)
            notice = f"**Demo model.** {notice}"
        set_threads(args.threads)
        pipe = load_pipeline(choice, args, resolve_device(args.device))
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"loaded {choice.ckpt} ({choice.config.name})", file=sys.stderr)
    if pipe.loras:  # fused at load: the page says which
        said = "LoRA: " + "; ".join(fused.summary() for fused in pipe.loras)
        print(said, file=sys.stderr)
        notice = f"{notice}\n\n{said}" if notice else said
    defaults, image = (demo_params(), DEMO_IMAGE) if choice.demo else (CannyParams(), None)
    page = build_page(pipe, notice, defaults, image, controlnets, choice.config)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # fmt: skip  # no web fonts: works offline
    try:
        page.launch(**options, theme=theme, show_error=True)
    except OSError as err:
        print(f"error: cannot serve on port {args.port}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
