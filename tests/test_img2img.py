"""img2img and latent-blending inpainting with a ControlNet (``InitLatents``, ``--init-image``/``--mask``/
``--denoise``): every sampler against diffusers' ``StableDiffusionControlNetImg2ImgPipeline`` and
``StableDiffusionControlNetInpaintPipeline`` (legacy blending, 4-channel UNet) on the same random tiny weights,
init latents and noise; the kept latents of an all-black mask; the shipped tiny demo's inpainting; bad input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from cldm.control import Control
from cldm.guidance import CFGDenoiser
from ldm.models.diffusion.sampling import SAMPLERS, InitLatents, sample
from tests.conftest import TINY_CONFIG, random_tiny_model
from tests.diffusers_port import convert_to_diffusers
from tests.test_samplers import DIFFUSERS, SD15_SCHEDULER_CONFIG

TOL = 1e-4
SCALE = 3.0
BATCH, LATENT = 2, 8
STEPS = {name: 4 if name == "lcm" else 10 for name in SAMPLERS}
SCHEDULERS = {"ddim": ("DDIMScheduler", {}), **DIFFUSERS}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_tiny_model()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    """Contexts [2, 77, 32], hint [2, 3, 64, 64] in [0, 1], init latents [2, 4, 8, 8] (of the size of real ones),
    a pixel mask [2, 1, 64, 64] constant on 8 x 8 blocks (white = repaint) and its latent mask [2, 1, 8, 8]."""
    g = torch.Generator().manual_seed(5)
    latent_mask = (torch.rand(BATCH, 1, LATENT, LATENT, generator=g) > 0.5).float()
    return {
        "cond": torch.randn(BATCH, 77, 32, generator=g), "uncond": torch.randn(BATCH, 77, 32, generator=g),
        "hint": torch.rand(BATCH, 3, 8 * LATENT, 8 * LATENT, generator=g),
        "init": 2.0 * torch.randn(BATCH, 4, LATENT, LATENT, generator=g),
        "latent_mask": latent_mask, "pixel_mask": latent_mask.repeat_interleave(8, 2).repeat_interleave(8, 3),
    }  # fmt: skip


@pytest.fixture(scope="module")
def pipelines(model: torch.nn.Module) -> dict[str, Any]:
    """diffusers' ControlNet img2img and inpaint pipelines on the model's weights (converted; no text encoder:
    the tests give the prompt embeddings)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
    original = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG), resolve=True)
    with torch.random.fork_rng():
        parts = {name: part for name, (part, _) in convert_to_diffusers(original, model.state_dict()).items()}
    common = {"text_encoder": None, "tokenizer": None, "safety_checker": None, "feature_extractor": None,
              "requires_safety_checker": False}  # fmt: skip
    return {
        "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline(**parts, scheduler=None, **common),
        "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline(**parts, scheduler=None, **common),
    }


def denoiser(model: torch.nn.Module, inputs: dict) -> CFGDenoiser:
    control = Control(model.control_model, inputs["hint"], [1.0] * 13)
    return CFGDenoiser(model, inputs["cond"], inputs["uncond"], SCALE, [control])


@torch.no_grad()
def diffusers_run(pipelines: dict, name: str, inputs: dict, strength: float, inpaint: bool, seed: int) -> torch.Tensor:
    """The final latents of diffusers' pipeline (``output_type="latent"``): img2img takes the init latents as its
    image; inpaint gets them from a stubbed ``_encode_vae_image`` (its image is then unused pixels) and the pixel
    mask, which its nearest-neighbour resize turns into the latent mask."""
    diffusers = pytest.importorskip("diffusers")
    cls_name, overrides = SCHEDULERS[name]
    pipe = pipelines["inpaint" if inpaint else "img2img"]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(SD15_SCHEDULER_CONFIG, **overrides)
    common = {"prompt_embeds": inputs["cond"], "negative_prompt_embeds": inputs["uncond"], "strength": strength,
              "control_image": inputs["hint"], "controlnet_conditioning_scale": 1.0,  # its default is 0.8
              "num_inference_steps": STEPS[name], "guidance_scale": SCALE,
              "generator": torch.Generator().manual_seed(seed), "output_type": "latent"}  # fmt: skip
    if not inpaint:
        return pipe(image=inputs["init"], **common).images
    pipe._encode_vae_image = lambda image, generator: inputs["init"]
    pixels = torch.zeros(BATCH, 3, 8 * LATENT, 8 * LATENT)
    return pipe(image=pixels, mask_image=inputs["pixel_mask"], **common).images


def our_run(model: torch.nn.Module, name: str, inputs: dict, strength: float, mask: torch.Tensor | None,
            seed: int, seen: list[int] | None = None) -> torch.Tensor:  # fmt: skip
    """``sample`` with :class:`InitLatents`: the noise is the seeded generator's first draw, the step noise its
    continuation (the diffusers pipelines' order)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(inputs["init"].shape, generator=generator)
    denoise: Callable = denoiser(model, inputs)
    if seen is not None:
        guided = denoise

        def denoise(x: torch.Tensor, t: torch.Tensor, step: int, steps: int) -> torch.Tensor:
            seen.append(int(t[0]))
            return guided(x, t, step, steps)

    init = InitLatents(inputs["init"], noise, strength, mask)
    return sample(name, denoise, noise, model.alphas_cumprod, STEPS[name], generator=generator, init=init,
                  progress=False)  # fmt: skip


CASES = [(name, 0.6) for name in SAMPLERS] + [("ddim", 1.0), ("dpmpp_2m_karras", 0.35), ("euler_a", 1.0)]


@pytest.mark.parametrize(("name", "strength"), CASES)
@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_matches_diffusers_controlnet_pipelines(
    model: torch.nn.Module, pipelines: dict, inputs: dict, name: str, strength: float, inpaint: bool
) -> None:
    theirs = diffusers_run(pipelines, name, inputs, strength, inpaint, seed=7)
    seen: list[int] = []
    ours = our_run(model, name, inputs, strength, inputs["latent_mask"] if inpaint else None, seed=7, seen=seen)
    assert len(seen) == int(STEPS[name] * strength)
    assert seen == pipelines["inpaint" if inpaint else "img2img"].scheduler.timesteps[-len(seen) :].tolist()
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"{name} at {strength}, {'inpaint' if inpaint else 'img2img'}: max abs diff {diff:.3g}"
    assert (ours - inputs["init"]).abs().max().item() > 0.1  # the run changed the latents
    if inpaint:  # the kept cells are the init latents exactly
        kept = inputs["latent_mask"].expand_as(ours) == 0
        assert torch.equal(ours[kept], inputs["init"][kept])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_all_black_mask_keeps_the_init_latents(model: torch.nn.Module, inputs: dict, name: str) -> None:
    mask = torch.zeros(1, 1, LATENT, LATENT)
    for strength in (0.5, 1.0):
        assert torch.equal(our_run(model, name, inputs, strength, mask, seed=3), inputs["init"])


def test_strength_that_runs_no_step_is_refused(inputs: dict) -> None:
    init = InitLatents(inputs["init"], inputs["init"], 0.05)
    with pytest.raises(ValueError, match="runs no step"):
        init.steps_run(10)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        InitLatents(inputs["init"], inputs["init"], 1.5).steps_run(10)


def test_full_strength_img2img_starts_from_the_noised_init() -> None:
    """Without a mask, strength 1 runs every step from the init noised to the first timestep (diffusers' img2img);
    with a mask, from the noise alone (diffusers' inpaint)."""
    acp = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0).float()
    first: list[torch.Tensor] = []

    def denoise(x: torch.Tensor, t: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        if step == 0:
            first.append(x.clone())
        return torch.zeros_like(x)

    latents, noise = torch.ones(1, 4, 2, 2), torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    for mask in (None, torch.ones(1, 1, 2, 2)):
        sample("ddim", denoise, noise, acp, 10, init=InitLatents(latents, noise, 1.0, mask), progress=False)
    a = float(acp[901])
    assert torch.allclose(first[0], a**0.5 * latents + (1 - a) ** 0.5 * noise, atol=1e-6)
    assert torch.equal(first[1], noise)
