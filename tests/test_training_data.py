"""fill50k generator, Fill50kDataset, WebDataset shards (write, read, split across ranks/workers)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import cldm.data as data
from cldm.data import Fill50kDataset, WebDatasetShards, expand_braces, write_webdataset
from tools.make_fill50k import COLORS, MIN_COLOR_DISTANCE, main, make_fill50k, make_sample, sample_rng

RES = 64
N = 10
PER_SHARD = 4


@pytest.fixture(scope="module")
def fill50k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-sample, 64 px fill50k folder (seed 0)."""
    root = tmp_path_factory.mktemp("fill50k")
    make_fill50k(root, N, resolution=RES, seed=0)
    return root


@pytest.fixture(scope="module")
def shards(fill50k: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The 10 samples as 3 tar shards of at most 4 samples."""
    out = tmp_path_factory.mktemp("shards")
    return write_webdataset(fill50k, str(out / "shard-%06d.tar"), samples_per_shard=PER_SHARD)


@pytest.fixture(scope="module")
def reference_items(fill50k: Path) -> list[dict]:
    return [Fill50kDataset(fill50k)[i] for i in range(N)]


def hint_id(item: dict) -> bytes:
    """Identify a sample by its (unique, losslessly stored) condition image."""
    hint = item["hint"]
    return (hint.numpy() if isinstance(hint, torch.Tensor) else hint).tobytes()


def all_ids(items: list[dict]) -> set[bytes]:
    ids = {hint_id(item) for item in items}
    assert len(ids) == N
    return ids


def pixel_distance(meta: dict) -> np.ndarray:
    ys, xs = np.mgrid[0 : meta["resolution"], 0 : meta["resolution"]]
    return np.hypot(xs - meta["center"][0], ys - meta["center"][1])


# ---------------------------------------------------------------------------------------------------- generator


def test_sample_is_deterministic_per_seed() -> None:
    first = make_sample(np.random.default_rng(3), RES)
    again = make_sample(np.random.default_rng(3), RES)
    other = make_sample(np.random.default_rng(4), RES)
    for a, b in zip(first[:2], again[:2]):
        np.testing.assert_array_equal(a, b)
    assert first[2:] == again[2:]
    assert not np.array_equal(first[1], other[1]) or first[2] != other[2]


def test_make_fill50k_is_deterministic(tmp_path: Path, fill50k: Path) -> None:
    make_fill50k(tmp_path / "same", 3, resolution=RES, seed=0)
    make_fill50k(tmp_path / "other", 3, resolution=RES, seed=1)
    for i in range(3):
        for folder in ("source", "target"):
            name = f"{folder}/{i}.png"
            assert (tmp_path / "same" / name).read_bytes() == (fill50k / name).read_bytes()
    same_lines = (tmp_path / "same" / "prompt.json").read_text().splitlines()
    assert same_lines == (fill50k / "prompt.json").read_text().splitlines()[:3]
    other_targets = [(tmp_path / "other" / f"target/{i}.png").read_bytes() for i in range(3)]
    assert other_targets != [(fill50k / f"target/{i}.png").read_bytes() for i in range(3)]


def test_source_is_white_outline_on_the_radius() -> None:
    source, _, _, meta = make_sample(sample_rng(0, 5), RES)
    assert source.shape == (RES, RES, 3) and source.dtype == np.uint8
    assert set(np.unique(source)) == {0, 255}
    lit = source.any(axis=2)
    assert (source[lit] == 255).all()
    assert lit.sum() < 0.15 * RES * RES
    dist = pixel_distance(meta)
    assert np.all(np.abs(dist[lit] - meta["radius"]) <= meta["thickness"] / 2)
    cx, cy, r = *meta["center"], meta["radius"]
    for x, y in ((cx + r, cy), (cx - r, cy), (cx, cy + r), (cx, cy - r)):
        assert lit[y, x]


def test_target_colors_match_meta_and_prompt() -> None:
    _, target, prompt, meta = make_sample(sample_rng(0, 7), RES)
    inside = pixel_distance(meta) <= meta["radius"]
    assert inside.sum() > 0.5 * np.pi * meta["radius"] ** 2
    assert (target[inside] == meta["circle_rgb"]).all()
    assert (target[~inside] == meta["background_rgb"]).all()
    assert prompt == f"{meta['circle_color']} circle with {meta['background_color']} background"
    assert COLORS[meta["circle_color"]] == meta["circle_rgb"]
    assert COLORS[meta["background_color"]] == meta["background_rgb"]


def test_geometry_and_color_constraints_hold() -> None:
    assert len(set(COLORS.values())) == len(COLORS)
    assert all(name == name.lower() for name in COLORS)
    for i in range(200):
        _, _, _, meta = make_sample(sample_rng(1, i), 32)
        cx, cy = meta["center"]
        reach = meta["radius"] + meta["thickness"]
        assert 32 / 10 <= meta["radius"] <= 32 / 3
        assert 0 <= cx - reach and cx + reach < 32 and 0 <= cy - reach and cy + reach < 32
        gap = np.linalg.norm(np.subtract(meta["circle_rgb"], meta["background_rgb"]))
        assert gap >= MIN_COLOR_DISTANCE


def test_prompt_json_has_reference_fields(fill50k: Path) -> None:
    lines = (fill50k / "prompt.json").read_text(encoding="utf-8").splitlines()
    assert len(lines) == N
    for i, line in enumerate(lines):
        entry = json.loads(line)
        assert set(entry) == {"source", "target", "prompt"}
        assert entry["source"] == f"source/{i}.png" and entry["target"] == f"target/{i}.png"
        assert entry["prompt"] == make_sample(sample_rng(0, i), RES)[2]
        assert (fill50k / entry["source"]).is_file() and (fill50k / entry["target"]).is_file()


def test_cli_bad_args_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--n", "0"], ["--resolution", "8"]):
        assert main(["--out", str(tmp_path / "bad"), *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "bad").exists()
    assert main(["--out", str(tmp_path / "ok"), "--n", "2", "--resolution", "16"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "2 samples" in out[0]
    assert len((tmp_path / "ok" / "prompt.json").read_text().splitlines()) == 2


# ---------------------------------------------------------------------------------------------------- Fill50kDataset


def test_fill50k_dataset_format_and_rgb_order(fill50k: Path) -> None:
    dataset = Fill50kDataset(fill50k)
    assert len(dataset) == N
    checked = 0
    for i in range(N):
        item = dataset[i]
        assert set(item) == {"jpg", "txt", "hint"}
        for key in ("jpg", "hint"):
            assert item[key].dtype == np.float32 and item[key].shape == (RES, RES, 3)
        assert item["jpg"].min() >= -1.0 and item["jpg"].max() <= 1.0
        assert item["hint"].min() >= 0.0 and item["hint"].max() <= 1.0
        _, _, prompt, meta = make_sample(sample_rng(0, i), RES)
        assert item["txt"] == prompt
        cx, cy = meta["center"]
        np.testing.assert_allclose((item["jpg"][cy, cx] + 1.0) * 127.5, meta["circle_rgb"], atol=1e-3)
        np.testing.assert_allclose((item["jpg"][0, 0] + 1.0) * 127.5, meta["background_rgb"], atol=1e-3)
        np.testing.assert_array_equal(item["hint"][cy, cx + meta["radius"]], [1.0, 1.0, 1.0])
        checked += meta["circle_rgb"][0] != meta["circle_rgb"][2]
    assert checked > 0  # at least one color whose R and B differ, so a BGR mix-up would fail


def test_fill50k_dataset_resize(fill50k: Path) -> None:
    item = Fill50kDataset(fill50k, resolution=32)[0]
    assert item["jpg"].shape == (32, 32, 3) and item["hint"].shape == (32, 32, 3)
    assert item["jpg"].dtype == np.float32 and item["hint"].dtype == np.float32
    assert -1.0 <= item["jpg"].min() and item["jpg"].max() <= 1.0
    assert 0.0 < item["hint"].max() <= 1.0


def test_fill50k_dataset_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prompt.json"):
        Fill50kDataset(tmp_path / "nowhere")
    make_fill50k(tmp_path / "ds", 2, resolution=16, seed=0)
    prompt_path = tmp_path / "ds" / "prompt.json"
    good = prompt_path.read_text().splitlines()
    prompt_path.write_text(good[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"prompt\.json:2: malformed"):
        Fill50kDataset(tmp_path / "ds")
    prompt_path.write_text(good[0] + '\n{"source": "source/1.png"}\n')
    with pytest.raises(ValueError, match=r"prompt\.json:2: malformed"):
        Fill50kDataset(tmp_path / "ds")
    prompt_path.write_text("\n".join(good) + "\n")
    (tmp_path / "ds" / "target" / "1.png").unlink()
    (tmp_path / "ds" / "source" / "0.png").write_bytes(b"not a png")
    dataset = Fill50kDataset(tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match=r"target/1\.png"):
        dataset[1]
    with pytest.raises(ValueError, match=r"source/0\.png: unreadable"):
        dataset[0]


def test_tutorial_dataset_reads_relative_default(fill50k: Path, tmp_path: Path, monkeypatch) -> None:
    from tutorial_dataset import MyDataset

    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "fill50k").symlink_to(fill50k, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    dataset = MyDataset()
    assert isinstance(dataset, Fill50kDataset) and len(dataset) == N
    assert dataset[0]["txt"] == make_sample(sample_rng(0, 0), RES)[2]


# ---------------------------------------------------------------------------------------------------- WebDataset


def test_write_webdataset_layout(shards: list[Path]) -> None:
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert names[:3] == ["000000.jpg", "000000.txt", "000000.png"]
    assert len(names) == 3 * PER_SHARD
    with tarfile.open(shards[2]) as tar:
        assert tar.getnames()[0] == "000008.jpg" and len(tar.getnames()) == 3 * (N - 2 * PER_SHARD)


def test_webdataset_round_trip(shards: list[Path], reference_items: list[dict]) -> None:
    items = list(WebDatasetShards([str(p) for p in shards]))
    assert len(items) == N
    for got, want in zip(items, reference_items):
        assert got["txt"] == want["txt"]
        assert got["hint"].dtype == np.float32 and got["jpg"].dtype == np.float32
        np.testing.assert_array_equal(got["hint"], want["hint"])
        assert got["jpg"].shape == want["jpg"].shape
        assert np.abs(got["jpg"] - want["jpg"]).mean() < 0.015  # JPEG quality 95, 4:4:4


def test_webdataset_resolution(shards: list[Path]) -> None:
    item = next(iter(WebDatasetShards(str(shards[0]), resolution=32)))
    assert item["jpg"].shape == (32, 32, 3) and item["hint"].shape == (32, 32, 3)


def test_brace_and_glob_patterns(shards: list[Path], reference_items: list[dict]) -> None:
    assert expand_braces("a{1..3}b") == ["a1b", "a2b", "a3b"]
    assert expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert expand_braces("{x,y}{0..1}") == ["x0", "x1", "y0", "y1"]
    folder = shards[0].parent
    want = [item["txt"] for item in reference_items]
    brace = WebDatasetShards(f"{folder}/shard-{{000000..000002}}.tar")
    glob_ = WebDatasetShards(f"{folder}/shard-*.tar")
    assert brace.shards == glob_.shards == [str(p) for p in shards]
    assert [item["txt"] for item in brace] == want
    with pytest.raises(FileNotFoundError, match=r"shard-000003\.tar: shard not found"):
        WebDatasetShards(f"{folder}/shard-{{000000..000009}}.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        WebDatasetShards(f"{folder}/nothing-*.tar")


@pytest.mark.parametrize("world", [2, 4])  # 3 shards: split by shard (2 ranks), by sample index (4 ranks)
def test_split_across_ranks_is_a_partition(shards: list[Path], reference_items: list[dict], monkeypatch,
                                           world: int) -> None:
    seen = []
    for rank in range(world):
        monkeypatch.setattr(data, "_rank_and_world", lambda rank=rank: (rank, world))
        seen.append({hint_id(item) for item in WebDatasetShards([str(p) for p in shards])})
    assert all(seen)
    assert sum(len(s) for s in seen) == N
    assert set().union(*seen) == all_ids(reference_items)


@pytest.mark.parametrize("n_shards", [3, 1])  # shard split / sample-index split over 2 workers
def test_dataloader_workers_see_each_sample_once(shards: list[Path], fill50k: Path, tmp_path: Path,
                                                 n_shards: int) -> None:
    paths = [str(p) for p in shards]
    if n_shards == 1:
        paths = [str(p) for p in write_webdataset(fill50k, str(tmp_path / "one-%d.tar"), samples_per_shard=N)]
    loader = torch.utils.data.DataLoader(WebDatasetShards(paths), batch_size=None, num_workers=2)
    items = list(loader)
    ids = [hint_id(item) for item in items]
    assert len(ids) == N and len(set(ids)) == N


def test_shuffle_buffer_keeps_all_samples(shards: list[Path], reference_items: list[dict]) -> None:
    paths = [str(p) for p in shards]
    plain = [hint_id(item) for item in WebDatasetShards(paths)]
    shuffled = [hint_id(item) for item in WebDatasetShards(paths, shuffle_buffer=4, seed=1)]
    again = [hint_id(item) for item in WebDatasetShards(paths, shuffle_buffer=4, seed=1)]
    assert shuffled == again and shuffled != plain
    assert set(shuffled) == all_ids(reference_items)


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_incomplete_sample_is_skipped_with_warning(shards: list[Path], tmp_path: Path) -> None:
    with tarfile.open(shards[0]) as src:
        members = {m.name: src.extractfile(m).read() for m in src.getmembers()}
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tar:
        for name, payload in members.items():
            if name != "000001.png":
                add_member(tar, name, payload)
    with pytest.warns(UserWarning, match=r"incomplete sample '000001' \(missing \.png\)"):
        items = list(WebDatasetShards(str(broken)))
    assert len(items) == PER_SHARD - 1
    assert [item["txt"] for item in items] == [members[f"00000{i}.txt"].decode() for i in (0, 2, 3)]
