"""SD2.1 (``cldm_v21.yaml``: OpenCLIP ViT-H text encoder, linear transformer projections, 64-channel heads) end to
end on a tiny config of the same shape: the checkpoint loader, ``Canny2Image``, the command line,
``tool_add_control.py``; and the v-parameterisation of SD2.x 768-v models against its formula and diffusers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import cpu_canny2image
from cldm.checkpoint import load_state_dict, save_checkpoint
from cldm.control import Control
from cldm.guidance import CFGDenoiser
from cldm.model import build_model, create_model, load_model, model_config
from cldm.pipeline import Canny2Image, CannyParams, read_image
from ldm.models.diffusion.sampling import sample_ddim
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from tests.conftest import REPO, TINY_CONFIG
from tool_add_control import make_control_checkpoint
from tools.make_random_checkpoint import make_random_checkpoint

V21_CONFIG = REPO / "models" / "cldm_v21.yaml"
WIDTH = 32  # the tiny OpenCLIP text width = the UNet's context_dim
IMAGE = REPO / "test_imgs" / "chelsea.png"


def tiny_v21_config(folder: Path, parameterization: str = "eps") -> Path:
    """``cldm_v21.yaml`` with small widths (the tiny config's VAE) and ``parameterization``; written to ``folder``."""
    config = OmegaConf.load(V21_CONFIG)
    params = config.model.params
    for name in ("control_stage_config", "unet_config"):
        params[name].params.update(model_channels=32, channel_mult=[1, 1, 2, 2], num_head_channels=16,
                                   context_dim=WIDTH, norm_num_groups=8)  # fmt: skip
    params.first_stage_config = OmegaConf.load(TINY_CONFIG).model.params.first_stage_config
    params.cond_stage_config.params.text_config = {"width": WIDTH, "heads": 4, "layers": 2, "embed_dim": 16}
    params.image_size = 8
    params.parameterization = parameterization
    path = folder / f"cldm_tiny_v21_{parameterization}.yaml"
    OmegaConf.save(config, path)
    return path


@pytest.fixture(scope="module")
def v21_files(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """``parameterization -> (config, checkpoint)`` of a tiny v21 model with random weights (zero layers filled),
    each made once."""
    folder = tmp_path_factory.mktemp("v21")

    @functools.cache
    def make(parameterization: str) -> tuple[Path, Path]:
        config = tiny_v21_config(folder, parameterization)
        ckpt = folder / f"control_tiny_v21_{parameterization}.ckpt"
        make_random_checkpoint(config, ckpt, seed=0, fill_zeros_std=0.05)
        return config, ckpt

    return make


def test_v21_v_config_is_v21_with_v_prediction() -> None:
    v21, v21_v = OmegaConf.load(V21_CONFIG), OmegaConf.load(REPO / "models" / "cldm_v21_v.yaml")
    assert v21_v.model.params.pop("parameterization") == "v" and v21_v.model.params.pop("image_size") == 96
    v21.model.params.pop("image_size")
    assert v21_v == v21
    with torch.device("meta"):
        assert build_model(model_config(REPO / "models" / "cldm_v21_v.yaml"), "v").parameterization == "v"


def schedule(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(a_t), sqrt(1 - a_t)) of cldm_v21.yaml's schedule, in float64 from its definition: linear in sqrt(beta)
    from 0.00085 to 0.012 over 1000 steps, a_t the cumulative product of 1 - beta."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)[t].reshape(-1, 1, 1, 1)
    return a.sqrt(), (1 - a).sqrt()


def test_v_formulas_equal_their_definition(tmp_path: Path) -> None:
    model = create_model(tiny_v21_config(tmp_path, "v"))
    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0, 500, 999])
    s, n = (c.float() for c in schedule(t))
    x_t = model.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t, s * x0 + n * eps)
    torch.testing.assert_close(model.get_v(x0, eps, t), s * eps - n * x0)
    torch.testing.assert_close(model.predict_eps_from_z_and_v(x_t, t, v), s * v + n * x_t)
    torch.testing.assert_close(model.predict_start_from_z_and_v(x_t, t, v), s * x_t - n * v)
    # the true velocity gives back the true noise and x_0
    true_v = model.get_v(x0, eps, t)
    torch.testing.assert_close(model.predict_eps_from_z_and_v(x_t, t, true_v), eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.predict_start_from_z_and_v(x_t, t, true_v), x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_training_target_follows_the_parameterization(parameterization: str, tmp_path: Path) -> None:
    model = create_model(tiny_v21_config(tmp_path, parameterization))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    predicted = torch.randn(2, 4, 8, 8, generator=g)
    model.apply_model = lambda x, t, cond: predicted
    loss, _ = model.p_losses(x0, {"c_crossattn": [torch.zeros(2, 77, WIDTH)]}, t, noise)
    s, n = (c.float() for c in schedule(t))
    target = s * noise - n * x0 if model.parameterization == "v" else noise
    torch.testing.assert_close(loss, ((predicted - target) ** 2).mean())  # logvar 0


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@torch.no_grad()
def test_guided_ddim_equals_diffusers_scheduler(parameterization: str, v21_files: Callable) -> None:
    """DDIM over the guided denoiser equals diffusers' DDIMScheduler (SD's settings) fed the model's raw output
    mixed by the guidance scale, with ``prediction_type`` v_prediction or epsilon as the config says."""
    diffusers = pytest.importorskip("diffusers")
    model = load_model(*v21_files(parameterization))
    g = torch.Generator().manual_seed(2)
    hint = (torch.rand(1, 3, 64, 64, generator=g) > 0.8).float()
    cond, uncond = model.get_learned_conditioning(["a cat"]), model.get_learned_conditioning([""])
    x_t = torch.randn(1, 4, 8, 8, generator=g)
    control = Control(model.control_model, hint)
    ours = sample_ddim(CFGDenoiser(model, cond, uncond, 7.5, [control]), x_t, model.alphas_cumprod, 5, progress=False)

    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, timestep_spacing="leading",
        prediction_type="v_prediction" if model.parameterization == "v" else "epsilon",
    )  # fmt: skip
    scheduler.set_timesteps(5)
    x = x_t.clone()
    for t in scheduler.timesteps:
        ts = t.reshape(1).long()
        out_c = model.apply_model(x, ts, {"c_crossattn": [cond]}, controls=[control])
        out_u = model.apply_model(x, ts, {"c_crossattn": [uncond]}, controls=[control])
        x = scheduler.step(out_u + 7.5 * (out_c - out_u), t, x).prev_sample  # guidance on the raw output
    assert [int(t) for t in scheduler.timesteps] == [801, 601, 401, 201, 1]
    torch.testing.assert_close(ours, x, atol=2e-4, rtol=1e-4)
    assert (ours - x_t).abs().mean() > 0.1  # sampling moved the latent


@torch.no_grad()
def test_canny2image_makes_an_image_from_openclip_text(v21_files: Callable) -> None:
    config, ckpt = v21_files("v")
    pipe = Canny2Image.from_checkpoint(config, ckpt, torch.device("cpu"))
    assert isinstance(pipe.model.cond_stage_model, FrozenOpenCLIPEmbedder)
    assert pipe.model.get_learned_conditioning(["a cat"]).shape == (1, 77, WIDTH)
    image = read_image(IMAGE)
    params = CannyParams(prompt="a cat", image_resolution=64, ddim_steps=3, seed=7, num_samples=1)
    (edges, sample), seed = pipe(image, params, progress=False)
    assert seed == 7 and edges.shape == sample.shape == (64, 128, 3) and sample.dtype == np.uint8
    assert sample.std() > 1.0
    params.prompt = "a red house"
    (_, other), _ = pipe(image, params, progress=False)
    assert np.abs(other.astype(int) - sample.astype(int)).mean() > 0.5  # the text encoder reaches the image


@pytest.mark.slow
def test_command_line_with_a_v21_config(v21_files: Callable, tmp_path: Path, capsys) -> None:
    config, ckpt = v21_files("eps")
    args = ["--ckpt", str(ckpt), "--config", str(config), "-o", str(tmp_path), "-i", str(IMAGE),
            "--image-resolution", "64", "--ddim-steps", "2", "--seed", "5"]  # fmt: skip
    assert cpu_canny2image.main(args) == 0
    out = capsys.readouterr().out.split()
    assert [Path(p).name for p in out] == ["chelsea_edges.png", "chelsea_5_0.png"]


def test_tool_add_control_from_a_v21_base(tmp_path: Path) -> None:
    """The reference's tool_add_control_sd21.py is tool_add_control.py with --config cldm_v21.yaml."""
    config = tiny_v21_config(tmp_path, "v")
    torch.manual_seed(3)
    base = create_model(config, base=True).state_dict()
    save_checkpoint(base, tmp_path / "v2-1_base.ckpt")
    copied, new = make_control_checkpoint(tmp_path / "v2-1_base.ckpt", tmp_path / "control_ini.ckpt", config)
    result = load_state_dict(tmp_path / "control_ini.ckpt")
    assert len(copied) > 0 and all(k.startswith("control_model.") for k in copied)
    for key in copied:
        assert torch.equal(result[key], base["model.diffusion_model." + key[len("control_model.") :]]), key
    assert any(".proj_in.weight" in k and result[k].dim() == 2 for k in copied)  # linear projections (SD2)
    assert all(torch.equal(result[k], v) for k, v in base.items() if k.startswith("cond_stage_model.model."))
    assert load_model(config, tmp_path / "control_ini.ckpt").parameterization == "v"


def test_tool_add_control_with_the_wrong_config_names_the_file_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """An SD1 base with a v21 config built the full model (6.9 GB at full size) before finding the mismatch and
    named no file: the shapes are checked on the meta device and the config of the file's family is named."""
    import cldm.model
    import tool_add_control

    config = tiny_v21_config(tmp_path)
    sd1 = tmp_path / "cldm_tiny.yaml"
    sd1.write_text(TINY_CONFIG.read_text())
    torch.manual_seed(3)
    save_checkpoint(create_model(TINY_CONFIG, base=True).state_dict(), tmp_path / "sd1.ckpt")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the real model was built")

    monkeypatch.setattr(cldm.model, "create_model", never)
    out = tmp_path / "out.ckpt"
    assert tool_add_control.main([str(tmp_path / "sd1.ckpt"), str(out), "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'sd1.ckpt'}: does not fit {config}: model.diffusion_model.")
    assert err.endswith(f"; pass --config {sd1}\n") and err.count("\n") == 1 and not out.exists()
