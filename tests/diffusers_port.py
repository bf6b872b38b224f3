"""The same weights in diffusers: ControlNetModel, UNet2DConditionModel and AutoencoderKL, converted from a
project state dict with diffusers' own single-file conversion utilities and configs built locally (no hub).

diffusers is a test-only dependency: the equivalence tests and the benchmark's ``diffusers`` path use this
port as an independent implementation to compare against.
"""

from __future__ import annotations

from typing import Any

import torch

# diffusers UNet config keys that the ControlNet config shares (see create_controlnet_diffusers_config_from_ldm).
CONTROLNET_KEYS_FROM_UNET = (
    "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
    "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block",
)  # fmt: skip


def controlnet_config(original_config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers' ControlNet config for the yaml: its helper, or the same mapping where the helper is broken."""
    from diffusers.loaders import single_file_utils as sfu

    try:
        return sfu.create_controlnet_diffusers_config_from_ldm(original_config, state_dict)
    except TypeError:  # diffusers 0.42 calls create_unet_diffusers_config_from_ldm without its `checkpoint` argument
        unet_config = sfu.create_unet_diffusers_config_from_ldm(original_config, state_dict)
        hint_channels = original_config["model"]["params"]["control_stage_config"]["params"]["hint_channels"]
        return {"conditioning_channels": hint_channels, **{k: unet_config[k] for k in CONTROLNET_KEYS_FROM_UNET}}


def build_converted(
    cls: type, config: dict[str, Any], convert: Any, state_dict: dict[str, torch.Tensor]
) -> tuple[Any, dict]:
    """Instantiate ``cls(**config)`` and strictly load ``convert(state_dict, config)``; returns (model, converted)."""
    converted = convert(state_dict, config)
    missing_values = [k for k, v in converted.items() if v is None]
    if missing_values:
        raise ValueError(f"{cls.__name__}: conversion found no source for {missing_values[:3]}")
    with torch.device("meta"):
        model = cls(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval(), converted


def norm_groups(original_config: dict[str, Any]) -> tuple[int, int]:
    """(UNet/ControlNet, VAE) GroupNorm group counts of the yaml (``norm_num_groups``, SD's 32 when absent)."""
    params = original_config["model"]["params"]
    unet = params["unet_config"]["params"].get("norm_num_groups", 32)
    vae = params["first_stage_config"]["params"]["ddconfig"].get("norm_num_groups", 32)
    return unet, vae


def convert_to_diffusers(original_config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """name -> (diffusers model, converted state dict) for "unet", "controlnet" and "vae"."""
    import diffusers
    from diffusers.loaders import single_file_utils as sfu

    unet_groups, vae_groups = norm_groups(original_config)
    unet_config = {**sfu.create_unet_diffusers_config_from_ldm(original_config, state_dict),
                   "norm_num_groups": unet_groups}  # fmt: skip
    controlnet = {**controlnet_config(original_config, state_dict), "norm_num_groups": unet_groups}
    vae_config = {**sfu.create_vae_diffusers_config_from_ldm(original_config, state_dict),
                  "norm_num_groups": vae_groups}  # fmt: skip
    return {
        "unet": build_converted(diffusers.UNet2DConditionModel, unet_config, sfu.convert_ldm_unet_checkpoint,
                                state_dict),  # fmt: skip
        "controlnet": build_converted(diffusers.ControlNetModel, controlnet, sfu.convert_controlnet_checkpoint,
                                      state_dict),  # fmt: skip
        "vae": build_converted(diffusers.AutoencoderKL, vae_config, sfu.convert_ldm_vae_checkpoint, state_dict),
    }


# SD1.5's scheduler_config.json (a PNDMScheduler's): what `Scheduler.from_config(pipe.scheduler.config)` starts from.
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": False,
    "skip_prk_steps": True, "trained_betas": None,
}  # fmt: skip
# the project's sampler name -> (diffusers scheduler class name, config overrides) of the scheduler it equals
DIFFUSERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2", "predict_x0": True}),
    "unipc_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def diffusers_scheduler(sampler: str) -> Any:
    """The diffusers scheduler that the project's sampler ``sampler`` (a key of ``DIFFUSERS``) equals, made from
    SD1.5's scheduler config."""
    import diffusers

    cls_name, overrides = DIFFUSERS[sampler]
    return getattr(diffusers, cls_name).from_config(SD15_SCHEDULER_CONFIG, **overrides)


def convert_text_encoder(state_dict: dict[str, torch.Tensor], config: Any) -> Any:
    """transformers' ``CLIPTextModel`` of ``config`` (made without touching torch's global random stream) holding the
    weights diffusers' ``convert_ldm_clip_checkpoint`` gives for ``state_dict`` (reference keys; its transformers-4
    ``text_model.`` level dropped where the model has none), in eval mode."""
    import transformers
    from diffusers.loaders import single_file_utils as sfu

    with torch.random.fork_rng():
        text = transformers.CLIPTextModel(config)
    own = text.state_dict()
    clip = {k if k in own else k.removeprefix("text_model."): v
            for k, v in sfu.convert_ldm_clip_checkpoint(state_dict).items() if "position_ids" not in k}  # fmt: skip
    text.load_state_dict(clip, strict=True)
    return text.eval()


def random_autoencoder_tiny(seed: int = 0) -> Any:
    """diffusers' ``AutoencoderTiny`` from its default config (no hub), every parameter random normal (weights std
    0.045, biases 0.1: torch's default initialisation decodes to a near-constant image), in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.AutoencoderTiny().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.045 if param.dim() > 1 else 0.1)
    return model
