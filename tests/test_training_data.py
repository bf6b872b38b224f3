"""fill50k generator, Fill50kDataset, WebDataset shards (write, read, split across ranks/workers); sizes and
checks of training data and of the initial checkpoint before training."""

from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cldm.data as data
import tutorial_train
from cldm.checkpoint import save_checkpoint
from cldm.data import Fill50kDataset, WebDatasetShards, expand_braces, write_webdataset
from cldm.model import create_model
from tests.conftest import TINY_CONFIG
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


# ---------------------------------------------------------------------------------------------------- sizes, checks


def flat(width: int, height: int, rgb: tuple[int, int, int] = (200, 30, 90)) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (height, width, 3)).copy()


def write_folder(root: Path, pairs: list[tuple[np.ndarray | bytes, np.ndarray | bytes]]) -> Path:
    """A fill50k-style folder of (source, target) pairs: arrays saved as PNG, bytes written as they are."""
    for folder in ("source", "target"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, images in enumerate(pairs):
        for folder, image in zip(("source", "target"), images):
            path = root / folder / f"{i}.png"
            if isinstance(image, bytes):
                path.write_bytes(image)
            else:
                Image.fromarray(image).save(path)
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"p{i}"}))
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def train_cli(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str], *extra: str,
              init_ckpt: Path | None = None) -> tuple[int, str, str]:
    """Exit code, stderr and stdout of tutorial_train.main on ``data``; the default initial checkpoint is a dummy
    file, so a run whose data passes its checks stops at the checkpoint."""
    if init_ckpt is None:
        init_ckpt = tmp_path / "dummy.ckpt"
        init_ckpt.write_bytes(b"not a checkpoint")
    argv = ["--config", str(TINY_CONFIG), "--init-ckpt", str(init_ckpt), "--data", str(data),
            "--log-dir", str(tmp_path / "logs"), "--batch-size", "2", *extra]  # fmt: skip
    code = tutorial_train.main(argv)
    out, err = capsys.readouterr()
    return code, err.strip(), out.strip()


def one_line_error(code: int, err: str, out: str = "") -> str:
    assert code == 1
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("value", ["72", "0", "-64", "32", "100", "513"])
def test_resolution_must_be_a_multiple_of_64(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    folder = write_folder(tmp_path / "data", [(flat(64, 64), flat(64, 64))] * 2)
    err = one_line_error(*train_cli(tmp_path, folder, capsys, "--resolution", value))
    assert f"--resolution must be a multiple of 64 (64, 128, ...), got {value}" in err
    assert not (tmp_path / "logs").exists()  # refused before anything was made


def test_resize_needs_a_resolution(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_folder(tmp_path / "data", [(flat(64, 64), flat(64, 64))] * 2)
    err = one_line_error(*train_cli(tmp_path, folder, capsys, "--resize", "stretch"))
    assert "--resize stretch needs --resolution" in err


@pytest.mark.parametrize(
    "sizes,extra,file,message",
    [
        ([((80, 48), (80, 48))] * 2, [], "target/0.png", "80x48: sides must be multiples of 64"),
        ([((72, 72), (72, 72))] * 2, [], "target/0.png", "72x72: sides must be multiples of 64"),
        ([((64, 64), (64, 64)), ((64, 128), (64, 128))], [], "target/1.png",
         "64x128, but .*target/0.png is 64x64: images batched together must have one size"),
        ([((64, 64), (64, 64)), ((64, 64), (128, 128))], [], "source/1.png",
         "64x64, but its target .*target/1.png is 128x128: a pair must have one size"),
        ([((128, 128), (128, 128))] * 2, ["--resolution", "64", "--resize", "none"], "target/0.png",
         "128x128, not the training size 64x64"),
        ([((64, 64), (64, 64)), ((128, 64), (64, 128))], ["--resolution", "64"], "source/1.png",
         "128x64, but its target .*target/1.png is 64x128: other proportions would not line up"),
    ],
    ids=["80x48", "72x72", "mixed-sizes", "pair-differs", "not-the-resolution", "pair-aspect"],
)
def test_unusable_sizes_are_one_line_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     sizes: list, extra: list[str], file: str, message: str) -> None:
    folder = write_folder(tmp_path / "data", [(flat(*source), flat(*target)) for source, target in sizes])
    err = one_line_error(*train_cli(tmp_path, folder, capsys, *extra))
    assert re.search(rf"error: {re.escape(str(folder / file))}: {message}", err), err
    assert "--resolution" in err or "--resize" in err or "proportions" in err  # says how to train on it


@pytest.mark.parametrize(
    "sizes,extra",
    [
        ([((80, 48), (80, 48)), ((72, 72), (72, 72)), ((64, 128), (64, 128))], ["--resolution", "64"]),
        ([((80, 48), (40, 24)), ((30, 50), (60, 100))], ["--resolution", "64", "--resize", "stretch"]),
        ([((64, 64), (64, 64)), ((64, 128), (64, 128))], ["--batch-size", "1"]),
    ],
    ids=["center-crop", "stretch-same-proportions", "mixed-sizes-batch-1"],
)
def test_usable_sizes_pass_the_data_check(tmp_path: Path, capsys: pytest.CaptureFixture[str], sizes: list,
                                          extra: list[str]) -> None:
    folder = write_folder(tmp_path / "data", [(flat(*source), flat(*target)) for source, target in sizes])
    code, err, out = train_cli(tmp_path, folder, capsys, *extra)
    assert "dummy.ckpt" in one_line_error(code, err)  # the data passed; the (dummy) checkpoint stopped the run
    size = "sizes vary" if "--batch-size" in extra else "64x64"
    assert out == f"training data: {len(sizes)} pairs checked, {size}"


def test_center_crop_and_stretch_pixels() -> None:
    bands = np.zeros((64, 128, 3), np.uint8)  # 128 wide, 64 high: red | green (middle half) | blue
    bands[:, :32], bands[:, 32:96], bands[:, 96:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    cropped = data.fit_image(bands, 64, "center-crop")
    assert cropped.shape == (64, 64, 3) and (cropped == (0, 255, 0)).all()
    stretched = data.fit_image(bands, 64, "stretch")
    assert stretched.shape == (64, 64, 3)
    assert (stretched[:, :16] == (255, 0, 0)).all() and (stretched[:, 16:48] == (0, 255, 0)).all()
    assert (stretched[:, 48:] == (0, 0, 255)).all()
    assert data.fit_image(bands, 64, "none") is bands and data.fit_image(bands, None, "stretch") is bands
    tall = np.zeros((80, 48, 3), np.uint8)  # enlarged: 48 -> 64 wide, 80 -> 107 high, centre rows kept
    tall[:, :, 0] = np.arange(80, dtype=np.uint8)[:, None]
    up = data.fit_image(tall, 64, "center-crop")
    assert up.shape == (64, 64, 3)
    for row in (0, 32, 63):  # output row -> row 21 + row of the 107-high scaled image -> source row
        assert abs(int(up[row, 7, 0]) - ((row + 21 + 0.5) * 80 / 107 - 0.5)) <= 1


def test_items_have_the_training_size_and_collate(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, [(flat(80, 48), flat(80, 48)), (flat(72, 72), flat(72, 72)),
                                     (flat(64, 128), flat(64, 128)), (flat(32, 32), flat(64, 64))])  # fmt: skip
    dataset = Fill50kDataset(folder, resolution=64)
    assert dataset.check(batch_size=4, multiple=64) == (64, 64)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["jpg"].shape == (4, 64, 64, 3) and batch["hint"].shape == (4, 64, 64, 3)
    np.testing.assert_allclose(batch["jpg"][:, 10, 10], np.tile([200 / 127.5 - 1, 30 / 127.5 - 1, 90 / 127.5 - 1],
                                                                (4, 1)), atol=1e-6)  # fmt: skip
    as_is = Fill50kDataset(folder)
    with pytest.raises(data.ImageSizeError, match=r"source/3\.png: 32x32, but its target .* is 64x64"):
        as_is[3]  # used without a check, a pair that does not fit is still one error naming the file
    assert as_is[2]["jpg"].shape == (128, 64, 3)


def test_header_size_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION] = 6  # a phone portrait: stored 128 wide, shown 64 wide
    for ext in ("jpg", "png", "webp"):
        path = tmp_path / f"portrait.{ext}"
        Image.fromarray(flat(128, 64)).save(path, exif=exif)
        assert data.header_size(path, str(path)) == (64, 128) == data.decoded_size(data.read_rgb(path))
    plain = tmp_path / "plain.png"
    Image.fromarray(flat(128, 64)).save(plain)
    assert data.header_size(plain, "x") == (128, 64)


def png_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "bad,message",
    [
        (None, "image not found"),
        (b"", "unreadable image"),
        (b"<html>404 Not Found</html>", "unreadable image"),
        (png_bytes(flat(64, 64))[:-40], "unreadable image"),  # a truncated download
        (png_bytes(flat(64, 64), "TGA"), "unreadable image \\(a format OpenCV cannot decode\\)"),
    ],
    ids=["missing", "empty", "html", "truncated-png", "tga"],
)
def test_bad_files_are_found_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: bytes | None,
                                             message: str) -> None:
    good = flat(64, 64)
    pairs = [(good, good)] * 6
    pairs[3] = (good, good if bad is None else bad)
    folder = write_folder(tmp_path / "data", pairs)
    bad_path = folder / "target" / "3.png"
    if bad is None:
        bad_path.unlink()
    err = one_line_error(*train_cli(tmp_path, folder, capsys))
    assert re.search(rf"error: {re.escape(str(bad_path))}: {message}", err), err
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        Fill50kDataset(folder).check()


@pytest.mark.parametrize("field", ["source", "target"])
@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "source/../../x.png", "..\\..\\x.png",
                                  "C:/Windows/win.ini", ""])  # fmt: skip
def test_paths_must_stay_inside_the_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str,
                                                path: str) -> None:
    folder = write_folder(tmp_path / "data", [(flat(64, 64), flat(64, 64))] * 2)
    lines = (folder / "prompt.json").read_text().splitlines()
    entry = json.loads(lines[1])
    entry[field] = path
    (folder / "prompt.json").write_text("\n".join([lines[0], "", json.dumps(entry)]) + "\n")
    err = one_line_error(*train_cli(tmp_path, folder, capsys))
    assert f"prompt.json:3: {field} {path!r} is outside the data folder" in err
    with pytest.raises(ValueError, match="outside the data folder"):
        Fill50kDataset(folder)
    with pytest.raises(ValueError, match="outside the data folder"):
        write_webdataset(folder, str(tmp_path / "s-%d.tar"))


def test_symlinked_images_inside_the_folder_are_read(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "data", [(flat(64, 64), flat(64, 64))])
    elsewhere = tmp_path / "elsewhere.png"
    Image.fromarray(flat(64, 64, (1, 2, 3))).save(elsewhere)
    (folder / "target" / "0.png").unlink()
    (folder / "target" / "0.png").symlink_to(elsewhere)
    dataset = Fill50kDataset(folder)
    assert dataset.check() == (64, 64)
    np.testing.assert_allclose((dataset[0]["jpg"][0, 0] + 1) * 127.5, [1, 2, 3], atol=1e-4)


def truncated_jpeg(fraction: float) -> bytes:
    """A noisy 64x64 JPEG cut to ``fraction`` of its length (an interrupted download): its header is sound."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(noise, "JPEG")
    return data[: int(len(data) * fraction)]


def corrupt_idat_png() -> bytes:
    """A 64x64 PNG whose pixel data does not inflate, every chunk CRC still right (what Pillow's verify checks)."""
    data = bytearray(png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    start = data.index(b"IDAT")
    length = int.from_bytes(data[start - 4 : start], "big")
    for i in range(start + 4 + length // 2, start + 4 + length // 2 + 16):
        data[i] ^= 0xFF
    crc_at = start + 4 + length
    data[crc_at : crc_at + 4] = zlib.crc32(bytes(data[start:crc_at])).to_bytes(4, "big")
    return bytes(data)


UNDECODABLE = {"jpeg-30%": truncated_jpeg(0.3), "jpeg-90%": truncated_jpeg(0.9), "png-idat": corrupt_idat_png()}


@pytest.mark.parametrize("kind", list(UNDECODABLE))
def test_undecodable_pixels_pass_the_header_check_and_raise_data_error(tmp_path: Path, kind: str) -> None:
    good = flat(64, 64)
    folder = write_folder(tmp_path / "data", [(good, good), (good, UNDECODABLE[kind])])
    dataset = Fill50kDataset(folder)
    assert dataset.check() == (64, 64)  # headers only: this is found when the sample is drawn
    with pytest.raises(data.DataError) as caught:
        dataset[1]
    assert str(caught.value) == (f"{folder / 'target' / '1.png'}: unreadable image "
                                 "(the pixel data cannot be decoded: truncated or corrupt)")  # fmt: skip


def test_data_errors_keep_their_line_through_dataloader_workers(tmp_path: Path) -> None:
    good = flat(64, 64)
    folder = write_folder(tmp_path / "data", [(good, good), (good, corrupt_idat_png())])
    (folder / "source" / "0.png").unlink()
    for index, error, message in [(1, data.DataError, f"{folder / 'target' / '1.png'}: unreadable image"),
                                  (0, data.MissingDataError, f"{folder / 'source' / '0.png'}: image not found")]:
        subset = torch.utils.data.Subset(Fill50kDataset(folder), [index])
        with pytest.raises(error) as caught:
            next(iter(torch.utils.data.DataLoader(subset, num_workers=1)))
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value), str(caught.value)
    assert issubclass(data.MissingDataError, FileNotFoundError) and issubclass(data.ImageSizeError, data.DataError)


@pytest.mark.parametrize("resize", ["center-crop", "stretch"])
@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (64, 513)], ids=["1x20000", "20000x1", "64x513"])
def test_thin_images_are_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str], resize: str,
                                                 size: tuple[int, int]) -> None:
    folder = write_folder(tmp_path / "data", [(flat(64, 64), flat(64, 64)), (flat(*size), flat(*size))])
    err = one_line_error(*train_cli(tmp_path, folder, capsys, "--resolution", "512", "--resize", resize))
    assert err == (f"error: {folder / 'target' / '1.png'}: {size[0]}x{size[1]}: sides further apart than 8:1, "
                   "too thin to resize to 512x512 (crop it first)")  # fmt: skip


@pytest.mark.parametrize("resize", ["center-crop", "stretch"])
def test_fit_image_scales_within_the_aspect_bound(resize: str) -> None:
    for height, width in [(2000, 1), (1, 2000), (8, 65)]:  # center-crop would scale 1x2000 to 64x128000
        with pytest.raises(data.ImageSizeError, match=f"{width}x{height}: sides further apart than 8:1"):
            data.fit_image(np.zeros((height, width, 3), np.uint8), 64, resize)
    for height, width in [(8, 64), (512, 64), (1, 1)]:  # 8:1 is the most allowed
        assert data.fit_image(np.zeros((height, width, 3), np.uint8), 64, resize).shape == (64, 64, 3)
    assert data.fit_image(np.zeros((1, 2000, 3), np.uint8), 64, "none").shape == (1, 2000, 3)  # not resized


def test_prompt_json_that_is_not_utf8_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_folder(tmp_path / "data", [(flat(64, 64), flat(64, 64))] * 3)
    prompt = folder / "prompt.json"
    lines = prompt.read_text().splitlines()
    lines[1] = lines[1].replace('"p1"', '"café"')
    prompt.write_bytes("\n".join(lines).encode("latin-1") + b"\n")  # é is the one byte 0xe9 in Latin-1
    err = one_line_error(*train_cli(tmp_path, folder, capsys))
    column = lines[1].index("é") + 1
    assert err == f"error: {prompt}:2: not UTF-8 text (byte 0xe9 at column {column}); save prompt.json as UTF-8"
    with pytest.raises(data.DataError, match=r"prompt\.json:2: not UTF-8"):
        Fill50kDataset(folder)


def test_prompt_json_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "data", [(flat(64, 64), flat(64, 64))] * 2)
    prompt = folder / "prompt.json"
    prompt.write_bytes(b"\xef\xbb\xbf" + prompt.read_text().replace('"p1"', '"caf\u00e9"').encode())
    dataset = Fill50kDataset(folder)
    assert dataset.data[0] == {"source": "source/0.png", "target": "target/0.png", "prompt": "p0"}
    assert dataset.data[1]["prompt"] == "café"


def test_resize_without_resolution_says_images_keep_their_size(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_folder(tmp_path / "data", [(flat(64, 64), flat(64, 64))] * 2)
    err = one_line_error(*train_cli(tmp_path, folder, capsys, "--resize", "center-crop"))
    assert err == ("error: --resize center-crop needs --resolution (the size to resize to); without --resolution "
                   "images are used at their own size")  # fmt: skip
    assert tutorial_train.build_parser().parse_args([]).resize is None  # center-crop only once --resolution is given


# ---------------------------------------------------------------------------------------------------- --init-ckpt


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return create_model(TINY_CONFIG).state_dict()


@pytest.mark.parametrize("fault", ["missing-and-unexpected", "wrong-shape", "sd-without-control"])
def test_init_ckpt_mismatch_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], fill50k: Path,
                                        tiny_state: dict[str, torch.Tensor], fault: str) -> None:
    state = dict(tiny_state)
    control = sorted(k for k in state if k.startswith("control_model."))
    if fault == "missing-and-unexpected":
        for key in control[:5]:
            del state[key]
        state.update({f"extra.layer{i}.weight": torch.zeros(1) for i in range(3)})
        expected = (r"5 missing keys \(control_model\.[\w.]+, control_model\.[\w.]+, \.\.\. \(3 more\)\); "
                    r"3 unexpected keys \(extra\.layer0\.weight, extra\.layer1\.weight, \.\.\. \(1 more\)\)$")
    elif fault == "wrong-shape":
        state[control[0]] = torch.zeros(3, 1)
        expected = rf"1 tensors with the wrong shape \({re.escape(control[0])} \(3, 1\) vs \([\d, ]+\)\)$"
    else:
        state = {k: v for k, v in state.items() if not k.startswith("control_model.")}
        expected = r"no ControlNet weights \(control_model\.\*\): make the initial checkpoint .* tool_add_control\.py$"
    ckpt = tmp_path / "init.ckpt"
    save_checkpoint(state, ckpt)
    err = one_line_error(*train_cli(tmp_path, fill50k, capsys, init_ckpt=ckpt))
    assert err.startswith(f"error: {ckpt}") and re.search(expected, err), err
    assert len(err) < 400


# ---------------------------------------------------------------------------------------------------- shards


def write_shard(path: Path, samples: list[tuple[str, bytes, bytes]], tail: bytes = b"") -> Path:
    """A tar shard of (key, target bytes, source bytes) samples with prompt 'p'; ``tail`` is appended raw."""
    with tarfile.open(path, "w") as tar:
        for key, target, source in samples:
            add_member(tar, f"{key}.jpg", target)
            add_member(tar, f"{key}.txt", b"p")
            add_member(tar, f"{key}.png", source)
    if tail:
        path.write_bytes(path.read_bytes().rstrip(b"\0") + tail)
    return path


def test_shard_check_reads_the_first_sample_of_every_shard(tmp_path: Path) -> None:
    ok = png_bytes(flat(64, 64))
    first = write_shard(tmp_path / "a.tar", [("0", ok, ok), ("1", ok, ok)])
    odd = write_shard(tmp_path / "b.tar", [("2", png_bytes(flat(80, 48)), png_bytes(flat(80, 48)))])
    assert WebDatasetShards(str(first)).check(batch_size=2, multiple=64) == (64, 64)
    with pytest.raises(data.ImageSizeError, match=rf"^{re.escape(str(odd))}:2\.jpg: 80x48: sides must be multiples"):
        WebDatasetShards([str(first), str(odd)]).check(batch_size=2, multiple=64)
    assert WebDatasetShards([str(first), str(odd)], resolution=64).check(batch_size=2, multiple=64) == (64, 64)
    not_tar = tmp_path / "c.tar"
    not_tar.write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(not_tar))}: unreadable tar shard"):
        WebDatasetShards([str(first), str(not_tar)]).check()
    no_png = tmp_path / "d.tar"
    with tarfile.open(no_png, "w") as tar:
        add_member(tar, "0.jpg", ok)
    with pytest.raises(ValueError, match=r"d\.tar: no complete sample"):
        WebDatasetShards(str(no_png)).check()


def test_shard_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = write_shard(tmp_path / "a.tar", [("0", png_bytes(flat(72, 72)), png_bytes(flat(72, 72)))])
    err = one_line_error(*train_cli(tmp_path, tmp_path, capsys, "--webdataset", str(shard)))
    assert f"{shard}:0.jpg: 72x72: sides must be multiples of 64" in err and "--resolution" in err
    code, err, out = train_cli(tmp_path, tmp_path, capsys, "--webdataset", str(shard), "--resolution", "64")
    assert "dummy.ckpt" in one_line_error(code, err)  # the shard passed with resizing
    assert out == "training data: 1 shards (first samples) checked, 64x64"


def test_bad_shard_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    ok, big = png_bytes(flat(64, 64)), png_bytes(flat(128, 128))
    samples = [("0", ok, ok), ("1", b"garbage", ok), ("2", big, big), ("3", ok, big), ("4", ok, ok)]
    shard = write_shard(tmp_path / "a.tar", samples, tail=b"\x01" * 700)  # damaged tar data at the end
    shards = WebDatasetShards(str(shard))
    assert shards.check(batch_size=2, multiple=64) == (64, 64)
    with pytest.warns(UserWarning) as caught:
        items = list(shards)
    assert [item["jpg"].shape for item in items] == [(64, 64, 3)] * 2
    messages = [str(w.message) for w in caught]
    assert [m.split("skipping ")[1].split(":")[0].split(" (")[0] for m in messages[:3]] == [
        "sample '1'", "sample '2'", "sample '3'"]  # fmt: skip
    assert "unreadable image" in messages[0] and "not the first shard's 64x64" in messages[1]
    assert "a pair must have one size" in messages[2]
    assert messages[-1].endswith(f"({len(messages)} skipped by this reader so far)")
    assert len(messages) in (3, 4)  # the damaged tail, when tarfile notices it, is one more skip
