"""What one machine serves (services/indexer/serving.py): the record in `<state dir>/serving.json`, written
atomically and read forgivingly, the index file it names, the bundle copy it keeps and what it forgets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services.common.settings import ModelSettings
from services.indexer.serving import (
    DEFAULT_INDEX,
    RECORD_FILE,
    ServingRecord,
    forget,
    index_file_for,
    keep_bundle,
    read_record,
    served_index,
    write_record,
)

RECORD = ServingRecord(model_version="vgg16-10c-abc-d64-w2", index="index.npz", model_dir="models/vgg16-10c-abc",
                       pca_dims=64, onehot_weight=2.0)


def test_a_written_record_reads_back_and_names_the_served_index(tmp_path: Path) -> None:
    assert read_record(tmp_path) is None and served_index(tmp_path) == tmp_path / DEFAULT_INDEX
    beside = ServingRecord(**{**RECORD.__dict__, "index": index_file_for("next/model:1")})
    write_record(tmp_path / "state", beside)
    assert read_record(tmp_path / "state") == beside
    assert served_index(tmp_path / "state") == tmp_path / "state" / "index-next-model-1.npz"
    assert [p.name for p in (tmp_path / "state").iterdir()] == [RECORD_FILE]  # no temporary file left


def test_an_unreadable_record_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / RECORD_FILE).write_text('{"model_version": "half')
    with caplog.at_level(logging.WARNING):
        assert read_record(tmp_path) is None
    assert "ignoring" in caplog.text and RECORD_FILE in caplog.text
    (tmp_path / RECORD_FILE).write_text('{"model_version": "m"}')  # a field missing
    assert read_record(tmp_path) is None


def test_the_record_loads_its_model_again_with_its_vector_settings(tmp_path: Path) -> None:
    settings = ModelSettings(_env_file=None, model_dir=Path("/configured"), pca_dims=8,  # type: ignore[call-arg]
                             onehot_weight=1.0, max_batch=16)
    served = RECORD.model_settings(tmp_path, settings)
    assert (served.model_dir, served.pca_dims, served.onehot_weight) == (tmp_path / RECORD.model_dir, 64, 2.0)
    assert served.max_batch == 16  # the rest is the configured settings'


def test_a_kept_bundle_is_linked_under_the_state_dir_once(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    (bundle / "model.safetensors").write_bytes(b"weights")
    state = tmp_path / "state"
    state.mkdir()
    relative = keep_bundle(state, bundle, "vgg16-10c-abc")
    assert relative == "models/vgg16-10c-abc"
    kept = state / relative
    assert sorted(p.name for p in kept.iterdir()) == ["bundle.json", "model.safetensors"]
    assert (kept / "model.safetensors").stat().st_ino == (bundle / "model.safetensors").stat().st_ino  # a hard link
    (bundle / "bundle.json").unlink()  # the configured bundle replaced: the kept copy stays as it was
    assert keep_bundle(state, bundle, "vgg16-10c-abc") == relative and (kept / "bundle.json").is_file()


def test_forget_removes_only_what_the_kept_pair_does_not_use(tmp_path: Path) -> None:
    (tmp_path / "models" / "old").mkdir(parents=True)
    beside = ["index.npz.00000003.log", "index.npz.0a1b2c.hnsw", "index-new.npz.00000000.log"]
    for name in ["index.npz", *beside]:
        (tmp_path / name).write_bytes(b"old index")
    old = ServingRecord(**{**RECORD.__dict__, "model_dir": "models/old"})
    same_bundle = ServingRecord(**{**old.__dict__, "index": "index-new.npz", "pca_dims": 8})
    forget(tmp_path, old, keep=same_bundle)  # another index of the same bundle: the bundle copy stays
    assert not (tmp_path / "index.npz").exists() and (tmp_path / "models" / "old").is_dir()
    assert sorted(path.name for path in tmp_path.glob("index*")) == ["index-new.npz.00000000.log"]  # its logs, graphs
    forget(tmp_path, same_bundle, keep=RECORD)
    assert not (tmp_path / "models" / "old").exists()
