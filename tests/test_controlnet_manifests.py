"""The full-size model against the key/shape manifests of the files users download (ControlNet 1.1's
``control_v11p_sd15_canny.pth`` and a diffusers ControlNet's ``diffusion_pytorch_model.safetensors``), which
``tools/make_controlnet_manifests.py`` made from the reference code's key dump and diffusers' own model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cldm.checkpoint import convert
from cldm.model import build_model, model_config
from tests.conftest import REPO, V15_CONFIG
from tools import make_controlnet_manifests as manifests

FOLDER = REPO / "tests" / "data" / "manifests"


def read(name: str) -> dict:
    return json.loads((FOLDER / name).read_text())


def entries(state_dict: dict[str, torch.Tensor]) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def control_state() -> dict[str, torch.Tensor]:
    """The ``control_model.*`` tensors of the project's full-size model (cldm_v15.yaml), on the meta device."""
    with torch.device("meta"):
        model = build_model(model_config(V15_CONFIG), V15_CONFIG)
    return {k: v for k, v in model.state_dict().items() if k.startswith("control_model.")}


def test_manifests_hold_the_published_counts() -> None:
    for name in (manifests.LDM_NAME, manifests.DIFFUSERS_NAME):
        body = read(name)
        assert body["tensors"] == len(body["keys"]) == 340
        assert body["values"] == sum(math.prod(shape) for shape, _ in body["keys"].values()) == 361_279_120
        assert body["values"] * 4 == 1_445_116_480  # float32: the 1.45 GB of both files
        assert {dtype for _, dtype in body["keys"].values()} == {"float32"}
    diffusers_keys = read(manifests.DIFFUSERS_NAME)["keys"]
    assert sum(k.startswith("controlnet_down_blocks.") and k.endswith(".weight") for k in diffusers_keys) == 12
    assert diffusers_keys["controlnet_cond_embedding.conv_out.weight"][0] == [320, 256, 3, 3]
    assert diffusers_keys["controlnet_mid_block.weight"][0] == [1280, 1280, 1, 1]


def test_full_size_controlnet_equals_the_v11_manifest(control_state: dict[str, torch.Tensor]) -> None:
    expected = read(manifests.LDM_NAME)["keys"]
    assert entries(control_state) == expected


def test_diffusers_conversion_equals_the_diffusers_manifest(control_state: dict[str, torch.Tensor]) -> None:
    converted = convert(control_state, "ldm", "diffusers")
    assert entries(converted) == read(manifests.DIFFUSERS_NAME)["keys"]
    back = convert(converted, "diffusers", "ldm")
    assert entries(back) == read(manifests.LDM_NAME)["keys"]


def test_manifests_are_what_the_tool_makes(tmp_path) -> None:
    pytest.importorskip("diffusers")
    assert manifests.main(["--out", str(tmp_path)]) == 0
    for name in (manifests.LDM_NAME, manifests.DIFFUSERS_NAME):
        assert (tmp_path / name).read_text() == (FOLDER / name).read_text()
