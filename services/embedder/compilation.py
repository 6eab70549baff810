"""Compiling the embedder's network (torch.compile) without a request ever waiting for it.

torch.compile specialises on the batch size, so the network is compiled once per size of `batch_buckets`,
smallest first (a search's one or two images before the indexer's full batches), by `WarmUp`'s thread on
its own copy of the network while the eager one serves; between and after compilations a chunk uses a
compiled size where that wastes little (`compiled_pieces`), else it runs eagerly. Inductor's on-disk caches
live in `compile_cache_dir`, one folder per bundle version, torch version and device, so a restart skips the
C++ compiler's work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Held for each compilation: inductor reads its cache folder from the environment, and the tracer patches
# nn.Module for the whole process, so no compiled graph runs meanwhile (`Embedder._forward` takes it without
# waiting, else runs eagerly).
COMPILE_LOCK = threading.Lock()
# While a compilation holds the GIL for seconds of Python (tracing, lowering), the thread that runs the
# model waits for it after each operator: a short switch interval bounds each wait (the default is 5 ms).
COMPILE_SWITCH_INTERVAL_S = 0.0002


# nn.Module's own, before anything patches them: FX's tracer (inside torch.compile) sets its wrappers on
# nn.Module itself while it traces, for every thread, and an eager forward pass in another thread then
# went through the tracer and failed ("module is not installed as a submodule").
_MODULE_CALL, _MODULE_GETATTR = torch.nn.Module.__call__, torch.nn.Module.__getattr__


def shield_from_tracing(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, each of its modules now of a subclass of its class that holds nn.Module's own `__call__` and
    `__getattr__`, so that it runs eagerly in one thread while torch.compile traces in another. Behaviour is
    unchanged (the same methods, found one class earlier); compile a copy made before, not the shielded model.
    """
    shielded: dict[type, type] = {}
    for module in model.modules():
        cls = type(module)
        if cls not in shielded:
            own = {name: method for name, method in (("__call__", _MODULE_CALL), ("__getattr__", _MODULE_GETATTR))
                   if getattr(cls, name) is method}  # a class with its own keeps it
            shielded[cls] = type(cls.__name__, (cls,), {**own, "__module__": cls.__module__,
                                                        "__qualname__": cls.__qualname__}) if own else cls
        module.__class__ = shielded[cls]
    return model


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled model is built for: powers of four up to `max_batch`, and `max_batch` (1, 4,
    16, 64). Each size is traced and lowered again at every start (about 2 s here, from the cache: torch's graph
    caches refuse the frozen graph), so there are few; other chunk sizes go through their pieces
    (`compiled_pieces`). Powers of two (7 sizes for 64) made a restart `ready` after 22.5 s; powers of four, the
    same cache, 3.4 s then 1.9 s a size (2026-12-05)."""
    sizes, size = {max_batch}, 1
    while size < max_batch:
        sizes.add(size)
        size *= 4
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
    """Where inductor keeps the compiled code of one bundle: `root/<bundle>-torch<version>-<device>`, so that
    another bundle, torch or device never reads it."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{bundle_version}-torch{torch.__version__}")
    return root / f"{safe}-{device.type}"


@contextlib.contextmanager
def compiling(cache_dir: Path | None) -> Iterator[None]:
    """Hold `COMPILE_LOCK` with inductor's caches in `cache_dir` (None: torch's default folder) and a short
    GIL switch interval, for the length of one compilation."""
    with COMPILE_LOCK:
        before_dir, before_interval = os.environ.get("TORCHINDUCTOR_CACHE_DIR"), sys.getswitchinterval()
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
        sys.setswitchinterval(COMPILE_SWITCH_INTERVAL_S)
        try:
            yield
        finally:
            sys.setswitchinterval(before_interval)
            if before_dir is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before_dir


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
        # Not at a lower priority: a thread starved of the CPU while it holds the GIL stalls the one that serves.
        try:
            while not self._stopping.is_set() and self._compile_next():
                pass
        finally:
            self.done.set()
