"""Compiling the embedder's network without a request ever waiting for it, or running beside its tracing.

The network is compiled ahead of time once per size of `batch_buckets` (`aot`: an AOTInductor package per size,
built in a child process at the lowest priority), smallest first (a search's one or two images before the
indexer's full batches), by `WarmUp`'s thread while the eager network serves; each package is used as soon as it
is loaded, a chunk going through the compiled sizes where that wastes little (`compiled_pieces`), else eagerly.
The packages live in `compile_cache_dir`, one folder per bundle version, torch version and device: a restart
loads them in milliseconds.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
# Without CBIR_COMPILE_CACHE_DIR or a state dir (`cbir embedder`):
DEFAULT_COMPILE_CACHE = Path(tempfile.gettempdir()) / "cbir-compile-cache"


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled model is built for: 1, the powers of two from 4 up to `max_batch`, and
    `max_batch` (1, 4, 8, 16, 32, 64). Each is a package that a restart loads in milliseconds but a first start
    compiles (about 15 s each on two cores); other chunk sizes go through their pieces (`compiled_pieces`).
    Without 8 and 32, 16 clients got 0.40-0.48 of the yardstick (2026-12-05): chunks of 9-11 took three or four
    calls."""
    sizes, size = {1, max_batch}, 4
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def compiled_pieces(count: int, sizes: tuple[int, ...]) -> list[tuple[int | None, int]]:
    """How `count` images go through a model compiled for `sizes`: (compiled size, images taken) per call.

    A remainder is padded to the next compiled size when that wastes at most a quarter of it, else the
    largest size that fits is split off (17 images at sizes 1, 2, 4, 8, 16, 32: 16 + 1, not 32 with 15
    blank); None as the size: nothing compiled fits without more waste (run those eagerly), so a query
    never pays for a batch much larger than its own while the small sizes still compile.

    >>> compiled_pieces(17, (1, 2, 4, 8, 16, 32))
    [(16, 16), (1, 1)]
    >>> compiled_pieces(1, (64,))
    [(None, 1)]
    """
    pieces, remaining = [], count
    while remaining:
        up = next((s for s in sizes if s >= remaining), None)
        if up is not None and up - remaining <= up // 4:
            pieces.append((up, remaining))
            break
        down = max((s for s in sizes if s <= remaining), default=None)
        if down is None:
            pieces.append((None, remaining))
            break
        pieces.append((down, down))
        remaining -= down
    return pieces


def compile_cache_dir(root: Path, *, bundle_version: str, device: torch.device) -> Path:
    """Where the compiled packages of one bundle live: `root/<bundle>-torch<version>-<device>`, so that another
    bundle, torch or device never loads them."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{bundle_version}-torch{torch.__version__}")
    return root / f"{safe}-{device.type}"


class WarmUp:
    """Runs `compile_next` until it returns False, in a background thread.

    >>> warm_up = WarmUp(embedder.compile_next)
    >>> warm_up.start()   # the eager model serves meanwhile
    >>> warm_up.stop()    # between two sizes; one being compiled finishes in its daemon thread
    """

    def __init__(self, compile_next: Callable[[], bool]) -> None:
        self._compile_next = compile_next
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedder-compile", daemon=True)
        self.done = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, timeout_s: float = 1.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set() and self._compile_next():
                pass
        finally:
            self.done.set()
