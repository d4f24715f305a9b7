"""Process-wide settings every edgepack process applies once: quiet third-party libraries,
never reach for the Hugging Face hub, give freed heap memory back to the OS, and say when
progress lines are wanted."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

_STARTED = time.monotonic()


def progress_wanted() -> bool:
    """Progress lines go to standard error when it is a terminal; EDGEPACK_PROGRESS=1 asks for
    them anyway (a CI log), EDGEPACK_PROGRESS=0 never."""
    import os
    import sys

    setting = os.environ.get("EDGEPACK_PROGRESS", "").strip().lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


def _progress_line(message: str) -> None:
    import sys

    if progress_wanted():
        elapsed = time.monotonic() - _STARTED
        print(f"[{int(elapsed // 60):02d}:{elapsed % 60:04.1f}] {message}", file=sys.stderr, flush=True)


def _no_progress(message: str) -> None:
    pass


def progress_printer(as_json: bool = False) -> Callable[[str], None]:
    """A command's progress callback: timestamped lines on standard error (as
    :func:`progress_wanted` allows), none under ``--json``, whose output is for machines."""
    return _no_progress if as_json else _progress_line


def quiet_libraries() -> None:
    """Keep third-party import chatter (torchao's optional kernels, torch's deprecation notes,
    transformers' progress bars) off the user's terminal; edgepack prints its own progress.
    Also make sure nothing reaches for the Hugging Face hub."""
    import logging
    import os

    for name in ("torch.utils._pytree", "torchao"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc (its ``madvise`` typed for pointers and sizes), loaded once; None off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's ``malloc_trim``), so
    that memory freed before a measurement is not silently reused inside it, and a long pack
    does not keep the high-water mark of every candidate. Does nothing off glibc."""
    import gc

    gc.collect()
    try:
        _libc().malloc_trim(0)
    except AttributeError:
        pass  # not glibc: a measurement can only over-count


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def release_large_blocks(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more from its own mapping, returned to
    the OS when freed. glibc raises its mapping threshold up to 32 MB as a program frees large
    blocks and then keeps such blocks in the heap, where they stay resident after they are
    freed; quantizing a model one weight at a time thus piles up freed temporaries of a whole
    model's size (measured: 1.2 GB of freed heap after int8 of a 0.4 B decoder). Packing sets
    this; a bundle's measured runtime does not (it is measured as users run it). Returns False
    off glibc."""
    try:
        libc = _libc()
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except AttributeError:
        return False


#: madvise's advice to reclaim a range's pages now (Linux 5.4+, sys/mman.h): clean file pages
#: leave the process (read again from the file if touched), written ones are paged out, never lost
_MADV_PAGEOUT = 21


def drop_file_pages(tensor: Any) -> bool:
    """Take the pages wholly inside a no-longer-used CPU tensor's bytes out of this process's
    resident memory (``madvise(MADV_PAGEOUT)``): for a tensor in a memory-mapped file (a
    safetensors weight, which edgepack loads mapped), its pages leave the process at once and
    a later read would fault them in again from the file, so a weight replaced by a copy in
    another layout (int4 repacked for the CPU kernel) stops counting twice. Nothing is lost
    whatever the memory is (pages written since they were mapped, or anonymous ones, are paged
    out to swap, or stay where there is none). Pages shared with the tensors beside it are kept.
    Returns whether the kernel took the advice: False off Linux, on kernels before 5.4, for a
    tensor not on the CPU, not contiguous or within one page."""
    import ctypes
    import mmap
    import sys

    if tensor is None or sys.platform != "linux" or tensor.device.type != "cpu" or tensor.numel() == 0 \
            or not tensor.is_contiguous():
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    libc = _libc()
    if last <= first or libc is None:
        return False
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT) == 0
