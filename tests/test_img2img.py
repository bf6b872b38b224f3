"""img2img and latent-blending inpainting with a ControlNet (``InitLatents``, ``--init-image``/``--mask``/
``--denoise``): every sampler against diffusers' ``StableDiffusionControlNetImg2ImgPipeline`` and
``StableDiffusionControlNetInpaintPipeline`` (legacy blending, 4-channel UNet) on the same random tiny weights,
init latents and noise; the kept latents of an all-black mask; the shipped tiny demo's inpainting; bad input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import cpu_canny2image
from cldm.control import Control
from cldm.guidance import CFGDenoiser
from cldm.img2img import InitInputError, init_inputs
from cldm.pipeline import Canny2Image, ParamError, read_image
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import SAMPLERS, InitLatents, denoise_steps, sample
from share import DEMO_CKPT, DEMO_IMAGE, demo_params
from tests.conftest import TINY_CONFIG, random_tiny_model
from tests.diffusers_port import convert_to_diffusers, diffusers_scheduler
from tools.make_fill50k import COLORS

TOL = 1e-4
SCALE = 3.0
BATCH, LATENT = 2, 8
STEPS = {name: 4 if name == "lcm" else 10 for name in SAMPLERS}


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
    pytest.importorskip("diffusers")
    pipe = pipelines["inpaint" if inpaint else "img2img"]
    pipe.scheduler = diffusers_scheduler(name)
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


def test_denoise_steps() -> None:
    assert [denoise_steps(10, s) for s in (1.0, 0.6, 0.35, 0.1)] == [10, 6, 3, 1]
    with pytest.raises(ValueError, match="runs no step"):
        denoise_steps(10, 0.05)
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            denoise_steps(10, strength)


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


@pytest.fixture(scope="module")
def demo() -> Canny2Image:
    """The shipped tiny demo (a trained 64 px model)."""
    return Canny2Image.from_checkpoint(TINY_CONFIG, DEMO_CKPT, torch.device("cpu"))


@pytest.fixture(scope="module")
def disc() -> dict[str, np.ndarray]:
    """The demo's input (test_imgs/disc.png, 512 px: an orange disc on gray), an init image with the disc red on
    blue and the mask of the disc (white inside)."""
    image = read_image(DEMO_IMAGE)
    inside = image[..., 0] > 128
    init = np.where(inside[..., None], np.uint8([255, 0, 0]), np.uint8([0, 0, 255])).astype(np.uint8)
    return {"image": image, "init": init, "mask": (inside * 255).astype(np.uint8)}


def colour_distance(pixels: np.ndarray, name: str) -> float:
    return float(np.abs(pixels.reshape(-1, 3).astype(np.float64).mean(0) - np.array(COLORS[name])).max())


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_tiny_demo_inpaints_the_disc_and_keeps_the_rest(demo: Canny2Image, disc: dict, sampler: str) -> None:
    """The prompt names another circle colour and another background: the disc is repainted in the circle colour,
    the outside keeps the init's blue. In latents the kept cells are the init's (tested against diffusers above);
    in pixels, the tiny VAE decoder spreads the repainted cells' colour over the whole 64 px image (its mid-block
    attention is global), so the kept pixels are set back to the init's: they equal it, the round trip's error is
    zero there."""
    params = demo_params(prompt="green circle with yellow background", seed=1, ddim_steps=20, sampler=sampler)
    out = demo(disc["image"], params, progress=False, init_image=disc["init"], mask=disc["mask"])[0][1]
    size = out.shape[1::-1]
    init = cv2.resize(disc["init"], size, interpolation=cv2.INTER_AREA)
    inside = cv2.resize(disc["mask"], size, interpolation=cv2.INTER_AREA) >= 128
    assert np.array_equal(out[~inside], init[~inside])
    core = cv2.erode(inside.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0  # away from the outline
    assert core.sum() > 200
    assert colour_distance(out[core], "green") < 50 < colour_distance(out[core], "red")
    plain = demo(disc["image"], params, progress=False)[0][1]  # without the mask the prompt's yellow fills the rest
    assert colour_distance(plain[~inside], "yellow") < 50


def test_tiny_demo_mask_without_init_image_keeps_the_input(demo: Canny2Image, disc: dict) -> None:
    """A mask alone: the init image is the input image; an all-black mask returns the input's pixels."""
    params = demo_params(seed=2, ddim_steps=4)
    out = demo(disc["image"], params, progress=False, mask=np.zeros((32, 32), np.uint8))[0][1]
    assert np.array_equal(out, cv2.resize(disc["image"], (64, 64), interpolation=cv2.INTER_AREA))


def test_tiny_demo_img2img_keeps_more_of_the_init_at_lower_denoise(demo: Canny2Image, disc: dict) -> None:
    """img2img: the lower the strength, the closer the sample stays to the init image (mean abs difference)."""
    init = cv2.resize(disc["init"], (64, 64), interpolation=cv2.INTER_AREA).astype(np.float64)
    diffs = []
    for denoise in (0.3, 0.6, 1.0):
        params = demo_params(prompt="green circle with yellow background", seed=3, ddim_steps=10, denoise=denoise)
        out = demo(disc["image"], params, progress=False, init_image=disc["init"])[0][1]
        diffs.append(float(np.abs(out - init).mean()))
    assert diffs[0] < diffs[1] < diffs[2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask": np.zeros((64, 32), np.uint8)}, r"mask \(--mask\): 32x64 has another aspect ratio than init_image"),
        ({"mask": np.zeros((64, 64), np.float32)}, r"mask \(--mask\): not an image .*float32"),
        ({"mask": "mask.png"}, r"mask \(--mask\): not an image .*str"),
        ({"init_image": np.zeros((64, 64, 2), np.uint8)}, r"init_image \(--init-image\): not an image"),
    ],
)
def test_bad_init_inputs_are_named(demo: Canny2Image, disc: dict, kwargs: dict, message: str) -> None:
    kwargs = {"init_image": disc["init"], **kwargs}
    with pytest.raises(InitInputError, match=message):
        demo(disc["image"], demo_params(), progress=False, **kwargs)


@pytest.mark.parametrize(("denoise", "message"), [(0.0, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"), (0.04, "no step")])
def test_denoise_is_checked(denoise: float, message: str) -> None:
    with pytest.raises(ParamError, match=rf"denoise \(--denoise\): .*{message}") as err:
        demo_params(denoise=denoise).validate()
    assert err.value.name == "denoise"


def test_mask_with_rounded_sides_is_accepted() -> None:
    """One pixel off the init's aspect ratio is rounding: accepted."""
    image = np.zeros((300, 451, 3), np.uint8)
    inputs = init_inputs(image, None, np.full((100, 150), 255, np.uint8), (64, 128))
    assert inputs.mask is not None and inputs.mask.shape == (1, 1, 8, 16) and bool(inputs.mask.all())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mask", "missing.png"], "--mask: missing.png: input image not found"),
        (["--init-image", "missing.png"], "--init-image: missing.png: input image not found"),
        (["--denoise", "0"], "denoise (--denoise)"),
        (["--denoise", "2"], "denoise (--denoise)"),
        (["--mask", "WIDE"], "has another aspect ratio"),
        (["--mask", "TEXT"], "cannot read image"),
    ],
)
def test_cli_bad_img2img_input_is_one_line_exit_2(
    capsys: pytest.CaptureFixture, tmp_path: Path, extra: list[str], message: str
) -> None:
    (tmp_path / "text.png").write_text("not an image")
    Image.new("L", (20, 10)).save(tmp_path / "wide.png")
    extra = [str(tmp_path / f"{e.lower()}.png") if e in ("WIDE", "TEXT") else e for e in extra]
    code = cpu_canny2image.main(["--demo", "-o", str(tmp_path / "out"), *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if not line.startswith(("demo:", "note:"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_reference_ddim_sampler_mask_and_x0_follow_ldm(tiny_model: torch.nn.Module, monkeypatch: Any) -> None:
    """``DDIMSampler.sample(mask=, x0=)``: before each step, ``q_sample(x0, t)`` with fresh global-generator noise
    where ``mask`` is 1, the running latents where it is 0 (ldm's ``ddim.py``); an all-zero mask changes nothing."""
    model = tiny_model
    cond = {"c_concat": [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))],
            "c_crossattn": [model.get_learned_conditioning(["x"])]}  # fmt: skip
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    seen: list[tuple[torch.Tensor, int]] = []
    apply_model = model.apply_model
    monkeypatch.setattr(model, "apply_model", lambda x, t, c, **kw: seen.append((x.clone(), int(t[0]))) or
                        apply_model(x, t, c, **kw))  # fmt: skip
    torch.manual_seed(3)
    DDIMSampler(model).sample(4, 1, (4, 8, 8), cond, x_T=x_T, mask=mask, x0=x0, progress=False, verbose=False)
    torch.manual_seed(3)
    for x, t in seen:  # the draws in order: the blend's noise, then DDIM's step noise (zero weight at eta 0)
        expected = model.q_sample(x0, torch.tensor([t]), torch.randn_like(x0))
        torch.randn(x0.shape)
        assert torch.equal(x[..., :4], expected[..., :4])
    assert torch.equal(seen[0][0][..., 4:], x_T[..., 4:])
    torch.manual_seed(3)
    plain, _ = DDIMSampler(model).sample(4, 1, (4, 8, 8), cond, x_T=x_T, progress=False, verbose=False)
    blended, _ = DDIMSampler(model).sample(4, 1, (4, 8, 8), cond, x_T=x_T, mask=torch.zeros(1, 1, 8, 8), x0=x0,
                                           progress=False, verbose=False)  # fmt: skip
    assert torch.equal(plain, blended)


def png(path: Path, width: int, height: int, value: int = 255) -> str:
    Image.new("L", (width, height), value).save(path)
    return str(path)


@pytest.mark.parametrize(
    ("init", "mask", "denoise", "at", "message"),
    [
        (None, None, 1.0, None, ""),
        ((64, 64), (32, 32), 0.5, None, ""),
        (None, (40, 20), 1.0, "mask", "mask: 40x20 has another aspect ratio than the init image (64x64)"),
        ((128, 64), (64, 64), 1.0, "mask", "mask: 64x64 has another aspect ratio than the init image (128x64)"),
        ("broken", None, 1.0, "init_image", "broken.png: cannot read image"),
        (None, None, 0.0, "denoise", "denoise must be between 0.01 and 1 on this page"),
        (None, None, 0.02, "denoise", "denoise (--denoise): denoise 0.02 of 20 steps runs no step"),
    ],
)
def test_page_validator_checks_the_init_image_mask_and_denoise(
    tmp_path: Path, init: Any, mask: Any, denoise: float, at: str | None, message: str
) -> None:
    """The page's img2img inputs: the message on the input at fault, before the request is queued."""
    gradio_canny2image = pytest.importorskip("gradio_canny2image")
    pytest.importorskip("gradio")
    uploads = {}
    for name, size in (("init_image", init), ("mask", mask)):
        if size == "broken":
            (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
            uploads[name] = str(tmp_path / "broken.png")
        elif size is not None:
            uploads[name] = png(tmp_path / f"{name}.png", *size)
    given = [png(tmp_path / "input.png", 64, 64), "red circle", "", "", 1, 64, 20, False, 1.0, 9.0, 1, 0.0, 100,
             200, "ddim", denoise, uploads.get("init_image"), uploads.get("mask")]  # fmt: skip
    verdicts = gradio_canny2image.make_validator(limits={"denoise": (0.01, 1.0)})(*given)
    assert [v["is_valid"] for v in verdicts] == [name != at for name in gradio_canny2image.INPUTS[: len(given)]]
    (said,) = [v["message"] for v in verdicts if not v["is_valid"]] or [""]
    assert message in said if message else said == ""


def test_page_process_inpaints_with_the_uploads(demo: Canny2Image, disc: dict, tmp_path: Path) -> None:
    """The page's process with a mask upload and no init image: the input image is kept outside the mask."""
    gradio_canny2image = pytest.importorskip("gradio_canny2image")
    pytest.importorskip("gradio")
    Image.fromarray(disc["mask"]).save(tmp_path / "mask.png")
    process = gradio_canny2image.make_process(demo, uncond_hint=False)
    given = [str(DEMO_IMAGE), "green circle with blue background", "", "", 1, 64, 4, False, 1.0, 5.0, 1, 0.0, 100,
             200, "ddim", 1.0, None, str(tmp_path / "mask.png")]  # fmt: skip
    out = process(*given, progress=lambda *a, **k: None)[1]
    keep = cv2.resize(disc["mask"], (64, 64), interpolation=cv2.INTER_AREA) < 128
    assert np.array_equal(out[keep], cv2.resize(disc["image"], (64, 64), interpolation=cv2.INTER_AREA)[keep])
    assert not np.array_equal(out[~keep], cv2.resize(disc["image"], (64, 64), interpolation=cv2.INTER_AREA)[~keep])


def test_transparent_mask_keeps_what_it_does_not_cover(demo: Canny2Image, disc: dict) -> None:
    """A mask painted on a transparent layer (white disc, alpha 255; the rest alpha 0) is the same mask as the
    white disc on black: transparent = keep (it was composited on white, and everything was repainted)."""
    rgba = np.zeros((*disc["mask"].shape, 4), np.uint8)
    rgba[disc["mask"] > 0] = 255
    params = demo_params(prompt="green circle with blue background", seed=1, ddim_steps=4)
    drawn = demo(disc["image"], params, progress=False, mask=rgba)[0][1]
    plain = demo(disc["image"], params, progress=False, mask=disc["mask"])[0][1]
    assert np.array_equal(drawn, plain)


def test_inputs_without_effect_are_said(demo: Canny2Image, disc: dict) -> None:
    """An init image at denoise 1 without a mask (pure noise start) and a mask without white are each said once."""
    said: list[str] = []
    params = demo_params(seed=2, ddim_steps=2)
    demo(disc["image"], params, progress=False, notify=said.append, init_image=disc["init"])
    demo(disc["image"], params, progress=False, notify=said.append, mask=np.zeros((32, 32), np.uint8))
    demo(disc["image"], demo_params(seed=2, ddim_steps=2, denoise=0.5), progress=False, notify=said.append,
         init_image=disc["init"])  # fmt: skip
    assert len(said) == 2
    assert "at denoise 1 the run starts from pure noise" in said[0] and "no white" in said[1]
