"""Python's cyclic garbage collector in a long-running service: what start-up made is set aside for good.

A service's start-up leaves some 390,000 objects the collector tracks (torch, FastAPI, pydantic, the model's
modules), and every full collection walks all of them: 67-89 ms each on two cores (2026-12-05), during which
nothing else of the process runs Python. Full collections come every so often under a steady stream of
requests, and a search that met one took up to 10 × its time. Nearly all of those objects live as long as the
process, so once it is ready `freeze_startup_objects` moves them to the permanent generation (`gc.freeze`,
what CPython documents for this), and a collection walks only what was made since.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect what start-up left unreachable, then set every object alive now aside from later collections;
    returns how many the collector no longer walks. Call it once the service has started: only the first call in a
    process does anything (a frozen object in a reference cycle is never collected, so what a second start in the
    same process, a test's, would freeze could leak)."""
    if gc.get_freeze_count():
        return 0
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("set %d objects aside from garbage collection in %.0f ms", frozen,
                 (time.perf_counter() - started) * 1000)
    return frozen
