"""The table of checkpoint layouts (``cldm/checkpoint.py``): the ``sd`` row tool_add_control.py uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cldm.checkpoint import LAYOUTS, convert
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


def test_the_table_has_the_reference_and_sd_rows() -> None:
    assert list(LAYOUTS) == ["ldm", "sd"]
    with pytest.raises(ValueError, match=r"unknown checkpoint layout 'kohya' .*ldm, sd\)"):
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
