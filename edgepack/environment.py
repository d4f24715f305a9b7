"""Process-wide settings every edgepack process applies once: quiet third-party libraries,
never reach for the Hugging Face hub, and give freed heap memory back to the OS."""

from __future__ import annotations


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


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's ``malloc_trim``), so
    that memory freed before a measurement is not silently reused inside it, and a long pack
    does not keep the high-water mark of every candidate. Does nothing off glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: a measurement can only over-count
