"""Exactly one module knows about devices: ``ldm/device.py``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from ldm.device import DEVICE_ENV, autocast, resolve_device
from tests.conftest import REPO

CUDA_PATTERN = re.compile(r"\.cuda\(|torch\.cuda|device\s*=\s*[\"']cuda")
SHIM = REPO / "ldm" / "device.py"


def project_sources() -> list:
    files = [p for d in ("ldm", "cldm", "annotator") for p in (REPO / d).rglob("*.py")]
    return files + sorted(REPO.glob("*.py"))


def test_no_cuda_outside_the_shim() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in project_sources()
        if path != SHIM
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if CUDA_PATTERN.search(line)
    ]
    assert len(project_sources()) > 20
    assert offenders == []
    assert CUDA_PATTERN.search(SHIM.read_text())


def calls_named(path: Path, name: str) -> list[int]:
    """Line numbers of calls ``<anything>.name(...)`` or ``name(...)`` in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called == name:
                found.append(node.lineno)
    return found


def test_no_hub_downloads_at_run_time() -> None:
    offenders = [f"{p.relative_to(REPO)}:{calls_named(p, 'from_pretrained')}" for p in project_sources()]
    assert [o for o in offenders if not o.endswith(":[]")] == []


def test_default_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")


def test_env_var_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device(None)
    assert resolve_device("cpu") == torch.device("cpu")  # the flag wins over the env var


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_absent_device_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="device 'cuda' is not available here"):
        resolve_device("cuda")


def test_autocast_is_noop_for_fp32() -> None:
    with autocast(torch.device("cpu"), torch.float32):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16

