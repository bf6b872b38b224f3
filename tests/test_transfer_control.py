"""``tool_transfer_control.py``: a ControlNet moved onto another base equals control + (new - old) key by key."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from cldm.checkpoint import load_state_dict, save_checkpoint, save_diffusers_controlnet
from cldm.model import create_model, load_model, model_config
from tests.conftest import TINY_CONFIG
from tool_transfer_control import main

CONTROL, UNET = "control_model.", "model.diffusion_model."


def base_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny SD base (LatentDiffusion keys) with random weights."""
    torch.manual_seed(seed)
    return create_model(TINY_CONFIG, base=True).state_dict()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Three files: SD1.5 stand-in (.ckpt, with flattened EMA keys), a whole 1.0 ControlNet made from it (its
    UNet, VAE and CLIP are the old base's; a trained ControlNet), a new base stored in fp16 (.safetensors)."""
    folder = tmp_path_factory.mktemp("transfer")
    old, new = base_state(1), base_state(2)
    torch.manual_seed(3)
    control = create_model(TINY_CONFIG).state_dict()
    control.update({k: v.clone() for k, v in old.items()})
    for key, value in control.items():  # "trained": every ControlNet tensor moved away from its init
        if key.startswith(CONTROL):
            control[key] = value + 0.01 * torch.randn_like(value)
    ema = {"model_ema." + k[len(UNET) :].replace(".", ""): torch.zeros_like(v) for k, v in old.items() if UNET in k}
    paths = {"old": folder / "sd15.ckpt", "control": folder / "control.pth", "new": folder / "new.safetensors"}
    save_checkpoint({**old, **ema}, paths["old"])
    save_checkpoint(control, paths["control"])
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in new.items()}, str(paths["new"]))
    return {"old": old, "new": {k: v.half().float() for k, v in new.items()}, "control": control, "paths": paths,
            "folder": folder}  # fmt: skip


def run(models: dict, out: Path, control: Path | None = None, **paths: Path) -> int:
    p = models["paths"]
    args = {"--path_sd15": p["old"], "--path_sd15_with_control": control or p["control"], "--path_input": p["new"],
            "--path_output": out, **{f"--{k}": v for k, v in paths.items()}}  # fmt: skip
    return main([str(x) for pair in args.items() for x in pair])


def test_whole_file_equals_control_plus_new_minus_old(models: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "control_new.pth"
    assert run(models, out) == 0
    result = load_state_dict(out)
    old, new, control = models["old"], models["new"], models["control"]
    assert result.keys() == control.keys()
    offset = kept = 0
    for key, value in result.items():
        assert value.dtype == control[key].dtype, key
        source = UNET + key[len(CONTROL) :] if key.startswith(CONTROL) else key
        if key.startswith(CONTROL) and source in new:
            assert torch.equal(value, control[key] + (new[source] - old[source])), key
            offset += 1
        elif key.startswith(CONTROL):  # hint encoder, zero convs, middle-block zero conv
            assert torch.equal(value, control[key]), key
            kept += 1
        else:  # UNet, VAE, CLIP and schedule: the new base's (the file's UNet is the old base's)
            assert torch.equal(value, new[key]), key
    assert offset == sum(k.startswith(UNET) and not k.startswith((UNET + "output_blocks", UNET + "out.")) for k in old)
    new_parts = tuple(CONTROL + n for n in ("input_hint_block", "zero_convs", "middle_block_out"))
    assert kept == sum(k.startswith(new_parts) for k in control)
    assert "Transferred model saved at" in capsys.readouterr().out
    model = load_model(TINY_CONFIG, out)  # a whole model the loader takes as it is
    assert torch.equal(model.first_stage_model.encoder.conv_in.weight, new["first_stage_model.encoder.conv_in.weight"])


def test_controlnet_only_file_stays_controlnet_only(models: dict, tmp_path: Path) -> None:
    only = {k: v for k, v in models["control"].items() if k.startswith(CONTROL)}
    path = tmp_path / "control_v11.safetensors"
    save_checkpoint(only, path)
    out = tmp_path / "out.safetensors"
    assert run(models, out, control=path) == 0
    result = load_state_dict(out)
    assert result.keys() == only.keys()
    key = CONTROL + "input_blocks.1.0.in_layers.2.weight"
    source = UNET + key[len(CONTROL) :]
    assert torch.equal(result[key], only[key] + (models["new"][source] - models["old"][source]))


def test_diffusers_controlnet_folder_is_read(models: dict, tmp_path: Path) -> None:
    """A folder was refused as "file not found" although it exists; the folder gives the file's result."""
    only = {k: v for k, v in models["control"].items() if k.startswith(CONTROL)}
    save_checkpoint(only, tmp_path / "only.safetensors")
    params = model_config(TINY_CONFIG).params.control_stage_config.params
    folder = save_diffusers_controlnet(only, tmp_path / "cn-diffusers", params)
    assert run(models, tmp_path / "a.safetensors", control=tmp_path / "only.safetensors") == 0
    assert run(models, tmp_path / "b.safetensors", control=folder) == 0
    a, b = load_state_dict(tmp_path / "a.safetensors"), load_state_dict(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() == only.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unlocked_unet_keeps_its_change(models: dict, tmp_path: Path) -> None:
    """A ControlNet trained with its UNet unlocked: the UNet's own change is moved too (new + (file - old))."""
    control = dict(models["control"])
    key = UNET + "out.2.weight"
    control[key] = control[key] + 1.0
    path = tmp_path / "unlocked.pth"
    save_checkpoint(control, path)
    out = tmp_path / "out.pth"
    assert run(models, out, control=path) == 0
    assert torch.equal(load_state_dict(out)[key], models["new"][key] + (control[key] - models["old"][key]))


def test_errors_are_one_line(models: dict, tmp_path: Path, capsys) -> None:
    p = models["paths"]

    def error(out: Path, **paths: Path) -> str:
        assert run(models, out, **paths) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
        return err.strip().splitlines()[-1]

    out = tmp_path / "out.pth"
    assert "missing.ckpt: not found (--path_input)" in error(out, path_input=tmp_path / "missing.ckpt")
    assert "--path_sd15_with_control" in error(out, path_sd15_with_control=p["old"])
    only_control = tmp_path / "only_control.pth"
    save_checkpoint({k: v for k, v in models["control"].items() if k.startswith(CONTROL)}, only_control)
    assert "only_control.pth: no model.diffusion_model.* tensors" in error(out, path_input=only_control)
    wide = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == UNET + "input_blocks.1.0.in_layers.2.weight" else v
            for k, v in models["new"].items()}  # fmt: skip
    save_checkpoint(wide, tmp_path / "wide.ckpt")
    message = error(out, path_input=tmp_path / "wide.ckpt")
    assert "wide.ckpt: model.diffusion_model.input_blocks.1.0.in_layers.2.weight has shape (33," in message
    save_checkpoint({**models["control"], "difference": torch.tensor(1.0)}, tmp_path / "diff.pth")
    assert "'difference' ControlNet" in error(out, path_sd15_with_control=tmp_path / "diff.pth")
    assert not out.exists()
    out.write_bytes(b"")
    assert "out.pth: output file already exists" in error(out)
    (tmp_path / "file").write_bytes(b"")
    assert "output folder is a file" in error(tmp_path / "file" / "out.pth")
    assert error(tmp_path / "o7.txt").endswith("o7.txt: not a checkpoint file name (.ckpt, .pth, .pt, .bin, "
                                               ".safetensors) (--path_output)")  # fmt: skip
    assert not (tmp_path / "o7.txt").exists()
