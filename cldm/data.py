"""Training data sources yielding the reference's sample format.

Every sample is ``{"jpg": target, "txt": prompt, "hint": source}`` with ``target`` a float32 (H, W, 3) RGB
array in [-1, 1], ``source`` (the condition) a float32 (H, W, 3) RGB array in [0, 1] and ``prompt`` a str,
exactly as the reference's ``tutorial_dataset.py`` builds it.

- ``Fill50kDataset``: a fill50k-style folder (``prompt.json`` JSON Lines + source/target images).
- ``WebDatasetShards``: WebDataset tar shards in NeMo's ControlNet convention (``KEY.jpg`` target,
  ``KEY.txt`` prompt, ``KEY.png`` condition), read with the standard library.
- ``write_webdataset``: converts a fill50k-style folder into such shards.

Sizes (``resolution``, ``resize``): without a resolution, or with ``resize="none"``, images are used as they are
(the reference's way: it expects 512x512 pairs); a pair's source and target must then have one size, and with a
resolution that size must be (resolution, resolution). With a resolution and ``resize="center-crop"`` (the
default; diffusers' ``train_controlnet.py``) the shorter side is scaled to the resolution and the centre is
cropped; ``resize="stretch"`` scales both sides to it (aspect ratio not kept). Scaling uses ``cv2.INTER_AREA``
when shrinking and ``cv2.INTER_LINEAR`` when enlarging. Either mode refuses an image whose long side is more than
:data:`MAX_ASPECT` times its short side, so that no scaled image exceeds ``MAX_ASPECT * resolution`` on its long
side. The ``check`` methods look at a whole data set (file headers only) before training and raise a one-line
:class:`DataError` naming the first file that cannot be used; reading an item raises the same class.
"""

from __future__ import annotations

import codecs
import glob
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

PROMPT_FIELDS = ("source", "target", "prompt")
SHARD_MEMBERS = ("jpg", "txt", "png")
JPEG_QUALITY = 95
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_DRIVE = re.compile(r"^[A-Za-z]:")
RESIZE_MODES = ("none", "center-crop", "stretch")
# SD needs image sides divisible by 64: 8x in the VAE, 8x more in the UNet (and in the hint encoder).
SIZE_MULTIPLE = 64
ASPECT_TOLERANCE = 0.01  # relative difference of a pair's aspect ratios that resizing still lines up
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# Longest side / shortest side an image may have when it is resized: bounds the scaled image (center-crop
# scales the short side to the resolution) to MAX_ASPECT * resolution on its long side.
MAX_ASPECT = 8
_WORKER_PREFIX = "Caught "  # torch's DataLoader re-raises a worker's error as "Caught X in DataLoader worker ..."
Size = tuple[int, int]  # (width, height) in pixels


# ---------------------------------------------------------------------------------------------------- errors


class DataError(ValueError):
    """Training data that cannot be used (the one-line message names the file, or prompt.json and the line).

    Raised in a DataLoader worker process, torch re-raises it in the main process as the same class with the
    worker's traceback as its message; that message is turned back into the original line here."""

    def __init__(self, message: str) -> None:
        super().__init__(_unwrap_worker_message(message, type(self)))


class MissingDataError(DataError, FileNotFoundError):
    """A file the training data names does not exist (also a ``FileNotFoundError``)."""


class ImageSizeError(DataError):
    """An image whose size the chosen resolution and resize mode cannot train on (the message names the file)."""


def _unwrap_worker_message(message: str, cls: type) -> str:
    """The original message of ``cls`` inside torch's "Caught ... in DataLoader worker process N. Original
    Traceback ..." text (its last line is ``module.Class: message``); any other message unchanged."""
    if not message.startswith(_WORKER_PREFIX) or "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().rsplit("\n", 1)[-1]
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else message


# ---------------------------------------------------------------------------------------------------- images


def decode_rgb(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes to (H, W, 3) uint8 RGB. Raises :class:`DataError` naming ``name`` when OpenCV
    cannot decode them (e.g. a truncated JPEG, PNG pixel data that does not inflate)."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(f"{name}: unreadable image (the pixel data cannot be decoded: truncated or corrupt)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file to (H, W, 3) uint8 RGB; :class:`MissingDataError` / :class:`DataError` name the file."""
    if not path.is_file():
        raise MissingDataError(f"{path}: image not found")
    return decode_rgb(path.read_bytes(), str(path))


def shown_size(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def header_size(source: Path | bytes, name: str) -> Size:
    """(width, height) of an image as :func:`decode_rgb` will return it (EXIF orientation applied), read from
    the file's header without decoding the pixels; PNG chunks are CRC-checked, so a truncated PNG is found.
    ``source``: a path or the encoded bytes. Raises :class:`MissingDataError` / :class:`DataError` naming ``name``."""
    if isinstance(source, Path) and not source.is_file():
        raise MissingDataError(f"{name}: image not found")
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
            width, height = image.size
            exif = Image.Exif()
            if image.info.get("exif"):
                exif.load(image.info["exif"])
            image.verify()
    except Exception as err:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, struct.error...)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{name}: unreadable image ({reason})") from None
    if isinstance(source, Path) and not cv2.haveImageReader(str(source)):
        raise DataError(f"{name}: unreadable image (a format OpenCV cannot decode)")
    if exif.get(EXIF_ORIENTATION) in ROTATED_ORIENTATIONS:
        return height, width
    return width, height


def check_pair(target: Size, source: Size, target_name: str, source_name: str, resolution: int | None,
               resize: str, multiple: int = 1) -> None:
    """Raise :class:`ImageSizeError` naming the file when a pair of (width, height) sizes cannot be trained at
    ``resolution`` with ``resize`` (see the module docstring); ``multiple``: what every side must divide by
    when images are used as they are."""
    if resolution is not None and resize != "none":
        check_aspect(target, target_name, resolution)
        check_aspect(source, source_name, resolution)
        if abs(source[0] * target[1] - target[0] * source[1]) > ASPECT_TOLERANCE * target[0] * source[1]:
            raise ImageSizeError(f"{source_name}: {shown_size(source)}, but its target {target_name} is "
                                 f"{shown_size(target)}: other proportions would not line up after resizing")
        return
    if source != target:
        raise ImageSizeError(f"{source_name}: {shown_size(source)}, but its target {target_name} is "
                             f"{shown_size(target)}: a pair must have one size")
    if resolution is not None and target != (resolution, resolution):
        raise ImageSizeError(f"{target_name}: {shown_size(target)}, not the training size "
                             f"{shown_size((resolution, resolution))}")
    if target[0] % multiple or target[1] % multiple:
        raise ImageSizeError(f"{target_name}: {shown_size(target)}: sides must be multiples of {multiple}")


def as_is(resolution: int | None, resize: str) -> bool:
    """Whether images are used at their own size (no resolution, or ``resize="none"``)."""
    return resolution is None or resize == "none"


def check_sizes(pairs: Iterable[tuple[str, Size, str, Size]], resolution: int | None, resize: str,
                batch_size: int = 1, multiple: int = 1) -> Size | None:
    """Check ``(target name, target size, source name, source size)`` pairs in order with :func:`check_pair`;
    with ``batch_size > 1`` and images used as they are, every pair must also have the first one's size.
    Returns the one (width, height) the items will have, or None when they vary. Raises
    :class:`ImageSizeError` naming the first file that does not fit."""
    first: tuple[Size, str] | None = None
    sizes = set()
    for target_name, target, source_name, source in pairs:
        check_pair(target, source, target_name, source_name, resolution, resize, multiple)
        first = first or (target, target_name)
        if as_is(resolution, resize) and batch_size > 1 and target != first[0]:
            raise ImageSizeError(f"{target_name}: {shown_size(target)}, but {first[1]} is "
                                 f"{shown_size(first[0])}: images batched together must have one size")
        sizes.add(target)
    if not as_is(resolution, resize):
        return resolution, resolution
    return sizes.pop() if len(sizes) == 1 else None


def check_aspect(size: Size, name: str, resolution: int) -> None:
    """Raise :class:`ImageSizeError` naming ``name`` when a (width, height) image is too thin to resize to
    ``resolution``: its long side more than :data:`MAX_ASPECT` times its short side."""
    if max(size) > MAX_ASPECT * min(size):
        raise ImageSizeError(f"{name}: {shown_size(size)}: sides further apart than {MAX_ASPECT}:1, too thin to "
                             f"resize to {shown_size((resolution, resolution))} (crop it first)")


def scale_to(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize (H, W, C) uint8 to (height, width, C): ``INTER_AREA`` when shrinking, ``INTER_LINEAR`` otherwise."""
    if rgb.shape[:2] == (height, width):
        return rgb
    shrink = width * height < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def fit_image(rgb: np.ndarray, resolution: int | None, resize: str) -> np.ndarray:
    """(H, W, C) uint8 to (resolution, resolution, C) by ``resize`` (``center-crop``: shorter side scaled to
    ``resolution``, centre kept; ``stretch``: both sides scaled); ``None`` or ``"none"``: unchanged. The scaled
    image is at most ``MAX_ASPECT * resolution`` on its long side: a thinner image raises :class:`ImageSizeError`
    (:func:`check_aspect`) before anything is allocated."""
    if resolution is None or resize == "none":
        return rgb
    check_aspect(decoded_size(rgb), "image", resolution)
    if resize == "stretch":
        return scale_to(rgb, resolution, resolution)
    height, width = rgb.shape[:2]
    scale = resolution / min(height, width)
    width, height = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    top, left = (height - resolution) // 2, (width - resolution) // 2
    return scale_to(rgb, width, height)[top : top + resolution, left : left + resolution]


def make_item(target: np.ndarray, source: np.ndarray, prompt: str, resolution: int | None,
              resize: str = "center-crop") -> dict[str, Any]:
    """Build the reference sample from uint8 RGB target/source (sizes already checked with
    :func:`check_pair`): jpg in [-1, 1], hint in [0, 1], float32, both fitted by :func:`fit_image`."""
    target = fit_image(target, resolution, resize)
    source = fit_image(source, resolution, resize)
    return {
        "jpg": target.astype(np.float32) / 127.5 - 1.0,
        "txt": prompt,
        "hint": source.astype(np.float32) / 255.0,
    }


def check_resolution(resolution: int | None, multiple: int = 1, name: str = "resolution") -> None:
    """Raise ``ValueError`` (naming ``name``) unless ``resolution`` is None or a positive multiple of ``multiple``."""
    if resolution is not None and (resolution < multiple or resolution % multiple):
        needed = "a positive int" if multiple == 1 else f"a multiple of {multiple} ({multiple}, {2 * multiple}, ...)"
        raise ValueError(f"{name} must be {needed}, got {resolution}")


def check_resize(resize: str) -> None:
    """Raise ``ValueError`` unless ``resize`` is one of :data:`RESIZE_MODES`."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")


def decoded_size(rgb: np.ndarray) -> Size:
    return rgb.shape[1], rgb.shape[0]


# ---------------------------------------------------------------------------------------------------- fill50k


def is_inside(relative: str) -> bool:
    """Whether a prompt.json path stays inside the data folder: relative (no leading slash or drive letter, on
    any OS) and no ``..`` reaching out. Judged on the text, so images may be symlinks the folder's owner made."""
    normal = os.path.normpath(relative.replace("\\", "/"))
    return bool(relative) and not normal.startswith(("/", "../")) and normal != ".." and not _DRIVE.match(normal)


def read_prompt_lines(path: Path) -> list[dict[str, str]]:
    """Parse a prompt.json: UTF-8 text (a leading byte order mark is accepted), one JSON object per line with
    str source/target/prompt; blank lines are skipped. :class:`MissingDataError` when it does not exist;
    :class:`DataError` names the file and line of text that is not UTF-8, of a malformed entry, or of a
    source/target outside the folder (:func:`is_inside`)."""
    if not path.is_file():
        raise MissingDataError(f"{path}: prompt file not found")
    entries = []
    for lineno, raw in enumerate(path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                            "save prompt.json as UTF-8") from None
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: malformed line: {err.msg}") from None
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in PROMPT_FIELDS):
            raise DataError(f"{path}:{lineno}: malformed line: expected an object with str fields "
                            f"{', '.join(PROMPT_FIELDS)}")
        for field in ("source", "target"):
            if not is_inside(entry[field]):
                raise DataError(f"{path}:{lineno}: {field} {entry[field]!r} is outside the data folder "
                                "(paths must be relative, without '..')")
        entries.append({k: entry[k] for k in PROMPT_FIELDS})
    if not entries:
        raise DataError(f"{path}: no samples")
    return entries


class Fill50kDataset(Dataset):
    """Map-style dataset over a fill50k-style folder: ``root/prompt.json`` plus the images it names.

    Item ``i`` is the reference sample dict (see module docstring), its images fitted to ``resolution`` by
    ``resize`` (module docstring); a pair whose sizes do not fit raises :class:`ImageSizeError`, an image whose
    pixels cannot be decoded :class:`DataError`, a missing one :class:`MissingDataError`. Call :meth:`check` to
    look at every pair (headers only) before training.
    """

    def __init__(self, root: str | Path = "./training/fill50k", resolution: int | None = None,
                 resize: str = "center-crop") -> None:
        check_resolution(resolution)
        check_resize(resize)
        self.root = Path(root)
        self.resolution = resolution
        self.resize = resize
        self.data = read_prompt_lines(self.root / "prompt.json")

    def __len__(self) -> int:
        return len(self.data)

    def paths(self, idx: int) -> tuple[Path, Path]:
        """(target path, source path) of item ``idx``."""
        entry = self.data[idx]
        return self.root / entry["target"], self.root / entry["source"]

    def check(self, batch_size: int = 1, multiple: int = 1) -> Size | None:
        """Read the header of every image (:func:`header_size`, no pixel decoding) and check the pairs with
        :func:`check_sizes` (its arguments and return value). Raises :class:`MissingDataError` /
        :class:`DataError` (:class:`ImageSizeError` for sizes) naming the first bad file."""

        def headers() -> Iterator[tuple[str, Size, str, Size]]:
            for idx in range(len(self)):
                target, source = self.paths(idx)
                source_size = header_size(source, str(source))
                yield str(target), header_size(target, str(target)), str(source), source_size

        return check_sizes(headers(), self.resolution, self.resize, batch_size, multiple)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        target_path, source_path = self.paths(idx)
        source = read_rgb(source_path)
        target = read_rgb(target_path)
        check_pair(decoded_size(target), decoded_size(source), str(target_path), str(source_path), self.resolution,
                   self.resize)
        return make_item(target, source, self.data[idx]["prompt"], self.resolution, self.resize)


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
    size, seeded by (seed, epoch, global worker); call ``set_epoch`` to reshuffle. Images are fitted to
    ``resolution`` by ``resize`` (module docstring). Reading a whole set ahead of training would cost a pass over
    all of it, so :meth:`check` looks at the first sample of every shard only, and during iteration a sample that
    is incomplete, unreadable or of a size the run cannot use is skipped with a warning that counts the skips
    (as is the rest of a shard whose tar data is damaged). Items are the reference sample dict (module docstring).
    """

    def __init__(self, shards: str | Sequence[str], resolution: int | None = None, shuffle_buffer: int = 0,
                 seed: int = 0, resize: str = "center-crop") -> None:
        check_resolution(resolution)
        check_resize(resize)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shards = resolve_shards(shards)
        self.resolution = resolution
        self.resize = resize
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.size: Size | None = None  # the one size of images used as they are, once :meth:`check` found it
        self.multiple = 1
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling of epoch ``epoch`` (only matters with ``shuffle_buffer > 0``)."""
        self.epoch = epoch

    def check(self, batch_size: int = 1, multiple: int = 1) -> Size | None:
        """Read every shard's first complete sample (image headers only, :func:`header_size`) and check them with
        :func:`check_sizes` (its arguments and return value). Later samples are then held to ``multiple`` and,
        with ``batch_size > 1`` and images used as they are, to the first sample's size (others are skipped).
        Raises ``ValueError`` (:class:`ImageSizeError` for sizes) naming the shard and sample."""

        def headers() -> Iterator[tuple[str, Size, str, Size]]:
            for shard in self.shards:
                key, group = next(((k, g) for k, g in iter_tar_groups(shard)
                                   if all(e in g for e in SHARD_MEMBERS)), (None, None))  # fmt: skip
                if group is None:
                    raise ValueError(f"{shard}: no complete sample ({', '.join('.' + e for e in SHARD_MEMBERS)})")
                target, source = f"{shard}:{key}.jpg", f"{shard}:{key}.png"
                yield target, header_size(group["jpg"], target), source, header_size(group["png"], source)

        size = check_sizes(headers(), self.resolution, self.resize, batch_size, multiple)
        self.multiple = multiple
        self.size = size if batch_size > 1 and as_is(self.resolution, self.resize) else None
        return size

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

    def _skip(self, shard: str, what: str) -> None:
        self.skipped += 1
        warnings.warn(f"{shard}: skipping {what} ({self.skipped} skipped by this reader so far)", stacklevel=3)

    def _iter_samples(self) -> Iterator[dict[str, Any]]:
        shards, stride, offset = self._assignment()
        index = 0
        for shard in shards:
            try:
                for key, group in iter_tar_groups(shard):
                    mine = index % stride == offset
                    index += 1
                    if not mine:
                        continue
                    missing = [ext for ext in SHARD_MEMBERS if ext not in group]
                    if missing:
                        self._skip(shard, f"incomplete sample {key!r} (missing {', '.join('.' + m for m in missing)})")
                        continue
                    try:
                        item = self._decode(shard, key, group)
                    except ValueError as err:  # unreadable image or text, or a size this run cannot use
                        self._skip(shard, f"sample {key!r}: {err}")
                        continue
                    yield item
            except ValueError as err:  # damaged tar data: the rest of this shard cannot be read
                self._skip(shard, f"the rest of the shard: {err}")

    def _decode(self, shard: str, key: str, group: dict[str, bytes]) -> dict[str, Any]:
        target_name, source_name = f"{shard}:{key}.jpg", f"{shard}:{key}.png"
        target = decode_rgb(group["jpg"], target_name)
        source = decode_rgb(group["png"], source_name)
        check_pair(decoded_size(target), decoded_size(source), target_name, source_name, self.resolution,
                   self.resize, self.multiple)
        if self.size is not None and decoded_size(target) != self.size:
            raise ImageSizeError(f"{target_name}: {shown_size(decoded_size(target))}, not the first shard's "
                                 f"{shown_size(self.size)}")
        prompt = group["txt"].decode("utf-8").strip()
        return make_item(target, source, prompt, self.resolution, self.resize)

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
