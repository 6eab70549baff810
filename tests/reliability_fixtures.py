"""Helpers of the reliability tests: crafted and odd images, apps served on localhost, stub servers.

Imported by the test modules (`from reliability_fixtures import ...`); nothing here is collected.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import uvicorn
from benchlib import free_port, stop_process  # noqa: F401 - re-exported: one copy, shared with the benches
from PIL import Image

from services.common.collection import REPO_ROOT
from services.common.embedding import EmbedderInfo, Embedding
from services.common.images import decode_image
from services.embedder.bundle import Bundle
from services.embedder.runtime import Embedder
from services.training import get_args_parser, train

# ---------------------------------------------------------------------------------------------
# Images


def encode(image: Image.Image, format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def sample_image(size: tuple[int, int] = (48, 40)) -> Image.Image:
    """An asymmetric RGB test card: a rotation or flip of it never looks like the original."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[np.newaxis, :].repeat(height, axis=0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, np.newaxis].repeat(width, axis=1)
    pixels = np.stack([x, y, np.full_like(x, 60)], axis=-1)
    pixels[: height // 3, : width // 4] = (250, 20, 20)  # a red block in the top-left corner
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, idat: bytes = b"") -> bytes:
    """A PNG written by hand, so its IHDR may claim any size (every chunk has a valid CRC)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def png_bomb(width: int, height: int) -> bytes:
    """A real 1-bit PNG of `width`×`height` black pixels: tens of KB on disk, compressed row by row."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_bytes(width, height, bit_depth=1, color_type=0, idat=idat)


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def odd_images(photo: Image.Image) -> dict[str, bytes]:
    """Valid but unusual uploads, each one encoding of `photo` (an RGB image)."""
    small = photo.resize((32, 32))
    palette = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    rgba = small.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((32, 32)))
    sixteen_bit = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257)  # I;16
    frames = [small, small.transpose(Image.Transpose.FLIP_LEFT_RIGHT), small.rotate(90)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "rgba.png": encode(rgba, "PNG"),
        "palette-transparent.png": encode(palette, "PNG", transparency=0),
        "grayscale.png": encode(small.convert("L"), "PNG"),
        "cmyk.jpg": encode(small.convert("CMYK"), "JPEG", quality=95),
        "sixteen-bit.png": encode(sixteen_bit, "PNG"),
        "one-pixel.png": encode(small.resize((1, 1)), "PNG"),
        "large.jpg": encode(photo.resize((3000, 2000)), "JPEG", quality=85),
        "animated.gif": gif.getvalue(),
        "image.webp": encode(small, "WEBP", quality=90),
        "image.bmp": encode(small, "BMP"),
        "image.tiff": encode(small, "TIFF"),
        "exif-rotated.jpg": exif_rotated_jpeg(photo.resize((40, 24))),
    }


# ---------------------------------------------------------------------------------------------
# Apps on localhost


class FixedEmbedder:
    """An `EmbeddingService` without a model: every image gets the same unit vector."""

    warming_up = False

    def __init__(self, *, dims: int = 26, model_version: str = "fixed-model") -> None:
        self.dims, self.model_version = dims, model_version
        self.vector = np.eye(dims, dtype=np.float32)[0]

    async def info(self) -> EmbedderInfo:
        return EmbedderInfo(model_version=self.model_version, dims=self.dims, classes=["cat", "dog"], metadata={})

    async def embed(self, images: np.ndarray, *, purpose: str = "query") -> list[Embedding]:
        return [Embedding(vector=self.vector, label="cat", confidence=1.0) for _ in images]

    async def close(self) -> None:
        pass


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


def python_path() -> str:
    """PYTHONPATH for a Python subprocess of a test: the repository (services) and tests/ (the helper
    modules, such as factories), ahead of this process's own."""
    return os.pathsep.join(filter(None, [str(REPO_ROOT), str(Path(__file__).resolve().parent),
                                         os.environ.get("PYTHONPATH")]))


def subprocess_env(model_dir: Path, data_dir: Path, state_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a `cbir` subprocess: this one's, with CBIR_* pointing at test data."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CBIR_")}
    env.update(CBIR_MODEL_DIR=str(model_dir), CBIR_DATA_DIR=str(data_dir), CBIR_STATE_DIR=str(state_dir),
               CBIR_BACKEND="faiss", CBIR_COMPILE="off", PYTHONUNBUFFERED="1", PYTHONPATH=python_path())
    env.update(extra)
    return env


def start_cbir(*args: str, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """`cbir <args>` as a subprocess (`python -m services.cli`), its stdout and stderr written to `log`."""
    with log.open("wb") as output:
        return subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=env, cwd=cwd, stdout=output,
                                stderr=subprocess.STDOUT)


def read_index(path: Path) -> Mapping[str, np.ndarray]:
    """The arrays of a FAISS store file, read directly (no store code involved)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def load_bench_script(name: str) -> ModuleType:
    """bench/<name>.py, which is a script rather than part of the installed package (loaded once)."""
    module_name = f"bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def tiny_training_args(collection: Path, work: Path, *extra: str, epochs: int = 10, seed: int = 1,
                       output: Path | None = None) -> argparse.Namespace:
    """`cbir train` options for a narrow VGG-16 on `collection` (seconds): the one tiny recipe of the
    tests. `work` holds the checkpoint; the bundle goes to `output` (default `work/bundle`); `extra`
    options come last, so they override the recipe's."""
    return get_args_parser().parse_args([
        "--data-dir", str(collection), "--output", str(output or work / "bundle"),
        "--checkpoint-dir", str(work / "train"), "--epochs", str(epochs), "--batch-size", "50", "--lr", "0.05",
        "--width-mult", "0.125", "--embedding-dim", "64", "--pca-components", "32", "--pca-dims", "16", "--quiet",
        "--seed", str(seed), *extra,
    ])


def train_tiny_bundle(collection: Path, work: Path, *extra: str, epochs: int = 10, seed: int = 1) -> Path:
    """A narrow VGG-16 trained on `collection` for ten epochs (3 s on one core: about 0.35 accuracy on
    CIFAR-10 images it never saw, where 4 epochs gave 0.23–0.26); returns its bundle directory."""
    args = tiny_training_args(collection, work, *extra, epochs=epochs, seed=seed)
    train(args)
    return args.output


# `cbir train-bovw` on the mini collection in seconds: two feature sets, two fast classifiers, a tiny vocabulary.
TINY_BOVW_OPTIONS = ("--feature-sets", "hog+sift,gch", "--classifiers", "logreg,gnb", "--vocabulary-sizes", "8,16,24",
                     "--kmeans-descriptors", "4000", "--db-descriptors", "1000", "--grid-images", "200",
                     "--folds", "3", "--jobs", "1", "--quiet")


def train_tiny_bovw_bundle(collection: Path, work: Path, *extra: str) -> Path:
    """A BOVW bundle trained on `collection` with `TINY_BOVW_OPTIONS` (a few seconds); returns its directory.
    Its measurements are also in `work/results.json`."""
    from services.training.bovw import get_args_parser as bovw_parser
    from services.training.bovw import train_bovw

    args = bovw_parser().parse_args(["--data-dir", str(collection), "--output", str(work / "bovw"), "--cache-dir",
                                     str(work / "cache"), "--results", str(work / "results.json"),
                                     *TINY_BOVW_OPTIONS, *extra])
    train_bovw(args)
    return args.output


def classify_test_images(bundle: Bundle, collection: Path, *, per_class: int,
                         skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true class names of `per_class` test images a class (after the first `skip`),
    decoded and embedded as an upload is: `decode_image` at the bundle's size and filter, then `Embedder`."""
    pre = bundle.preprocessing
    paths = [(path, name) for name in bundle.classes
             for path in sorted((collection / "test" / name).iterdir())[skip:skip + per_class]]
    images = np.stack([decode_image(path.read_bytes(), size=pre.image_size, resample=pre.resize) for path, _ in paths])
    predicted = [embedding.label for embedding in Embedder(bundle, device="cpu").embed_batch(images)]
    return np.asarray(predicted), np.asarray([name for _, name in paths])
