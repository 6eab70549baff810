"""The Elasticsearch double (tests/es_double.py) as a server of its own, which the compose test stack runs in place
of Elasticsearch (compose.test.yml): `python -m es_double_server --port PORT` serves on 127.0.0.1:PORT until SIGTERM
or SIGINT. Needs tests/ and tests/compose/ on PYTHONPATH."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from contextlib import ExitStack
from typing import Any
from unittest import mock

from aiohttp import web
from es_double import EsDouble

logger = logging.getLogger("es_double_server")


def serve(port: int) -> None:
    """Serve the double on 127.0.0.1:`port` until a signal asks it to stop."""
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped.set())

    class AtPort(web.TCPSite):
        """The double asks for a free port (0); here it must listen where the stack's URLs point."""

        def __init__(self, runner: web.BaseRunner, host: str, _port: int, **kwargs: Any) -> None:
            super().__init__(runner, host, port, **kwargs)

    with ExitStack() as running:
        with mock.patch.object(web, "TCPSite", AtPort):
            double = running.enter_context(EsDouble())
        logger.info("the Elasticsearch double serves %s", double.url)
        stopped.wait()
        logger.info("stopping")


def main() -> None:
    parser = argparse.ArgumentParser(prog="es_double_server", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port to listen on, on 127.0.0.1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(parser.parse_args().port)


if __name__ == "__main__":
    main()
