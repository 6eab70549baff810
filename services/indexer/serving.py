"""What one machine serves: the model and the index file, recorded in `<state dir>/serving.json`.

`cbir serve` reads the record to serve the model and index that belong together, and writes it when an
index is complete. When the configured model is another one, it goes on serving the recorded model and
index while the new index is built beside them (`index-<model version>.npz`), then swaps both at once and
records the new pair. The recorded bundle is kept under `<state dir>/models/<bundle version>/` (hard links
where the file system allows), so the old model can still be loaded after the configured bundle was replaced.

    {"model_version": "vgg16-10c-181913bd0bb3-d64-w2", "index": "index.npz",
     "model_dir": "models/vgg16-10c-181913bd0bb3", "pca_dims": 64, "onehot_weight": 2.0}
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from services.common.files import write_atomically
from services.common.settings import ModelSettings

logger = logging.getLogger(__name__)

RECORD_FILE = "serving.json"
DEFAULT_INDEX = "index.npz"  # the first index of a state directory


@dataclass(frozen=True)
class ServingRecord:
    """A model (its bundle copy and vector settings) and the index file built with it, relative to the state dir."""

    model_version: str
    index: str
    model_dir: str
    pca_dims: int
    onehot_weight: float

    def model_settings(self, state_dir: Path, settings: ModelSettings) -> ModelSettings:
        """`settings` with this record's model: what loads the served model again."""
        return settings.model_copy(update={"model_dir": state_dir / self.model_dir, "pca_dims": self.pca_dims,
                                           "onehot_weight": self.onehot_weight})


def read_record(state_dir: Path) -> ServingRecord | None:
    """The record, or None when there is none, or it is unreadable (logged: the configured model is served)."""
    path = state_dir / RECORD_FILE
    try:
        return ServingRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("ignoring %s (%s): serving the configured model", path, exc)
        return None


def served_index(state_dir: Path) -> Path:
    """The FAISS file one machine serves: the one the record names, else the first index (`index.npz`)."""
    record = read_record(state_dir)
    return state_dir / (record.index if record is not None else DEFAULT_INDEX)


def write_record(state_dir: Path, record: ServingRecord) -> None:
    """Replace the record, whole or not at all (`write_atomically`)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(state_dir / RECORD_FILE, lambda file: file.write(json.dumps(asdict(record), indent=1).encode()))


def index_file_for(model_version: str) -> str:
    """The index file of a model version's index, built beside the served one."""
    return f"index-{re.sub(r'[^A-Za-z0-9._-]', '-', model_version)}.npz"


def keep_bundle(state_dir: Path, bundle_dir: Path, bundle_version: str) -> str:
    """A copy of the bundle under the state dir (hard links where possible); its path relative to the state dir."""
    relative = f"models/{bundle_version}"
    target = state_dir / relative
    if target.is_dir():
        return relative
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=state_dir))
    try:
        for source in bundle_dir.iterdir():
            if source.is_file():
                try:
                    os.link(source, staging / source.name)
                except OSError:  # another file system
                    shutil.copy2(source, staging / source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return relative


def forget(state_dir: Path, record: ServingRecord, *, keep: ServingRecord) -> None:
    """Remove what `record` served and `keep` does not use: its index file (with the FAISS write logs and HNSW
    graphs beside it) and its bundle copy."""
    if record.index != keep.index:
        (state_dir / record.index).unlink(missing_ok=True)
        for pattern in (f"{record.index}.*.log", f"{record.index}.*.hnsw"):
            for beside in state_dir.glob(pattern):
                beside.unlink(missing_ok=True)
    if record.model_dir != keep.model_dir:
        shutil.rmtree(state_dir / record.model_dir, ignore_errors=True)
