"""edgepack-lowrank: an example third-party edgepack package with one compressor and one target.

* :mod:`edgepack_lowrank.compressor` — ``lowrank``: Linear layers factorised by truncated SVD;
* :mod:`edgepack_lowrank.board` — ``edge-board``: an 8 GB shared-memory edge board, emulated
  by this machine's CPU where the board is not here.

Each module is one entry point of the ``edgepack`` group (see ``pyproject.toml``); edgepack
finds them only there. Importing this package imports neither torch nor transformers.
"""

__version__ = "0.1.0"
