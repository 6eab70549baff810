"""`cbir gateway` and `cbir index` embed through CBIR_EMBEDDER_URL and run where torch cannot be imported (their
images have none): each runs as a subprocess in which importing torch fails (`torchless_cbir.py`), against the
embedder served over HTTP and the Elasticsearch double."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from es_double import EsDouble
from processes import free_port, stop_process, subprocess_env
from servers import serve_in_thread, wait_for_http

from services.cli import main as cbir

pytestmark = pytest.mark.slow
TORCHLESS = Path(__file__).with_name("torchless_cbir.py")


@pytest.fixture
def embedder_url(cbir_env: Path) -> Iterator[str]:
    """The embedder app (the tiny bundle) served over HTTP from this process, which has torch."""
    from services.serve.apps import embedder_app

    with serve_in_thread(embedder_app()) as url:
        yield url


@pytest.fixture
def torchless_env(tiny_bundle_dir: Path, mini_collection: Path, tmp_path: Path, embedder_url: str,
                  es_double: EsDouble) -> dict[str, str]:
    """A `cbir` subprocess's settings: the Elasticsearch double, and the embedder over HTTP."""
    return subprocess_env(tiny_bundle_dir, mini_collection, tmp_path / "state", CBIR_BACKEND="elasticsearch",
                          CBIR_ES_URL=es_double.url, CBIR_ES_INDEX="cbir-torchless", CBIR_ES_SHARDS="3",
                          CBIR_EMBEDDER_URL=embedder_url)


def run_torchless(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TORCHLESS), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_the_runner_hides_torch_from_what_needs_it(torchless_env: dict[str, str], tmp_path: Path) -> None:
    """The checks below can fail: `cbir train` needs torch, and in the runner it stops at its import."""
    result = run_torchless("train", "--help", env=torchless_env, cwd=tmp_path)
    assert result.returncode == 1 and "ModuleNotFoundError: No module named 'torch'" in result.stderr


def test_cbir_gateway_searches_through_the_embedder_without_torch(torchless_env: dict[str, str], tmp_path: Path,
                                                                  test_image: bytes,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CBIR_BACKEND", "CBIR_ES_URL", "CBIR_ES_INDEX", "CBIR_ES_SHARDS", "CBIR_EMBEDDER_URL"):
        monkeypatch.setenv(name, torchless_env[name])
    cbir(["index", "--no-progress"])  # with torch, in this process: the gateway needs a filled index
    port, log = free_port(), tmp_path / "gateway.log"
    with log.open("wb") as output:
        gateway = subprocess.Popen([sys.executable, str(TORCHLESS), "gateway", "--port", str(port)],
                                   env=torchless_env, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{url}/healthz", timeout_s=60, process=gateway)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}\n{log.read_text()[-3000:]}")
        answer = httpx.post(f"{url}/search", params={"k": 3}, files={"file": ("q.jpg", test_image, "image/jpeg")},
                            timeout=30)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["hits"]) == 3
    finally:
        stop_process(gateway)


def test_cbir_index_fills_the_index_through_the_embedder_without_torch(torchless_env: dict[str, str],
                                                                        tmp_path: Path, es_double: EsDouble) -> None:
    result = run_torchless("index", "--no-progress", "--json", env=torchless_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout)
    assert counts["added"] == counts["documents"] == 500
