"""The samplers of ``ldm/models/diffusion/sampling.py`` against diffusers' schedulers (an independent
implementation), their step limits, seeds, one denoiser pass per step at guidance 1, and the flag.

The equivalence runs the tiny config with every layer random (``tiny_model``) under classifier-free guidance and
a ControlNet: both loops call the very same denoiser from the very same noise, so any difference comes from the
schedule and the update. diffusers is a test-only dependency: those tests are skipped without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cpu_canny2image
from cldm.control import Control
from cldm.guidance import CFGDenoiser
from cldm.pipeline import Canny2Image, CannyParams, read_image
from ldm.models.diffusion.sampling import MAX_STEPS, SAMPLERS, sample, sampling_steps
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from share import DEMO_CKPT, DEMO_IMAGE, TINY_CONFIG
from tests.diffusers_port import diffusers_scheduler

TOL = 1e-4
STOCHASTIC = ("euler_a", "lcm")
CASES = [("dpmpp_2m", 1), ("dpmpp_2m", 4), ("dpmpp_2m", 10), ("dpmpp_2m_karras", 10), ("unipc", 1), ("unipc", 3),
         ("unipc", 10), ("unipc_karras", 10), ("euler_a", 10), ("lcm", 1), ("lcm", 4)]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine the tiny model's small ops run many times faster than with
    two (both loops of a comparison run alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def denoiser(tiny_model: torch.nn.Module) -> Callable:
    """Guided eps (scale 3) of the random tiny model with a ControlNet, batch 2 at latent 8 x 8. The random model's
    final latents reach |x| of 40-50 (float32 steps of 4e-6 there); at guidance 7.5 the differences come within 1e-5
    of the tolerance, at 3 they stay under 4e-5."""
    g = torch.Generator().manual_seed(11)
    cond, uncond = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    control = Control(tiny_model.control_model, torch.rand(2, 3, 64, 64, generator=g), [1.0] * 13)
    return CFGDenoiser(tiny_model, cond, uncond, 3.0, [control])


def recording(denoise: Callable, seen: list[int]) -> Callable:
    def wrapped(x: torch.Tensor, t: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        seen.append(int(t[0]))
        return denoise(x, t, step, steps)

    return wrapped


@torch.no_grad()
def diffusers_loop(name: str, denoise: Callable, noise: torch.Tensor, steps: int, seed: int) -> tuple:
    """diffusers' pipeline loop: scale x_T by init_noise_sigma, then scale_model_input, eps, step."""
    pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
    scheduler = diffusers_scheduler(name)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = noise * scheduler.init_noise_sigma
    seen: list[int] = []
    for i, t in enumerate(scheduler.timesteps):
        ts = torch.full((x.shape[0],), int(t), dtype=torch.long)
        eps = recording(denoise, seen)(scheduler.scale_model_input(x, t), ts, i, len(scheduler.timesteps))
        kwargs = {"generator": generator} if name in STOCHASTIC else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x, seen


@pytest.mark.parametrize(("name", "steps"), CASES)
def test_sampler_equals_diffusers_scheduler(denoiser: Callable, name: str, steps: int) -> None:
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs, their_timesteps = diffusers_loop(name, denoiser, noise, steps, seed=21)
    seen: list[int] = []
    ours = sample(name, recording(denoiser, seen), noise, denoiser.model.alphas_cumprod, steps,
                  generator=torch.Generator().manual_seed(21), progress=False)  # fmt: skip
    assert seen == their_timesteps and len(seen) == steps == sampling_steps(name, steps)
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"{name}, {steps} steps: max abs diff {diff:.3g}"
    assert ours.std().item() > 0.1  # a real image latent, not a collapsed one


def test_reference_ddim_timesteps_are_leading_with_offset_1_when_steps_divide_1000() -> None:
    """The reference's ``uniform`` DDIM grid (+1) equals diffusers' DDIMScheduler with SD1.5's config at 20
    steps; at 30 the reference visits 31 timesteps, diffusers 30."""
    pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
    scheduler = diffusers_scheduler("ddim")
    for steps, equal in ((20, True), (30, False)):
        scheduler.set_timesteps(steps)
        ours = np.flip(make_ddim_timesteps(steps, 1000))
        assert (list(ours) == scheduler.timesteps.tolist()) is equal


def test_noise_comes_from_the_generator() -> None:
    """euler_a and lcm: the same generator seed gives the same latents, another seed others, and torch's global
    generator is not touched."""
    acp = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0).float()

    def denoise(x: torch.Tensor, t: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        return 0.5 * x

    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for name in STOCHASTIC:
        state = torch.get_rng_state()
        runs = [sample(name, denoise, x_T, acp, 4, generator=torch.Generator().manual_seed(s), progress=False)
                for s in (1, 1, 2)]  # fmt: skip
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("name", [name for name in SAMPLERS if name != "ddim"])  # ddim: the reference's grid
def test_step_limits(name: str) -> None:
    """At the most steps a sampler takes, its timesteps are inside [0, 999] and distinct (Karras': from 45 steps
    on, neighbouring noise levels round to one timestep, as in diffusers); one more step is an error."""
    most = MAX_STEPS[name](1000)
    acp = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0).float()
    seen: list[int] = []

    def denoise(x: torch.Tensor, t: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    sample(name, denoise, torch.randn(1, 1, 1, 1), acp, most, generator=torch.Generator().manual_seed(0),
           progress=False)  # fmt: skip
    assert len(seen) == sampling_steps(name, most)
    assert len(set(seen)) == len(seen) or name.endswith("_karras")
    assert 0 <= min(seen) and max(seen) <= 999
    for bad in (0, most + 1):
        with pytest.raises(ValueError, match=f"the {name} sampler takes 1 to {most} steps, got {bad}"):
            sample(name, denoise, torch.randn(1, 1, 1, 1), acp, bad, progress=False)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sampler": "dpm"}, "sampler (--sampler): unknown sampler 'dpm': choose one of ddim, dpmpp_2m, "
                             "dpmpp_2m_karras, unipc, unipc_karras, euler_a, lcm"),
        ({"sampler": "lcm", "ddim_steps": 60},
         "ddim_steps (--ddim-steps): the lcm sampler takes 1 to 50 steps, got 60"),
        ({"sampler": "unipc", "eta": 0.5}, "eta (--eta) applies to the ddim sampler only, got 0.5 with unipc"),
    ],
)  # fmt: skip
def test_params_validate_the_sampler(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        CannyParams(**changes).validate()
    assert str(err.value) == message


def test_eta_is_ddim_only_in_the_api() -> None:
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only, not to euler_a"):
        sample("euler_a", lambda x, t, i, n: x, torch.zeros(1, 4, 2, 2), torch.linspace(0.99, 0.01, 1000), 2, eta=0.1)


def test_guidance_1_is_one_pass_per_step(tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """At guidance 1 the pipeline calls the model once per step on the batch's own rows (no unconditional
    pass) and encodes no negative prompt; at guidance 9 once per step on both halves (batched), after encoding
    both prompts. (Every sampler calls the denoiser once per step: ``test_sampler_equals_diffusers_scheduler``.)"""
    calls: list[int] = []
    texts: list[list[str]] = []
    real, real_text = tiny_model.apply_model, tiny_model.get_learned_conditioning

    def counting(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    def encoding(prompts: list[str]) -> torch.Tensor:
        texts.append(prompts)
        return real_text(prompts)

    monkeypatch.setattr(tiny_model, "apply_model", counting)
    monkeypatch.setattr(tiny_model, "get_learned_conditioning", encoding)
    pipe = Canny2Image(tiny_model, torch.device("cpu"))
    image = read_image(DEMO_IMAGE)
    for scale, rows, encoded in ((1.0, 1, 1), (9.0, 2, 2)):
        calls.clear()
        texts.clear()
        params = CannyParams(prompt="a", image_resolution=64, ddim_steps=4, scale=scale, seed=3, sampler="lcm")
        pipe(image, params, progress=False)
        assert calls == [rows] * 4
        assert texts == [[params.full_prompt()], [params.n_prompt]][:encoded]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_seed_same_images(tiny_model: torch.nn.Module, name: str) -> None:
    """The pipeline seeds the step noise too: two runs with one seed give the same image (other seeds give other
    noise: ``test_noise_comes_from_the_generator``)."""
    pipe = Canny2Image(tiny_model, torch.device("cpu"))
    params = CannyParams(prompt="a", image_resolution=64, ddim_steps=3, scale=1.0, seed=5, sampler=name)
    first, second = (pipe(read_image(DEMO_IMAGE), params, progress=False)[0][1] for _ in range(2))
    assert np.array_equal(first, second)


def test_cli_sampler_writes_the_api_image(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """``--demo --sampler dpmpp_2m --ddim-steps 10`` writes the image the Python API gives for the same settings."""
    code = cpu_canny2image.main(["--demo", "--sampler", "dpmpp_2m", "--ddim-steps", "10", "--seed", "4",
                                 "-o", str(tmp_path)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    written = np.array(Image.open(tmp_path / f"{DEMO_IMAGE.stem}_4_0.png"))
    args = cpu_canny2image.build_parser().parse_args(["--demo", "--sampler", "dpmpp_2m", "--ddim-steps", "10",
                                                      "--seed", "4"])  # fmt: skip
    params, _ = cpu_canny2image.settings(args, demo=True)
    assert params.sampler == "dpmpp_2m"
    pipe = Canny2Image.from_checkpoint(TINY_CONFIG, DEMO_CKPT, torch.device("cpu"))
    expected = pipe(read_image(DEMO_IMAGE), params, progress=False)[0][1]
    assert np.array_equal(written, expected)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sampler", "lcm", "--ddim-steps", "60"],
         "error: ddim_steps (--ddim-steps): the lcm sampler takes 1 to 50 steps, got 60"),
        (["--sampler", "unipc", "--eta", "0.5"],
         "error: eta (--eta) applies to the ddim sampler only, got 0.5 with unipc"),
    ],
)  # fmt: skip
def test_cli_bad_sampler_settings_are_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, extra: list,
                                               message: str) -> None:  # fmt: skip
    code = cpu_canny2image.main(["--demo", "-o", str(tmp_path), *extra])
    _, err = capsys.readouterr()
    assert code == 1 and err.splitlines()[-1] == message and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_sampler_lists_the_names(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cpu_canny2image.main(["--sampler", "dpm"])
    assert exit_.value.code == 2
    names = ", ".join(f"'{name}'" for name in SAMPLERS)
    assert f"argument --sampler: invalid choice: 'dpm' (choose from {names})" in capsys.readouterr().err


def test_page_passes_the_sampler(tiny_model: torch.nn.Module) -> None:
    """The page's process takes the sampler after the reference's inputs: lcm at 3 steps reports 3 steps (DDIM's
    schedule would visit 4), and an eta with it is a page error."""
    gr = pytest.importorskip("gradio")
    import gradio_canny2image

    progress_calls: list[tuple[int, int]] = []
    process = gradio_canny2image.make_process(Canny2Image(tiny_model, torch.device("cpu")))
    inputs = [str(DEMO_IMAGE), "a", "", "", 1, 64, 3, False, 1.0, 1.0, 7, 0.0, 100, 200]
    results = process(*inputs, "lcm", progress=lambda done, desc=None, unit="steps": progress_calls.append(done))
    assert len(results) == 2 and progress_calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    inputs[11] = 0.3  # eta
    with pytest.raises(gr.Error, match="eta \\(--eta\\) applies to the ddim sampler only, got 0.3 with lcm"):
        process(*inputs, "lcm", progress=lambda *args, **kwargs: None)
