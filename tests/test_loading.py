"""One loader for .ckpt/.pth/.safetensors: clear one-line errors, no second copy of the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cldm.checkpoint import CheckpointError, load_state_dict, save_checkpoint
from cldm.model import load_model
from tests.conftest import TINY_CONFIG


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of ``path`` (Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".safetensors"])
def test_formats_and_nesting_load_the_same(tmp_path: Path, tiny_ckpt: Path, suffix: str) -> None:
    ref = load_state_dict(tiny_ckpt)
    path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save(dict(ref), path)  # flat, not nested under "state_dict"
    else:
        save_checkpoint(ref, path)
    loaded = load_state_dict(path)
    assert loaded.keys() == ref.keys()
    assert all(torch.equal(loaded[k], ref[k]) for k in ref)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_weights_are_not_copied(tiny_ckpt: Path) -> None:
    """Every floating parameter of the loaded model lives in the checkpoint's memory mapping."""
    model = load_model(TINY_CONFIG, tiny_ckpt)
    ranges = mapped_ranges(tiny_ckpt)
    assert ranges, "checkpoint is not memory-mapped"
    params = list(model.parameters())
    inside = [any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in params]
    assert all(inside), f"{inside.count(False)} of {len(params)} parameters were copied"


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pth: checkpoint file not found"):
        load_state_dict(tmp_path / "nope.pth")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file(tmp_path: Path, tiny_ckpt: Path, suffix: str) -> None:
    full = tmp_path / f"full{suffix}"
    save_checkpoint(load_state_dict(tiny_ckpt), full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"cut\{suffix}: not a readable checkpoint") as info:
        load_state_dict(cut)
    assert "\n" not in str(info.value)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match=r"garbage\.ckpt: not a readable checkpoint"):
        load_state_dict(path)


def test_not_a_dict_and_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "list.ckpt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        load_state_dict(path)
    path = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {"epoch": 3}}, path)
    with pytest.raises(CheckpointError, match="contains no tensors"):
        load_state_dict(path)


def test_bad_config(tmp_path: Path, tiny_ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing\.yaml: config file not found"):
        load_model(tmp_path / "missing.yaml", tiny_ckpt)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(CheckpointError, match=r"bad\.yaml: not a readable yaml config"):
        load_model(bad, tiny_ckpt)
    empty = tmp_path / "empty.yaml"
    empty.write_text("foo: 1\n")
    with pytest.raises(CheckpointError, match=r"empty\.yaml: config has no model\.target"):
        load_model(empty, tiny_ckpt)


def test_fp16_checkpoint_is_cast_to_fp32(tmp_path: Path, tiny_ckpt: Path) -> None:
    ref = load_state_dict(tiny_ckpt)
    path = tmp_path / "half.safetensors"
    save_checkpoint({k: v.half() if v.is_floating_point() else v for k, v in ref.items()}, path)
    model = load_model(TINY_CONFIG, path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    w = model.state_dict()["control_model.input_hint_block.0.weight"]
    assert torch.equal(w, ref["control_model.input_hint_block.0.weight"].half().float())
