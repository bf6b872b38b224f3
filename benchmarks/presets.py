"""Time to an image: whole runs of the user-facing presets, this project against diffusers in the same run.

    python -m benchmarks.bench_canny2image --presets reference,dpmpp,lcm --resolution 512

A run is what a user waits for after the model is loaded: reading the image, Canny, text encoding, every
sampling step, decoding, the image as uint8. Load time (and LoRA fusing) is measured apart. The presets:

- ``reference``: DDIM, 20 steps, guidance 9 (the reference demo's settings), the full VAE decoder;
- ``dpmpp``: DPM-Solver++ 2M, 10 steps, guidance 9, the full VAE decoder;
- ``lcm``: LCM sampling, 4 steps, guidance 1 (one pass per step), an LCM-LoRA fused at scale 1 and the TAESD
  decoder.

The project runs its public pipeline (``Canny2Image.from_checkpoint(...)(image, params)``). diffusers runs its
``StableDiffusionControlNetPipeline`` built from the same weights (converted with its own utilities), with the
scheduler each sampler is proven equal to (``tests/diffusers_port.DIFFUSERS``), the LoRA loaded with
``load_lora_weights`` + ``fuse_lora`` and ``AutoencoderTiny``; it gets the same start noise, the same LCM step noise
and the same Canny map, so the two images agree to a few 8-bit levels. The weights are random (no download): the
full-size checkpoint of the per-step benchmark, a rank-64 kohya-layout LoRA on the UNet's attention, projection
and convolution layers and the text encoder (LCM-LoRA's shape), and a random TAESD (written once, next to the
checkpoint). Each preset and implementation runs in its own process: its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "test_imgs" / "astronaut.png"
SEED = 0
IMPLEMENTATIONS = ("project", "diffusers", "openvino", "openvino-int8", "sdcpp", "sdcpp-q8_0")


@dataclass(frozen=True)
class Preset:
    """One user-facing setting: sampler name (``ldm.models.diffusion.sampling.SAMPLERS``), steps, guidance scale,
    whether the LCM-LoRA is fused and whether TAESD decodes."""

    sampler: str
    steps: int
    scale: float
    lora: bool = False
    taesd: bool = False


PRESETS = {
    "reference": Preset("ddim", 20, 9.0),
    "dpmpp": Preset("dpmpp_2m", 10, 9.0),
    "lcm": Preset("lcm", 4, 1.0, lora=True, taesd=True),
}


def asset_paths(ckpt: Path) -> tuple[Path, Path]:
    """(the random LoRA file, the random TAESD folder), next to the benchmark checkpoint."""
    return ckpt.with_name("lcm_lora_random.safetensors"), ckpt.with_name("taesd_random")


def ensure_assets(config: Path, ckpt: Path) -> None:
    """Write the random LoRA (kohya layout, rank 64, UNet convolutions included) and the random TAESD (a diffusers
    ``AutoencoderTiny`` folder, with the public ``taesd_decoder.safetensors`` of its decoder inside) once."""
    lora, taesd = asset_paths(ckpt)
    if not lora.is_file():
        from cldm.model import load_model
        from tools.measure_lora_memory import write_random_lora

        print(f"writing the random LoRA {lora} (once) ...", file=sys.stderr)
        write_random_lora(load_model(config, ckpt), lora, rank=64, convs=True)
    if not (taesd / "taesd_decoder.safetensors").is_file():
        import safetensors.torch

        from ldm.models.taesd import diffusers_to_taesd
        from tests.diffusers_port import random_autoencoder_tiny

        print(f"writing the random TAESD {taesd} (once) ...", file=sys.stderr)
        model = random_autoencoder_tiny(0)
        model.save_pretrained(taesd)
        public = {k: v.contiguous() for k, v in diffusers_to_taesd(model.state_dict()).items()}
        safetensors.torch.save_file(public, str(taesd / "taesd_decoder.safetensors"))


def canny_map(resolution: int) -> Any:
    """The Canny map (HWC uint8) that both implementations condition on, made as the project's pipeline does."""
    from annotator.canny import CannyDetector
    from annotator.util import HWC3, resize_image
    from cldm.pipeline import read_image

    image = resize_image(HWC3(read_image(IMAGE)), resolution)
    return HWC3(CannyDetector()(image, 100, 200))


Stamp = Callable[[], None]


def timed_run(load: Callable[[], Any], make_image: Callable[[Any, Stamp], np.ndarray]) -> dict:
    """Time ``load()`` (``load_s``, ``load_peak_rss_gb``) and then ``make_image(loaded, stamp)``, which calls
    ``stamp()`` after each sampling step and returns the HWC uint8 image (``whole_s``; ``stamps``: seconds from its
    start)."""
    from .bench_canny2image import peak_rss_gb

    start = time.perf_counter()
    loaded = load()
    result: dict[str, Any] = {"load_s": time.perf_counter() - start, "load_peak_rss_gb": peak_rss_gb()}
    stamps: list[float] = []
    start = time.perf_counter()
    image = make_image(loaded, lambda: stamps.append(time.perf_counter()))
    result.update(whole_s=time.perf_counter() - start, stamps=[s - start for s in stamps], image=image)
    return result


def run_project(preset: Preset, config: Path, ckpt: Path, resolution: int, prompt: str, n_prompt: str) -> dict:
    """One image through ``Canny2Image``: load (with LoRA fusing) timed apart, then the whole call."""
    from cldm.pipeline import Canny2Image, CannyParams, read_image

    lora, taesd = asset_paths(ckpt)
    params = CannyParams(prompt=prompt, a_prompt="", n_prompt=n_prompt, image_resolution=resolution,
                         ddim_steps=preset.steps, sampler=preset.sampler, scale=preset.scale, seed=SEED)  # fmt: skip

    def load() -> Canny2Image:
        return Canny2Image.from_checkpoint(config, ckpt, torch.device("cpu"),
                                           loras=[(lora, 1.0)] if preset.lora else (),
                                           vae_decoder=f"taesd:{taesd}" if preset.taesd else None)  # fmt: skip

    def make_image(pipe: Canny2Image, stamp: Stamp) -> np.ndarray:
        return pipe(read_image(IMAGE), params, progress=False, callback=lambda i: stamp())[0][1]

    return timed_run(load, make_image)


def run_diffusers(preset: Preset, config: Path, ckpt: Path, resolution: int, prompt: str, n_prompt: str) -> dict:
    """The same image through diffusers' ``StableDiffusionControlNetPipeline``."""
    from PIL import Image

    def make_image(pipe: Any, stamp: Stamp) -> np.ndarray:
        edges = canny_map(resolution)
        height, width = edges.shape[:2]
        latents, generator = start_noise(height, width)

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            stamp()
            return kwargs

        with torch.no_grad():
            out = pipe(prompt, image=Image.fromarray(edges), height=height, width=width,
                       num_inference_steps=preset.steps, guidance_scale=preset.scale, negative_prompt=n_prompt,
                       latents=latents, generator=generator, controlnet_conditioning_scale=1.0, output_type="np",
                       callback_on_step_end=on_step).images  # fmt: skip
        return (out[0] * 255).round().clip(0, 255).astype("uint8")

    return timed_run(lambda: diffusers_pipeline(preset, config, ckpt), make_image)


def diffusers_pipeline(preset: Preset, config: Path, ckpt: Path) -> Any:
    """diffusers' ``StableDiffusionControlNetPipeline`` on the benchmark's weights, as the preset sets it up."""
    import diffusers
    from omegaconf import OmegaConf

    from cldm.checkpoint import load_state_dict
    from ldm.modules.encoders.modules import clip_text_config
    from ldm.modules.encoders.tokenizer import load_clip_tokenizer
    from tests.diffusers_port import convert_text_encoder, convert_to_diffusers, diffusers_scheduler

    lora, taesd = asset_paths(ckpt)
    state_dict = load_state_dict(ckpt)
    original = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    models = convert_to_diffusers(original, state_dict)
    text = convert_text_encoder(state_dict, clip_text_config("openai/clip-vit-large-patch14"))
    del state_dict
    vae = (diffusers.AutoencoderTiny.from_pretrained(taesd, local_files_only=True) if preset.taesd  # never the hub
           else models["vae"][0])  # fmt: skip
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text, tokenizer=load_clip_tokenizer(), unet=models["unet"][0],
        controlnet=models["controlnet"][0], scheduler=diffusers_scheduler(preset.sampler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    if preset.lora:
        pipe.load_lora_weights(str(lora), local_files_only=True)  # a missing file never becomes a hub name
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    pipe.set_progress_bar_config(disable=True)
    return pipe


def start_noise(height: int, width: int) -> tuple[Any, Any]:
    """(x_T [1, 4, h/8, w/8], the generator of the LCM step noise) as the project's pipeline draws them."""
    torch.manual_seed(SEED)
    latents = torch.randn(1, 4, height // 8, width // 8)
    return latents, torch.Generator().set_state(torch.get_rng_state())


class OpenVINOModels:
    """diffusers' ControlNet and UNet converted with ``openvino.convert_model`` (traced on the run's shapes) and
    compiled for the CPU; ``int8``: weights compressed to int8 with ``nncf.compress_weights`` first. Called as the
    pipeline's ControlNet + UNet pair: ``eps(x, t, context, hint)``."""

    def __init__(self, pipe: Any, batch: int, height: int, width: int, int8: bool):
        import openvino as ov

        h, w = height // 8, width // 8
        x, t = torch.randn(batch, 4, h, w), torch.tensor(500)
        context, hint = torch.randn(batch, 77, 768), torch.rand(batch, 3, height, width)
        with torch.no_grad():
            down, mid = pipe.controlnet(x, t, context, hint, return_dict=False)
        control = ov.convert_model(_ControlNetCall(pipe.controlnet), example_input=(x, t, context, hint))
        unet = ov.convert_model(_UNetCall(pipe.unet), example_input=(x, t, context, *down, mid))
        if int8:
            import nncf

            control, unet = nncf.compress_weights(control), nncf.compress_weights(unet)
        core = ov.Core()
        precision = {"INFERENCE_PRECISION_HINT": "f32"}  # never a lower compute precision behind the fp32 label
        self.control, self.unet = (core.compile_model(m, "CPU", precision) for m in (control, unet))

    def eps(self, x: Any, t: Any, context: Any, hint: Any) -> Any:
        args = [a.numpy() for a in (x, t.reshape(()).to(torch.int64), context, hint)]
        residuals = list(self.control(args).values())
        return torch.from_numpy(self.unet([*args[:3], *residuals])[0])


class _ControlNetCall(torch.nn.Module):
    def __init__(self, controlnet: Any):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, x: Any, t: Any, context: Any, hint: Any) -> tuple:
        down, mid = self.controlnet(x, t, context, hint, return_dict=False)
        return (*down, mid)


class _UNetCall(torch.nn.Module):
    def __init__(self, unet: Any):
        super().__init__()
        self.unet = unet

    def forward(self, x: Any, t: Any, context: Any, *residuals: Any) -> Any:
        return self.unet(x, t, context, down_block_additional_residuals=list(residuals[:-1]),
                         mid_block_additional_residual=residuals[-1], return_dict=False)[0]  # fmt: skip


def run_openvino(preset: Preset, config: Path, ckpt: Path, resolution: int, prompt: str, n_prompt: str,
                 int8: bool = False) -> dict:  # fmt: skip
    """The preset with OpenVINO's ControlNet + UNet (fp32, or int8 weights) in diffusers' scheduler loop; text
    encoding and decoding by diffusers' torch modules."""
    guided = preset.scale > 1.0

    def load() -> tuple[Any, OpenVINOModels]:
        pipe = diffusers_pipeline(preset, config, ckpt)
        height, width = canny_map(resolution).shape[:2]  # the shapes the graphs are traced on
        models = OpenVINOModels(pipe, 2 if guided else 1, height, width, int8)
        pipe.unet = pipe.controlnet = None  # the torch copies are done with
        return pipe, models

    def make_image(loaded: tuple[Any, OpenVINOModels], stamp: Stamp) -> np.ndarray:
        pipe, models = loaded
        edges = canny_map(resolution)
        hint = torch.from_numpy(edges).float().permute(2, 0, 1)[None] / 255.0
        x, generator = start_noise(*edges.shape[:2])
        scheduler = pipe.scheduler
        scheduler.set_timesteps(preset.steps)
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, guided, n_prompt)
            context = torch.cat([uncond, cond]) if guided else cond
            hints = torch.cat([hint] * context.shape[0])
            x = x * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                xin = scheduler.scale_model_input(torch.cat([x] * context.shape[0]), t)
                eps = models.eps(xin, t, context, hints)
                if guided:
                    e_uncond, e_cond = eps.chunk(2)
                    eps = e_uncond + preset.scale * (e_cond - e_uncond)
                x = scheduler.step(eps, t, x, generator=generator).prev_sample
                stamp()
            decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        return ((decoded[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()

    return timed_run(load, make_image)


SDCPP_SAMPLERS = {"ddim": "ddim_trailing", "dpmpp_2m": "dpm++2m", "lcm": "lcm"}  # its nearest sample methods


def sdcpp_files(ckpt: Path) -> tuple[Path, Path]:
    """The benchmark weights as stable-diffusion.cpp reads them, written once next to the checkpoint: the SD1.5
    part (UNet, VAE, CLIP keys) and the ControlNet part (the 1.1 ControlNet-only layout), both safetensors."""
    import safetensors.torch

    from cldm.checkpoint import load_state_dict

    base, control = ckpt.with_name("sd15_random.safetensors"), ckpt.with_name("controlnet_random.safetensors")
    if not (base.is_file() and control.is_file()):
        print(f"writing {base.name} and {control.name} for stable-diffusion.cpp (once) ...", file=sys.stderr)
        state = {k: v.contiguous() for k, v in load_state_dict(ckpt).items()}
        parts = {p: {k: v for k, v in state.items() if k.startswith("control_model.") == (p is control)}
                 for p in (base, control)}  # fmt: skip
        for path, tensors in parts.items():
            safetensors.torch.save_file(tensors, str(path))
    return base, control


def run_sdcpp(preset: Preset, config: Path, ckpt: Path, resolution: int, prompt: str, n_prompt: str,
              wtype: str = "f32") -> dict:  # fmt: skip
    """The preset in stable-diffusion.cpp (``stable-diffusion-cpp-python``), weights as ``wtype`` (``f32``, ``q8_0``),
    with its nearest sampler (``SDCPP_SAMPLERS``; DDIM is its ``ddim_trailing``), the same Canny map and settings;
    its own noise (its RNG), so its image is not comparable pixel for pixel. The LCM preset's LoRA goes through its
    LoRA folder, TAESD through ``taesd_path`` (the diffusers file, as its docs ask)."""
    from PIL import Image
    from stable_diffusion_cpp import StableDiffusion

    base, control = sdcpp_files(ckpt)
    lora, taesd = asset_paths(ckpt)

    def load() -> StableDiffusion:
        return StableDiffusion(model_path=str(base), control_net_path=str(control), wtype=wtype,
                               n_threads=torch.get_num_threads(),
                               lora_model_dir=str(lora.parent) if preset.lora else "",
                               taesd_path=str(taesd / "diffusion_pytorch_model.safetensors") if preset.taesd else "",
                               vae_decode_only=True, verbose=False)  # fmt: skip

    def make_image(sd: StableDiffusion, stamp: Stamp) -> np.ndarray:
        edges = canny_map(resolution)
        height, width = edges.shape[:2]

        def on_progress(step: int, steps: int, seconds: float) -> None:
            # its loading and decoding report progress too, and sampling reports step 0 before the first step
            if steps == preset.steps and step > 0:
                stamp()

        images = sd.generate_image(f"{prompt}<lora:{lora.stem}:1>" if preset.lora else prompt, n_prompt,
                                   width=width, height=height, cfg_scale=preset.scale,
                                   sample_method=SDCPP_SAMPLERS[preset.sampler], sample_steps=preset.steps,
                                   seed=SEED, control_image=Image.fromarray(edges), control_strength=1.0,
                                   progress_callback=on_progress)  # fmt: skip
        return np.asarray(images[0].convert("RGB"))

    return timed_run(load, make_image)


def worker(spec: str, args: argparse.Namespace) -> int:
    """``spec`` = ``PRESET:IMPLEMENTATION``: one run in this process, its figures saved to ``args.worker_out``."""
    from .bench_canny2image import CONFIG, N_PROMPT, PROMPT, peak_rss_gb

    name, implementation = spec.split(":")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = {"project": run_project, "diffusers": run_diffusers, "openvino": run_openvino,
           "openvino-int8": functools.partial(run_openvino, int8=True), "sdcpp": run_sdcpp,
           "sdcpp-q8_0": functools.partial(run_sdcpp, wtype="q8_0")}[implementation]  # fmt: skip
    result = run(PRESETS[name], CONFIG, args.ckpt, args.resolution, PROMPT, N_PROMPT)
    result["peak_rss_gb"] = peak_rss_gb()
    torch.save(result, args.worker_out)
    return 0


def run_worker(spec: str, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{spec.replace(':', '_')}.pt"
    cmd = [sys.executable, "-m", "benchmarks.bench_canny2image", "--worker", f"preset:{spec}", "--worker-out",
           str(out), "--ckpt", str(args.ckpt), "--resolution", str(args.resolution),
           "--threads", str(args.threads or 0)]  # fmt: skip
    print(f"running {spec} ...", file=sys.stderr)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise RuntimeError(f"{spec} failed")
    return torch.load(out, weights_only=False)


def summarize(name: str, runs: dict[str, dict]) -> list[dict]:
    """Rows for one preset: per implementation the median step (between step stamps; the first step also pages
    in the weights), the whole run, load time and peak RSS; the project's speed-up and image difference."""
    rows = []
    for implementation, r in runs.items():
        stamps = r["stamps"]
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        rows.append({"preset": name, "implementation": implementation, "whole_s": r["whole_s"],
                     "step_s": statistics.median(steps) if steps else stamps[0], "steps": len(stamps),
                     "load_s": r["load_s"], "load_peak_rss_gb": r["load_peak_rss_gb"],
                     "peak_rss_gb": r["peak_rss_gb"], "stamps_s": stamps,
                     "whole_s_runs": r.get("whole_s_runs", [r["whole_s"]])})  # fmt: skip
    if "project" in runs:  # the project's time over each other implementation's: below 1, that one is faster
        for row in rows:
            row["project_time_ratio"] = runs["project"]["whole_s"] / row["whole_s"]
    if "diffusers" in runs:  # every other implementation against diffusers
        theirs = runs["diffusers"]
        for row, (implementation, r) in zip(rows, runs.items()):
            if implementation != "diffusers":
                diff = int(np.abs(r["image"].astype(np.int16) - theirs["image"].astype(np.int16)).max())
                row |= {"speedup_vs_diffusers": theirs["whole_s"] / r["whole_s"], "max_diff_vs_diffusers": diff}
    return rows


def print_rows(rows: list[dict], meta: dict) -> None:
    print(f"\ntime to an image at {meta['resolution']}x{meta['resolution']}, {meta['threads']} threads; fp32 GEMM "
          f"{meta['gemm_gflops']:.0f} GFLOP/s before, {meta['gemm_gflops_after']:.0f} after"
          f"{'; one core kept busy' if meta['background_load'] else ''}"
          f"{f'; each row the median of {n} runs' if (n := meta.get('repeats', 1)) > 1 else ''}")  # fmt: skip
    print(f"{'preset':<10} {'run by':<13} {'steps':>5} {'s/step':>7} {'image s':>8} {'x diffusers':>11} "
          f"{'max diff':>8} {'project/it':>10} {'peak GB':>7} {'load s':>6}  runs s")  # fmt: skip
    for r in rows:
        speed = f"{r['speedup_vs_diffusers']:.2f}x" if "speedup_vs_diffusers" in r else ""
        diff = f"{r['max_diff_vs_diffusers']}/255" if "max_diff_vs_diffusers" in r else ""
        ratio = f"{r['project_time_ratio']:.2f}" if "project_time_ratio" in r else ""
        each = " ".join(f"{t:.1f}" for t in r["whole_s_runs"]) if len(r["whole_s_runs"]) > 1 else ""
        print(f"{r['preset']:<10} {r['implementation']:<13} {r['steps']:5d} {r['step_s']:7.2f} {r['whole_s']:8.1f} "
              f"{speed:>11} {diff:>8} {ratio:>10} {r['peak_rss_gb']:7.2f} {r['load_s']:6.1f}  {each}")  # fmt: skip
    whole = {r["preset"]: r["whole_s"] for r in rows if r["implementation"] == "project"}
    if "reference" in whole and "dpmpp" in whole:
        print(f"dpmpp / reference (project): {whole['dpmpp'] / whole['reference']:.2f}")


PEER_PACKAGES = {"openvino": ("openvino",), "openvino-int8": ("openvino", "nncf"), "sdcpp": ("stable_diffusion_cpp",),
                 "sdcpp-q8_0": ("stable_diffusion_cpp",)}  # fmt: skip


def available_peers(spec: str) -> list[str]:
    """The peers named in ``spec`` (comma-separated) whose packages import; a line on stderr for each skipped one."""
    import importlib.util

    peers = []
    for name in (x.strip() for x in spec.split(",") if x.strip()):
        if name not in PEER_PACKAGES:
            raise SystemExit(f"error: --peers: unknown peer {name!r} (choose from {', '.join(PEER_PACKAGES)})")
        missing = [m for m in PEER_PACKAGES[name] if importlib.util.find_spec(m) is None]
        if missing:
            print(f"skipping {name}: {', '.join(missing)} not installed", file=sys.stderr)
        else:
            peers.append(name)
    return peers


def run_presets(names: list[str], implementations: list[str], args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Every preset in ``names`` by every implementation, each run in its own process, ``args.repeats`` rounds
    alternating the order (so a drift in the machine's speed falls on both sides); per implementation the median
    whole time, the other figures from the run nearest it (:func:`median_run`)."""
    from .bench_canny2image import CONFIG

    ensure_assets(CONFIG, args.ckpt)
    rows = []
    for name in names:
        tries: dict[str, list[dict]] = {impl: [] for impl in implementations}
        for round_ in range(args.repeats):
            for impl in implementations if round_ % 2 == 0 else implementations[::-1]:
                tries[impl].append(run_worker(f"{name}:{impl}", args, tmp))
        rows += summarize(name, {impl: median_run(runs) for impl, runs in tries.items()})
    return rows


def median_run(runs: list[dict]) -> dict:
    """The run nearest the median whole time (the faster of two as near) with ``whole_s`` set to that median (of
    an even count: the mean of the middle two) and ``whole_s_runs``: every run's whole time in the order run."""
    median = statistics.median(r["whole_s"] for r in runs)
    nearest = min(runs, key=lambda r: (abs(r["whole_s"] - median), r["whole_s"]))
    return {**nearest, "whole_s": median, "whole_s_runs": [r["whole_s"] for r in runs]}
