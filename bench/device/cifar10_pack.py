#!/usr/bin/env python3
# A copy of ../shared/tools/cifar10_pack.py, the project's shared tool, so that it travels to a lent GPU
# machine with the checkout (bench/device/run.sh, docs/model.md); keep the two in step.
"""Pack ../shared/cifar10 into one small file, and unpack it into the same folders, byte for byte.

Every CIFAR-10 JPEG in that folder starts with the same 600-odd bytes (JFIF header, quantisation
and Huffman tables); only the scan after them differs (about 260 bytes an image). Stored once, that
header shrinks the 60,000 files (55 MB of bytes, 240 MB on disk) to a 16 MB pack: small enough to
travel to another machine with a checkout. Needs only Python 3.8+ and NumPy.

    python cifar10_pack.py pack ../shared/cifar10 cifar10.pack.npz
    python cifar10_pack.py unpack cifar10.pack.npz data/cifar10     # then CBIR_DATA_DIR=data/cifar10

`unpack` checks the SHA-256 of every file it writes against the one recorded at packing time and
fails loudly on any difference.
"""
import hashlib
import sys
from pathlib import Path

import numpy as np

SOS = b"\xff\xda"  # JPEG start-of-scan marker: the shared header ends right before it


def pack(src: Path, out: Path) -> None:
    paths = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.jpg"))
    header, scans, offsets, digests = None, [], [0], []
    for rel in paths:
        data = (src / rel).read_bytes()
        cut = data.index(SOS)
        if header is None:
            header = data[:cut]
        if data[:cut] != header:
            sys.exit(f"{rel}: its header differs from the first file's; this pack needs one shared header")
        scans.append(np.frombuffer(data[cut:], dtype=np.uint8))
        offsets.append(offsets[-1] + len(data) - cut)
        digests.append(hashlib.sha256(data).digest())
    extra = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.glob("*.md")}
    extra_data = np.empty(len(extra), dtype=object)
    extra_data[:] = [np.frombuffer(v, dtype=np.uint8) for v in extra.values()]
    np.savez_compressed(
        out,
        header=np.frombuffer(header, dtype=np.uint8),
        scans=np.concatenate(scans),
        offsets=np.asarray(offsets, dtype=np.int64),
        paths=np.asarray(paths),
        sha256=np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 32),
        extra_names=np.asarray(list(extra)),
        extra_data=extra_data,
    )
    print(f"packed {len(paths)} images from {src} into {out} ({out.stat().st_size / 1e6:.1f} MB)")


def unpack(pack_file: Path, dest: Path) -> None:
    z = np.load(pack_file, allow_pickle=True)
    header, scans, offsets, digests = z["header"].tobytes(), z["scans"], z["offsets"], z["sha256"]
    for i, rel in enumerate(z["paths"]):
        data = header + scans[offsets[i]:offsets[i + 1]].tobytes()
        if hashlib.sha256(data).digest() != digests[i].tobytes():
            sys.exit(f"{rel}: rebuilt bytes do not match the packed file's SHA-256")
        target = dest / str(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    for name, data in zip(z["extra_names"], z["extra_data"]):  # noqa: B905 - runs on Python 3.8 too
        (dest / str(name)).write_bytes(data.tobytes())
    print(f"unpacked {len(z['paths'])} images into {dest}, every file's SHA-256 checked")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        sys.exit(__doc__)
    (pack if sys.argv[1] == "pack" else unpack)(Path(sys.argv[2]), Path(sys.argv[3]))
