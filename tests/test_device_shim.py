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


FRAGMENTING = """
import sys
from pathlib import Path
import torch
from ldm.device import return_freed_memory
def rss_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) / 1024
if sys.argv[1] == "on" and not return_freed_memory():
    sys.exit(3)
torch.ones(4 * 2**20).sum()  # a 16 MiB block freed: glibc's default mmap threshold rises to 16 MiB
start = rss_mb()
blocks = [torch.ones(2**21) for _ in range(64)]  # 64 x 8 MiB
kept = blocks[1::2]
del blocks  # every other block freed: holes in the heap by default
print(round(rss_mb() - start))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_return_freed_memory_gives_freed_blocks_back() -> None:
    """With glibc's defaults freed 8 MiB activations stay resident in a fragmented heap; not after the call."""
    import subprocess
    import sys

    def grown_mb(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", FRAGMENTING, mode], cwd=REPO, capture_output=True, text=True)

    on = grown_mb("on")
    if on.returncode == 3:
        pytest.skip("the C library is not glibc")
    assert on.returncode == 0, on.stderr
    assert 240 <= int(on.stdout) <= 300  # only the 32 blocks still held
    assert int(grown_mb("off").stdout) >= 480  # the freed half too


REALLOCATING = """
import resource, sys
import torch
from ldm.device import keep_freed_memory
if sys.argv[1] == "on" and not keep_freed_memory():
    sys.exit(3)
x = torch.ones(2**22)
def layer():  # activations of 16-64 MiB made and freed, as a step's layers do
    a = torch.cat([x, x])
    b = (a.repeat(2) * 2).sum()
    c = torch.nn.functional.gelu(x) + x
    return (b + c.sum()).item()
for _ in range(3):
    layer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    layer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_keep_freed_memory_reuses_large_blocks() -> None:
    """By default every freed block of 32 MiB or more is unmapped and its successor faults in fresh pages (5 rounds
    of a layer: ~180k faults here); kept, the heap's blocks are reused (0-33k faults: a few blocks do not fit)."""
    import subprocess
    import sys

    def faults(mode: str) -> int:
        proc = subprocess.run([sys.executable, "-c", REALLOCATING, mode], cwd=REPO, capture_output=True, text=True)
        if proc.returncode == 3:
            pytest.skip("the C library is not glibc")
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)

    default = faults("off")
    assert default >= 5 * 16384  # at least the 64 MiB block, fresh in every round
    assert faults("on") <= default / 3
