"""Reference parameters this project does not implement raise one ValueError naming the class and the parameter."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.diffusionmodules.util import conv_nd
from ldm.util import check_supported, instantiate_from_config, unsupported_parameter
from tests.conftest import TINY_CONFIG

UNET, CONTROL, VAE, CLIP = "unet_config", "control_stage_config", "first_stage_config", "cond_stage_config"

# (section of the tiny config's model params, or "" for the model itself; overrides; class named; parameter named)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    *[("", {name: value}, "ControlLDM", name) for name, value in [
        ("parameterization", "x0"), ("conditioning_key", "concat"), ("use_ema", True), ("ckpt_path", "sd.ckpt"),
        ("ignore_keys", ["model_ema."]), ("load_only_unet", True), ("make_it_fit", True), ("reset_ema", True),
        ("reset_num_ema_updates", True), ("scheduler_config", {"target": "ldm.lr_scheduler.LambdaLinearScheduler"}),
        ("use_positional_encodings", True), ("learn_logvar", True), ("original_elbo_weight", 0.5),
        ("loss_type", "huber"), ("num_timesteps_cond", 2), ("cond_stage_trainable", True),
        ("cond_stage_forward", "encode"), ("scale_by_std", True), ("force_null_conditioning", True),
        ("cond_stage_config", "__is_unconditional__"), ("first_stage_config", "__is_first_stage__"),
    ]],
    ("", {"conditioning_key": None, "concat_mode": True}, "ControlLDM", "concat_mode"),
    *[(UNET, {name: value}, "ControlledUnetModel", name) for name, value in [
        ("num_classes", 1000), ("n_embed", 8192), ("num_heads_upsample", 4), ("use_new_attention_order", True),
        ("use_spatial_transformer", False), ("context_dim", None), ("dims", 3),
    ]],
    *[(CONTROL, {name: value}, "ControlNet", name) for name, value in [
        ("n_embed", 8192), ("num_heads_upsample", 4), ("use_new_attention_order", True), ("dims", 1),
    ]],
    *[(VAE, {name: value}, "AutoencoderKL", name) for name, value in [
        ("ckpt_path", "vae.ckpt"), ("ignore_keys", ["loss."]), ("colorize_nlabels", 3), ("ema_decay", 0.999),
        ("learn_logvar", True),
    ]],
    (VAE, {"lossconfig": {"target": "ldm.modules.losses.LPIPSWithDiscriminator"}}, "AutoencoderKL",
     "lossconfig.target"),
    (VAE, {"ddconfig.double_z": False}, "AutoencoderKL", "ddconfig.double_z"),
    (VAE, {"ddconfig.use_linear_attn": True}, "Encoder", "use_linear_attn"),
    (VAE, {"ddconfig.attn_type": "linear"}, "Encoder", "attn_type"),
    (CLIP, {"layer": "penultimate"}, "FrozenCLIPEmbedder", "layer"),
]  # fmt: skip


def case_id(case: tuple[str, dict[str, Any], str, str]) -> str:
    return f"{case[2]}.{case[3]}"


@pytest.mark.parametrize("section,overrides,owner,name", CASES, ids=[case_id(c) for c in CASES])
def test_unsupported_reference_parameter_is_named(section: str, overrides: dict[str, Any], owner: str,
                                                  name: str) -> None:  # fmt: skip
    config = OmegaConf.load(TINY_CONFIG).model
    if section:  # build only the section's module (the model builds it the same way)
        config = config.params[section]
    params = config.setdefault("params", {})
    for key, value in overrides.items():
        OmegaConf.update(params, key, value, merge=False)
    expected = rf"^{owner}: parameter '{re.escape(name)}' = .+ is not supported \(this project implements only .+\)"
    with torch.device("meta"), pytest.raises(ValueError, match=expected):
        instantiate_from_config(config)


def test_sampler_parameters_are_named() -> None:
    model = SimpleNamespace(num_timesteps=1000)
    with pytest.raises(ValueError, match=r"^DDIMSampler: parameter 'schedule' = 'cosine' is not supported"):
        DDIMSampler(model, schedule="cosine")
    with pytest.raises(ValueError, match=r"^DDIMSampler.sample: parameter 'quantize_x0' = True is not supported"):
        DDIMSampler(model).sample(1, 1, (4, 8, 8), None, quantize_x0=True, mask=None)
    with pytest.raises(ValueError, match=r"^conv_nd: parameter 'dims' = 3 is not supported"):
        conv_nd(3, 4, 4, 3)


def test_message_and_comparison() -> None:
    with pytest.raises(ValueError) as err:
        check_supported("DDPM", "num_timesteps_cond", 2, None, 1)
    assert str(err.value) == (
        "DDPM: parameter 'num_timesteps_cond' = 2 is not supported (this project implements only None or 1)"
    )
    error = unsupported_parameter("M", "ckpt_path", "a.ckpt", "None", hint="load the checkpoint instead")
    assert str(error) == "M: parameter 'ckpt_path' = 'a.ckpt' is not supported (this project implements only None): " \
                         "load the checkpoint instead"  # fmt: skip
    check_supported("M", "ignore_keys", OmegaConf.create({"k": []}).k, ())  # yaml lists compare as lists
    check_supported("M", "use_ema", False, False)
    with pytest.raises(ValueError, match=r"= <Tensor of shape \(2, 3\)>"):
        check_supported("M", "x0", torch.zeros(2, 3), None)
