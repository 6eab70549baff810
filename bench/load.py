"""Load test of a running search gateway: N concurrent clients upload real images for T seconds.

    cbir serve &                                   # or any gateway on this machine
    python bench/load.py --clients 16 --duration 20 --pid <server pid>

Prints requests, errors, QPS, latency percentiles and, with --pid, the server's resident memory
before, at peak and after. Only loopback URLs are accepted: this is a bench, not a stress tool
to point at other people's servers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "cifar10" / "test"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MAX_CLIENTS, MAX_DURATION_S = 256, 600


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL (loopback only)")
    parser.add_argument("--clients", type=int, default=16, help=f"concurrent clients (1–{MAX_CLIENTS})")
    parser.add_argument("--duration", type=float, default=20.0, help=f"seconds of load (at most {MAX_DURATION_S})")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="folder searched recursively for query images (default: CIFAR-10 test split)")
    parser.add_argument("--max-images", type=int, default=2000, help="how many images to load into memory")
    parser.add_argument("--k", type=int, default=10, help="hits per search")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    parser.add_argument("--api-key", default=None, help="X-API-Key to send, if the gateway wants one")
    parser.add_argument("--pid", type=int, default=None, help="server process id, to report its memory (RSS)")
    parser.add_argument("--honor-retry-after", action="store_true",
                        help="after a 503, wait the Retry-After it names before the next request")
    return parser


@dataclass
class LoadResult:
    """What one run measured; latencies are in seconds, memory in bytes."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    error_kinds: Counter[str] = field(default_factory=Counter)
    rss_before: int | None = None
    rss_peak: int | None = None
    rss_after: int | None = None

    @property
    def qps(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """The `q`-th percentile (0–100) of successful-request latency, nearest-rank."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

    @property
    def rss_growth(self) -> int | None:
        if self.rss_before is None or self.rss_after is None:
            return None
        return self.rss_after - self.rss_before

    def summary(self) -> str:
        lines = [
            f"requests {self.requests}, errors {self.errors}, {self.seconds:.1f} s, {self.qps:.1f} QPS",
            "latency ms: p50 {:.1f}, p95 {:.1f}, p99 {:.1f}".format(
                *(self.percentile(q) * 1000 for q in (50, 95, 99))),
        ]
        if self.error_kinds:
            lines.append("errors: " + ", ".join(f"{kind} ×{n}" for kind, n in self.error_kinds.most_common()))
        if self.rss_before is not None:
            lines.append("server RSS MB: before {}, peak {}, after {}, growth {}".format(
                *(_mb(v) for v in (self.rss_before, self.rss_peak, self.rss_after, self.rss_growth))))
        return "\n".join(lines)


def _mb(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.1f}"


def read_rss(pid: int) -> int | None:
    """Resident memory of `pid` in bytes, from /proc (no psutil needed); None if it is gone."""
    return _read_status_kb(pid, "VmRSS")


def read_peak_rss(pid: int) -> int | None:
    """The highest resident memory `pid` has had in its life (VmHWM), in bytes; None if it is gone."""
    return _read_status_kb(pid, "VmHWM")


def _read_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def load_images(directory: Path, *, limit: int) -> list[tuple[str, bytes]]:
    paths = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise SystemExit(f"no images under {directory}; pass --images DIR")
    # Spread the sample over every class folder instead of taking the first `limit` files.
    step = max(1, len(paths) // limit)
    return [(p.name, p.read_bytes()) for p in paths[::step][:limit]]


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise SystemExit(f"{url}: only loopback hosts ({', '.join(sorted(LOOPBACK_HOSTS))}) are load-tested")


async def run_load(url: str, images: list[tuple[str, bytes]], *, clients: int, duration: float, k: int = 10,
                   timeout: float = 30.0, api_key: str | None = None, pid: int | None = None,
                   honor_retry_after: bool = False) -> LoadResult:
    """`clients` concurrent loops, each posting one image after another until `duration` passes; with
    `honor_retry_after`, a loop answered 503 waits the `Retry-After` it was given first, as a polite client
    does (else it asks again at once).

    The client is aiohttp's: it runs on the same cores as the server it measures, and httpx's connection
    pool cost 10 ms of CPU a request at 64 connections here (2 ms at 16), which the server's figures paid for.
    """
    result = LoadResult(rss_before=read_rss(pid) if pid else None)
    result.rss_peak = result.rss_before
    headers = {"X-API-Key": api_key} if api_key else {}
    started = time.perf_counter()
    deadline = started + duration

    async def client_loop(session: aiohttp.ClientSession, offset: int) -> None:
        for n in itertools.count():
            if time.perf_counter() >= deadline:
                return
            name, data = images[(offset + n * clients) % len(images)]
            form = aiohttp.FormData()
            form.add_field("file", data, filename=name)
            sent, wait_s = time.perf_counter(), 0.0
            try:
                async with session.post("/search", params={"k": str(k)}, data=form) as response:
                    await response.read()
                kind = None if response.status == 200 else f"HTTP {response.status}"
                if honor_retry_after and response.status == 503:
                    wait_s = retry_after_s(response.headers)
            except (aiohttp.ClientError, TimeoutError) as exc:
                kind = type(exc).__name__
            result.requests += 1
            if kind is None:
                result.latencies.append(time.perf_counter() - sent)
            else:
                result.errors += 1
                result.error_kinds[kind] += 1
            if wait_s:
                await asyncio.sleep(min(wait_s, max(0.0, deadline - time.perf_counter())))

    async def watch_memory() -> None:
        while pid and (rss := read_rss(pid)) is not None:
            result.rss_peak = max(result.rss_peak or 0, rss)
            await asyncio.sleep(0.25)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base_url=url, connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        watcher = asyncio.create_task(watch_memory())
        try:
            await asyncio.gather(*(client_loop(session, offset) for offset in range(clients)))
        finally:
            watcher.cancel()
    result.seconds = time.perf_counter() - started
    if pid:
        result.rss_after = read_rss(pid)
        result.rss_peak = max(filter(None, (result.rss_peak, result.rss_after)), default=None)
    return result


def retry_after_s(headers: Mapping[str, str]) -> float:
    """The seconds a 503's `Retry-After` asks for (1 when it names none, or a date)."""
    value = headers.get("Retry-After", "")
    return float(value) if value.isdigit() else 1.0


def main(argv: list[str] | None = None) -> LoadResult:
    args = get_args_parser().parse_args(argv)
    check_loopback(args.url)
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.duration <= MAX_DURATION_S:
        raise SystemExit(f"--clients must be 1–{MAX_CLIENTS} and --duration 0–{MAX_DURATION_S} s")
    images = load_images(args.images, limit=args.max_images)
    print(f"{args.clients} clients × {args.duration:g} s against {args.url}, {len(images)} images", flush=True)
    result = asyncio.run(run_load(args.url, images, clients=args.clients, duration=args.duration, k=args.k,
                                  timeout=args.timeout, api_key=args.api_key, pid=args.pid,
                                  honor_retry_after=args.honor_retry_after))
    print(result.summary(), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(1 if main().errors else 0)
