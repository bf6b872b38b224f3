"""Several ControlNets in one run, step windows, your own control maps and scribbles (cldm/units.py; issue 19 items
1-4). Tiny config, random weights (tests/routes.py); the two-ControlNet run is compared with diffusers'
``StableDiffusionControlNetPipeline`` over a ``MultiControlNetModel`` built from the same weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from annotator.util import HWC3, resize_image
from cldm.checkpoint import CONTROL_PREFIX, CheckpointError, save_checkpoint
from cldm.control import Control, control_residuals
from cldm.guidance import CFGDenoiser
from cldm.model import load_controlnet
from cldm.pipeline import Canny2Image, read_image
from cldm.units import ControlUnit, annotate, control_maps, display_map, parse_control_spec
from ldm.models.diffusion.sampling import sample
from ldm.util import seed_everything
from share import DEMO_CKPT
from tests.routes import (
    INPUT_IMAGE,
    PARAMS,
    TINY_CONFIG,
    base_model,
    controlnet_only,
    difference_file,
    perturbed,
    quiet,
    tiny_weights,
)

TOL = 1e-4
SEED = 7


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A whole tiny ControlNet 1.0 file, a second ControlNet (other weights) alone, and its difference file."""
    folder = tmp_path_factory.mktemp("multi")
    weights = tiny_weights()
    other = perturbed(weights, (CONTROL_PREFIX,), seed=3)
    paths = {"whole": folder / "whole.ckpt", "second": folder / "second.pth", "diff": folder / "diff.pth",
             "base": folder / "base.ckpt"}  # fmt: skip
    save_checkpoint(weights, paths["whole"])
    save_checkpoint(controlnet_only(other), paths["second"], flat=True)
    save_checkpoint(difference_file(other, weights), paths["diff"], flat=True)
    save_checkpoint(base_model(weights), paths["base"])
    return paths


@pytest.fixture(scope="module")
def pipe(files: dict[str, Path]) -> Canny2Image:
    return Canny2Image.from_checkpoint(TINY_CONFIG, files["whole"], torch.device("cpu"), notify=quiet)


@pytest.fixture(scope="module")
def second(pipe: Canny2Image, files: dict[str, Path]) -> torch.nn.Module:
    return pipe.load_controlnet(TINY_CONFIG, files["second"])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return read_image(INPUT_IMAGE)


def params(**changes: Any) -> Any:
    return dataclasses.replace(PARAMS, **{"ddim_steps": 4, "seed": SEED, **changes})


def latents(pipe: Canny2Image, image: np.ndarray, units: list[ControlUnit] | None, **changes: Any) -> torch.Tensor:
    """The sampled latents of a pipeline run (its decode step replaced by a recorder)."""
    seen: list[torch.Tensor] = []

    def record(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.clone())
        return torch.zeros(z.shape[0], 3, 8 * z.shape[2], 8 * z.shape[3])

    pipe.decode = record  # type: ignore[method-assign]
    try:
        pipe(image, params(**changes), progress=False, notify=quiet, units=units)
    finally:
        del pipe.decode
    return seen[0]


def counting(net: torch.nn.Module) -> list[int]:
    """Count ``net``'s forward calls (an instance attribute shadowing the class's forward)."""
    calls = [0]
    forward = type(net).forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return forward(net, *args, **kwargs)

    net.forward = counted  # type: ignore[method-assign]
    return calls


@torch.no_grad()
def test_residuals_of_two_controlnets_are_the_sum(pipe: Canny2Image, second: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    t, context = torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)
    one = Control(pipe.model.control_model, hint, [0.7] * 13)
    two = Control(second, torch.rand(2, 3, 64, 64, generator=g), [1.3] * 13)
    both = control_residuals([one, two], x, t, context)
    singles = one.residuals(x, t, context), two.residuals(x, t, context)
    assert len(both) == 13
    for total, a, b in zip(both, *singles):
        assert torch.equal(total, a + b)
        assert (a - b).abs().max() > 1e-3  # two different ControlNets


def test_strength_0_unit_adds_nothing(pipe: Canny2Image, second: torch.nn.Module, image: np.ndarray) -> None:
    alone = latents(pipe, image, [ControlUnit(controlnet=second)])
    with_zero = latents(pipe, image, [ControlUnit(strength=0.0), ControlUnit(controlnet=second)])
    assert torch.equal(alone, with_zero)
    both = latents(pipe, image, [ControlUnit(strength=1.0), ControlUnit(controlnet=second)])
    assert (alone - both).abs().max() > 1e-3


def test_same_controlnet_twice_at_half_is_one_at_full(pipe: Canny2Image, image: np.ndarray) -> None:
    halves = latents(pipe, image, [ControlUnit(strength=0.5), ControlUnit(strength=0.5)])
    full = latents(pipe, image, [ControlUnit(strength=1.0)])
    assert (halves - full).abs().max() <= 1e-6


def test_window_0_0_is_the_uncontrolled_run_and_never_runs_the_controlnet(pipe: Canny2Image, image: np.ndarray
                                                                          ) -> None:  # fmt: skip
    model = pipe.model
    calls = counting(model.control_model)
    try:
        windowed = latents(pipe, image, [ControlUnit(start=0.0, end=0.0)])
        assert calls[0] == 0
        latents(pipe, image, [ControlUnit(start=0.0, end=0.5)])  # 2 of 4 steps, both guidance halves in one batch
        assert calls[0] == 2
    finally:
        del model.control_model.forward
    p = params()
    seed_everything(p.seed)
    cond = model.get_learned_conditioning([p.full_prompt()])
    uncond = model.get_learned_conditioning([p.n_prompt])
    x_t = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        plain = sample("ddim", CFGDenoiser(model, cond, uncond, p.scale, []), x_t, model.alphas_cumprod, p.ddim_steps,
                       progress=False)  # fmt: skip
    assert torch.equal(windowed, plain)


@pytest.fixture(scope="module")
def diffusers_pipe(files: dict[str, Path]) -> Any:
    """diffusers' StableDiffusionControlNetPipeline over a MultiControlNetModel of the two ControlNets, converted
    from the same weights (tests/diffusers_port.py)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
    from tests.diffusers_port import convert_to_diffusers, diffusers_scheduler

    original = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG), resolve=True)
    weights = tiny_weights()
    other = perturbed(weights, (CONTROL_PREFIX,), seed=3)
    with torch.random.fork_rng():
        first, second = convert_to_diffusers(original, weights), convert_to_diffusers(original, other)
    return diffusers.StableDiffusionControlNetPipeline(
        vae=first["vae"][0], text_encoder=None, tokenizer=None, unet=first["unet"][0],
        controlnet=[first["controlnet"][0], second["controlnet"][0]],
        scheduler=diffusers_scheduler("ddim"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


@pytest.mark.parametrize(("strengths", "windows"), [((1.0, 0.6), ((0.0, 1.0), (0.0, 1.0))),
                                                    ((0.8, 1.2), ((0.0, 0.5), (0.25, 1.0)))])  # fmt: skip
def test_two_controlnets_match_diffusers_multicontrolnet(
    pipe: Canny2Image, second: torch.nn.Module, image: np.ndarray, diffusers_pipe: Any, strengths: tuple,
    windows: tuple,
) -> None:  # fmt: skip
    maps = [image, 255 - HWC3(image)]  # own control maps (annotator none): the disc and its negative
    units = [ControlUnit(image=m, annotator="none", controlnet=net, strength=s, start=w[0], end=w[1])
             for m, net, s, w in zip(maps, (None, second), strengths, windows)]  # fmt: skip
    ours = latents(pipe, image, units)
    p, model = params(), pipe.model
    seed_everything(p.seed)
    x_t = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        cond = model.get_learned_conditioning([p.full_prompt()])
        uncond = model.get_learned_conditioning([p.n_prompt])
    theirs = diffusers_pipe(
        prompt_embeds=cond, negative_prompt_embeds=uncond, image=[Image.fromarray(resize_image(m, 64)) for m in maps],
        num_inference_steps=p.ddim_steps, guidance_scale=p.scale, latents=x_t, output_type="latent",
        controlnet_conditioning_scale=list(strengths), control_guidance_start=[w[0] for w in windows],
        control_guidance_end=[w[1] for w in windows], eta=0.0,
    ).images  # fmt: skip
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"max abs difference {diff:.3g}"
    assert (ours - latents(pipe, image, units[:1])).abs().max() > 1e-3  # the second ControlNet matters


def test_load_controlnet_routes(pipe: Canny2Image, second: torch.nn.Module, files: dict[str, Path]) -> None:
    """A difference file is made whole against the model's UNet; a file without a ControlNet is refused."""
    from_diff = pipe.load_controlnet(TINY_CONFIG, files["diff"])
    for (name, a), b in zip(second.state_dict().items(), from_diff.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match=r"base.ckpt: .*no control_model"):
        load_controlnet(TINY_CONFIG, files["base"])


def test_annotators() -> None:
    paper = np.full((64, 96, 3), 255, np.uint8)
    paper[30:33, 10:80] = (20, 200, 255)  # a line: its darkest channel is below 127
    paper[40:42, 10:80] = (130, 200, 255)  # not dark enough
    hint = annotate(paper, "scribble")
    expected = np.zeros_like(paper)
    expected[30:33, 10:80] = 255
    assert np.array_equal(hint, expected)
    assert np.array_equal(display_map(hint, "scribble"), 255 - expected)
    assert annotate(paper, "none") is paper and display_map(paper, "none") is paper
    canny = annotate(paper, "canny", 100, 200)
    assert canny.shape == paper.shape and set(np.unique(canny)) == {0, 255}


def test_control_maps_resize_as_the_reference_and_to_the_first_map() -> None:
    said: list[str] = []
    square = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    wide = np.random.default_rng(1).integers(0, 256, (50, 150), dtype=np.uint8)
    maps = control_maps([ControlUnit(annotator="none"), ControlUnit(image=wide, annotator="none"),
                         ControlUnit(image=wide, annotator="scribble")], square, 128, said.append)  # fmt: skip
    assert np.array_equal(maps[0], resize_image(HWC3(square), 128))
    assert [m.shape for m in maps] == [(128, 128, 3)] * 3
    assert said == ["control 2 (384x128), control 3 (384x128) resized to the first control's map, 128x128"]
    said.clear()
    control_maps([ControlUnit(annotator="none"), ControlUnit(image=square)], square, 128, said.append)
    assert said == []


def test_pipeline_shows_one_map_per_unit(pipe: Canny2Image, image: np.ndarray) -> None:
    one, _ = pipe(image, params(ddim_steps=1), progress=False, notify=quiet)
    assert len(one) == 2 and np.array_equal(one[0], 255 - pipe.edges(image, params()))
    two, _ = pipe(image, params(ddim_steps=1), progress=False, notify=quiet,
                  units=[ControlUnit(), ControlUnit(annotator="none", strength=0.0)])  # fmt: skip
    assert len(two) == 3 and np.array_equal(two[0], one[0])
    assert np.array_equal(two[1], resize_image(HWC3(image), 64))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "the ControlNet part (CKPT or main) is missing"),
        ("image=a.png", "the ControlNet part (CKPT or main) is missing"),
        ("cn.pth,image=", "part 'image' has no value"),
        ("cn.pth,weight=2", "unknown part 'weight=2'"),
        ("cn.pth,strength=strong", "part 'strength' needs a number, got 'strong'"),
        ("cn.pth,low=1.5", "part 'low' needs an integer"),
        ("cn.pth,start=0.8,end=0.2", "the window needs 0 <= start <= end <= 1"),
        ("cn.pth,annotator=depth", "annotator must be one of canny, none, scribble, got 'depth'"),
        ("cn.pth,strength=1,strength=2", "part 'strength' is given twice"),
    ],
)
def test_bad_control_spec_names_the_part(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_control_spec(spec)
    assert str(err.value).startswith(f"--control '{spec}': ") and message in str(err.value)


def test_control_spec_parts() -> None:
    spec = parse_control_spec("models/d.pth, image=d.png,annotator=canny,strength=0.5,start=0.1,end=0.9,guess,"
                              "low=50,high=150")  # fmt: skip
    assert spec.ckpt == Path("models/d.pth") and spec.image == Path("d.png")
    assert spec.unit(None, None) == ControlUnit(annotator="canny", strength=0.5, guess_mode=True, start=0.1, end=0.9,
                                                low_threshold=50, high_threshold=150)  # fmt: skip
    assert parse_control_spec("main").ckpt is None


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    import cpu_canny2image

    try:
        code = cpu_canny2image.main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_control_is_one_line_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """Refused before any file is read (the checkpoint does not exist)."""
    window = ["--control-start", "0.7", "--control-end", "0.2"]
    for extra, message in ((["--control", "cn.pth,weight=2"], "unknown part 'weight=2'"),
                           (window, "(--control-start, 0.7) must not exceed control_end (--control-end, 0.2)"),
                           (["--control-end", "1.5"], "control_end (--control-end) must be between 0.0 and 1.0"),
                           ):  # fmt: skip
        code, out, err = run_cli(capsys, "--ckpt", str(tmp_path / "none.ckpt"), "-o", str(tmp_path), *extra)
        assert code == (2 if "--control" in extra else 1) and out == ""
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err


def test_cli_two_controlnets_write_each_map_and_the_api_image(
    capsys: pytest.CaptureFixture, pipe: Canny2Image, second: torch.nn.Module, files: dict[str, Path],
    image: np.ndarray, tmp_path: Path,
) -> None:  # fmt: skip
    code, out, err = run_cli(capsys, "--ckpt", str(files["whole"]), "--config", str(TINY_CONFIG), "-i",
                             str(INPUT_IMAGE), "-o", str(tmp_path), "--image-resolution", "64", "--ddim-steps", "2",
                             "--seed", "5", "--scale", "5", "--a-prompt", "", "--n-prompt", "", "--prompt",
                             PARAMS.prompt, "--control-end", "0.5",
                             "--control", f"{files['second']},annotator=scribble,strength=0.7")  # fmt: skip
    assert code == 0, err
    written = out.split()
    assert [Path(p).name for p in written] == ["disc_edges.png", "disc_control2.png", "disc_5_0.png"]
    units = [ControlUnit(end=0.5), ControlUnit(annotator="scribble", controlnet=second, strength=0.7)]
    api, _ = pipe(image, params(ddim_steps=2, seed=5), progress=False, notify=quiet, units=units)
    for path, expected in zip(written, api):
        assert np.array_equal(np.array(Image.open(path)), expected)


def test_page_second_unit_loads_its_controlnet_once(pipe: Canny2Image, second: torch.nn.Module, image: np.ndarray,
                                                    files: dict[str, Path]) -> None:  # fmt: skip
    """The page's second unit with a ControlNet chosen by name gives the API's image of the same two units."""
    gradio_canny2image = pytest.importorskip("gradio_canny2image")
    loads: list[Path] = []
    real_load = pipe.load_controlnet

    def load(config: Path, ckpt: Path, low_memory: bool = False) -> torch.nn.Module:
        loads.append(ckpt)
        return real_load(config, ckpt, low_memory)

    pipe.load_controlnet = load  # type: ignore[method-assign]
    try:
        process = gradio_canny2image.make_process(pipe, False, controlnets={"second.pth": files["second"]},
                                                  config=TINY_CONFIG)  # fmt: skip
        p = params(ddim_steps=1)
        args = [str(INPUT_IMAGE), p.prompt, p.a_prompt, p.n_prompt, 1, 64, 1, False, 1.0, p.scale, p.seed, 0.0, 100,
                200, "ddim", 1.0, None, None, "canny", 0.0, 1.0, str(INPUT_IMAGE), "scribble", "second.pth", 0.7, 0.0,
                1.0]  # fmt: skip
        shown = [process(*args, progress=lambda *a, **k: None) for _ in range(2)]
    finally:
        del pipe.load_controlnet
    assert loads == [files["second"]]
    units = [ControlUnit(), ControlUnit(annotator="scribble", controlnet=second, strength=0.7)]
    api, _ = pipe(image, dataclasses.replace(p, uncond_hint=False), progress=False, notify=quiet, units=units)
    for page_images in shown:
        assert len(page_images) == 3
        for a, b in zip(page_images, api):
            assert np.array_equal(a, b)


def test_none_annotator_reads_transparency_as_black() -> None:
    """A ready-made map with a transparent background: no signal there (it became white, a full-strength hint)."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (200, 100, 50, 255)
    (hint,) = control_maps([ControlUnit(image=rgba, annotator="none")], None, 64, quiet)
    assert hint[0, 0].tolist() == [0, 0, 0] and hint[32, 32].tolist() == [200, 100, 50]


def test_unit_type_errors_are_named() -> None:
    for unit, message in ((ControlUnit(image="disc.png"), "image must be an HWC uint8 array"),  # type: ignore[arg-type]
                          (ControlUnit(controlnet="cn.pth"), "controlnet must be a loaded ControlNet")):  # type: ignore[arg-type]  # fmt: skip
        with pytest.raises(ValueError, match=message):
            unit.check("control 2")


def test_control_spec_expands_home_and_keeps_thresholds_to_canny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    spec = parse_control_spec("~/cn.pth,image=~/depth.png")
    assert (spec.ckpt, spec.image) == (Path("/home/someone/cn.pth"), Path("/home/someone/depth.png"))
    with pytest.raises(ValueError, match="need annotator=canny"):
        parse_control_spec("main,annotator=none,low=50")


def test_cli_control_files_are_checked_before_loading(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A missing, folder or non-ControlNet --control file, and an unreadable --control image, are one line naming the
    --control, exit 2, before the main model is loaded."""
    import share

    monkeypatch.setattr(share, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "folder").mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    for spec, message in ((str(tmp_path / "none.pth"), "not found"), (f"main,image={tmp_path / 'folder'}",
                          "is a folder, not an image"), (str(notes), ""), (str(DEMO_CKPT) + ",image=" + str(notes),
                          "cannot read image")):  # fmt: skip
        code, out, err = run_cli(capsys, "--demo", "-o", str(tmp_path / "out"), "--control", spec)
        errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the demo's one notice
        assert code == 2 and out == "" and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
        assert errors[0].startswith(f"error: --control '{spec}': ") and message in errors[0]


def test_window_without_steps_is_said(pipe: Canny2Image, image: np.ndarray) -> None:
    said: list[str] = []
    pipe(image, params(ddim_steps=4), progress=False, notify=said.append, units=[ControlUnit(start=0.5, end=0.6)])
    assert said == ["control 1: the step window holds none of the 4 steps; that ControlNet is not run"]
