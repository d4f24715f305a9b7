"""edgepack: package a PyTorch / Hugging Face model for one device under a memory budget.

Python API (the CLI calls the same functions)::

    import edgepack
    result = edgepack.pack("./all-MiniLM-L6-v2", target="cpu", budget="100MB",
                           apply=["precision:dtype=bf16"], out="dist")
    report = edgepack.verify(result.bundle)
    report = edgepack.verify(result.bundle, keys=["release.pub"], min_version="0.1.0")  # signed, no rollback
    model = edgepack.load(result.bundle)

Writing a plugin: implement hooks from :mod:`edgepack.hookspecs`, mark them with
:data:`edgepack.hookimpl`, and expose the module under the ``edgepack`` entry-point group::

    import edgepack
    from edgepack.interfaces import Compressor

    class MyCompressor(Compressor):
        name = "mine"
        ...

    @edgepack.hookimpl
    def edgepack_register_compressors(register):
        register(MyCompressor)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("edgepack")

if TYPE_CHECKING:  # pragma: no cover
    from edgepack.bundle.verify import VerifyReport
    from edgepack.pipeline import PackResult


def pack(model: str, **kwargs: Any) -> "PackResult":
    """Pack ``model`` into a verified bundle; see :func:`edgepack.pipeline.pack`."""
    from edgepack.pipeline import pack as _pack

    return _pack(model, **kwargs)


def verify(bundle: str, **kwargs: Any) -> "VerifyReport":
    """Verify a bundle on this machine; see :func:`edgepack.bundle.verify.verify`."""
    from edgepack.bundle.verify import verify as _verify

    return _verify(bundle, **kwargs)


def load(bundle: str, **kwargs: Any) -> Any:
    """Load a bundle's model, ready on this machine's device; see :func:`edgepack.runtime.load`."""
    from edgepack.runtime import load as _load

    return _load(bundle, **kwargs)


__all__ = ["__version__", "hookimpl", "pack", "verify", "load"]
