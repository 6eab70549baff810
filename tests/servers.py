"""Apps served for a test: in-process over ASGI, on localhost in a thread, and stub servers that stall."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import uvicorn
from benchlib import free_port


@asynccontextmanager
async def asgi_client(app: Any, base_url: str = "http://test") -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client wired to `app` in-process, with the app's lifespan running."""
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=base_url
    ) as client:
        yield client


@contextmanager
def serve_in_thread(app: Any, *, port: int | None = None, startup_s: float = 60.0) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 in a daemon thread; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the app on port {port} failed to start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the app on port {port} did not start in {startup_s} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


class StallingServer:
    """A fake embedder on localhost that accepts connections and then answers too slowly.

    `mode="silent"` never answers; `mode="trickle"` sends a 200 header at once, then one body
    byte every `interval_s`, so no single read ever times out. Each connection is held at most
    `hold_s` seconds.
    """

    def __init__(self, *, mode: str = "silent", interval_s: float = 0.1, hold_s: float = 20.0) -> None:
        self.mode, self.interval_s, self.hold_s = mode, interval_s, hold_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="stalling-server", daemon=True)

    def __enter__(self) -> StallingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.hold_s
        with conn:
            try:
                conn.settimeout(1.0)
                conn.recv(65536)
                if self.mode == "trickle":
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: 100000\r\n\r\n")
                while not self._stop.is_set() and time.monotonic() < deadline:
                    if self.mode == "trickle":
                        conn.sendall(b" ")
                    time.sleep(self.interval_s)
            except OSError:
                pass


def wait_for_http(url: str, *, timeout_s: float, process: subprocess.Popen | None = None) -> httpx.Response:
    """Poll `url` until it answers 200 (or `process` exits, or `timeout_s` passes)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before {url} answered")
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200:
                return response
            last = response.status_code
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s (last: {last})")
