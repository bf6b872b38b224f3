"""The model's state dict has exactly the reference checkpoint's keys and shapes, and loads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cldm.checkpoint import CheckpointError, check_state_dict, load_state_dict, save_checkpoint
from cldm.model import load_model, read_config
from ldm.util import instantiate_from_config
from tests.conftest import REPO, TINY_CONFIG, V15_CONFIG

MANIFEST = REPO / "tests" / "data" / "reference_sd15_keys.json"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def meta_model(config: Path) -> torch.nn.Module:
    with torch.device("meta"):
        return instantiate_from_config(read_config(config).model)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="module")
def v15_shapes() -> dict[str, tuple[list[int], str]]:
    sd = meta_model(V15_CONFIG).state_dict()
    return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}


def test_manifest_matches_public_facts(manifest: dict) -> None:
    keys = manifest["keys"]
    values = sum(torch.Size(shape).numel() for shape, _ in keys.values())
    assert manifest["tensors"] == len(keys) == 1484
    # the public count, 1483, leaves out the transformers-4 position_ids buffer a model built here lacks
    assert len([k for k in keys if k != POSITION_IDS]) == 1483
    # the public figure: 1,427.5 M values in fp32 = 5.71 GB
    assert round(values / 1e6, 1) == 1427.5
    assert round(values * 4 / 1e9, 2) == 5.71
    assert keys[POSITION_IDS] == [[1, 77], "int64"]
    prefixes = {
        "model.diffusion_model.": 686, "control_model.": 340, "first_stage_model.": 248, "cond_stage_model.": 197
    }  # fmt: skip
    for prefix, count in prefixes.items():
        assert sum(k.startswith(prefix) for k in keys) == count, prefix


def test_v15_keys_and_shapes_equal_reference(manifest: dict, v15_shapes: dict) -> None:
    expected = {k: tuple(v) for k, v in manifest["keys"].items() if k != POSITION_IDS}
    got = {k: (v[0], v[1]) for k, v in v15_shapes.items()}
    assert set(got) == set(expected)
    assert {k: (list(v[0]), v[1]) for k, v in got.items()} == {k: (list(v[0]), v[1]) for k, v in expected.items()}


def test_v15_has_reference_sections(v15_shapes: dict) -> None:
    assert "control_model.input_hint_block.14.weight" in v15_shapes
    assert v15_shapes["control_model.input_hint_block.14.weight"][0] == [320, 256, 3, 3]
    assert v15_shapes["control_model.zero_convs.11.0.weight"][0] == [1280, 1280, 1, 1]
    assert v15_shapes["control_model.middle_block_out.0.weight"][0] == [1280, 1280, 1, 1]
    assert len([k for k in v15_shapes if k.startswith("control_model.zero_convs.") and k.endswith("weight")]) == 12
    assert v15_shapes["cond_stage_model.transformer.text_model.final_layer_norm.weight"][0] == [768]
    assert v15_shapes["betas"][0] == [1000]


def test_reference_yaml_targets_unchanged() -> None:
    cfg = OmegaConf.load(V15_CONFIG).model
    assert cfg.target == "cldm.cldm.ControlLDM"
    assert cfg.params.control_stage_config.target == "cldm.cldm.ControlNet"
    assert cfg.params.unet_config.target == "cldm.cldm.ControlledUnetModel"
    assert cfg.params.first_stage_config.target == "ldm.models.autoencoder.AutoencoderKL"
    assert cfg.params.cond_stage_config.target == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    assert "params" not in cfg.params.cond_stage_config  # the hub name is the default, used offline


def _tiny_reference_style_checkpoint(tmp_path: Path, tiny_ckpt: Path, **edits: object) -> Path:
    """Tiny checkpoint saved as the released files are: flat dict, with transformers 4.x position_ids."""
    sd = dict(load_state_dict(tiny_ckpt))
    sd[POSITION_IDS] = torch.arange(77)[None]
    for key, value in edits.items():
        if value is None:
            sd.pop(key)
        else:
            sd[key] = value
    path = tmp_path / "released_style.pth"
    torch.save(sd, path)
    return path


def test_released_layout_loads_silently(tmp_path: Path, tiny_ckpt: Path, tiny_model: torch.nn.Module) -> None:
    path = _tiny_reference_style_checkpoint(tmp_path, tiny_ckpt, logvar=None)
    model = load_model(TINY_CONFIG, path)
    ref = tiny_model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref[key]), key
    ids = model.cond_stage_model.transformer.text_model.embeddings.position_ids
    assert ids.tolist() == [list(range(77))]


def test_reference_api_load_state_dict(tiny_ckpt: Path, tmp_path: Path) -> None:
    """``model.load_state_dict(load_state_dict(path))`` as in the reference scripts, incl. position_ids."""
    from cldm.model import create_model, load_state_dict  # the reference's imports

    path = _tiny_reference_style_checkpoint(tmp_path, tiny_ckpt)
    model = create_model(str(TINY_CONFIG))
    result = model.load_state_dict(load_state_dict(str(path), location="cpu"))
    assert not result.missing_keys and not result.unexpected_keys


def test_transformers5_style_clip_keys_are_renamed(tmp_path: Path, tiny_ckpt: Path) -> None:
    sd = dict(load_state_dict(tiny_ckpt))
    prefix = "cond_stage_model.transformer.text_model."
    sd = {("cond_stage_model.transformer." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    path = tmp_path / "tf5.safetensors"
    save_checkpoint(sd, path)
    loaded = load_state_dict(path)
    assert any(k.startswith(prefix) for k in loaded)
    check_state_dict(load_model(TINY_CONFIG, path), loaded)


def test_wrong_shapes_and_keys_are_named(tmp_path: Path, tiny_ckpt: Path) -> None:
    key = "control_model.zero_convs.0.0.weight"
    path = _tiny_reference_style_checkpoint(tmp_path, tiny_ckpt, **{key: torch.zeros(1, 2, 3)})
    with pytest.raises(CheckpointError, match=r"released_style\.pth.*1 tensors with the wrong shape.*zero_convs\.0\.0"):
        load_model(TINY_CONFIG, path)
    path = _tiny_reference_style_checkpoint(tmp_path, tiny_ckpt, **{key: None, "extra.weight": torch.zeros(1)})
    expected = r"1 missing keys \(control_model\.zero_convs\.0\.0\.weight\).*1 unexpected"
    with pytest.raises(CheckpointError, match=expected):
        load_model(TINY_CONFIG, path)
