"""Memory measures (``ldm/memory.py``): bfloat16 storage with float32 compute, paging out memory-mapped
weights, glibc's allocator settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cldm.model import create_model, load_model
from ldm.memory import HALF_DTYPES, compute_in_float32, release_mapped_weights
from tests.conftest import REPO, TINY_CONFIG


class Probe(torch.nn.Module):
    """A layer that records the dtype of its weight during its call; raises when asked to."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor, fail: bool = False) -> torch.Tensor:
        self.seen.append(self.weight.dtype)
        if fail:
            raise RuntimeError("asked to fail")
        return x @ self.weight


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                               torch.nn.Conv2d(8, 4, 1))  # fmt: skip


@torch.no_grad()
def test_bfloat16_storage_computes_in_float32() -> None:
    """The same numbers as float32 weights holding the bfloat16 values; the stored parameters stay the same
    bfloat16 tensors, and ``forward`` is the class's own."""
    low = small_model().to(torch.bfloat16)
    stored = {name: p for name, p in low.named_parameters()}
    assert compute_in_float32(low) == 3  # two convs and the norm; the SiLU has no parameters
    full = small_model()
    full.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = low(x)
    assert out.dtype == torch.float32 and torch.equal(out, full(x))
    assert all(p is stored[name] and p.dtype == torch.bfloat16 for name, p in low.named_parameters())
    assert all("forward" not in vars(m) for m in low.modules())


def test_float32_copies_are_dropped_after_a_failed_call() -> None:
    probe = Probe().to(torch.bfloat16)
    weight = probe.weight
    assert compute_in_float32(probe) == 1
    with pytest.raises(RuntimeError, match="asked to fail"):
        probe(torch.ones(1, 4), fail=True)
    assert probe.weight is weight and probe.seen == [torch.float32]
    assert probe(torch.ones(1, 4)).dtype == torch.float32 and probe.weight is weight


@torch.no_grad()
def test_low_memory_model_computes_every_layer_in_float32(tiny_ckpt: Path) -> None:
    """Every module of a low-memory model that holds parameters, the transformers CLIP text encoder's included,
    sees float32 parameters during its call; its text encoding equals the float32 model's on the same values."""
    low = load_model(TINY_CONFIG, tiny_ckpt, low_memory=True)
    full = create_model(TINY_CONFIG).eval()
    full.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in low.state_dict().items()})
    seen: dict[str, set[torch.dtype]] = {}

    def record(name: str):  # noqa: ANN202
        return lambda module, args: seen.setdefault(name, set()).update(
            p.dtype for p in module.parameters(recurse=False))  # fmt: skip

    for name, module in low.named_modules():
        if any(p.dtype in HALF_DTYPES for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(record(name))
    text = low.get_learned_conditioning(["a house"])
    assert torch.equal(text, full.get_learned_conditioning(["a house"]))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = {"c_concat": [torch.rand(1, 3, 64, 64)], "c_crossattn": [text]}
    eps = low.apply_model(x, torch.tensor([500]), cond)
    assert torch.equal(eps, full.apply_model(x, torch.tensor([500]), cond))
    low.decode_first_stage(x)
    clip = [n for n in seen if n.startswith("cond_stage_model.transformer.")]
    assert len(clip) >= 10 and any(n.startswith("control_model.") for n in seen)
    assert any(n.startswith("first_stage_model.decoder.") for n in seen)
    assert set().union(*seen.values()) == {torch.float32}
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}


def resident_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_release_mapped_weights_drops_pages_and_reads_them_back(tmp_path) -> None:
    """Memory-mapped weights leave RAM and come back with the file's values; weights in ordinary memory stay."""
    path = tmp_path / "w.pth"
    torch.save({"w": torch.randn(16 * 2**20, generator=torch.Generator().manual_seed(0))}, path)  # 64 MiB
    mapped = torch.nn.Linear(1, 1)
    mapped.weight = torch.nn.Parameter(torch.load(path, mmap=True, weights_only=True)["w"], requires_grad=False)
    before = float(mapped.weight.sum())  # touches every page
    resident = resident_mb()
    assert release_mapped_weights(mapped) >= 63 * 2**20
    assert resident - resident_mb() > 48
    assert float(mapped.weight.sum()) == before
    ordinary = torch.nn.Linear(512, 512)
    copy = ordinary.weight.detach().clone()
    assert release_mapped_weights(ordinary) == 0 and torch.equal(ordinary.weight, copy)


FRAGMENTING = """
import sys
from pathlib import Path
import torch
from ldm.memory import return_freed_memory
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
from cldm.model import create_model, load_model
from ldm.memory import keep_freed_memory
mode = sys.argv[1]
if mode == "on" and not keep_freed_memory():
    sys.exit(3)
if mode.startswith("create"):  # the reference API: tuned unless told not to
    create_model(sys.argv[2], tune_allocator=mode == "create")
if mode.startswith("load"):
    load_model(sys.argv[2], sys.argv[3], tune_allocator=mode == "load")
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
def test_keep_freed_memory_reuses_large_blocks(tiny_ckpt: Path) -> None:
    """By default every freed block of 32 MiB or more is unmapped and its successor faults in fresh pages (5 rounds
    of a layer: ~180k faults here); kept, the heap's blocks are reused (0-33k faults: a few blocks do not fit).
    ``create_model`` (the reference API) and ``load_model`` keep them too, unless told not to touch the allocator."""

    def faults(mode: str) -> int:
        cmd = [sys.executable, "-c", REALLOCATING, mode, str(TINY_CONFIG), str(tiny_ckpt)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode == 3:
            pytest.skip("the C library is not glibc")
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)

    default = faults("off")
    assert default >= 5 * 16384  # at least the 64 MiB block, fresh in every round
    for tuned in ("on", "create", "load"):
        assert faults(tuned) <= default / 3, tuned
    for untouched in ("create-untuned", "load-untuned"):
        assert faults(untouched) >= 5 * 16384, untouched
