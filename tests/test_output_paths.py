"""Output locations that cannot be written: found before any slow work, one line naming the path, exit 1,
no file left behind (issue 20 item 12). Tests run as root, where a read-only mode does not stop writes, so an
unwritable location is a path under a regular file (it can never be created) or a writer made to fail."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

import cpu_canny2image
import tool_add_control
import tutorial_train
from cldm.checkpoint import check_writable_dir, save_checkpoint
from cldm.pipeline import Canny2Image
from tests.conftest import TINY_CONFIG
from tools import convert_checkpoint


def under_a_file(tmp_path: Path) -> Path:
    """A folder path that cannot exist: its parent is a regular file."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    return blocker / "sub"


def unwritable(tmp_path: Path, kind: str) -> Path:
    """``"missing"``: a folder that cannot be created; ``"existing"``: a folder that exists and takes no files
    (/proc, as a read-only folder would for a user who is not root)."""
    under_a_file(tmp_path)  # the same files in tmp_path either way
    return tmp_path / "file.txt" / "sub" if kind == "missing" else Path("/proc")


KINDS = pytest.mark.parametrize("kind", ["missing", "existing"])


def one_error_line(capsys: pytest.CaptureFixture, after_sampling: bool = False) -> str:
    """The one error line; after sampling, the load and progress lines come before it."""
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1 or after_sampling, err
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, err
    return lines[-1]


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def never(*args: object, **kwargs: object) -> None:
    raise AssertionError("reached the slow work before checking the output location")


# --- the check itself -----------------------------------------------------------------------------------


def test_check_writable_dir_creates_a_missing_folder_and_leaves_it_empty(tmp_path: Path) -> None:
    folder = check_writable_dir(tmp_path / "a" / "b")
    assert folder == tmp_path / "a" / "b" and folder.is_dir() and os.listdir(folder) == []


@pytest.mark.parametrize("where", ["under a file", "a file", "proc"])
def test_check_writable_dir_refuses_with_the_folder_named(tmp_path: Path, where: str) -> None:
    folder = {"under a file": under_a_file(tmp_path), "a file": tmp_path / "file.txt", "proc": Path("/proc/x")}[where]
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OSError) as info:
        check_writable_dir(folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: ") and len(message.splitlines()) == 1


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_check_writable_dir_on_proc_says_the_filesystem_refuses_files() -> None:
    """/proc exists: "No such file or directory" alone was misleading."""
    with pytest.raises(OSError) as info:
        check_writable_dir("/proc")
    assert str(info.value).startswith("/proc: output folder cannot be written (its filesystem does not allow new "
                                      "files")  # fmt: skip


# --- cpu_canny2image.py -----------------------------------------------------------------------------------


def cli_args(ckpt: Path, out_dir: Path) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "-o", str(out_dir), "--image-resolution", "64",
            "--ddim-steps", "2", "--seed", "5", "-n", "2"]  # fmt: skip


@KINDS
def test_cli_unwritable_output_folder_is_found_before_loading(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path, tmp_path: Path, kind: str
) -> None:
    monkeypatch.setattr(Canny2Image, "from_checkpoint", never)
    out = unwritable(tmp_path, kind)
    assert cpu_canny2image.main(cli_args(tiny_ckpt, out)) == 1
    assert str(out) in one_error_line(capsys)
    assert all_files(tmp_path) == ["file.txt"]


@pytest.mark.slow
def test_cli_write_failing_midway_keeps_no_image(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path, tmp_path: Path
) -> None:
    real_save_png = cpu_canny2image.save_png
    calls: list[Path] = []

    def disk_full_on_the_second(array: np.ndarray, path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save_png(array, path)

    monkeypatch.setattr(cpu_canny2image, "save_png", disk_full_on_the_second)
    out = tmp_path / "out"
    assert cpu_canny2image.main(cli_args(tiny_ckpt, out)) == 1
    err = one_error_line(capsys, after_sampling=True)
    assert str(out) in err and "No space left on device" in err
    assert len(calls) == 2 and calls[0].name == "astronaut_edges.png"  # the first image was written, then removed
    assert all_files(out) == []


# --- checkpoint tools -------------------------------------------------------------------------------------


@KINDS
def test_add_control_checks_the_output_before_reading_the_input(
    capsys: pytest.CaptureFixture, tmp_path: Path, kind: str
) -> None:
    out = unwritable(tmp_path, kind) / "control.ckpt"
    # the input does not exist either: the output's error shows the output was checked first
    assert tool_add_control.main([str(tmp_path / "missing.ckpt"), str(out), "--config", str(TINY_CONFIG)]) == 1
    err = one_error_line(capsys)
    assert str(out.parent) in err and "missing.ckpt" not in err
    assert all_files(tmp_path) == ["file.txt"]


@KINDS
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_convert_checkpoint_checks_the_output_before_reading_the_input(
    capsys: pytest.CaptureFixture, tmp_path: Path, suffix: str, kind: str
) -> None:
    out = unwritable(tmp_path, kind) / f"model{suffix}"
    assert convert_checkpoint.main([str(tmp_path / "missing.ckpt"), str(out)]) == 1
    err = one_error_line(capsys)
    assert str(out.parent) in err and "missing.ckpt" not in err
    assert all_files(tmp_path) == ["file.txt"]


# --- save_checkpoint --------------------------------------------------------------------------------------

STATE = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_save_checkpoint_to_an_unwritable_folder_is_an_oserror_naming_it(tmp_path: Path, suffix: str) -> None:
    path = under_a_file(tmp_path) / f"model{suffix}"
    with pytest.raises(OSError) as info:
        save_checkpoint(STATE, path)
    assert str(info.value).startswith(f"{path}: ") and len(str(info.value).splitlines()) == 1
    assert all_files(tmp_path) == ["file.txt"]


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_save_checkpoint_write_error_is_an_oserror_and_leaves_no_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, suffix: str
) -> None:
    """torch.save reports a full disk as RuntimeError, safetensors as SafetensorError; both leave bytes behind."""

    def torch_full(obj: object, f: Any) -> None:  # a path or an open file, as torch.save takes
        f.write(b"PK partial") if hasattr(f, "write") else Path(f).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0\nmore detail")

    def safetensors_full(tensors: object, filename: str) -> None:
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(torch, "save", torch_full)
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_full)
    path = tmp_path / f"model{suffix}"
    with pytest.raises(OSError) as info:
        save_checkpoint(STATE, path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot write the checkpoint") and len(message.splitlines()) == 1
    assert all_files(tmp_path) == []


def test_save_checkpoint_still_writes(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "model.safetensors"
    save_checkpoint(STATE, path)
    assert torch.equal(safetensors.torch.load_file(path)["w"], STATE["w"])
    assert all_files(tmp_path) == ["deep/model.safetensors"]


# --- tutorial_train.py ------------------------------------------------------------------------------------


@KINDS
@pytest.mark.parametrize("flag", ["--log-dir", "--ckpt-dir"])
def test_training_checks_its_folders_before_building_the_model(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flag: str, kind: str
) -> None:
    monkeypatch.setattr(tutorial_train, "build_model", never)
    (tmp_path / "init.ckpt").write_bytes(b"x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompt.json").write_text("")
    bad = unwritable(tmp_path, kind)
    folders = {"--log-dir": str(tmp_path / "logs"), "--ckpt-dir": str(tmp_path / "ckpts"), flag: str(bad)}
    args = ["--config", str(TINY_CONFIG), "--init-ckpt", str(tmp_path / "init.ckpt"), "--data", str(tmp_path / "data")]
    assert tutorial_train.main([*args, *(x for item in folders.items() for x in item)]) == 1
    assert str(bad) in one_error_line(capsys)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_saved_checkpoints_get_ordinary_file_permissions(tmp_path: Path, suffix: str) -> None:
    """As any new file (0666 less the umask), not the 0600 of safetensors' or a temporary file's own creation."""
    mask = os.umask(0o022)
    try:
        save_checkpoint({"w": torch.zeros(2)}, tmp_path / f"x{suffix}")
    finally:
        os.umask(mask)
    assert (tmp_path / f"x{suffix}").stat().st_mode & 0o777 == 0o644
