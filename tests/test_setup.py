"""Set-up files: CPU-only installs."""

from __future__ import annotations

import re

from omegaconf import OmegaConf

from tests.conftest import REPO


def requirement_names(path: str) -> set[str]:
    names = set()
    for line in (REPO / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=!~\[ ]", line)[0].lower())
    return names


def test_default_install_is_cpu_only_and_light() -> None:
    text = (REPO / "requirements.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", text, re.M)
    heavy = {"torchvision", "open-clip-torch", "xformers", "triton", "diffusers", "gradio"}
    assert not requirement_names("requirements.txt") & heavy


def test_conda_environment_is_cpu_only() -> None:
    env = OmegaConf.to_container(OmegaConf.load(REPO / "environment.yaml"))
    flat = str(env).lower()
    assert "cudatoolkit" not in flat and "pytorch-cuda" not in flat and "nvidia" not in flat
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-r requirements.txt" in pip
    assert any("download.pytorch.org/whl/cpu" in p for p in pip)
