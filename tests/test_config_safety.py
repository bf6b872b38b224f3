"""Configs are data (issue 20 item 6): a yaml ``target`` outside the project's model classes is refused without
importing or running anything, and every config fault is one line naming the file and the field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import cpu_canny2image
from cldm.checkpoint import CheckpointError
from cldm.model import create_model
from ldm.util import ALLOW_TARGETS_ENV, ALLOWED_TARGETS, ConfigError, instantiate_from_config
from tests.conftest import REPO, TINY_CONFIG

Edit = Callable[[OmegaConf], None]


class UserModel:
    """A user's own class, allowed through the environment variable."""

    def __init__(self, width: int) -> None:
        self.width = width


def bad_config(tmp_path: Path, edit: Edit) -> Path:
    """The tiny config with ``edit`` applied, written to tmp_path/bad.yaml."""
    config = OmegaConf.load(TINY_CONFIG)
    edit(config)
    path = tmp_path / "bad.yaml"
    OmegaConf.save(config, path)
    return path


def run_cli(config: Path, ckpt: Path, out: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = cpu_canny2image.main(["--config", str(config), "--ckpt", str(ckpt), "-o", str(out),
                                 "--image-resolution", "64", "--ddim-steps", "1"])  # fmt: skip
    stdout, err = capsys.readouterr()
    assert stdout == "" and "Traceback" not in err
    return code, err


def test_every_target_of_the_shipped_configs_is_allowed() -> None:
    targets = set()
    for path in (REPO / "models").glob("*.yaml"):
        targets |= {line.split("target:")[1].strip() for line in path.read_text().splitlines() if "target:" in line}
    assert len(targets) >= 7 and targets <= ALLOWED_TARGETS


@pytest.mark.parametrize("where", ["model", "cond_stage_config", "lossconfig"])
def test_os_system_target_is_refused_and_not_run(
    where: str, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    evil = {"target": "os.system", "params": {"command": f"touch {marker}"}}

    def edit(config: OmegaConf) -> None:
        if where == "model":
            config.model = evil
        elif where == "cond_stage_config":
            config.model.params.cond_stage_config = evil
        else:
            config.model.params.first_stage_config.params.lossconfig = evil

    bad = bad_config(tmp_path, edit)
    code, err = run_cli(bad, tiny_ckpt, tmp_path / "out", capsys)
    assert code == 1 and len(err.splitlines()) == 1 and not marker.exists()
    assert err.startswith(f"error: {bad}: model") and "'os.system' is not one of the project's model classes" in err
    assert ALLOW_TARGETS_ENV in err
    with pytest.raises(ConfigError, match="os.system"):
        instantiate_from_config(evil)
    with pytest.raises(CheckpointError, match="os.system"):
        create_model(bad)
    assert not marker.exists()


FAULTS: dict[str, tuple[Edit, str]] = {
    "wrong target": (lambda c: setattr(c.model, "target", "cldm.cldm.NoSuchModel"),
                     "model.target: 'cldm.cldm.NoSuchModel' is not one of the project's model classes"),
    "missing target": (lambda c: c.model.params.unet_config.pop("target"), "model.params.unet_config.target: missing"),
    "missing first_stage_config": (lambda c: c.model.params.pop("first_stage_config"),
                                   "model.params.first_stage_config: missing (required by cldm.cldm.ControlLDM)"),
    "missing model_channels": (
        lambda c: c.model.params.control_stage_config.params.pop("model_channels"),
        "model.params.control_stage_config.params.model_channels: missing (required by cldm.cldm.ControlNet)"),
    "wrong type": (lambda c: setattr(c.model.params.unet_config.params, "model_channels", "abc"),
                   "model.params.unet_config.params.model_channels: expected int, got 'abc'"),
    "wrong float": (lambda c: setattr(c.model.params, "scale_factor", [1, 2]),
                    "model.params.scale_factor: expected float, got [1, 2]"),
    "unknown param": (lambda c: setattr(c.model.params.first_stage_config.params, "bogus", 1),
                      "model.params.first_stage_config.params.bogus: unknown parameter of "
                      "ldm.models.autoencoder.AutoencoderKL"),
    "params not a mapping": (lambda c: setattr(c.model.params.unet_config, "params", 3),
                             "model.params.unet_config.params: expected a mapping, got 3"),
    "nested wrong type": (lambda c: setattr(c.model.params.first_stage_config.params.ddconfig, "ch", "x"),
                          "model.params.first_stage_config.params.ddconfig.ch: expected int, got 'x'"),
    "nested missing": (lambda c: c.model.params.first_stage_config.params.ddconfig.pop("z_channels"),
                       "model.params.first_stage_config.params.ddconfig.z_channels: missing (required by "
                       "ldm.models.autoencoder.AutoencoderKL.ddconfig)"),
    "value the constructor refuses": (
        lambda c: setattr(c.model.params.unet_config.params, "use_spatial_transformer", False),
        "model: cannot build cldm.cldm.ControlLDM: ControlledUnetModel: parameter 'use_spatial_transformer' = False "
        "is not supported"),
}  # fmt: skip


@pytest.mark.parametrize("fault", FAULTS)
def test_config_fault_is_one_line_naming_file_and_field(
    fault: str, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    edit, message = FAULTS[fault]
    bad = bad_config(tmp_path, edit)
    code, err = run_cli(bad, tiny_ckpt, tmp_path / "out", capsys)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {bad}: {message}"), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(CheckpointError) as info:
        create_model(bad)
    assert str(info.value).startswith(f"{bad}: {message}")


def test_missing_module_of_an_allowed_custom_target(
    monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(ALLOW_TARGETS_ENV, "no_such_package.Model")
    bad = bad_config(tmp_path, lambda c: setattr(c.model.params.cond_stage_config, "target", "no_such_package.Model"))
    code, err = run_cli(bad, tiny_ckpt, tmp_path / "out", capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {bad}: model.params.cond_stage_config.target: cannot import 'no_such_package.Model'")


def test_users_own_classes_are_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"target": f"{__name__}.UserModel", "params": {"width": 3}}
    monkeypatch.delenv(ALLOW_TARGETS_ENV, raising=False)
    with pytest.raises(ConfigError, match="UserModel' is not one of the project's model classes"):
        instantiate_from_config(config)
    monkeypatch.setenv(ALLOW_TARGETS_ENV, f" other.Thing , {__name__}.UserModel")
    model = instantiate_from_config(config)
    assert isinstance(model, UserModel) and model.width == 3
