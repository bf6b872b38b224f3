"""Training data sources yielding the reference's sample format.

Every sample is ``{"jpg": target, "txt": prompt, "hint": source}`` with ``target`` a float32 (H, W, 3) RGB
array in [-1, 1], ``source`` (the condition) a float32 (H, W, 3) RGB array in [0, 1] and ``prompt`` a str,
exactly as the reference's ``tutorial_dataset.py`` builds it.

- ``Fill50kDataset``: a fill50k-style folder (``prompt.json`` JSON Lines + source/target images).
- ``WebDatasetShards``: WebDataset tar shards in NeMo's ControlNet convention (``KEY.jpg`` target,
  ``KEY.txt`` prompt, ``KEY.png`` condition), read with the standard library.
- ``write_webdataset``: converts a fill50k-style folder into such shards.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

PROMPT_FIELDS = ("source", "target", "prompt")
SHARD_MEMBERS = ("jpg", "txt", "png")
JPEG_QUALITY = 95
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# ---------------------------------------------------------------------------------------------------- images


def decode_rgb(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes to (H, W, 3) uint8 RGB; ``name`` is used in the error message."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{name}: unreadable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file to (H, W, 3) uint8 RGB; FileNotFoundError / ValueError name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    return decode_rgb(path.read_bytes(), str(path))


def resize_square(rgb: np.ndarray, resolution: int | None) -> np.ndarray:
    """Resize (H, W, C) to (resolution, resolution, C) with INTER_AREA; ``None`` or same size: unchanged."""
    if resolution is None or rgb.shape[:2] == (resolution, resolution):
        return rgb
    return cv2.resize(rgb, (resolution, resolution), interpolation=cv2.INTER_AREA)


def make_item(target: np.ndarray, source: np.ndarray, prompt: str, resolution: int | None) -> dict[str, Any]:
    """Build the reference sample from uint8 RGB target/source: jpg in [-1, 1], hint in [0, 1], float32."""
    target = resize_square(target, resolution)
    source = resize_square(source, resolution)
    return {
        "jpg": target.astype(np.float32) / 127.5 - 1.0,
        "txt": prompt,
        "hint": source.astype(np.float32) / 255.0,
    }


def _check_resolution(resolution: int | None) -> None:
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be a positive int or None, got {resolution}")


# ---------------------------------------------------------------------------------------------------- fill50k


def read_prompt_lines(path: Path) -> list[dict[str, str]]:
    """Parse a prompt.json (one JSON object per line with str source/target/prompt); blank lines are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    entries = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed line: {err.msg}") from err
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in PROMPT_FIELDS):
                raise ValueError(f"{path}:{lineno}: malformed line: expected an object with str fields "
                                 f"{', '.join(PROMPT_FIELDS)}")
            entries.append({k: entry[k] for k in PROMPT_FIELDS})
    if not entries:
        raise ValueError(f"{path}: no samples")
    return entries


class Fill50kDataset(Dataset):
    """Map-style dataset over a fill50k-style folder: ``root/prompt.json`` plus the images it names.

    Item ``i`` is the reference sample dict (see module docstring); with ``resolution`` both images are
    resized to (resolution, resolution) with ``cv2.INTER_AREA``.
    """

    def __init__(self, root: str | Path = "./training/fill50k", resolution: int | None = None) -> None:
        _check_resolution(resolution)
        self.root = Path(root)
        self.resolution = resolution
        self.data = read_prompt_lines(self.root / "prompt.json")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        entry = self.data[idx]
        source = read_rgb(self.root / entry["source"])
        target = read_rgb(self.root / entry["target"])
        return make_item(target, source, entry["prompt"], self.resolution)


# ---------------------------------------------------------------------------------------------------- shards


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{000..009}`` numeric ranges (zero padding kept), left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [f"{v:0{width}d}" for v in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [expanded for opt in options for expanded in expand_braces(head + opt + tail)]


def _has_glob_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def resolve_shards(shards: str | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a brace pattern, a glob pattern or a list of either; errors name what is missing."""
    patterns = [shards] if isinstance(shards, str | os.PathLike) else list(shards)
    paths: list[str] = []
    for pattern in patterns:
        for expanded in expand_braces(os.fspath(pattern)):
            if _has_glob_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise FileNotFoundError(f"{expanded}: no shards match")
                paths.extend(matches)
            elif not os.path.isfile(expanded):
                raise FileNotFoundError(f"{expanded}: shard not found")
            else:
                paths.append(expanded)
    if not paths:
        raise ValueError(f"no shards given: {shards!r}")
    return paths


def _rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of torch.distributed if initialised, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _worker_and_count() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker, (0, 1) in the main process."""
    info = get_worker_info()
    if info is None:
        return 0, 1
    return info.id, info.num_workers


def split_key(name: str) -> tuple[str, str]:
    """Tar member name -> (key, extension): key = dir + basename up to its first dot, extension lowercased."""
    head, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_tar_groups(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for consecutive file members sharing a key, in tar order."""
    key: str | None = None
    group: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = split_key(member.name)
                if member_key != key:
                    if key is not None:
                        yield key, group
                    key, group = member_key, {}
                handle = tar.extractfile(member)
                group[ext] = handle.read() if handle is not None else b""
    except tarfile.TarError as err:
        raise ValueError(f"{path}: unreadable tar shard: {err}") from err
    if key is not None:
        yield key, group


class WebDatasetShards(IterableDataset):
    """Iterable dataset over WebDataset tar shards (NeMo ControlNet convention: KEY.jpg/.txt/.png).

    ``shards``: a glob pattern, a brace pattern (``data/shard-{000000..000009}.tar``) or a list of paths.
    Shards are split over DDP ranks x DataLoader workers (shard i -> global worker i % total); with fewer
    shards than workers every worker reads all shards and keeps samples whose index % total is its own.
    ``shuffle_buffer > 0`` shuffles the shard order (same on all ranks) and samples through a buffer of that
    size, seeded by (seed, epoch, global worker); call ``set_epoch`` to reshuffle. Incomplete samples are
    skipped with a warning. Items are the reference sample dict (see module docstring).
    """

    def __init__(self, shards: str | Sequence[str], resolution: int | None = None, shuffle_buffer: int = 0,
                 seed: int = 0) -> None:
        _check_resolution(resolution)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shards = resolve_shards(shards)
        self.resolution = resolution
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling of epoch ``epoch`` (only matters with ``shuffle_buffer > 0``)."""
        self.epoch = epoch

    def _assignment(self) -> tuple[list[str], int, int]:
        """(shards to read, sample stride, sample offset) for the current rank and worker."""
        rank, world = _rank_and_world()
        worker, workers = _worker_and_count()
        total, me = world * workers, rank * workers + worker
        shards = list(self.shards)
        if self.shuffle_buffer > 0:
            np.random.default_rng([self.seed, self.epoch]).shuffle(shards)
        if len(shards) >= total:
            return shards[me::total], 1, 0
        return shards, total, me

    def _iter_samples(self) -> Iterator[dict[str, Any]]:
        shards, stride, offset = self._assignment()
        index = 0
        for shard in shards:
            for key, group in iter_tar_groups(shard):
                mine = index % stride == offset
                index += 1
                if not mine:
                    continue
                missing = [ext for ext in SHARD_MEMBERS if ext not in group]
                if missing:
                    warnings.warn(f"{shard}: skipping incomplete sample {key!r} (missing "
                                  f"{', '.join('.' + m for m in missing)})", stacklevel=2)
                    continue
                yield self._decode(shard, key, group)

    def _decode(self, shard: str, key: str, group: dict[str, bytes]) -> dict[str, Any]:
        target = decode_rgb(group["jpg"], f"{shard}:{key}.jpg")
        source = decode_rgb(group["png"], f"{shard}:{key}.png")
        prompt = group["txt"].decode("utf-8").strip()
        return make_item(target, source, prompt, self.resolution)

    def _shuffled(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rank, _ = _rank_and_world()
        worker, workers = _worker_and_count()
        rng = np.random.default_rng([self.seed, self.epoch, rank * workers + worker])
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        samples = self._iter_samples()
        if self.shuffle_buffer > 0:
            return self._shuffled(samples)
        return samples


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _encode(rgb: np.ndarray, ext: str, name: str) -> bytes:
    params = []
    if ext == ".jpg":  # quality 95, no chroma subsampling (sharp color edges)
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                  cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"{name}: {ext} encoding failed")
    return buf.tobytes()


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add_member(tar, name, data)
    os.replace(tmp, path)


def write_webdataset(fill50k_root: Path, out_pattern: str, samples_per_shard: int = 1000) -> list[Path]:
    """Convert a fill50k-style folder to tar shards ``out_pattern % shard_index`` (e.g. ``out/shard-%06d.tar``).

    Sample ``i`` (prompt.json order) becomes ``{i:06d}.jpg`` (target, JPEG quality 95, 4:4:4), ``.txt`` (prompt,
    UTF-8) and ``.png`` (source). Returns the shard paths in order.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    try:
        out_pattern % 0
    except TypeError as err:
        raise ValueError(f"out_pattern needs one %-format field for the shard index, got {out_pattern!r}") from err
    root = Path(fill50k_root)
    entries = read_prompt_lines(root / "prompt.json")
    paths = []
    for start in range(0, len(entries), samples_per_shard):
        members = []
        for i in range(start, min(start + samples_per_shard, len(entries))):
            entry = entries[i]
            target_path, source_path = root / entry["target"], root / entry["source"]
            members.append((f"{i:06d}.jpg", _encode(read_rgb(target_path), ".jpg", str(target_path))))
            members.append((f"{i:06d}.txt", entry["prompt"].encode("utf-8")))
            members.append((f"{i:06d}.png", _encode(read_rgb(source_path), ".png", str(source_path))))
        path = Path(out_pattern % (start // samples_per_shard))
        _write_shard(path, members)
        paths.append(path)
    return paths
