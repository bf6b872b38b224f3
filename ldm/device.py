"""The one place that knows about devices, dtypes and autocast.

Everything else asks this module which device to use and how to enter mixed precision,
so the rest of the code base runs unchanged on ``cpu`` (the default), ``cuda`` or ``mps``.
The device can be chosen by a CLI flag or the ``CONTROLNET_DEVICE`` environment variable.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager

import torch

DEVICE_ENV = "CONTROLNET_DEVICE"
DEVICE_CHOICES = ("cpu", "cuda", "mps", "auto")


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
    """Set torch's CPU thread count from a ``--threads`` flag (``None``: leave torch's choice).

    ``ValueError`` naming the flag unless 1 <= ``n`` <= ``os.cpu_count()``: more threads than cores only make
    every step wait on the others."""
    if n is None:
        return
    cores = os.cpu_count() or 1
    if not 1 <= n <= cores:
        raise ValueError(f"--threads must be between 1 and {cores} (this machine's CPU count), got {n}")
    torch.set_num_threads(n)
