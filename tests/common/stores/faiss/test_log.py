"""The FAISS store's write-ahead log (services/common/stores/faiss/log.py): records read back as written, a torn or
corrupt tail ignored with a warning, and the store's promise tested for real: a writer process SIGKILLed during an
append, before an fsync, around a fold's rename and before the log's removal, and at random moments, loses no
acknowledged add or removal, and the writes it replayed reach the HNSW graph too."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import faiss_crash_writer as writer
import numpy as np
import pytest
from factories import DIMS, MODEL_VERSION, make_documents
from processes import python_path

from services.common.stores.faiss import FaissStore
from services.common.stores.faiss.log import MAGIC, delete_record, log_files, read_log, upsert_record
from services.common.stores.faiss.persistence import load_index

pytestmark = pytest.mark.anyio


def write_log(path: Path, *records: bytes) -> None:
    path.write_bytes(MAGIC + b"".join(records))


def test_records_read_back_as_written(tmp_path: Path) -> None:
    documents = make_documents(3)
    path = tmp_path / "index.npz.00000000.log"
    write_log(path, upsert_record(documents, np.stack([d.vector for d in documents]), model_version=MODEL_VERSION),
              delete_record(["doc-0001", "missing"]))
    upsert, delete = list(read_log(path))
    assert upsert.op == "upsert" and upsert.model_version == MODEL_VERSION
    assert [d.stored() for d in upsert.documents] == [d.stored() for d in documents]
    np.testing.assert_array_equal(np.stack([d.vector for d in upsert.documents]),
                                  np.stack([d.vector for d in documents]))
    assert delete.op == "delete" and delete.ids == ("doc-0001", "missing")
    assert log_files(tmp_path / "index.npz") == [(0, path)]


def test_a_torn_or_corrupt_last_record_is_ignored_with_a_warning(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "index.npz.00000003.log"
    first, last = delete_record(["a"]), delete_record(["b", "c"])
    for cut in range(1, len(last)):  # killed anywhere in the middle of the last append
        write_log(path, first, last[:cut])
        with caplog.at_level(logging.WARNING):
            assert [w.ids for w in read_log(path)] == [("a",)]
        assert "torn or corrupt record" in caplog.text
    corrupt = bytearray(last)
    corrupt[-2] ^= 0xFF
    write_log(path, first, bytes(corrupt), delete_record(["d"]))
    assert [w.ids for w in read_log(path)] == [("a",)]  # what follows a bad record is not trusted either
    for partial_magic in (b"", MAGIC[:3]):  # killed while creating the file
        path.write_bytes(partial_magic)
        assert list(read_log(path)) == []


async def test_replay_is_idempotent_and_every_write_since_the_fold_comes_back(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    store = FaissStore(path, fold_records=1000)
    await store.open(dims=DIMS, model_version=MODEL_VERSION)
    documents = make_documents(10)
    await store.upsert(documents[:6])
    await store.flush()
    for document in documents[6:]:
        assert await store.add(document)
    assert await store.remove("doc-0002") and await store.remove("doc-0007")
    assert not await store.remove("doc-0002")
    # No close: as after a crash. The log (a second generation too: a writer after a crash starts one) is replayed.
    [(generation, log)] = log_files(path)
    log.with_name(f"index.npz.{generation + 1:08d}.log").write_bytes(log.read_bytes())  # the same writes twice
    reopened = FaissStore(path)
    await reopened.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    expected = {d.id for d in documents} - {"doc-0002", "doc-0007"}
    assert {doc.id async for doc in reopened.iter_documents()} == expected
    hits = await reopened.search(documents[8].vector, 1)
    assert hits[0].id == "doc-0008" and hits[0].score == pytest.approx(2.0, abs=1e-5)


async def test_the_log_is_folded_after_enough_records_and_close_leaves_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    store = FaissStore(path, fold_records=5)
    await store.open(dims=DIMS, model_version=MODEL_VERSION)
    for document in make_documents(12):
        await store.add(document)
    await store.close()  # waits for the fold under way; what came after it stays in the log
    logs = log_files(path)
    folded, logged = len(load_index(path).table), sum(len(list(read_log(log))) for _, log in logs)
    assert len(logs) <= 1 and folded >= 5 and logged < 5 and folded + logged == 12
    reopened = FaissStore(path)
    await reopened.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    assert await reopened.count() == 12


async def test_writes_during_a_fold_go_to_the_next_log_and_survive_it(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    store = FaissStore(path, fold_records=1000)
    await store.open(dims=DIMS, model_version=MODEL_VERSION)
    documents = make_documents(40)
    await store.upsert(documents[:20])
    # The fold takes its copy, then saves in a thread while these adds and removes are logged.
    results = await asyncio.gather(store.flush(), *(store.add(d) for d in documents[20:]),
                                   store.remove("doc-0001"), store.remove("doc-0025"))
    assert results[-2:] == [True, True]
    assert [generation for generation, _ in log_files(path)] == [1]  # the folded generation is gone
    reopened = FaissStore(path)  # as after a crash
    await reopened.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    assert {doc.id async for doc in reopened.iter_documents()} == {d.id for d in documents} - {"doc-0001", "doc-0025"}


async def test_replayed_writes_reach_the_graph(tmp_path: Path) -> None:
    path = tmp_path / "index.npz"
    store = FaissStore(path, index="hnsw")
    await store.open(dims=DIMS, model_version=MODEL_VERSION)
    documents = make_documents(60)
    await store.upsert(documents[:50])
    await store.wait_for_graph()  # built, kept beside the index and named in it
    await store.add(documents[55])
    await store.remove("doc-0007")
    reopened = FaissStore(path, index="hnsw")  # as after a crash: the graph from its file, the rest replayed
    await reopened.open(dims=DIMS, model_version=MODEL_VERSION, create=False)
    assert reopened.index_kind == "hnsw"
    assert (await reopened.search(documents[55].vector, 1))[0].id == "doc-0055"
    assert "doc-0007" not in {hit.id for hit in await reopened.search(documents[7].vector, 10)}


# -- killed writers -----------------------------------------------------------------------------------------------


@dataclass
class Acknowledged:
    """What a killed writer's output says the store must hold, and what it may hold (writes begun, unanswered)."""

    present: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    unsure: set[str] = field(default_factory=set)

    def read(self, lines: list[str]) -> None:
        begun: set[str] = set()
        for line in lines:
            kind, *rest = line.split()
            if kind not in ("begin", "ack"):
                continue
            op, doc_id = rest
            if kind == "begin":
                begun.add(doc_id)
                continue
            begun.discard(doc_id)
            (self.present.add if op == "add" else self.present.discard)(doc_id)
            if op == "remove":
                self.removed.add(doc_id)
        self.unsure = begun

    async def check(self, state: Path) -> None:
        store = writer.open_store(state)
        await store.open(dims=writer.DIMS, model_version=writer.MODEL_VERSION, create=False)
        stored = {doc.id async for doc in store.iter_documents()}
        assert self.present - self.unsure <= stored, "an acknowledged add was lost"
        assert not (stored & (self.removed - self.unsure)), "an acknowledged removal came back"
        assert stored - self.present <= self.unsure
        for doc_id, vector in (await store.vectors(sorted(stored))).items():
            np.testing.assert_array_equal(vector, writer.vector_of(doc_id))
        for doc_id in random.Random(len(stored)).sample(sorted(stored), min(3, len(stored))):
            assert (await store.search(writer.vector_of(doc_id), 1))[0].id == doc_id
        await store.close()
        self.present, self.unsure = stored, set()  # what the next writer starts from


def run_writer(state: Path, prefix: str, *, count: int, seed: int, kill_point: str | None = None,
               kill_after_acks: int | None = None) -> tuple[int, list[str]]:
    """Run the writer until it exits (killed by `kill_point`) or, with `kill_after_acks`, until that many
    acknowledgements, then SIGKILL it. Returns its exit code and its output lines."""
    args = [sys.executable, writer.__file__, str(state), prefix, str(count), str(seed), *filter(None, [kill_point])]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={"PYTHONPATH": python_path(), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    lines, acks = [], 0
    for line in process.stdout:
        lines.append(line)
        acks += line.startswith("ack")
        if kill_after_acks is not None and acks >= kill_after_acks:
            process.send_signal(signal.SIGKILL)
            lines += process.stdout.readlines()
            break
    return process.wait(timeout=60), lines


KILL_POINTS = ["append:1", "append:7", "fsync:6", "before-rename:2", "after-rename:2", "discard:2", "append:30"]


@pytest.mark.slow
async def test_a_writer_killed_at_each_point_of_a_write_or_a_fold_loses_no_acknowledged_write(tmp_path: Path) -> None:
    acknowledged = Acknowledged()
    for run, point in enumerate(KILL_POINTS):  # one store through all of them: each run starts from the last's wreck
        code, lines = run_writer(tmp_path, f"r{run}", count=60, seed=run, kill_point=point)
        assert code == -signal.SIGKILL, f"{point}: the writer was not killed ({code}): {lines[-3:]}"
        acknowledged.read(lines)
        await acknowledged.check(tmp_path)
        assert any(line.startswith("ack") for line in lines) or point == "append:1"
    assert len(acknowledged.present) > 20 and acknowledged.removed


@pytest.mark.slow
async def test_a_writer_killed_at_random_moments_loses_no_acknowledged_write(tmp_path: Path) -> None:
    acknowledged, rng = Acknowledged(), random.Random(25)
    for run in range(8):
        code, lines = run_writer(tmp_path, f"r{run}", count=400, seed=run, kill_after_acks=rng.randint(1, 60))
        assert code == -signal.SIGKILL
        acknowledged.read(lines)
        await acknowledged.check(tmp_path)
