"""Peak memory of decoding many large uploads at once, by `CBIR_MAX_CONCURRENT_DECODES`.

    python bench/decode_memory.py --uploads 16 --megapixels 36 --limits 1 4 16

Makes one large PNG (random noise, so it does not compress away), then, for each limit, runs a
fresh Python process that holds the PNG bytes and decodes `--uploads` copies of them concurrently
through the services' `UploadDecoder`, as the search and embedder apps do. Prints the process's
peak resident memory above what it held before decoding, and the wall time.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import asyncio, json, resource, sys, time
from services.common.images import UploadDecoder
data = open(sys.argv[1], "rb").read()
limit, uploads = int(sys.argv[2]), int(sys.argv[3])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

async def main():
    decoder = UploadDecoder(limit, max_bytes=len(data), max_pixels=10**9)
    started = time.perf_counter()
    arrays = await asyncio.gather(*(decoder.decode(data) for _ in range(uploads)))
    assert all(a.shape == (32, 32, 3) for a in arrays)
    return time.perf_counter() - started

seconds = asyncio.run(main())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_peak_mb": (peak - before) / 1024, "seconds": seconds}))
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=16, help="uploads decoded concurrently")
    parser.add_argument("--megapixels", type=float, default=36.0, help="size of the PNG (square)")
    parser.add_argument("--limits", type=int, nargs="+", default=[1, 4, 16], help="decoder limits to compare")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    side = int((args.megapixels * 1e6) ** 0.5)
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG", compress_level=1)
    del noise
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large.png"
        path.write_bytes(buffer.getvalue())
        print(f"{args.uploads} concurrent uploads of a {side}×{side} PNG ({path.stat().st_size / 1e6:.0f} MB)")
        print("| limit | peak memory above baseline | seconds |")
        print("| --- | --- | --- |")
        for limit in args.limits:
            result = subprocess.run([sys.executable, "-c", CHILD, str(path), str(limit), str(args.uploads)],
                                    check=True, capture_output=True, text=True)
            figures = json.loads(result.stdout)
            print(f"| {limit} | {figures['extra_peak_mb']:,.0f} MB | {figures['seconds']:.1f} |")


if __name__ == "__main__":
    main()
