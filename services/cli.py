"""The `cbir` command: train, index, serve, and run each service on its own.

    cbir serve              one machine: the gateway with the model in-process, indexing in the background
    cbir train              train the VGG-16 embedder (or --arch another network) and write a model bundle
    cbir train-bovw         train the study's Bag-of-Visual-Words model and write its bundle
    cbir index              index a collection (in-process, or through CBIR_EMBEDDER_URL); --watch: keep it indexed
    cbir search IMAGE...    search by images from the terminal: a running server, or --local
    cbir promote VERSION    serve the Elasticsearch index of VERSION (after cbir index --rebuild)
    cbir duplicates         groups of near-identical images: a running server's, or --local
    cbir embedder           run the embedder service
    cbir gateway            run the search gateway alone (no indexing)
    cbir evaluate           the original study's evaluation (MAP@100, P@k, mAP@ALL, report)
    cbir compare            the study's comparison of models (reports/comparison.md; --train retrains)
    cbir download-cifar10   fetch CIFAR-10 into data/cifar10 (needs internet)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.errors import CbirError
from services.common.logs import configure_logging

if TYPE_CHECKING:
    from fastapi import FastAPI

    from services.indexer.pipeline import IndexOptions
    from services.indexer.settings import IndexerSettings
    from services.indexer.watch import WatchState

logger = logging.getLogger("cbir")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging()
    parser = _parser()
    if argv and argv[0] in ("train", "train-bovw", "evaluate", "compare"):  # they own their argument parsers
        command, rest = argv[0], argv[1:]
    else:
        args = parser.parse_args(argv)
        command, rest = args.command, args
    try:
        if command == "train":
            from services.training import get_args_parser, train

            train(get_args_parser().parse_args(rest))
        elif command == "train-bovw":
            from services.training.bovw import get_args_parser as bovw_parser
            from services.training.bovw import train_bovw

            train_bovw(bovw_parser().parse_args(rest))
        elif command == "compare":
            from services.evaluation.compare import main as compare

            compare(rest)
        elif command == "evaluate":
            from services.evaluation.cli import main as evaluate

            evaluate(rest)
        elif command is None:
            parser.print_help()
        else:
            {"serve": _serve, "index": _index, "promote": _promote, "embedder": _embedder, "gateway": _gateway,
             "search": _search, "download-cifar10": _download, "duplicates": _duplicates}[command](rest)
    except CbirError as exc:  # anything else is a bug: its traceback shows
        logger.error("%s", exc.message)
        raise SystemExit(2) from exc


def _parser() -> argparse.ArgumentParser:
    from services.search_cli import add_parser as add_search_parser

    parser = argparse.ArgumentParser(prog="cbir", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("train", help="train the embedder (cbir train --help)", add_help=False)
    commands.add_parser("train-bovw", help="train the Bag-of-Visual-Words model (cbir train-bovw --help)",
                        add_help=False)
    commands.add_parser("evaluate", help="evaluate retrieval (cbir evaluate --help)", add_help=False)
    commands.add_parser("compare", help="compare the study's models (cbir compare --help)", add_help=False)
    _add_server_parsers(commands)
    _add_index_parser(commands)
    add_search_parser(commands)
    promote = commands.add_parser(
        "promote", help="serve an Elasticsearch index built by `cbir index --rebuild` (moves the alias)",
        description="Carry the uploads and deletions made meanwhile over from the served index to the index of "
                    "VERSION (re-embedding uploads from CBIR_STATE_DIR/uploads with the configured model, which "
                    "must be VERSION's), then move the CBIR_ES_INDEX alias to it in one atomic call.")
    promote.add_argument("version", metavar="VERSION", help="the model version whose index to serve")
    _add_duplicates_parser(commands)
    download = commands.add_parser("download-cifar10", help="fetch CIFAR-10 as JPEG folders (internet)")
    download.add_argument("--dest", type=Path, default=Path("data/cifar10"), help="destination folder")
    return parser


def _add_server_parsers(commands: argparse._SubParsersAction) -> None:
    for name, help_text, port in (("serve", "serve search on one machine, indexing in the background if needed", 8000),
                                  ("embedder", "run the embedder service", 8001),
                                  ("gateway", "run the search gateway only", 8000)):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--host", default="127.0.0.1", help="interface to listen on")
        sub.add_argument("--port", type=int, default=port, help="port to listen on")
        if name == "serve":
            sub.add_argument("--no-index", action="store_true", help="serve the existing index as it is")
            sub.add_argument("--watch", action="append", type=Path, default=[], metavar="DIR",
                             help="keep DIR indexed as its images come, change and go (repeatable; also CBIR_WATCH)")


def _add_index_parser(commands: argparse._SubParsersAction) -> None:
    from services.common.collection import Layout

    index = commands.add_parser(
        "index", help="index a collection into the store (again: only new and changed files)",
        description="Index the images under DIR: new files are added, files whose size or mtime changed are "
                    "re-embedded, the rest is left as it is.")
    index.add_argument("dir", nargs="?", type=Path, default=None, metavar="DIR",
                       help="collection root (default: CBIR_DATA_DIR, else CIFAR-10 where found)")
    index.add_argument("--layout", choices=[layout.value for layout in Layout], default="auto",
                       help="how folders give labels: split = DIR/<split>/<class>/<image>; "
                            "class = DIR/<class>/<image>; flat = any image below DIR, no labels; "
                            "auto (default) = split if DIR/<split>/ holds folders, else class if DIR holds "
                            "only folders, else flat. Subfolders are searched recursively in every layout.")
    index.add_argument("--split", default=None, help="the split of the split layout (default: CBIR_INDEX_SPLIT, train)")
    index.add_argument("--sync", action="store_true",
                       help="also remove the documents indexed from DIR whose file is gone (never uploads)")
    index.add_argument("--json", action="store_true", help="print the counts as one JSON object on stdout")
    index.add_argument("--batch-size", type=int, default=None, help="images per embed call")
    index.add_argument("--concurrency", type=int, default=None,
                       help="batches in flight (default: 1 with the model here, 2 through CBIR_EMBEDDER_URL)")
    index.add_argument("--rebuild", action="store_true",
                       help="build the index of the configured model beside one built by another model version, "
                            "which goes on serving until the new one is done: one machine then records it (a "
                            "running cbir serve swaps to it), Elasticsearch waits for `cbir promote VERSION`")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    index.add_argument("--watch", action="store_true",
                       help="then keep running: index DIR's images as they come, change and go (with --sync's "
                            "removal, of DIR's own documents only) until Ctrl-C or SIGTERM; with --json, one "
                            "line of the watcher's state per batch")


def _add_duplicates_parser(commands: argparse._SubParsersAction) -> None:
    duplicates = commands.add_parser(
        "duplicates", help="print the groups of near-identical images (GET /duplicates)",
        description="The groups of GET /duplicates: copies of one image (re-encoded, resized, shifted, brightened), "
                    "the suggested one to keep marked; from a running gateway, or --local in this process. Exit "
                    "status 3 when the gateway cannot be reached, 2 for any other error.")
    where = duplicates.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="the gateway (default: CBIR_SEARCH_URL, http://127.0.0.1:8000)")
    where.add_argument("--local", action="store_true",
                       help="the index in this process (CBIR_STATE_DIR, CBIR_BACKEND), no server")
    duplicates.add_argument("--api-key", default=None, help="X-API-Key for --url (default: CBIR_SEARCH_API_KEY)")
    duplicates.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                            help="longest wait for one answer (default: CBIR_SEARCH_TIMEOUT_S, 30)")
    duplicates.add_argument("--threshold", type=float, default=None,
                            help="signature similarity from which images are duplicates (default: the gateway's)")
    duplicates.add_argument("--limit", type=int, default=50, help="groups to print (default %(default)s)")
    duplicates.add_argument("--offset", type=int, default=0, help="groups to skip")
    duplicates.add_argument("--json", action="store_true", help="print GET /duplicates' answer as JSON")


def _serve(args: argparse.Namespace) -> None:
    from services.common.cores import idle_openmp_threads_sleep
    from services.serve.apps import one_machine_app

    idle_openmp_threads_sleep()  # before the app's imports load OpenMP
    _run_server(one_machine_app(index=not args.no_index, watch=args.watch), args.host, args.port,
                ready_note="" if args.no_index else "; indexing runs in the background, /healthz shows its progress")


def _index(args: argparse.Namespace) -> None:
    from services.common.collection import Layout, find_data_dir
    from services.indexer.settings import IndexerSettings
    from services.serve.indexing import index_into_store
    from services.wiring import build_index_options

    settings = IndexerSettings.load()
    data_dir = find_data_dir(args.dir or settings.data_dir)
    options = build_index_options(settings, rebuild=args.rebuild, progress_bar=not args.no_progress,
                                  batch_size=args.batch_size, concurrency=args.concurrency,
                                  layout=Layout(args.layout), sync=args.sync)
    if args.watch:
        _watch(settings, data_dir, args.split or settings.index_split, options, json_lines=args.json,
               rebuild=args.rebuild)
        return
    report = asyncio.run(index_into_store(settings, data_dir, args.split or settings.index_split, options))
    logger.info("%s", report.summary())
    if args.json:  # the one line on stdout: the log goes to stderr
        sys.stdout.write(json.dumps(report.counts()) + "\n")
        sys.stdout.flush()


def _watch(settings: IndexerSettings, data_dir: Path, split: str, options: IndexOptions, *, json_lines: bool,
           rebuild: bool) -> None:
    """`cbir index DIR --watch`: the watcher until SIGINT or SIGTERM, which cancel it (it keeps what it wrote)."""
    from services.common.errors import ConfigError
    from services.serve.watching import watch_into_store

    if rebuild:
        raise ConfigError("--watch keeps an index in step with DIR; build a new model's index with --rebuild first")

    def report(state: WatchState) -> None:
        if json_lines:  # one line per batch on stdout: the log goes to stderr
            sys.stdout.write(json.dumps(state.as_dict()) + "\n")
            sys.stdout.flush()

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await watch_into_store(settings, data_dir, split, options, on_batch=report)

    asyncio.run(run())
    logger.info("stopped watching %s", data_dir)


def _promote(args: argparse.Namespace) -> None:
    from services.indexer.settings import IndexerSettings
    from services.serve.rollover import promote

    asyncio.run(promote(IndexerSettings.load(), args.version))


def _search(args: argparse.Namespace) -> None:
    from services.search_cli import run

    run(args)


def _embedder(args: argparse.Namespace) -> None:
    from services.common.cores import idle_openmp_threads_sleep
    from services.serve.apps import embedder_app

    idle_openmp_threads_sleep()  # before the app's imports load OpenMP
    _run_server(embedder_app(), args.host, args.port)


def _gateway(args: argparse.Namespace) -> None:
    from services.common.cores import idle_openmp_threads_sleep
    from services.serve.apps import gateway_app

    idle_openmp_threads_sleep()  # before the app's imports load OpenMP
    _run_server(gateway_app(), args.host, args.port)


def _run_server(app: FastAPI, host: str, port: int, *, ready_note: str = "") -> None:
    """Serve `app` with uvicorn, its lifespan entered here rather than by uvicorn, so that a start-up
    failure (a broken bundle, an unusable setting) ends the command with its one-line message instead
    of uvicorn's traceback. The lifespan loads the model, then the server listens within seconds."""
    import uvicorn

    # access_log off: the services log one JSON line per request themselves, with its request id (cbir.access).
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="off",
                                           access_log=False))

    async def run() -> None:
        async with app.router.lifespan_context(app):
            if not server.should_exit:
                logger.info("serving http://%s:%d/ (API docs at /docs)%s", host, port, ready_note)
                await server.serve()

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    # uvicorn handles SIGINT/SIGTERM while it serves, then raises the signal again once it has stopped,
    # which would end the process before the lifespan does (a background indexing run saves what it
    # wrote on the way out). These handlers take that second signal, and one that comes while the model
    # loads keeps the server from starting.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(run())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopped: every resource closed")


def _duplicates(args: argparse.Namespace) -> None:
    import httpx

    from services.search_cli import SearchClientSettings
    from services.serve.duplicates import fetch_duplicates, render_groups

    settings = SearchClientSettings.load()
    url = None if args.local else (args.url or str(settings.search_url)).rstrip("/")
    key = args.api_key or (settings.search_api_key.get_secret_value() if settings.search_api_key else None)
    try:
        body = asyncio.run(fetch_duplicates(url=url, api_key=key, timeout_s=args.timeout or settings.search_timeout_s,
                                            threshold=args.threshold, limit=args.limit, offset=args.offset))
    except httpx.TransportError as exc:
        logger.error("could not reach the gateway at %s: %s", url, exc)
        raise SystemExit(3) from None
    sys.stdout.write((json.dumps(body) if args.json else render_groups(body)) + "\n")
    sys.stdout.flush()


def _download(args: argparse.Namespace) -> None:
    from services.indexer.download import download_cifar10

    download_cifar10(args.dest)


if __name__ == "__main__":
    main()
