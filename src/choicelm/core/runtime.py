"""Device, precision and allocator choices shared by training, evaluation, generation and serving."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys

import torch

from .errors import ChoicelmError


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto (CUDA if there is one, else CPU), cpu, cuda (this rank's GPU), cuda:N or mps; a device this torch cannot
    use is a ChoicelmError, not a traceback from the first tensor moved there."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except (RuntimeError, TypeError, ValueError):
        raise ChoicelmError(f"device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ChoicelmError(f"device {name!r}: {why}; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ChoicelmError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise ChoicelmError(f"device {name!r} is not available with this torch; use auto, cpu, cuda or cuda:N")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations: CUDA's free memory, or on CPU the kernel's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX); without them bf16 autocast is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def keep_freed_memory() -> None:
    """Stop glibc from returning big blocks to the OS after every step.

    A 50k-vocabulary model allocates hundreds of MB of logits each step; by default glibc maps such
    blocks with mmap and unmaps them on free, so every step pays the page faults again (measured
    here: 1.09x slower training with the chunked loss, up to 1.5x with full logits). Raising the
    mmap and trim thresholds keeps those pages. The cost: glibc reuses aligned heap blocks poorly,
    so resident memory can grow well above the live tensors (train.tune_allocator=false turns
    this off).
    """
    if not sys.platform.startswith("linux"):
        return
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    try:
        libc = ctypes.CDLL(libc_name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 2**31 - 1)
        libc.mallopt(m_trim_threshold, 2**31 - 1)
    except (OSError, AttributeError):
        pass  # not glibc (musl has no mallopt): nothing to tune
