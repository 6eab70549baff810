"""What `cbir train` reads from the environment (`CBIR_*`, and a `.env` file as `cbir serve` does)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.settings import BaseCbirSettings


class TrainingSettings(BaseCbirSettings):
    """The defaults of the options a command line leaves out; a flag given wins."""

    data_dir: Path | None = Field(
        None, description="collection root with train/ and test/ (default: data/cifar10, else ../shared/cifar10)"
    )
