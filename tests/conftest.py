"""Shared fixtures: the tiny config, seeded random checkpoints built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cldm.model import create_model, load_model
from tools.make_random_checkpoint import fill_zero_parameters, make_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "models" / "cldm_tiny.yaml"
V15_CONFIG = REPO / "models" / "cldm_v15.yaml"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random checkpoint whose zero-initialised layers are filled (every path is exercised)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_filled.ckpt"
    make_random_checkpoint(TINY_CONFIG, path, seed=0, fill_zeros_std=0.05)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt: Path) -> torch.nn.Module:
    """The tiny model loaded from ``tiny_ckpt`` through the scripts' loader."""
    return load_model(TINY_CONFIG, tiny_ckpt)


@pytest.fixture()
def fresh_tiny_model() -> torch.nn.Module:
    """A tiny model with the reference's initialisation (zero convs at zero), except the UNet's output conv."""
    torch.manual_seed(0)
    model = create_model(TINY_CONFIG).eval()
    unet = model.model.diffusion_model
    fill_zero_parameters(unet, 0.05, torch.Generator().manual_seed(1))
    return model


def random_tiny_model() -> torch.nn.Module:
    """The tiny ControlLDM (eval mode) with seeded random weights and no all-zero layer (every tensor matters);
    the global random state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(TINY_CONFIG)
    fill_zero_parameters(model, 0.05, torch.Generator().manual_seed(1))
    return model.eval()


def with_flags(args: list[str], extra: list[str]) -> list[str]:
    """``args`` with each ``--flag value`` pair of ``extra`` replacing the flag's value, or appended."""
    args = list(args)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args
