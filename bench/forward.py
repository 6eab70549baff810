"""Model-only throughput: images/s of the shipped model's forward pass at batch 1, 16, 64 and 256.

    python bench/forward.py                 # full: about 5 min on the 2-core CPU machine (4 compilations)
    python bench/forward.py --quick         # batches 1 and 16, eager only: about 10 s

For each device (the CPU, and CUDA when present; --device picks one) and batch: the eager bf16
forward (`predict` with bf16 autocast, as the embedder runs it uncompiled: the yardstick of every
speed goal), eager fp32, and bf16 compiled as the embedder compiles it (an AOTInductor package per batch
size, with freezing; built before its row). Random uint8 images, one pass per image, a few untimed batches
first, then `--seconds` of
batches back to back. Each row's ratio is to the eager bf16 forward at the same batch: above 1
the mode helps. Writes bench/results/forward.json; refuses to start while the machine is busy.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import benchlib
import torch

from services.common.logs import configure_logging

MODES = ("bf16", "fp32", "compiled")
MODE_NAMES = {"bf16": "eager bf16", "fp32": "eager fp32", "compiled": "compiled bf16"}


def get_args_parser():
    parser = benchlib.base_parser(__doc__)
    parser.add_argument("--batches", type=benchlib.int_list, default=None,
                        help="comma-separated batch sizes (default 1,16,64,256; --quick: 1,16)")
    parser.add_argument("--modes", type=benchlib.str_list, default=None,
                        help="comma-separated, of bf16 (always measured: the yardstick), fp32, compiled "
                             "(default all three; --quick: bf16,fp32)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per row (default 5; --quick: 0.3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches per row (default 3; --quick: 1)")
    return parser


def compiled_model(model: torch.nn.Module, *, batch: int, image_size: int, device: torch.device,
                   folder: Path) -> torch.nn.Module:
    """`model` compiled as `Embedder.compile_next` serves it: an AOTInductor package for batches of `batch`
    (`services.embedder.aot`), built here in this process (the bench measures nothing meanwhile)."""
    from services.embedder.aot import CompiledNetwork, build_package, package_path

    package = package_path(folder, size=batch, image_size=image_size)
    return CompiledNetwork(build_package(copy.deepcopy(model), size=batch, image_size=image_size, device=device,
                                         package=package))


def devices(choice: str) -> list[torch.device]:
    if choice == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    from services.embedder.inference import pick_device

    return [pick_device(choice)]


def measure_device(bundle: Any, device: torch.device, *, batches: list[int], modes: list[str], seconds: float,
                   warmup: int) -> list[benchlib.Throughput]:
    model = benchlib.prepared_model(bundle, device)
    packages = Path(tempfile.mkdtemp(prefix="cbir-forward-"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        return measure_rows(bundle, model, device, batches=batches, modes=modes, seconds=seconds, warmup=warmup,
                            packages=packages)
    finally:
        shutil.rmtree(packages, ignore_errors=True)


def measure_rows(bundle: Any, model: torch.nn.Module, device: torch.device, *, batches: list[int], modes: list[str],
                 seconds: float, warmup: int, packages: Path) -> list[benchlib.Throughput]:
    rows = []
    for batch in batches:
        for mode in ("bf16", *(m for m in modes if m != "bf16")):
            network = model if mode != "compiled" else compiled_model(
                model, batch=batch, image_size=bundle.preprocessing.image_size, device=device, folder=packages)
            rows.append(benchlib.measure_forward(network, bundle.preprocessing, mode=MODE_NAMES[mode], batch=batch,
                                                 views=1, device=device, seconds=seconds, warmup=warmup))
            logging.info("%s %s: %.1f images/s", device.type, rows[-1].describe(), rows[-1].images_per_second)
    return rows


def figures_of(rows: list[benchlib.Throughput]) -> list[dict[str, Any]]:
    """A row per measurement; each but the yardstick with its ratio to the eager bf16 row of its device and batch."""
    sticks = {(r.device, r.batch): r for r in rows if r.mode == "eager bf16"}
    figures = []
    for row in rows:
        name = f"{row.device} {row.mode}, batch {row.batch}"
        stick = sticks[row.device, row.batch]
        if row is stick:
            figures.append(benchlib.figure(f"{name} (yardstick)", row.images_per_second, "images/s"))
        else:
            figures.append(benchlib.figure(name, row.images_per_second, "images/s", yardstick=stick))
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    args = get_args_parser().parse_args(argv)
    batches = args.batches or ([1, 16] if args.quick else [1, 16, 64, 256])
    modes = args.modes or (["bf16", "fp32"] if args.quick else list(MODES))
    if unknown := sorted(set(modes) - set(MODES)):
        raise SystemExit(f"--modes {','.join(unknown)}: not one of {', '.join(MODES)}")
    seconds = args.seconds if args.seconds is not None else (0.3 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    load = benchlib.require_idle(args.max_load, wait_s=args.idle_wait, allow_busy=args.allow_busy)
    bundle = benchlib.load_shipped_bundle(args.model_dir)
    rows = [row for device in devices(args.device)
            for row in measure_device(bundle, device, batches=batches, modes=modes, seconds=seconds, warmup=warmup)]
    result = {
        "load": load,
        "settings": {"quick": args.quick, "model": bundle.version, "batches": batches, "modes": modes,
                     "seconds_per_row": seconds, "warmup_batches": warmup, "views": 1,
                     "devices": sorted({row.device for row in rows})},
        "yardsticks": [row.to_json() for row in rows if row.mode == "eager bf16"],
        "figures": figures_of(rows),
        "goals": [],  # the yardstick itself: the other benches' goals are ratios to it
        "details": {"measurements": [row.to_json() for row in rows]},
    }
    benchlib.write_result("forward", result, output_dir=args.output_dir, argv=argv)
    return result


if __name__ == "__main__":
    main()
