"""SD-era .ckpt files as users have them: numpy scalars and Lightning callback objects load (tensors only, no code
runs); a pickle that names code is refused with one line naming the callable; no message has escape codes."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import cpu_canny2image
from cldm.checkpoint import MAX_STAND_INS, CheckpointError, StandIn, _read_checkpoint, load_state_dict
from cldm.model import load_model
from tests.conftest import TINY_CONFIG

LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"
FORMATS = {"zip": True, "legacy": False}  # torch.save's _use_new_zipfile_serialization


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3, generator=g),
        "model.diffusion_model.out.2.bias": torch.randn(4, generator=g).half(),
        "betas": torch.linspace(1e-4, 2e-2, 10, dtype=torch.float64),
    }


def save(obj: Any, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value), key


def fake_classes(monkeypatch: pytest.MonkeyPatch, module: str, names: list[str]) -> list[type]:
    """Classes that pickle under ``module.<name>`` (fake modules in ``sys.modules`` for the test's duration, so
    the pickle's GLOBAL names that path without the real package being imported)."""
    parts = module.split(".")
    for i in range(1, len(parts)):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    mod = types.ModuleType(module)
    classes = []
    for name in names:
        cls = type(name, (), {"__module__": module, "__qualname__": name})
        setattr(mod, name, cls)
        classes.append(cls)
    monkeypatch.setitem(sys.modules, module, mod)
    return classes


def lightning_checkpoint(monkeypatch: pytest.MonkeyPatch, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What many SD 1.x files hold: numpy-scalar counters and the ModelCheckpoint callback (as a dict key and as
    an instance with its state) next to the state dict."""
    (model_checkpoint,) = fake_classes(monkeypatch, LIGHTNING_MODULE, ["ModelCheckpoint"])
    callback = model_checkpoint()
    callback.monitor = "val/loss"
    callback.best_model_score = torch.tensor(0.125)
    return {
        "state_dict": state_dict,
        "epoch": np.int64(6),
        "global_step": np.int64(470000),
        "callbacks": {model_checkpoint: {"best_model_path": "/logs/last.ckpt"}},
        "checkpoint_callback": callback,
    }


def refusal_line(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and "weights_only" not in message
    assert message.startswith(str(path))
    return message


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "scalar", [np.int64(470000), np.int32(7), np.float32(0.5), np.float64(1e-4), np.bool_(True), np.float16(2.0)]
)
def test_numpy_scalars_load(tmp_path: Path, fmt: str, scalar: np.generic) -> None:
    expected = weights()
    path = save({"state_dict": expected, "global_step": scalar, "epoch": np.int64(3)}, tmp_path / "sd.ckpt", fmt)
    assert_same(load_state_dict(path), expected)
    assert _read_checkpoint(path, "cpu")["global_step"] == scalar


@pytest.mark.parametrize("fmt", FORMATS)
def test_lightning_callback_state_loads_as_inert_stand_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    expected = weights()
    with monkeypatch.context() as m:
        path = save(lightning_checkpoint(m, expected), tmp_path / "sd-v1.ckpt", fmt)
    assert_same(load_state_dict(path), expected)

    data = _read_checkpoint(path, "cpu")
    assert data["global_step"] == 470000
    callback = data["checkpoint_callback"]
    assert isinstance(callback, StandIn) and callback.stands_for == f"{LIGHTNING_MODULE}.ModelCheckpoint"
    assert callback.state["monitor"] == "val/loss" and callback.state["best_model_score"].item() == 0.125
    assert not hasattr(callback, "monitor")  # the state is kept, never applied to the object
    (key,) = data["callbacks"]
    assert issubclass(key, StandIn) and data["callbacks"][key] == {"best_model_path": "/logs/last.ckpt"}


def test_stand_in_never_imports_the_named_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        (thing,) = fake_classes(m, "absent_pkg_for_safe_loading.sub", ["Thing"])
        path = save({"state_dict": weights(), "extra": thing(), "kind": thing}, tmp_path / "x.ckpt", "zip")
    assert_same(load_state_dict(path), weights())
    assert not any(name.startswith("absent_pkg_for_safe_loading") for name in sys.modules)
    assert repr(_read_checkpoint(path, "cpu")["extra"]) == "<stand-in for absent_pkg_for_safe_loading.sub.Thing>"


def test_too_many_unknown_classes_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        classes = fake_classes(m, "many_classes_for_safe_loading", [f"C{i}" for i in range(MAX_STAND_INS + 1)])
        path = save({"state_dict": weights(), "objs": [c() for c in classes]}, tmp_path / "many.ckpt", "zip")
    assert f"more than {MAX_STAND_INS} unknown classes" in refusal_line(path)


class Reduces:
    """An object whose pickle calls ``func(*args)`` on load, as a malicious checkpoint does."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


def payloads(target: Path) -> dict[str, Reduces]:
    """Each payload would create ``target`` if run."""
    return {
        "os.system": Reduces(os.system, (f"echo pwned > {target}",)),
        "builtins.exec": Reduces(exec, (f"open({str(target)!r}, 'w').write('pwned')",)),
        "subprocess.Popen": Reduces(subprocess.Popen, (["sh", "-c", f"echo pwned > {target}"],)),
        "builtins.eval": Reduces(eval, (f"open({str(target)!r}, 'w')",)),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("callable_name", ["os.system", "builtins.exec", "subprocess.Popen", "builtins.eval"])
def test_malicious_pickle_refused_naming_the_callable(tmp_path: Path, fmt: str, callable_name: str) -> None:
    target = tmp_path / "pwned"
    payload = payloads(target)[callable_name]
    path = save({"state_dict": weights(), "global_step": np.int64(1), "x": payload}, tmp_path / "evil.ckpt", fmt)
    message = refusal_line(path)
    assert not target.exists()
    assert f"wants to run code ({callable_name})" in message and "not loaded" in message


def test_code_after_a_stand_in_still_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "pwned"
    with monkeypatch.context() as m:
        obj = lightning_checkpoint(m, weights())
        obj["z"] = payloads(target)["os.system"]
        path = save(obj, tmp_path / "evil.ckpt", "zip")
    assert "wants to run code (os.system)" in refusal_line(path)
    assert not target.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file_is_one_line_without_escape_codes(tmp_path: Path, fmt: str) -> None:
    path = save({"state_dict": weights(), "global_step": np.int64(5)}, tmp_path / "full.ckpt", fmt)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated or corrupt" in refusal_line(cut)


def test_sd_era_file_loads_into_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path) -> None:
    """The whole route: a Lightning-era file of the tiny model loads through the scripts' loader."""
    expected = load_state_dict(tiny_ckpt)
    with monkeypatch.context() as m:
        path = save(lightning_checkpoint(m, expected), tmp_path / "lightning.ckpt", "zip")
    model = load_model(TINY_CONFIG, path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in expected.items())


def test_malicious_checkpoint_from_the_command_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    ckpt = save({"state_dict": weights(), "x": payloads(target)["os.system"]}, tmp_path / "evil.ckpt", "zip")
    out_dir = tmp_path / "out"
    code = cpu_canny2image.main(["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "-o", str(out_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and not target.exists()
    assert err.splitlines() == [err] and "\x1b" not in err
    assert err.startswith(f"error: {ckpt}: refused: the file wants to run code (os.system)")
    assert not any(out_dir.glob("*"))
