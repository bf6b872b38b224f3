"""Issue 20 item 14: flags the scripts used to accept silently (or with a traceback) are one line, exit 1."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import cpu_canny2image
import gradio_canny2image
from ldm.device import set_threads
from share import DEMO_CKPT, TINY_CONFIG, choose_model
from tests.conftest import REPO


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("threads", [0, -3, (os.cpu_count() or 1) + 1, 1000])
def test_threads_outside_the_cpu_count_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, threads: int) -> None:
    before = torch.get_num_threads()
    code = cpu_canny2image.main(["--ckpt", str(DEMO_CKPT), "--config", str(TINY_CONFIG), "--threads", str(threads),
                                 "-o", str(tmp_path / "out")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert f"--threads must be between 1 and {os.cpu_count()}" in one_error_line(err)
    assert f"got {threads}" in err
    assert torch.get_num_threads() == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("threads", [1, os.cpu_count() or 1])
def test_threads_within_the_cpu_count_is_set(threads: int) -> None:
    before = torch.get_num_threads()
    try:
        set_threads(threads)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_set_threads_none_leaves_torch_alone() -> None:
    before = torch.get_num_threads()
    set_threads(None)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("main", [cpu_canny2image.main, gradio_canny2image.main], ids=["cli", "gradio"])
def test_demo_with_ckpt_is_refused(capsys: pytest.CaptureFixture, tmp_path: Path, main) -> None:
    ckpt = tmp_path / "mine.ckpt"
    code = main(["--demo", "--ckpt", str(ckpt)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert "--demo" in line and f"--ckpt {ckpt}" in line


def test_choose_model_modes() -> None:
    demo = choose_model(demo=True)
    assert (demo.ckpt, demo.config, demo.demo) == (DEMO_CKPT, TINY_CONFIG, True)
    mine = choose_model("x.ckpt", TINY_CONFIG)
    assert (mine.ckpt, mine.config, mine.demo) == (Path("x.ckpt"), TINY_CONFIG, False)
    with pytest.raises(ValueError, match="--demo and --ckpt x.ckpt cannot be combined"):
        choose_model("x.ckpt", None, demo=True)


@pytest.mark.parametrize("port", [0, -1, 65536, 99999])
def test_port_out_of_range_is_one_line(capsys: pytest.CaptureFixture, port: int) -> None:
    code = gradio_canny2image.main(["--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert one_error_line(err) == f"error: --port must be between 1 and 65535, got {port}"


@pytest.mark.parametrize("path,ignored", [("lightning_logs/version_0/metrics.csv", True), ("ldm/device.py", False)])
def test_lightning_logs_are_git_ignored(path: str, ignored: bool) -> None:
    done = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, check=False)
    assert done.returncode == (0 if ignored else 1)
