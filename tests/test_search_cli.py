"""`cbir search IMAGE...` (services/search_cli.py): tables and JSON against a real gateway on localhost and in
this process, and each exit status: no match, an unreachable or silent server, a bad image."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from benchlib import free_port
from servers import StallingServer, serve_in_thread

from services.cli import main
from services.search_cli import EXIT_BAD_IMAGE, EXIT_NO_MATCH, EXIT_UNREACHABLE, hits_table, similarity_decimals


@pytest.fixture
def gateway(indexed_state: Path) -> Iterator[str]:
    """The real gateway (tiny bundle, the mini collection indexed) on a free localhost port."""
    from services.serve.apps import gateway_app

    with serve_in_thread(gateway_app()) as url:
        yield url


def search(*argv: str) -> int:
    """`cbir search ...`'s exit status (0 when it returns)."""
    try:
        main(["search", *map(str, argv)])
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


def test_hits_print_as_a_table_per_image(gateway: str, mini_collection: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cat, ship = mini_collection / "test" / "cat" / "0000.jpg", mini_collection / "test" / "ship" / "0001.jpg"
    assert search(cat, ship, "--url", gateway, "-k", "3") == 0
    out = capsys.readouterr().out
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2 and blocks[0].startswith(f"{cat} (predicted ")
    header, *rows = blocks[0].splitlines()[1:]
    assert header.split() == ["rank", "score", "similarity", "label", "file"]
    assert [row.split()[0] for row in rows] == ["1", "2", "3"]
    for row in rows:
        _, score, similarity, label, filename = row.split()
        assert 0 <= float(score) <= 2 and -1 <= float(similarity) <= 1 and filename.endswith(".jpg")


def test_json_is_the_apis_answer_and_a_box_searches_a_region(gateway: str, mini_collection: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cat = mini_collection / "test" / "cat" / "0000.jpg"
    assert search(cat, "--url", gateway, "-k", "4", "--box", "2,2,20,20", "--json") == 0
    [result] = json.loads(capsys.readouterr().out)["results"]
    api = httpx.post(f"{gateway}/search", params={"k": 4, "box": "2,2,20,20"},
                     files={"file": ("q.jpg", cat.read_bytes())}, timeout=30).json()
    assert result["image"] == str(cat)
    assert [(h["id"], h["score"], h["similarity"]) for h in result["hits"]] == [
        (h["id"], h["score"], h["similarity"]) for h in api["hits"]]


def test_in_process_search_answers_as_the_server_does(gateway: str, mini_collection: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cat = mini_collection / "test" / "cat" / "0000.jpg"
    assert search(cat, "--url", gateway, "-k", "5", "--json") == 0
    [served] = json.loads(capsys.readouterr().out)["results"]
    assert search(cat, "--local", "-k", "5", "--json") == 0
    [local] = json.loads(capsys.readouterr().out)["results"]
    assert [h["id"] for h in local["hits"]] == [h["id"] for h in served["hits"]]
    for here, there in zip(local["hits"], served["hits"], strict=True):
        assert here["score"] == pytest.approx(there["score"], abs=1e-6)
        assert here["similarity"] == pytest.approx(there["similarity"], abs=1e-5)
    assert local["query"] == served["query"]


@pytest.mark.parametrize("where", ["server", "local"])
def test_no_match_exits_1(gateway: str, mini_collection: Path, where: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    mode = ["--url", gateway] if where == "server" else ["--local"]
    assert search(mini_collection / "test" / "cat" / "0000.jpg", *mode, "--label", "unicorn") == EXIT_NO_MATCH
    assert "no match" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["server", "local"])
def test_a_bad_image_exits_4_and_the_others_are_answered(gateway: str, mini_collection: Path, tmp_path: Path,
                                                         where: str, capsys: pytest.CaptureFixture[str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    mode = ["--url", gateway] if where == "server" else ["--local"]
    text, missing = tmp_path / "notes.jpg", tmp_path / "missing.jpg"
    text.write_text("not an image")
    cat = mini_collection / "test" / "cat" / "0000.jpg"
    with caplog.at_level(logging.ERROR):
        assert search(text, cat, missing, *mode, "--json") == EXIT_BAD_IMAGE
    results = json.loads(capsys.readouterr().out)["results"]
    assert [bool(r.get("hits")) for r in results] == [False, True, False]
    assert results[0]["error"]["status"] == 415 and "not a supported image" in results[0]["error"]["detail"]
    assert "cannot read the file" in results[2]["error"]["detail"]
    with caplog.at_level(logging.ERROR):
        assert search(cat, *mode, "--box", "30,30,10,10") == EXIT_BAD_IMAGE  # not inside the 32×32 image
    assert "not inside the image" in caplog.text


def test_an_unreachable_or_silent_server_exits_3(mini_collection: Path, caplog: pytest.LogCaptureFixture) -> None:
    cat = mini_collection / "test" / "cat" / "0000.jpg"
    with caplog.at_level(logging.ERROR):
        assert search(cat, "--url", f"http://127.0.0.1:{free_port()}") == EXIT_UNREACHABLE
    assert "cannot reach the search API" in caplog.text
    with StallingServer() as silent, caplog.at_level(logging.ERROR):
        assert search(cat, "--url", silent.url, "--timeout", "0.5") == EXIT_UNREACHABLE
    assert "did not answer within 0.5 s" in caplog.text


def test_in_process_with_an_unreachable_embedder_exits_3(indexed_state: Path, mini_collection: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_EMBEDDER_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("CBIR_EMBEDDER_RETRIES", "0")
    assert search(mini_collection / "test" / "cat" / "0000.jpg", "--local") == EXIT_UNREACHABLE


def test_other_failures_exit_2_with_their_reason(cbir_env: Path, mini_collection: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):  # nothing indexed yet
        assert search(mini_collection / "test" / "cat" / "0000.jpg", "--local") == 2
    assert "cbir index" in caplog.text
    assert search(mini_collection / "test" / "cat" / "0000.jpg", "--box", "1,2,3") == 2  # a bad option
    assert search(mini_collection / "test" / "cat" / "0000.jpg", "-k", "0") == 2


def test_the_table_shows_the_decimals_that_tell_similarities_apart() -> None:
    hits = [{"score": 1.99999, "similarity": 0.99994 - rank * 0.00001, "label": "horse", "filename": f"{rank}.jpg"}
            for rank in range(24)]
    rows = hits_table(hits).splitlines()[1:]
    assert [row.split()[2] for row in rows[:3]] == ["0.99994", "0.99993", "0.99992"]
    assert similarity_decimals([0.9, 0.5, 0.25]) == 3 and similarity_decimals([]) == 3
