"""The one place that knows about devices, dtypes and autocast.

Everything else asks this module which device to use and how to enter mixed precision,
so the rest of the code base runs unchanged on ``cpu`` (the default), ``cuda`` or ``mps``.
The device can be chosen by a CLI flag or the ``CONTROLNET_DEVICE`` environment variable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from contextlib import AbstractContextManager

import torch

DEVICE_ENV = "CONTROLNET_DEVICE"
DEVICE_CHOICES = ("cpu", "cuda", "mps", "auto")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt(3) parameters


def available_devices() -> list[str]:
    """Devices usable on this machine, best first."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


def resolve_device(name: str | None = None) -> torch.device:
    """Turn a flag value (or ``$CONTROLNET_DEVICE``, or ``cpu``) into a usable torch device.

    ``auto`` picks the best available device. Raises ``ValueError`` with a one-line message when
    the device is unknown or not present on this machine.
    """
    name = (name or os.environ.get(DEVICE_ENV) or "cpu").strip().lower()
    if name == "auto":
        name = available_devices()[0]
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise ValueError(f"unknown device '{name}' (choose from {', '.join(DEVICE_CHOICES)})")
    if kind not in available_devices():
        raise ValueError(f"device '{name}' is not available here (available: {', '.join(available_devices())})")
    return torch.device(name)


def autocast(device: torch.device, dtype: torch.dtype | None = None) -> AbstractContextManager:
    """Mixed-precision context for ``device``; a no-op for ``None`` or ``float32``."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def lightning_accelerator(device: torch.device) -> str:
    """PyTorch Lightning's accelerator name for ``device`` (``cpu``, ``gpu`` or ``mps``)."""
    return {"cuda": "gpu"}.get(device.type, device.type)


def set_threads(n: int | None) -> None:
    """Set torch's CPU thread count from a ``--threads`` flag (``None``: leave torch's choice)."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds (mallopt(3)); False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1


def return_freed_memory(mmap_threshold: int = 1 << 20) -> bool:
    """Have glibc give freed host memory back to the OS at once: blocks of ``mmap_threshold`` bytes or more get
    their own mappings and the heap is trimmed on every free. By default glibc raises that threshold to
    32 MiB after the first large free, so activations and per-call weight copies pile up in a fragmented heap
    (at 512 px the low-memory mode's sampling peak RSS: 3.56 GB, with this 3.31 GB). It costs speed: fresh
    mappings are zeroed page by page (a 512 step 0-4% slower, a 256 step 8-13%), so the scripts use it with
    ``--low-memory`` only (:func:`tune_allocator`). Process-wide; returns False where the C library is not glibc."""
    return _mallopt(mmap_threshold, 0)


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Have glibc keep freed host memory for reuse: blocks under ``threshold`` bytes come from the heap, which is
    trimmed only when ``threshold`` bytes at its top are free, so most large blocks reuse pages already mapped
    (not all: a freed block that borders neither the heap's top nor free space can be too small for torch's
    aligned request of the same size). By default each block of 32 MiB or more (GEGLU
    outputs, Winograd transforms, large activations) gets a fresh mapping that the kernel zeroes page by page
    on first touch; at 512 px that was ~9% of a CFG step (26.0 s -> 23.7 s), for ~0.1 GB more peak RSS. The
    scripts use it without ``--low-memory`` (:func:`tune_allocator`). Process-wide; False where not glibc."""
    return _mallopt(threshold, threshold)


def tune_allocator(low_memory: bool) -> bool:
    """The scripts' allocator setting: :func:`return_freed_memory` for ``low_memory``, else
    :func:`keep_freed_memory`. Returns False where the C library is not glibc."""
    return return_freed_memory() if low_memory else keep_freed_memory()
