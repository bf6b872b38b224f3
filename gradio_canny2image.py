"""The reference canny demo page (Gradio) on the CPU-first core.

    python gradio_canny2image.py                      # serves http://127.0.0.1:7860
    python gradio_canny2image.py --port 8080 --listen # reachable from other machines

Same controls and output as the reference page: the detected edge map first, then the samples.
It loads the model and samples exactly as ``cpu_canny2image.py`` does (``cldm.pipeline``); without
models/control_sd15_canny.pth it serves the tiny trained circle demo (with its circle image and prompt)
and says so on the page.
Requests are queued and run one at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gradio

    from cldm.pipeline import Canny2Image, CannyParams

TITLE = "Control Stable Diffusion with Canny Edge Maps"


def build_parser() -> argparse.ArgumentParser:
    from cldm.inference import add_inference_arguments
    from ldm.device import DEVICE_CHOICES, DEVICE_ENV

    p = argparse.ArgumentParser(description="Gradio page: Canny edge map -> image with SD1.5 + ControlNet.")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default: %(default)s)")
    p.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 instead of 127.0.0.1")
    p.add_argument("--share", action="store_true", help="also ask Gradio for a public share link (needs internet)")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: models/control_sd15_canny.pth)")
    p.add_argument("--config", default=None, help="model config (default: models/cldm_v15.yaml)")
    p.add_argument("--demo", action="store_true", help="serve the tiny trained circle demo (models/cldm_tiny.yaml)")
    p.add_argument("--device", default=None, choices=DEVICE_CHOICES, help=f"device (default: ${DEVICE_ENV} or cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add_inference_arguments(p)
    return p


def make_process(pipe: Canny2Image, uncond_hint: bool = True) -> Callable[..., list]:
    """The page's ``process`` (the reference's inputs, in its order, then the sampler's name), bound to ``pipe``;
    ``uncond_hint``: whether the unconditional pass gets the hint too (the reference: yes; the tiny demo: no)."""
    import gradio as gr

    from cldm.pipeline import CannyParams, read_image
    from ldm.models.diffusion.sampling import NonFiniteError

    def process(
        input_image: str | None, prompt: str, a_prompt: str, n_prompt: str, num_samples: float,
        image_resolution: float, ddim_steps: float, guess_mode: bool, strength: float, scale: float,
        seed: float, eta: float, low_threshold: float, high_threshold: float, sampler: str = "ddim",
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to inject the page's progress bar
    ) -> list:  # fmt: skip
        """Returns ``[255 - edge map, sample_1, ...]`` as HWC uint8 arrays, or shows an error on the page."""
        if input_image is None:
            raise gr.Error("No input image: upload an image first.", print_exception=False)
        params = CannyParams(
            prompt=prompt or "", a_prompt=a_prompt or "", n_prompt=n_prompt or "", num_samples=int(num_samples),
            image_resolution=int(image_resolution), ddim_steps=int(ddim_steps), guess_mode=bool(guess_mode),
            uncond_hint=uncond_hint,
            strength=float(strength), scale=float(scale), seed=int(seed), eta=float(eta or 0.0),
            low_threshold=int(low_threshold), high_threshold=int(high_threshold), sampler=sampler or "ddim",
        )  # fmt: skip
        try:
            params.validate()
            image = read_image(input_image, notify=gr.Info)  # an animation: the page says the first frame is used
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        steps = pipe.sampling_steps(params.ddim_steps, params.sampler)
        desc = f"{params.sampler.upper()} sampling"
        progress((0, steps), desc=desc, unit="steps")

        def on_step(i: int) -> None:
            progress((i + 1, steps), desc=desc, unit="steps")

        try:
            results, _ = pipe(image, params, callback=on_step, notify=gr.Warning)
        except NonFiniteError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return results

    return process


def build_page(
    pipe: Canny2Image, notice: str | None = None, defaults: CannyParams | None = None, image: Path | None = None
) -> gradio.Blocks:
    """The Gradio Blocks page: the reference's layout, plus ``notice`` (e.g. the demo model) on top;
    ``defaults`` fill the controls and ``image`` the input (the demo's circle)."""
    import gradio as gr

    from cldm.pipeline import MAX_SEED, CannyParams
    from ldm.models.diffusion.sampling import SAMPLERS

    d = defaults or CannyParams()
    with gr.Blocks(title="ControlNet canny", analytics_enabled=False) as page:
        gr.Markdown(f"## {TITLE}")
        if notice:
            gr.Markdown(notice, elem_id="notice")
        with gr.Row():
            with gr.Column():
                input_image = gr.Image(value=str(image) if image else None, sources=["upload"], type="filepath",
                                       label="Input image")  # fmt: skip
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
                    ddim_steps = gr.Slider(label="Steps", minimum=1, maximum=100, value=d.ddim_steps, step=1)
                    sampler = gr.Dropdown(label="Sampler", choices=list(SAMPLERS), value=d.sampler)
                    scale = gr.Slider(label="Guidance Scale", minimum=0.1, maximum=30.0, value=d.scale, step=0.1)
                    seed = gr.Slider(label="Seed", minimum=-1, maximum=MAX_SEED, step=1, randomize=True)
                    eta = gr.Number(label="eta (DDIM)", value=d.eta)
                    a_prompt = gr.Textbox(label="Added Prompt", value=d.a_prompt)
                    n_prompt = gr.Textbox(label="Negative Prompt", value=d.n_prompt)
            with gr.Column():
                gallery = gr.Gallery(label="Output", show_label=False, elem_id="gallery", columns=2, height="auto",
                                     format="png")  # fmt: skip
        inputs = [input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps, guess_mode,
                  strength, scale, seed, eta, low_threshold, high_threshold, sampler]  # fmt: skip
        run_button.click(fn=make_process(pipe, d.uncond_hint), inputs=inputs, outputs=[gallery], concurrency_limit=1)
    page.queue(default_concurrency_limit=1)
    return page


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    if not 1 <= args.port <= 65535:
        print(f"error: --port must be between 1 and 65535, got {args.port}", file=sys.stderr)
        return 1
    try:
        import gradio as gr
    except ImportError:
        print("error: gradio is not installed; run: pip install -r requirements-gradio.txt", file=sys.stderr)
        return 1

    from cldm.inference import path_from_args
    from cldm.pipeline import Canny2Image, CannyParams
    from ldm.device import resolve_device, set_threads
    from ldm.memory import tune_allocator
    from share import DEMO_IMAGE, choose_model, demo_params, describe_demo

    try:
        choice = choose_model(args.ckpt, args.config, args.demo)
        notice = None
        if choice.demo:
            notice = choice.notice or describe_demo()
            print(notice, file=sys.stderr)
            notice = f"**Demo model.** {notice}"
        set_threads(args.threads)
        tune_allocator(args.low_memory)  # low memory: freed memory returned; else kept for reuse (faster)
        pipe = Canny2Image.from_checkpoint(choice.config, choice.ckpt, resolve_device(args.device),
                                          low_memory=args.low_memory, path=path_from_args(args))  # fmt: skip
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"loaded {choice.ckpt} ({choice.config.name})", file=sys.stderr)
    if choice.demo:
        page = build_page(pipe, notice, demo_params(), DEMO_IMAGE)
    else:
        page = build_page(pipe, notice, CannyParams())
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # fmt: skip  # no web fonts: works offline
    try:
        page.launch(server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=args.port, share=args.share,
                    theme=theme, show_error=True)  # fmt: skip
    except OSError as err:
        print(f"error: cannot serve on port {args.port}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
