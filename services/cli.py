"""The `cbir` command: train, index, serve, and run each service on its own.

    cbir serve              one machine: index if needed, then the gateway with the model in-process
    cbir train              train the VGG-16 embedder and write a model bundle
    cbir index              index a collection (in-process, or through CBIR_EMBEDDER_URL)
    cbir embedder           run the embedder service
    cbir gateway            run the search gateway alone (no indexing)
    cbir evaluate           the original study's evaluation (MAP@100, P@k, mAP@ALL, report)
    cbir download-cifar10   fetch CIFAR-10 into data/cifar10 (needs internet)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from services.common.errors import CbirError

logger = logging.getLogger("cbir")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = _parser()
    if argv and argv[0] in ("train", "evaluate"):  # they own their argument parsers
        command, rest = argv[0], argv[1:]
    else:
        args = parser.parse_args(argv)
        command, rest = args.command, args
    try:
        if command == "train":
            from services.embedder.train import get_args_parser, train

            train(get_args_parser().parse_args(rest))
        elif command == "evaluate":
            from services.evaluation.cli import main as evaluate

            evaluate(rest)
        elif command is None:
            parser.print_help()
        else:
            {"serve": _serve, "index": _index, "embedder": _embedder, "gateway": _gateway,
             "download-cifar10": _download}[command](rest)
    except (CbirError, ValueError) as exc:
        logger.error("%s", getattr(exc, "message", exc))
        raise SystemExit(2) from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("train", help="train the embedder (cbir train --help)", add_help=False)
    commands.add_parser("evaluate", help="evaluate retrieval (cbir evaluate --help)", add_help=False)
    for name, help_text, port in (("serve", "index if needed, then serve search on one machine", 8000),
                                  ("embedder", "run the embedder service", 8001),
                                  ("gateway", "run the search gateway only", 8000)):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--host", default="127.0.0.1", help="interface to listen on")
        sub.add_argument("--port", type=int, default=port, help="port to listen on")
        if name == "serve":
            sub.add_argument("--no-index", action="store_true", help="serve the existing index as it is")
    index = commands.add_parser("index", help="index a collection into the store")
    index.add_argument("--data-dir", type=Path, default=None, help="collection root (default: CBIR_DATA_DIR)")
    index.add_argument("--split", default=None, help="split to index (default: CBIR_INDEX_SPLIT, train)")
    index.add_argument("--batch-size", type=int, default=None, help="images per embed call")
    index.add_argument("--concurrency", type=int, default=None, help="embed calls in flight")
    index.add_argument("--rebuild", action="store_true",
                       help="drop an index built by another model version and rebuild it")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    download = commands.add_parser("download-cifar10", help="fetch CIFAR-10 as JPEG folders (internet)")
    download.add_argument("--dest", type=Path, default=Path("data/cifar10"), help="destination folder")
    return parser


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from services.common.collection import find_data_dir
    from services.common.stores.factory import create_store
    from services.embedder.app import create_service
    from services.indexer.pipeline import IndexOptions, index_collection
    from services.search.app import create_app
    from services.search.settings import SearchSettings

    settings = SearchSettings()
    service = create_service(settings)
    service.start()
    store = create_store(settings)

    async def run() -> None:
        if not args.no_index:
            data_dir = find_data_dir(settings.data_dir)
            report = await index_collection(data_dir, settings.index_split, service, store,
                                            IndexOptions(rebuild=True))
            logger.info("index: %s", report.summary())
        app = create_app(settings, embedder=service, store=store)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
        logger.info("search ready at http://%s:%d/ (API docs at /docs)", args.host, args.port)
        try:
            await server.serve()
        finally:
            await store.close()
            await service.close()

    asyncio.run(run())


def _index(args: argparse.Namespace) -> None:
    from services.common.collection import find_data_dir
    from services.common.stores.factory import create_store
    from services.indexer.pipeline import IndexOptions, index_collection
    from services.indexer.settings import IndexerSettings
    from services.search.app import create_embedding_service

    settings = IndexerSettings()
    data_dir = find_data_dir(args.data_dir or settings.data_dir)
    options = IndexOptions(batch_size=args.batch_size or settings.index_batch_size,
                           concurrency=args.concurrency or settings.index_concurrency,
                           rebuild=args.rebuild, progress=not args.no_progress)

    async def run() -> None:
        service = create_embedding_service(settings)
        store = create_store(settings)
        try:
            report = await index_collection(data_dir, args.split or settings.index_split, service, store, options)
        finally:
            await store.close()
            await service.close()
        logger.info("%s", report.summary())

    asyncio.run(run())


def _embedder(args: argparse.Namespace) -> None:
    import uvicorn

    from services.embedder.app import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port)


def _gateway(args: argparse.Namespace) -> None:
    import uvicorn

    from services.search.app import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port)


def _download(args: argparse.Namespace) -> None:
    from services.indexer.download import download_cifar10

    download_cifar10(args.dest)


if __name__ == "__main__":
    main()
