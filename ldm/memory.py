"""Memory measures: half-precision weight storage with float32 compute, paging out memory-mapped weights,
and glibc's allocator settings.

* :func:`compute_in_float32`: weights stored in bfloat16 (half the RAM), every layer computes in float32
  with per-call float32 copies; installed by ``cldm.model.load_model(..., low_memory=True)``.
* :func:`release_mapped_weights`: drop the RAM pages of weights memory-mapped from a checkpoint once a
  stage is done; the kernel reads them back when they are next used. :func:`cast_releasing`: a mapped state
  dict cast tensor by tensor, each copied tensor's pages dropped at once.
* :func:`return_freed_memory`, :func:`keep_freed_memory`, :func:`tune_allocator`: process-wide glibc settings
  for freed host memory (given back to the OS, or kept for reuse).

Figures for these measures are in the docs, not here.
"""

from __future__ import annotations

import bisect
import ctypes
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

LOW_MEMORY_DTYPE = torch.bfloat16  # how ``--low-memory`` stores the parameters
HALF_DTYPES = (torch.bfloat16, torch.float16)
MADV_DONTNEED = 4  # Linux madvise(2): drop the pages; a file-backed page is read back on its next use
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt(3) parameters


# --- half-precision storage, float32 compute -------------------------------------------------------------------


class Float32Parameters:
    """A forward pre-hook and forward hook pair for one module: during each call the module's half-precision
    parameters ``names`` are replaced (``setattr``) by float32 copies, which are dropped after the call (also
    when it raises), when the stored parameters are put back. The copies do not require gradients: inference
    only. Calls may nest (a stack of held parameters)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.held: list[dict[str, nn.Parameter]] = []

    def before(self, module: nn.Module, args: Any) -> None:
        stored = {n: getattr(module, n) for n in self.names}
        self.held.append(stored)
        for name, p in stored.items():
            setattr(module, name, nn.Parameter(p.float(), requires_grad=False))

    def after(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.held:  # empty only if an earlier pre-hook raised before ours ran
            for name, p in self.held.pop().items():
                setattr(module, name, p)


def compute_in_float32(model: nn.Module) -> int:
    """Make every module of ``model`` (the transformers text encoder's included) whose own parameters are
    bfloat16 or float16 compute in float32 (:class:`Float32Parameters` hooks; ``forward`` is not replaced).
    The stored parameters stay the same tensors. Under ``torch.compile`` every hooked module is a graph break
    (dynamo does not trace the ``nn.Parameter`` constructor); the numbers are the same. Returns the number of
    modules hooked."""
    count = 0
    for module in model.modules():
        names = [n for n, p in module.named_parameters(recurse=False) if p.dtype in HALF_DTYPES]
        if names:
            hooks = Float32Parameters(names)
            module.register_forward_pre_hook(hooks.before)
            module.register_forward_hook(hooks.after, always_call=True)
            count += 1
    return count


# --- memory-mapped weights -------------------------------------------------------------------------------------


def _file_mappings() -> list[tuple[int, int]]:
    """Sorted (start, end) addresses of this process's memory mappings of files (empty off Linux)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    spans = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):  # an inode: a real file
            start, end = fields[0].split("-")
            spans.append((int(start, 16), int(end, 16)))
    return sorted(spans)


def release_mapped_weights(*modules: nn.Module) -> int:
    """Drop from RAM the pages of the modules' parameters and buffers that are memory-mapped from a checkpoint
    (``load_model`` maps every tensor whose dtype the file already has, e.g. a bfloat16 checkpoint in low-memory
    mode). The kernel reads them back from the page cache, or the file, when they are next used: the process
    holds one stage's weights at a time (text encoder, UNet + ControlNet, VAE). Tensors in ordinary memory are
    left alone. Mapped weights must not have been modified in place (the file's values come back). Returns
    the bytes released; 0 off Linux."""
    return release_mapped_tensors(t for module in modules for t in [*module.parameters(), *module.buffers()])


def release_mapped_tensors(tensors: Iterable[torch.Tensor]) -> int:
    """:func:`release_mapped_weights` for the given tensors (e.g. mapped weights a model no longer holds, read once
    to compute their replacements). Returns the bytes released; 0 off Linux."""
    return _release(list(tensors), _file_mappings())


def cast_releasing(
    state_dict: Mapping[str, torch.Tensor], dtype_of: Callable[[str], torch.dtype]
) -> dict[str, torch.Tensor]:
    """Each floating tensor of ``state_dict`` in ``dtype_of(key)`` (the same tensor when it has that dtype),
    tensor by tensor; the RAM pages of a memory-mapped tensor that was copied are dropped at once, so casting a
    mapped half-precision checkpoint never holds both precisions of all its weights. Keys unchanged."""
    spans = _file_mappings()
    out = {}
    for key, tensor in state_dict.items():
        dtype = dtype_of(key)
        if tensor.is_floating_point() and tensor.dtype != dtype:
            out[key] = tensor.to(dtype)
            _release([tensor], spans)
        else:
            out[key] = tensor
    return out


def _release(tensors: list[torch.Tensor], spans: list[tuple[int, int]]) -> int:
    """``madvise(MADV_DONTNEED)`` the whole pages of the tensors' CPU storages that lie in one of the file
    mappings ``spans``; the bytes released."""
    if not spans:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if tensor.device.type == "cpu" and storage.nbytes():
            storages[storage.data_ptr()] = storage.data_ptr() + storage.nbytes()
    libc = ctypes.CDLL(None, use_errno=True)
    released = 0
    for start, end in sorted(storages.items()):
        i = bisect.bisect_right(spans, (start, float("inf"))) - 1
        if i < 0 or end > spans[i][1]:
            continue  # not (wholly) inside a file mapping: ordinary memory
        first, last = -(-start // page) * page, end // page * page  # whole pages only: neighbours stay
        if last > first and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) == 0:
            released += last - first
    return released


# --- glibc allocator -------------------------------------------------------------------------------------------


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
    32 MiB after the first large free, so activations and per-call weight copies pile up in a fragmented heap.
    It lowers the peak RSS and costs speed (fresh mappings are zeroed page by page), so the scripts use it
    with ``--low-memory`` only (:func:`tune_allocator`). Process-wide; returns False where the C library is not
    glibc."""
    return _mallopt(mmap_threshold, 0)


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Have glibc keep freed host memory for reuse: blocks under ``threshold`` bytes come from the heap, which is
    trimmed only when ``threshold`` bytes at its top are free, so most large blocks reuse pages already mapped
    (not all: a freed block that borders neither the heap's top nor free space can be too small for torch's
    aligned request of the same size). By default each block of 32 MiB or more (GEGLU outputs, Winograd
    transforms, large activations) gets a fresh mapping that the kernel zeroes page by page on first touch.
    Faster, for a slightly higher peak RSS; the scripts use it without ``--low-memory``
    (:func:`tune_allocator`). Process-wide; False where not glibc."""
    return _mallopt(threshold, threshold)


def tune_allocator(low_memory: bool) -> bool:
    """The scripts' allocator setting: :func:`return_freed_memory` for ``low_memory``, else
    :func:`keep_freed_memory`. Returns False where the C library is not glibc."""
    return return_freed_memory() if low_memory else keep_freed_memory()
