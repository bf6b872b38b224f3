"""The table of checkpoint layouts (``cldm/checkpoint.py``): the ``sd`` row tool_add_control.py uses, and the
``diffusers`` ControlNet row, checked against diffusers' own conversion on the tiny and the SD1.5 config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cldm.checkpoint import (
    LAYOUTS,
    CheckpointError,
    ControlNetShape,
    UNetShape,
    controlnet_to_diffusers,
    convert,
    diffusers_to_controlnet,
)
from cldm.model import model_config
from ldm.util import instantiate_from_config
from tests.conftest import TINY_CONFIG, V15_CONFIG

CONTROL = "control_model."


def state_dict_of(config: Path, device: str) -> dict[str, torch.Tensor]:
    """The ControlLDM state dict of ``config``: seeded random values on the CPU, shapes only on ``meta``."""
    torch.manual_seed(0)
    with torch.device(device):
        return instantiate_from_config(model_config(config)).state_dict()


@pytest.fixture(scope="module", params=[(TINY_CONFIG, "cpu"), (V15_CONFIG, "meta")], ids=["tiny", "v15-meta"])
def ldm_and_config(request: pytest.FixtureRequest) -> tuple[dict[str, torch.Tensor], Path]:
    config, device = request.param
    return state_dict_of(config, device), config


def test_the_table_has_the_reference_sd_and_diffusers_rows() -> None:
    assert list(LAYOUTS) == ["ldm", "sd", "diffusers", "diffusers_unet", "diffusers_vae", "diffusers_clip"]
    with pytest.raises(ValueError, match="unknown checkpoint layout 'kohya' .*ldm, sd, diffusers"):
        convert({}, "kohya", "ldm")


def test_ldm_row_normalizes_transformers5_clip_keys() -> None:
    weight = torch.zeros(3)
    ids = torch.arange(77)[None]
    sd = {"cond_stage_model.transformer.final_layer_norm.weight": weight,
          "cond_stage_model.transformer.text_model.embeddings.position_ids": ids, "betas": weight}  # fmt: skip
    out = convert(sd, "ldm", "ldm")
    assert out == {"cond_stage_model.transformer.text_model.final_layer_norm.weight": weight, "betas": weight}


def test_sd_row_copies_the_unet_encoder_into_the_controlnet(ldm_and_config: tuple) -> None:
    ldm, _ = ldm_and_config
    sd = convert(ldm, "ldm", "sd")
    assert sd.keys() == {k for k in ldm if not k.startswith(CONTROL)} and all(sd[k] is ldm[k] for k in sd)
    back = convert(sd, "sd", "ldm")
    copied = {k for k in back if k.startswith(CONTROL)}
    # the ControlNet's own parts stay out: hint encoder, zero convs, middle_block_out
    assert copied == {k for k in ldm if k.startswith(CONTROL) and k.startswith(
        (CONTROL + "time_embed.", CONTROL + "input_blocks.", CONTROL + "middle_block."))}  # fmt: skip
    assert all(back[k] is sd["model.diffusion_model." + k[len(CONTROL) :]] for k in copied)
    assert all(back[k].shape == ldm[k].shape for k in copied)
    assert convert(back, "ldm", "sd") == sd
    assert convert({**sd, CONTROL + "zero_convs.0.0.weight": torch.ones(1)}, "sd", "ldm") == back  # ignored


def test_diffusers_row_equals_diffusers_conversion(ldm_and_config: tuple) -> None:
    """Our mapping gives exactly the keys diffusers' ``convert_controlnet_checkpoint`` gives, with the same tensors
    (hence shapes), and maps them back to the identical ``control_model.*`` keys and tensors."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    ldm, config = ldm_and_config
    layers = model_config(config).params.control_stage_config.params.num_res_blocks
    theirs = sfu.convert_controlnet_checkpoint(ldm, {"layers_per_block": layers})
    ours = convert(ldm, "ldm", "diffusers")
    assert ours.keys() == theirs.keys()
    assert all(ours[k] is theirs[k] for k in ours)
    assert len(ours) == sum(k.startswith(CONTROL) for k in ldm)
    named = {"controlnet_mid_block.weight", "controlnet_down_blocks.11.weight", "time_embedding.linear_2.bias",
             "controlnet_cond_embedding.blocks.5.weight", "down_blocks.3.resnets.1.conv2.weight"}  # fmt: skip
    assert named <= ours.keys()
    back = convert(ours, "diffusers", "ldm")
    control = {k: v for k, v in ldm.items() if k.startswith(CONTROL)}
    assert list(back) == list(control) and all(back[k] is control[k] for k in control)


def test_diffusers_row_matches_the_diffusers_model_at_sd15_size() -> None:
    """The SD1.5 ControlNet under our diffusers keys has exactly the keys and shapes of diffusers'
    ``ControlNetModel`` for SD1.5 (built on the meta device)."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = diffusers.ControlNetModel(cross_attention_dim=768)  # the other defaults are SD1.5's
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = controlnet_to_diffusers(state_dict_of(V15_CONFIG, "meta"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected


def test_controlnet_shape_is_read_from_either_layout(ldm_and_config: tuple) -> None:
    ldm, _ = ldm_and_config
    control = [k[len(CONTROL) :] for k in ldm if k.startswith(CONTROL)]
    shape = ControlNetShape.of_ldm(control)
    assert shape == ControlNetShape(levels=4, layers=2, hint_convs=8) and shape.input_blocks == 12
    assert ControlNetShape.of_diffusers(list(controlnet_to_diffusers(ldm))) == shape


def test_diffusers_row_names_keys_it_has_no_place_for() -> None:
    ldm = state_dict_of(TINY_CONFIG, "meta")
    with pytest.raises(CheckpointError, match=r"control_model\.extra\.weight: not a ControlNet key of the ldm"):
        controlnet_to_diffusers({**ldm, CONTROL + "extra.weight": torch.zeros(1)})
    converted = controlnet_to_diffusers(ldm)
    with pytest.raises(CheckpointError, match=r"down_blocks\.0\.resnets\.0\.norm3\.weight: not a ControlNet key"):
        diffusers_to_controlnet({**converted, "down_blocks.0.resnets.0.norm3.weight": torch.zeros(1)})
    assert controlnet_to_diffusers({"betas": torch.zeros(3)}) == {} and diffusers_to_controlnet({}) == {}


def test_unet_vae_and_clip_rows_equal_diffusers_conversion(ldm_and_config: tuple) -> None:
    """The pipeline rows give the keys and tensors of diffusers' ``convert_ldm_unet_checkpoint``,
    ``convert_ldm_vae_checkpoint`` (its attention weights reshaped to linear) and ``convert_ldm_clip_checkpoint``,
    and map them back to the identical reference keys and values."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    ldm, config = ldm_and_config
    params = model_config(config).params
    levels = len(params.first_stage_config.params.ddconfig.ch_mult)
    theirs = {"diffusers_unet": sfu.convert_ldm_unet_checkpoint(ldm, {"layers_per_block": 2}),
              "diffusers_vae": sfu.convert_ldm_vae_checkpoint(dict(ldm), {"down_block_types": [None] * levels,
                                                                          "up_block_types": [None] * levels}),
              "diffusers_clip": sfu.convert_ldm_clip_checkpoint(ldm)}  # fmt: skip
    prefixes = {"diffusers_unet": "model.diffusion_model.", "diffusers_vae": "first_stage_model.",
                "diffusers_clip": "cond_stage_model."}  # fmt: skip
    for row, expected in theirs.items():
        ours = convert(ldm, "ldm", row)
        assert ours.keys() == expected.keys(), row
        assert all(ours[k].shape == expected[k].shape for k in ours), row
        assert all(ours[k].untyped_storage().data_ptr() == expected[k].untyped_storage().data_ptr() for k in ours)
        back = convert(ours, row, "ldm")
        original = {k: v for k, v in ldm.items() if k.startswith(prefixes[row])}
        assert back.keys() == original.keys() and all(back[k].shape == original[k].shape for k in back), row
        assert all(back[k].untyped_storage().data_ptr() == original[k].untyped_storage().data_ptr() for k in back)


def test_unet_shape_knows_which_up_levels_have_attention(ldm_and_config: tuple) -> None:
    ldm, _ = ldm_and_config
    unet = [k.removeprefix("model.diffusion_model.") for k in ldm if k.startswith("model.diffusion_model.")]
    shape = UNetShape.of_ldm(unet)
    assert shape == UNetShape(levels=4, layers=2, attention=(False, True, True, True))
    assert UNetShape.of_diffusers(list(convert(ldm, "ldm", "diffusers_unet"))) == shape
