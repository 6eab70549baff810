"""`cbir serve` as a user starts it, a subprocess on a free port: it answers at once, becomes ready by
itself while it indexes in the background, and stops cleanly on SIGTERM keeping what it wrote.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from factories import copy_collection
from processes import free_port, read_index, start_cbir, stop_process, subprocess_env

pytestmark = pytest.mark.slow  # a real server indexing 3,000 images


@pytest.fixture(scope="module")
def larger_collection(tmp_path_factory: pytest.TempPathFactory, cifar10_dir: Path) -> Path:
    """300 train images per class: with batches of 4, indexing takes long enough to be watched."""
    return copy_collection(cifar10_dir, tmp_path_factory.mktemp("larger"), train=300)


def start_serve(tmp_path: Path, bundle: Path, collection: Path) -> tuple[subprocess.Popen, str, Path]:
    port, log = free_port(), tmp_path / "serve.log"
    env = subprocess_env(bundle, collection, tmp_path / "state", CBIR_INDEX_BATCH_SIZE="4",
                         CBIR_INDEX_CONCURRENCY="1")
    process = start_cbir("serve", "--port", str(port), env=env, cwd=tmp_path, log=log)
    return process, f"http://127.0.0.1:{port}", log


def poll_health(url: str, process: subprocess.Popen, log: Path, *, until, timeout_s: float = 120.0) -> list[dict]:
    """Every /healthz answer (status code folded into the body) until `until(body)` holds."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            response = httpx.get(f"{url}/healthz", timeout=5)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        seen.append({"code": response.status_code, **response.json()})
        if until(seen[-1]):
            return seen
        time.sleep(0.02)
    pytest.fail(f"no /healthz answer satisfied the condition; last {seen[-3:]}\n{log.read_text()[-3000:]}")


def test_serve_answers_at_once_and_becomes_ready_by_itself(tmp_path: Path, tiny_bundle_dir: Path,
                                                           larger_collection: Path) -> None:
    started = time.monotonic()
    process, url, log = start_serve(tmp_path, tiny_bundle_dir, larger_collection)
    try:
        first = poll_health(url, process, log, until=lambda body: True, timeout_s=30)
        assert time.monotonic() - started < 30
        seen = first + poll_health(url, process, log, until=lambda body: body["status"] == "ready")
        page = httpx.get(f"{url}/", timeout=5)
    finally:
        stop_process(process)
    indexing = [body for body in seen if body["status"] == "indexing"]
    assert indexing, seen[:3]  # the server answered while it indexed
    assert all(body["code"] == 503 for body in indexing)
    counts = [body["indexed"] for body in indexing if body.get("total")]
    assert counts == sorted(counts) and all(0 <= n <= 3000 for n in counts)
    assert {body["total"] for body in indexing if body.get("total")} <= {3000}
    assert seen[-1]["code"] == 200 and seen[-1]["documents"] == 3000
    assert page.status_code == 200
    assert process.returncode == 0 and "Traceback" not in log.read_text()


def test_sigterm_during_indexing_stops_cleanly_and_keeps_what_was_written(tmp_path: Path, tiny_bundle_dir: Path,
                                                                          larger_collection: Path) -> None:
    process, url, log = start_serve(tmp_path, tiny_bundle_dir, larger_collection)
    try:
        poll_health(url, process, log, until=lambda body: body["status"] == "indexing" and body["indexed"] >= 400)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        stop_process(process)
    output = log.read_text()
    assert process.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert "stopped: every resource closed" in output
    kept = len(read_index(tmp_path / "state" / "index.npz")["ids"])
    assert 400 <= kept < 3000  # everything up to the signal, saved on the way out; not the whole run
    assert np.unique(read_index(tmp_path / "state" / "index.npz")["ids"]).size == kept
