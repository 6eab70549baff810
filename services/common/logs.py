"""How every `cbir` command and bench script logs: one line a record, to stderr, from INFO up."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Log records of `level` and above as `LOG_FORMAT` lines on stderr (once a process: a second call changes
    nothing, as `logging.basicConfig` does)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
