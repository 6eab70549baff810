"""`cbir search IMAGE...`: search from the terminal, against a running search API or in this process.

    cbir search photo.jpg                       the gateway at CBIR_SEARCH_URL (default http://127.0.0.1:8000)
    cbir search a.jpg b.png -k 5 --json         several images; one JSON document on stdout
    cbir search photo.jpg --box 40,30,200,150   search by that region of the photo (pixels, as displayed)
    cbir search photo.jpg --local               the embedded index and the model in this process (no server)

Hits print as a table (rank, score, similarity, label, file) per image. The exit status says how it went, as
grep's does: 0 every image found hits, 1 some image found none, 3 the server (or, with --local, the embedder
or Elasticsearch) could not be reached or timed out, 4 an image could not be read or used (missing file, not an
image, a box outside it); 2 any other error (the index is not ready, a refused key, a bad option).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import httpx
from pydantic import AnyHttpUrl, Field, SecretStr

from services.common.errors import (
    EmbedderUnavailableError,
    ImageError,
    SearchApiError,
    StoreUnavailableError,
)
from services.common.settings import BaseCbirSettings

if TYPE_CHECKING:
    from services.search.engine import Answer

T = TypeVar("T")

logger = logging.getLogger("cbir.search")

EXIT_NO_MATCH = 1
EXIT_UNREACHABLE = 3
EXIT_BAD_IMAGE = 4
IMAGE_STATUSES = {400, 413, 415, 422}  # what the API answers for an image it cannot use (422: the box)


class SearchClientSettings(BaseCbirSettings):
    """What `cbir search` reads from the environment; a flag given wins."""

    search_url: AnyHttpUrl = Field(AnyHttpUrl("http://127.0.0.1:8000"), description="the search API `cbir search` "
                                   "asks (the local gateway of `cbir serve` by default)")
    search_api_key: SecretStr | None = Field(None, description="X-API-Key that `cbir search` sends (CBIR_API_KEYS)")
    search_timeout_s: float = Field(30.0, gt=0, description="how long `cbir search` waits for one answer")


@dataclass(frozen=True)
class ImageResult:
    """One image's answer (the API's search response, as JSON) or its error (`status`, `detail`)."""

    image: str
    answer: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {"image": self.image, **(self.answer if self.answer is not None else {"error": self.error})}


class Unreachable(Exception):
    """The server (or with --local, the embedder or Elasticsearch) did not answer: nothing more is tried."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`cbir search`'s arguments, under `cbir`'s sub-commands."""
    search = commands.add_parser(
        "search", help="search by images from the terminal (a running server, or --local)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    search.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="the images to search by")
    search.add_argument("-k", type=_k_argument, default=10, metavar="K",
                        help="hits per image, 1-1000 (default 10)")
    search.add_argument("--box", default=None, type=_box_argument, metavar="X,Y,W,H",
                        help="search by this region of each image: pixels of the image as displayed")
    search.add_argument("--label", action="append", default=None, help="only hits with this label (repeatable)")
    search.add_argument("--same-class", action="store_true", help="only hits of the query's predicted class")
    search.add_argument("--json", action="store_true", help="one JSON document on stdout instead of tables")
    where = search.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="the search API (default: CBIR_SEARCH_URL, http://127.0.0.1:8000)")
    where.add_argument("--local", action="store_true",
                       help="search the embedded index in this process (CBIR_STATE_DIR, CBIR_BACKEND), no server")
    search.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="longest wait for one answer from --url (default: CBIR_SEARCH_TIMEOUT_S, 30)")
    search.add_argument("--api-key", default=None, help="X-API-Key for --url (default: CBIR_SEARCH_API_KEY)")


def _k_argument(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"K must be an integer from 1 to 1000, got {text!r}")
    return int(text)


def _box_argument(text: str) -> str:
    from services.common.images import Box

    try:
        Box.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def run(args: argparse.Namespace) -> None:
    """Search, print, and exit with the status the module's docstring lists."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the tables
    params: dict[str, Any] = {"k": args.k, "same_class": str(args.same_class).lower()}
    if args.label:
        params["label"] = args.label
    if args.box is not None:
        params["box"] = args.box
    try:
        results = (asyncio.run(search_here(args.images, params)) if args.local
                   else search_server(args.images, params, _client_settings(args)))
    except Unreachable as exc:
        logger.error("%s", exc)
        raise SystemExit(EXIT_UNREACHABLE) from None
    print_results(results, as_json=args.json)
    if any(result.error is not None for result in results):
        raise SystemExit(EXIT_BAD_IMAGE)
    if any(not result.answer["hits"] for result in results if result.answer is not None):
        raise SystemExit(EXIT_NO_MATCH)


def _client_settings(args: argparse.Namespace) -> tuple[str, float, str | None]:
    settings = SearchClientSettings.load()
    key = args.api_key or (settings.search_api_key.get_secret_value() if settings.search_api_key else None)
    return (args.url or str(settings.search_url)).rstrip("/"), args.timeout or settings.search_timeout_s, key


def search_server(images: Sequence[Path], params: dict[str, Any], client: tuple[str, float, str | None]
                  ) -> list[ImageResult]:
    """Each image through `POST /search` of the API at `client` (base URL, timeout in seconds, API key)."""
    url, timeout_s, api_key = client
    headers = {"X-API-Key": api_key} if api_key else {}
    results = []
    with httpx.Client(base_url=url, timeout=timeout_s, headers=headers) as http:
        for image in images:
            try:
                data = image.read_bytes()
            except OSError as exc:
                results.append(_unreadable(image, exc))
                continue
            try:
                response = http.post("/search", params=params, files={"file": (image.name, data)})
            except httpx.TimeoutException:
                raise Unreachable(f"{url} did not answer within {timeout_s:g} s (--timeout)") from None
            except httpx.TransportError as exc:
                raise Unreachable(f"cannot reach the search API at {url}: {exc}; is `cbir serve` running? "
                                  "(--url, CBIR_SEARCH_URL; --local searches without a server)") from None
            results.append(_result(image, response))
    return results


def _result(image: Path, response: httpx.Response) -> ImageResult:
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:200]}
    if response.status_code == 200:
        return ImageResult(str(image), answer=body)
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if response.status_code in IMAGE_STATUSES:
        return ImageResult(str(image), error={"status": response.status_code, "detail": detail})
    raise SearchApiError(f"the search API answered {response.status_code} for {image}: {detail}")


def _unreadable(image: Path, exc: OSError) -> ImageResult:
    return ImageResult(str(image), error={"status": None, "detail": f"cannot read the file: {exc.strerror or exc}"})


async def search_here(images: Sequence[Path], params: dict[str, Any]) -> list[ImageResult]:
    """Each image searched in this process: the model and the store the settings name (`services.wiring`), as
    `cbir serve` would; answers shaped as the API's."""
    from services.common.images import Box, decode_image
    from services.search.engine import SearchEngine, SearchOptions
    from services.search.settings import SearchSettings
    from services.search.uploads import UploadFolder
    from services.wiring import build_embedding_service, build_store

    box = Box.parse(params["box"]) if "box" in params else None
    options = SearchOptions(k=params["k"], labels=frozenset(params["label"]) if "label" in params else None,
                            same_class=params["same_class"] == "true")
    settings = SearchSettings.load()
    embedder = await asyncio.to_thread(build_embedding_service, settings)
    engine = SearchEngine(embedder, build_store(settings),
                          uploads=UploadFolder(settings.uploads_dir, max_bytes=settings.max_upload_storage_bytes))
    results = []
    try:
        info = await _unless_unreachable(embedder.info())
        for image in images:
            try:
                pixels = decode_image(image.read_bytes(), size=info.image_size, resample=info.resize, box=box,
                                      max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
            except OSError as exc:
                results.append(_unreadable(image, exc))
                continue
            except ImageError as exc:
                results.append(ImageResult(str(image), error={"status": exc.status_code, "detail": exc.message}))
                continue
            [answer] = await _unless_unreachable(engine.search_images(pixels[None], options))
            results.append(ImageResult(str(image), answer=_answer_json(answer)))
    finally:
        await engine.close()
    return results


async def _unless_unreachable(work: Awaitable[T]) -> T:
    try:
        return await work
    except (EmbedderUnavailableError, StoreUnavailableError) as exc:
        raise Unreachable(exc.message) from None


def _answer_json(answer: Answer) -> dict[str, Any]:
    """An engine's answer as the API's JSON (`SearchResponse`)."""
    from services.search.schemas import QueryPrediction, SearchHit, SearchResponse

    embedding = answer.embedding
    hits = [SearchHit(id=hit.id, filename=hit.image.filename, label=hit.image.label,
                      predicted_label=hit.image.predicted_label, score=hit.score, similarity=similarity,
                      image_url=f"/images/{hit.id}")
            for hit, similarity in zip(answer.hits, answer.similarities, strict=True)]
    query = None if embedding is None else QueryPrediction(predicted_label=embedding.label,
                                                           confidence=embedding.confidence)
    return SearchResponse(query=query, hits=hits, model_version=answer.model_version, took_ms=0.0).model_dump()


def print_results(results: Sequence[ImageResult], *, as_json: bool, out: TextIO | None = None) -> None:
    """One JSON document (`{"results": [...]}`), or per image a heading and a table of its hits; errors go to
    the log (stderr) in the table form."""
    out = out or sys.stdout
    if as_json:
        out.write(json.dumps({"results": [result.as_json() for result in results]}) + "\n")
        return
    for number, result in enumerate(results):
        if result.answer is None:
            logger.error("%s: %s", result.image, result.error["detail"])
            continue
        query = result.answer["query"]
        predicted = f" (predicted {query['predicted_label']}, {query['confidence']:.0%})" if query else ""
        out.write(("\n" if number else "") + f"{result.image}{predicted}\n")
        out.write(hits_table(result.answer["hits"]) if result.answer["hits"] else "no match\n")


def hits_table(hits: Sequence[dict[str, Any]]) -> str:
    """The hits as aligned columns: rank, score, similarity, label, file."""
    rows = [("rank", "score", "similarity", "label", "file")]
    decimals = similarity_decimals([hit["similarity"] for hit in hits if hit["similarity"] is not None])
    for rank, hit in enumerate(hits, start=1):
        similarity = "-" if hit["similarity"] is None else f"{hit['similarity']:.{decimals}f}"
        rows.append((str(rank), f"{hit['score']:.4f}", similarity, hit["label"] or "-", hit["filename"]))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        numbers = [cell.rjust(width) for cell, width in zip(row[:3], widths, strict=False)]
        lines.append("  ".join([*numbers, row[3].ljust(widths[3]), row[4]]).rstrip())
    return "\n".join(lines) + "\n"


def similarity_decimals(values: Sequence[float]) -> int:
    """The fewest decimals (3 to 6) that tell most of `values` apart, as the web page shows them: the shipped
    model's same-class neighbours lie within 1e-3 of each other near 1.0, where 3 decimals all read 1.000."""
    for decimals in range(3, 6):
        if len({f"{value:.{decimals}f}" for value in values}) >= 0.8 * len(values):
            return decimals
    return 6
