"""Canny-to-image generation: the pipeline shared by ``cpu_canny2image.py`` and the Gradio page.

Same steps and defaults as the reference ``gradio_canny2image.py``'s ``process``: resize, Canny,
CLIP text encoding, DDIM (or another sampler of :data:`ldm.models.diffusion.sampling.SAMPLERS`) with
classifier-free guidance over UNet + ControlNet, VAE decode.
"""

from __future__ import annotations

import random
import struct
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

from annotator.util import resized_shape
from cldm.control import Control
from cldm.guidance import CFGDenoiser
from cldm.img2img import InitInputs, init_inputs, init_latents
from cldm.inference import InferencePath, use_path
from cldm.lora import FusedLora, apply_loras
from cldm.model import load_model
from cldm.units import ANNOTATORS, ControlUnit, control_maps, display_map, hint_tensor, load_extra_controlnet
from ldm.memory import release_mapped_weights
from ldm.models.diffusion.sampling import check_sampler, check_steps, denoise_steps, sample, sampling_steps
from ldm.models.taesd import TAESDDecoder, decoder_from_spec
from ldm.util import seed_everything

MAX_SEED = 2**31 - 1
T = TypeVar("T")
# The largest edge map / sample, in pixels: the square the largest --image-resolution gives (2048 x 2048). Sides
# are multiples of 64, so no side exceeds MAX_OUTPUT_PIXELS / 64 = 65536 (docs/image-size.md).
MAX_OUTPUT_SIDE = 2048
MAX_OUTPUT_PIXELS = MAX_OUTPUT_SIDE * MAX_OUTPUT_SIDE


class ParamError(ValueError):
    """A :class:`CannyParams` value out of range; ``name`` is the field at fault."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass
class CannyParams:
    """The reference demo's controls, with its defaults and ranges, and the sampler: a name of
    :data:`~ldm.models.diffusion.sampling.SAMPLERS` (``ddim``, the reference's, by default), with its own range of
    ``ddim_steps`` (:data:`~ldm.models.diffusion.sampling.MAX_STEPS`); ``eta`` is DDIM's only."""

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
    sampler: str = "ddim"
    denoise: float = 1.0  # img2img strength in (0, 1] (docs/img2img.md)
    annotator: str = "canny"  # the single unit's (cldm.units.ANNOTATORS)
    control_start: float = 0.0  # the single unit's step window (cldm.control.Control)
    control_end: float = 1.0

    RANGES = {
        "num_samples": (1, 12),
        "image_resolution": (64, MAX_OUTPUT_SIDE),
        "ddim_steps": (1, 1000),
        "strength": (0.0, 2.0),
        "scale": (0.1, 30.0),
        "seed": (-1, MAX_SEED),
        "eta": (0.0, 1.0),
        "low_threshold": (1, 255),
        "high_threshold": (1, 255),
        "control_start": (0.0, 1.0),
        "control_end": (0.0, 1.0),
    }

    def full_prompt(self) -> str:
        """``"prompt, a_prompt"`` as the reference builds it; without an added prompt, just the prompt (the
        reference would leave a trailing ", ", which the tiny demo's text encoder never saw in training)."""
        return f"{self.prompt}, {self.a_prompt}" if self.a_prompt else self.prompt

    def validate(self, image_size: tuple[int, int] | None = None, image_name: str = "the input image") -> None:
        """Raise :class:`ParamError` (a ``ValueError``) naming the first out-of-range parameter (an unknown
        sampler, a step count outside the sampler's range, a non-zero ``eta`` with a sampler other than DDIM
        included); with ``image_size`` (the input's ``(height, width)`` in pixels), ``ValueError`` also when the
        output would be over the size bound (:meth:`output_size`), naming ``image_name``."""
        for name, (lo, hi) in self.RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                flag = f"--{name.replace('_', '-')}"
                raise ParamError(name, f"{name} ({flag}) must be between {lo} and {hi}, got {value}")
        for name, check in (("sampler", lambda: check_sampler(self.sampler)),
                            ("ddim_steps", lambda: check_steps(self.sampler, self.ddim_steps))):  # fmt: skip
            try:
                check()
            except ValueError as err:
                raise ParamError(name, f"{name} (--{name.replace('_', '-')}): {err}") from None
        try:
            if self.denoise != 1.0:
                denoise_steps(sampling_steps(self.sampler, self.ddim_steps), self.denoise)
        except ValueError as err:
            raise ParamError("denoise", f"denoise (--denoise): {err}") from None
        if self.eta and self.sampler != "ddim":
            raise ParamError("eta", f"eta (--eta) applies to the ddim sampler only, got {self.eta} with {self.sampler}")
        if self.annotator not in ANNOTATORS:
            raise ParamError("annotator", f"annotator (--annotator) must be one of {', '.join(ANNOTATORS)}, "
                                          f"got {self.annotator!r}")  # fmt: skip
        if self.control_start > self.control_end:
            raise ParamError("control_start", f"control_start (--control-start, {self.control_start:g}) must not "
                                              f"exceed control_end (--control-end, {self.control_end:g})")  # fmt: skip
        if self.low_threshold > self.high_threshold:
            raise ParamError(
                "low_threshold",
                f"low_threshold ({self.low_threshold}) must not exceed high_threshold ({self.high_threshold})",
            )
        if image_size is not None:
            self.output_size(*image_size, image_name=image_name)

    def output_size(self, height: int, width: int, image_name: str = "the input image") -> tuple[int, int]:
        """``(H, W)`` in pixels of the edge map and samples for an input of ``height x width``: the short side
        scaled to ``image_resolution``, each side rounded to a multiple of 64 (the reference's ``resize_image``).

        The size bound: ``H * W <= MAX_OUTPUT_PIXELS`` (2048 x 2048), whatever the aspect ratio. Beyond it,
        ``ValueError`` naming ``image_name``, its size and the largest ``--image-resolution`` (a multiple of 64)
        that fits, if any; also for an empty input."""
        try:
            out_h, out_w = resized_shape(height, width, self.image_resolution)
        except ValueError as err:
            raise ValueError(f"{image_name}: {err}") from None
        if out_h * out_w <= MAX_OUTPUT_PIXELS:
            return out_h, out_w
        fits = [r for r in range(64, self.image_resolution, 64)
                if np.prod(resized_shape(height, width, r)) <= MAX_OUTPUT_PIXELS]  # fmt: skip
        advice = (f"use --image-resolution {fits[-1]} or less, or crop the image" if fits
                  else "crop the image: even --image-resolution 64 is over the bound")  # fmt: skip
        raise ValueError(
            f"{image_name}: {width}x{height} at image_resolution (--image-resolution) {self.image_resolution} "
            f"gives {out_w}x{out_h} = {out_w * out_h} pixels, over the limit of {MAX_OUTPUT_PIXELS} "
            f"({MAX_OUTPUT_SIDE}x{MAX_OUTPUT_SIDE}); {advice}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


# Value ranges a high-bit-depth image's data may imply, smallest first (see :func:`to_uint8`).
_FLOAT_RANGES = (1.0, 255.0, 65535.0)
_INT_RANGES = (255.0, 65535.0)


def to_uint8(values: np.ndarray, ranges: tuple[float, ...]) -> np.ndarray:
    """Scale one-channel numeric data to uint8, by the value range it implies.

    The range is the smallest of ``ranges`` holding the data when no value is negative (``1.0``: floats
    in [0, 1]; ``255``: 8-bit data stored wide; ``65535``: 16-bit data, e.g. a 16-bit PNG read as ``I``);
    anything else (negative values, or beyond the largest range) is stretched from its minimum to its maximum.
    Non-finite values count as 0. The result is ``round(value * 255 / range)``, never clipped data.
    """
    x = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    top = next((r for r in ranges if low >= 0.0 and high <= r), None)
    if top is None:
        x, top = x - low, max(high - low, 1e-12)
    return np.rint(x * (255.0 / top)).clip(0, 255).astype(np.uint8)


def image_array(img: Image.Image) -> np.ndarray:
    """One frame's pixels as :func:`read_image` returns them; ``ValueError`` for a mode Pillow cannot convert."""
    mode = img.mode
    if mode in ("L", "RGB", "RGBA"):
        return np.array(img)
    if mode.startswith("I;16"):  # I;16, I;16L, I;16B, I;16N: 16-bit, 0..65535
        return to_uint8(np.array(img), (65535.0,))
    if mode == "I":
        return to_uint8(np.array(img), _INT_RANGES)
    if mode == "F":
        return to_uint8(np.array(img), _FLOAT_RANGES)
    if mode == "1":
        return np.array(img.convert("L"))
    if mode == "LAB":  # Pillow's plain convert copies the channels; this is the colour conversion (D50 -> sRGB)
        to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return np.array(ImageCms.applyTransform(img, to_srgb))
    has_alpha = "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info
    try:
        return np.array(img.convert("RGBA" if has_alpha else "RGB"))
    except ValueError as err:  # e.g. La: Pillow has no conversion
        raise ValueError(f"image mode {mode} is not supported") from err


def read_image(path: str | Path, notify: Callable[[str], None] | None = None) -> np.ndarray:
    """The image at ``path`` as the uint8 array ``HWC3`` expects: ``H x W`` (gray), ``H x W x 3`` (RGB) or
    ``H x W x 4`` (RGBA, composited on white by ``HWC3``).

    Decoding is Pillow's. Every mode maps to 8 bits by scaling (16-bit: ``round(v / 257)``; ``I`` and ``F``: see
    :func:`to_uint8`); palette transparency and LA become RGBA; CMYK, YCbCr, HSV and LAB (as colour, through
    ``ImageCms``) become RGB. The EXIF orientation is applied. Of an animated or multi-page file the first frame
    is used, and ``notify`` (default: a line on stderr) is told so once. Raises ``ValueError`` naming the file
    if it is missing, unreadable, of an unsupported mode, or over Pillow's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``, its warning included).
    """

    def decode(img: Image.Image) -> tuple[np.ndarray, int]:
        frames = getattr(img, "n_frames", 1)
        img.seek(0)
        return image_array(ImageOps.exif_transpose(img)), frames

    pixels, frames = _with_image(path, decode)
    if frames > 1:
        (notify or _to_stderr)(f"{path}: {frames} frames, using the first")
    return pixels


_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` in pixels of the image :func:`read_image` would return, from the file's header alone
    (nothing is decoded; EXIF orientation applied); ``ValueError`` as :func:`read_image`."""

    def size(img: Image.Image) -> tuple[int, int]:
        width, height = img.size
        return (width, height) if img.getexif().get(ExifTags.Base.Orientation) in _ROTATED else (height, width)

    return _with_image(path, size)


def _with_image(path: str | Path, use: Callable[[Image.Image], T]) -> T:
    """``use(image)`` on the file opened with Pillow; each failure (missing, unreadable, over Pillow's
    decompression-bomb limit, or ``use``'s ``ValueError``) a ``ValueError`` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not an image")
    if not path.is_file():
        raise ValueError(f"{path}: input image not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return use(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path}: image too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels, "
                         "Pillow's decompression-bomb limit)") from err  # fmt: skip
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, struct.error) as err:
        raise ValueError(f"{path}: cannot read image ({err.__class__.__name__})") from err


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


class Canny2Image:
    """Loaded model + inference path; call with an image and :class:`CannyParams`.

    With the path's ``page_out`` (the fast path's default), each stage's memory-mapped weights (text encoder,
    UNet + ControlNet, VAE) leave RAM once the stage is done (:func:`release_mapped_weights`) and are read back
    from the page cache on the next call, so the process holds one stage's weights at a time.
    """

    def __init__(
        self, model: torch.nn.Module, device: torch.device, path: InferencePath | str = "fast",
        vae_decoder: TAESDDecoder | str | None = None,
    ):  # fmt: skip
        """``vae_decoder``: ``None`` or ``"full"`` (the model's VAE, ``decode_first_stage``), ``"taesd:PATH"`` or a
        :class:`TAESDDecoder` (used for the images; ``model.decode_first_stage`` stays the VAE). ``ValueError`` for
        another spec or a decoder whose latent channels are not the model's; ``CheckpointError`` for its file."""
        self.model = model
        self.device = device
        self.path = use_path(model, path)
        decoder = decoder_from_spec(vae_decoder)
        if decoder is not None and decoder.latent_channels != model.first_stage_model.embed_dim:
            raise ValueError(f"--vae-decoder: a TAESD decoder for {decoder.latent_channels}-channel latents, the "
                             f"model's have {model.first_stage_model.embed_dim}")  # fmt: skip
        self.vae_decoder = None if decoder is None else decoder.to(device)
        self.loras: list[FusedLora] = []  # LoRA files fused into the model (from_checkpoint's loras)

    @classmethod
    def from_checkpoint(
        cls, config: str | Path, ckpt: str | Path, device: torch.device, low_memory: bool = False,
        path: InferencePath | str = "fast", vae_decoder: TAESDDecoder | str | None = None,
        base_ckpt: str | Path | None = None, base_ema: bool = False, notify: Callable[[str], None] | None = None,
        loras: Sequence[tuple[str | Path, float]] = (), lora_controlnet: bool = False,
    ) -> Canny2Image:  # fmt: skip
        """Load the model (``low_memory``: bfloat16 weights, float32 compute; ``base_ckpt``, ``base_ema``,
        ``notify``: the Stable Diffusion base, see :func:`cldm.model.load_model`), fuse ``loras`` ((file, scale)
        pairs in order, :func:`cldm.lora.apply_lora`; ``lora_controlnet``: the ControlNet's copies too; the reports
        in ``.loras``) and wrap it (``path``: see :mod:`cldm.inference`; ``vae_decoder``: see :class:`Canny2Image`,
        a TAESD file read before the model). Raises :class:`~cldm.checkpoint.CheckpointError` as ``load_model``,
        and :class:`cldm.lora.LoraError` (a ``ValueError``) naming a LoRA file that cannot be used."""
        decoder = decoder_from_spec(vae_decoder)
        model = load_model(config, ckpt, device=device, low_memory=low_memory, base_ckpt=base_ckpt,
                           base_ema=base_ema, notify=notify)  # fmt: skip
        fused = apply_loras(model, loras, controlnet=lora_controlnet)
        pipe = cls(model, device, path, decoder)
        pipe.loras = fused
        return pipe

    def _done_with(self, *modules: torch.nn.Module) -> None:
        if self.path.page_out:
            release_mapped_weights(*modules)

    def _check_prompt_length(self, params: CannyParams, notify: Callable[[str], None]) -> None:
        encoder = self.model.cond_stage_model
        prompt = "prompt with the added prompt" if params.a_prompt else "prompt"
        long = [(name, n) for name, text in ((prompt, params.full_prompt()), ("negative prompt", params.n_prompt))
                if (n := encoder.count_tokens(text)) > encoder.max_length]  # fmt: skip
        if long:
            said = " and ".join(f"the {name} is {n} tokens" for name, n in long)
            notify(f"{said}: the text encoder reads the first {encoder.max_length} (start and end included), "
                   "the rest is ignored")  # fmt: skip

    @staticmethod
    def _say_idle_inputs(start: InitInputs, params: CannyParams, notify: Callable[[str], None]) -> None:
        """Tell of an init image or mask that cannot change the result: an init image at denoise 1 without a
        mask (the run starts from pure noise, as diffusers' img2img at strength 1), a mask without white."""
        if start.mask is None and params.denoise == 1.0:
            notify("init image (--init-image): at denoise 1 the run starts from pure noise and the init image has no "
                   "effect; a denoise below 1 (--denoise) keeps some of it")  # fmt: skip
        elif start.mask is not None and not bool(start.mask.any()):
            notify("mask (--mask): no white (repaint) pixels, so the init image is kept as it is")

    def sampling_steps(self, ddim_steps: int, sampler: str = "ddim") -> int:
        """Denoiser steps a run of ``ddim_steps`` with ``sampler`` takes (the reference's DDIM schedule visits 31
        for 30; the other samplers take ``ddim_steps``)."""
        return sampling_steps(sampler, ddim_steps, self.model.num_timesteps)

    def steps_run(self, params: CannyParams) -> int:
        """Denoiser steps a run of ``params`` takes: :meth:`sampling_steps`, of which img2img runs the last
        ``int(n * denoise)`` (``ValueError`` when none run)."""
        return denoise_steps(self.sampling_steps(params.ddim_steps, params.sampler), params.denoise)

    def edges(self, input_image: np.ndarray, params: CannyParams) -> np.ndarray:
        """The single unit's resized HWC uint8 hint map (Canny: white edges on black), as fed to the ControlNet,
        of ``params.output_size`` (``ValueError`` over the size bound)."""
        params.validate(input_image.shape[:2])
        return control_maps([ControlUnit.from_params(params)], input_image, params.image_resolution, _to_stderr)[0]

    def load_controlnet(self, config: str | Path, ckpt: str | Path, low_memory: bool = False) -> torch.nn.Module:
        """A further ControlNet for :class:`~cldm.units.ControlUnit` (any layout the loader reads; a difference
        file against this model's UNet), on this pipeline's inference path. ``CheckpointError`` naming the file."""
        return load_extra_controlnet(self.model, config, ckpt, self.path, low_memory)

    @torch.no_grad()
    def __call__(
        self,
        input_image: np.ndarray,
        params: CannyParams,
        callback: Callable[[int], None] | None = None,
        progress: bool = True,
        notify: Callable[[str], None] | None = None,
        init_image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        units: Sequence[ControlUnit] | None = None,
    ) -> tuple[list[np.ndarray], int]:
        """Return ``([map_1, ..., map_k, sample_1, ...], seed)``: HWC uint8 images, as the reference demo: one
        shown map per control unit (:func:`cldm.units.display_map`: ``255 - edge map`` for Canny), then the samples.

        img2img / inpainting (docs/img2img.md): ``init_image`` (uint8 HWC/HW, resized to the output size) with
        ``params.denoise``; ``mask`` (uint8 HWC/HW, white = repaint); without ``init_image``, a mask or a denoise
        below 1 starts from ``input_image`` (:func:`cldm.img2img.init_inputs`; ``ValueError`` naming the init
        image or the mask when one is not an image or the mask's aspect ratio is not the init image's).
        ``units``: the ControlNets of the run (:class:`~cldm.units.ControlUnit`; their residuals add up); default:
        the single unit of ``params`` on ``input_image`` with the model's ControlNet. A unit without an image takes
        ``input_image``; the first unit's image sets the output size; the other maps are resized to it
        (:func:`cldm.units.control_maps`, which ``notify`` tells).
        ``ValueError`` for parameters or units out of range or an output over the size bound
        (:meth:`CannyParams.validate`). A prompt longer than the text encoder reads is cut as the reference does;
        ``notify`` (default: a line on stderr) is told so once per call."""
        notify = notify or _to_stderr
        units = [ControlUnit.from_params(params)] if units is None else list(units)
        first = input_image if not units or units[0].image is None else units[0].image
        params.validate(None if first is None else first.shape[:2])
        self._check_prompt_length(params, notify)
        maps = control_maps(units, input_image, params.image_resolution, notify)
        height, width = maps[0].shape[:2]
        start = None
        if init_image is not None or mask is not None or params.denoise != 1.0:
            start = init_inputs(input_image, init_image, mask, (height, width), "init_image (--init-image)",
                                "mask (--mask)", notify)  # fmt: skip
            self._say_idle_inputs(start, params, notify)
        n = params.num_samples
        seed = random.randint(0, 65535) if params.seed == -1 else params.seed
        seed_everything(seed)
        model = self.model
        cond = model.get_learned_conditioning([params.full_prompt()] * n)
        # guidance 1 mixes nothing: no unconditional pass, so no negative prompt to encode (as diffusers)
        uncond = model.get_learned_conditioning([params.n_prompt] * n) if params.scale != 1.0 else None
        self._done_with(model.cond_stage_model)
        controls = [Control.from_strength(unit.controlnet or model.control_model, hint_tensor(hint, n, self.device),
                                          unit.strength, unit.guess_mode, uncond_hint=params.uncond_hint,
                                          cache=self.path.reuse_hint, start=unit.start, end=unit.end)
                    for unit, hint in zip(units, maps)]  # fmt: skip
        steps = self.steps_run(params)
        idle = [f"control {i}" for i, c in enumerate(controls, 1) if not any(c.active(k, steps) for k in range(steps))]
        if idle:
            notify(f"{', '.join(idle)}: the step window holds none of the {steps} steps; that ControlNet is not run")
        denoise = CFGDenoiser(model, cond, uncond, params.scale, controls, batch_cfg=self.path.batch_cfg)
        x_t = torch.randn((n, 4, height // 8, width // 8), device=self.device)
        # euler_a's and lcm's step noise: the seeded CPU stream, continued after the start noise
        step_noise = torch.Generator().set_state(torch.get_rng_state())
        init = None if start is None else init_latents(model, start, x_t, params.denoise)
        samples = sample(params.sampler, denoise, x_t, model.alphas_cumprod, params.ddim_steps, eta=params.eta,
                         generator=step_noise, init=init, progress=progress,
                         callback=None if callback is None else lambda i, x, x0: callback(i))  # fmt: skip
        self._done_with(model.model, model.control_model, *{c.model for c in controls})
        x_samples = self.decode(samples)
        x_samples = (x_samples.permute(0, 2, 3, 1) * 127.5 + 127.5).cpu().numpy().clip(0, 255).astype(np.uint8)
        x_samples = x_samples if start is None else start.overlay(x_samples)
        shown = [display_map(hint, unit.annotator) for unit, hint in zip(units, maps)]
        return shown + [x_samples[i] for i in range(n)], seed

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``z`` [B, 4, h, w] as sampled -> images [B, 3, 8h, 8w] roughly in [-1, 1]: the VAE
        (``decode_first_stage``, its weights then released as the path says) or the TAESD decoder (float32)."""
        if self.vae_decoder is not None:
            return self.vae_decoder.decode(z.float())
        x = self.model.decode_first_stage(z)
        self._done_with(self.model.first_stage_model)
        return x
