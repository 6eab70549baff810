"""The Python half of a training run on a lent GPU machine (bench/device/run.sh; docs/model.md, "Training on a
lent GPU"). One subcommand per step:

    pins           the packages `cbir train` needs that the machine lacks, as name==version installed here
    check-imports  import `cbir train` with only what the machine has (device-packages.txt) and .device/ carries
    train          train inside the time left (the planned budget), write the bundle and result.json
    pack-out       the bundle and logs → $OUT: model.safetensors in parts under 16 MiB, SHA256SUMS,
                   pca.safetensors, bundle.json, logs.tar.gz (at most 8 files, as the device tool returns)
    collect        the returned files → a bundle here, every file's SHA-256 checked, loaded as the embedder does

Runs under the machine's Python 3.12 and torch 2.11 with the carried wheels, and here under the project's.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.abc
import importlib.metadata
import json
import logging
import platform
import re
import shutil
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
# What `cbir train` imports that the machine's image lacks (found with `check-imports`); typing-extensions because
# pydantic needs a newer one than the image may have. (skops is imported only for BOVW bundles: not carried.)
CARRIED = ("pydantic", "pydantic-core", "pydantic-settings", "typing-inspection", "annotated-types", "python-dotenv",
           "typing-extensions")
DEVICE_PACKAGES = HERE / "device-packages.txt"
# The recipe of the run, before the budget and the paths; CBIR_DEVICE_TRAIN_ARGS options come after it and win.
RECIPE = ("--batch-size", "512", "--scale-lr", "--cutout", "16", "--crop-padding", "reflect",
          "--ema-decay", "0.995", "--ema-every", "5", "--test-every", "10", "--checkpoint-every", "1000000",
          "--profile-steps", "20", "--quiet")
# The CPU rehearsal (--tiny): a narrow network on 5 train and 2 test images a class, seconds of training.
TINY = ("--limit-per-class", "5", "--test-limit-per-class", "2", "--width-mult", "0.125", "--embedding-dim", "32",
        "--pca-components", "16", "--pca-dims", "8", "--batch-size", "25", "--test-every", "2", "--profile-steps", "3")
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20  # what the device tool brings back from $OUT
PART_BYTES = 15 * 2**20
WEIGHTS, PCA, METADATA, LOGS, SUMS = "model.safetensors", "pca.safetensors", "bundle.json", "logs.tar.gz", "SHA256SUMS"

logger = logging.getLogger("cbir.device")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pins", help="name==version of each carried package, as installed here")
    commands.add_parser("check-imports", help="import cbir train with only the machine's packages and the carried")
    train_parser = commands.add_parser("train", help="train inside the time left; write the bundle and result.json")
    train_parser.add_argument("--data-dir", type=Path, required=True, help="the unpacked collection")
    train_parser.add_argument("--work", type=Path, required=True, help="checkpoint, bundle and logs/ go here")
    train_parser.add_argument("--started", type=float, required=True, help="when run.sh started (epoch seconds)")
    train_parser.add_argument("--deadline-s", type=float, default=540, help="seconds the whole command may take")
    train_parser.add_argument("--reserve-s", type=float, default=150,
                              help="seconds kept for what is not training steps: compiling, test checks, the "
                              "bundle, packing")
    train_parser.add_argument("--budget-min", type=float, default=5.5, help="at most this many minutes of steps")
    train_parser.add_argument("--tiny", action="store_true", help="the CPU rehearsal's tiny run")
    train_parser.add_argument("--phase", action="append", default=[], metavar="NAME=SECONDS",
                              help="a step of run.sh before training and its seconds, for result.json")
    train_parser.add_argument("options", nargs=argparse.REMAINDER, help="cbir train options (after --)")
    out_parser = commands.add_parser("pack-out", help="the bundle and the logs → at most 8 files in OUT")
    out_parser.add_argument("bundle", type=Path)
    out_parser.add_argument("out", type=Path)
    out_parser.add_argument("--logs", type=Path, required=True)
    out_parser.add_argument("--part-bytes", type=int, default=PART_BYTES)
    collect_parser = commands.add_parser("collect", help="the returned files → a verified bundle")
    collect_parser.add_argument("returned", type=Path, help="the folder the device tool's files lie in")
    collect_parser.add_argument("bundle", type=Path, help="the bundle directory to write")
    args = parser.parse_args(argv)
    if args.command == "pins":
        print(" ".join(f"{name}=={importlib.metadata.version(name)}" for name in CARRIED))
    elif args.command == "check-imports":
        print(check_imports())
    elif args.command == "train":
        return train_within_budget(args)
    elif args.command == "pack-out":
        print(json.dumps(pack_out(args.bundle, args.out, logs=args.logs, part_bytes=args.part_bytes), indent=1))
    else:
        print(json.dumps(collect(args.returned, args.bundle), indent=1))
    return 0


def check_imports() -> str:
    """Import `services.training.trainer` with every module blocked whose distribution is neither on the
    machine (device-packages.txt) nor carried; raises ModuleNotFoundError naming the first one missing."""
    names = DEVICE_PACKAGES.read_text().split("\n")
    allowed = {_normalise(name) for name in names if name and not name.startswith("#")} | {
        _normalise(name) for name in CARRIED}
    distributions = importlib.metadata.packages_distributions()
    blocked = {module for module, owners in distributions.items() if module not in sys.stdlib_module_names
               and module != "services" and not allowed & {_normalise(owner) for owner in owners}}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> None:
            if name.partition(".")[0] in blocked:
                raise ModuleNotFoundError(f"{name} is not on the lent GPU machine nor carried", name=name)

    for module in [m for m in sys.modules if m.partition(".")[0] in blocked]:
        del sys.modules[module]  # imported before the check: import them again through the blocker
    sys.meta_path.insert(0, Blocker())
    import services.training.trainer  # noqa: F401

    loaded = sorted({owner for module in list(sys.modules) for owner in distributions.get(module, ())
                     if _normalise(owner) in {_normalise(name) for name in CARRIED}})
    return (f"services.training.trainer imports with {len(blocked)} modules of this environment blocked; "
            f"of the carried packages it loaded {', '.join(loaded)}")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def train_within_budget(args: argparse.Namespace) -> int:
    """`cbir train` for the time left: the budget is the smaller of --budget-min and what is left of the
    deadline after the reserve. If a compiled run fails, it is run again uncompiled in what time is left."""
    from services.common.logs import configure_logging

    configure_logging()
    import torch

    from services.training import get_args_parser, train

    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    options = [o for o in args.options if o != "--"]
    record: dict[str, Any] = {"phases": dict(_phase(p) for p in args.phase), "tries": []}
    while True:
        left = args.deadline_s - (time.time() - args.started) - args.reserve_s
        budget_s = min(args.budget_min * 60, left)
        if budget_s < (1 if args.tiny else 30):
            record["error"] = f"{left:.0f} s left for training after the reserve: too little"
            break
        argv = [*RECIPE, *(TINY if args.tiny else ()), *options, "--data-dir", str(args.data_dir),
                "--output", str(args.work / "bundle"), "--checkpoint-dir", str(args.work / "train"),
                "--time-budget-min", f"{budget_s / 60:.4f}"]
        train_args = get_args_parser().parse_args(argv)
        started = time.time()
        try:
            result = train(train_args)
        except KeyboardInterrupt:  # run.sh's deadline
            record["error"] = "interrupted at the deadline"
            logger.exception("training interrupted")
            break
        except Exception as exc:  # noqa: BLE001 - the run must come back with its logs, whatever broke
            record["tries"].append({"argv": argv, "error": "".join(traceback.format_exception(exc))[-4000:]})
            logger.exception("training failed")
            compiled = train_args.compile != "off" and (train_args.compile != "auto" or torch.cuda.is_available())
            if not compiled:
                break
            options = [*options, "--compile", "off"]
            logger.warning("training again without torch.compile")
            continue
        record["tries"].append({"argv": argv, "seconds": round(time.time() - started, 1)})
        record.update(result=result, training_seconds=round(time.time() - started, 1), budget_s=round(budget_s, 1))
        break
    record.update(environment(), total_seconds=round(time.time() - args.started, 1))
    bundle_json = args.work / "bundle" / METADATA
    if "result" in record and bundle_json.exists():
        training = json.loads(bundle_json.read_text())["training"]
        record.update(command=training["command"], budget=training.get("budget"),
                      training_environment=training.get("environment"), last_epochs=training["history"][-3:])
    profile = args.work / "train" / "profile.txt"
    if profile.exists():
        shutil.copyfile(profile, logs / "profile.txt")
    (logs / "result.json").write_text(json.dumps(record, indent=1) + "\n")
    print(summary(record))
    return 0 if "result" in record else 1


def _phase(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    return name, round(float(seconds), 1)


def environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda if cuda else None}


def summary(record: dict[str, Any]) -> str:
    """A few lines for the end of the call's output (the device tool returns its last 12,000 characters)."""
    result = record.get("result") or {}
    lines = [f"device {record['device']}, torch {record['torch']}, {record['total_seconds']} s in all; phases "
             + ", ".join(f"{k} {v} s" for k, v in record["phases"].items())]
    if result:
        budget = record.get("budget") or {}
        lines.append(f"bundle {result['version']}: test accuracy {result['test_accuracy']}, with flip "
                     f"{result['test_accuracy_flip_tta']}; {budget.get('epochs_reached')} epochs in "
                     f"{budget.get('trained_seconds')} s of steps (budget {record['budget_s']} s), "
                     f"training {record['training_seconds']} s in all")
        lines.append(f"command: {record['command']}")
    for attempt in record["tries"]:
        if "error" in attempt:
            lines.append("failed: " + attempt["error"].strip().splitlines()[-1])
    if "error" in record:
        lines.append(record["error"])
    return "\n".join(lines)


def pack_out(bundle: Path, out: Path, *, logs: Path, part_bytes: int = PART_BYTES) -> dict[str, int]:
    """What comes back from the machine: the weights in parts, the PCA, bundle.json, SHA256SUMS (of each
    file and of the whole weights) and the logs as one tarball; whatever of the bundle exists, so a failed
    run still brings its logs. Returns each file's size."""
    if not 0 < part_bytes < MAX_FILE_BYTES:
        raise ValueError(f"parts of {part_bytes} bytes: they must be under {MAX_FILE_BYTES}")
    out.mkdir(parents=True, exist_ok=True)
    sums = []
    weights = bundle / WEIGHTS
    if weights.exists():
        data = weights.read_bytes()
        sums.append((hashlib.sha256(data).hexdigest(), WEIGHTS))
        for number, start in enumerate(range(0, len(data), part_bytes)):
            name = f"{WEIGHTS}.{number:02d}"
            (out / name).write_bytes(data[start:start + part_bytes])
            sums.append((hashlib.sha256(data[start:start + part_bytes]).hexdigest(), name))
    for name in (PCA, METADATA):
        if (bundle / name).exists():
            shutil.copyfile(bundle / name, out / name)
            sums.append((hashlib.sha256((out / name).read_bytes()).hexdigest(), name))
    with tarfile.open(out / LOGS, "w:gz") as tar:
        tar.add(logs, arcname="logs")
    (out / SUMS).write_text("".join(f"{digest}  {name}\n" for digest, name in sums))
    sizes = {path.name: path.stat().st_size for path in sorted(out.iterdir())}
    too_large = [name for name, size in sizes.items() if size >= MAX_FILE_BYTES]
    if len(sizes) > MAX_FILES or too_large:
        raise RuntimeError(f"{out} holds {len(sizes)} files (at most {MAX_FILES} come back), too large: {too_large}")
    return sizes


def collect(returned: Path, bundle: Path) -> dict[str, Any]:
    """Rebuild the bundle from the files `pack_out` left: each file and the joined weights checked against
    SHA256SUMS, written to `bundle`, loaded as the embedder loads it; the logs unpacked beside it
    (`<bundle>-logs`). Returns the bundle's version and metrics."""
    from services.embedder.bundle import load_bundle

    expected = dict(reversed(line.split("  ", 1)) for line in (returned / SUMS).read_text().splitlines())
    parts = sorted(name for name in expected if name.startswith(f"{WEIGHTS}."))
    if not parts or PCA not in expected or METADATA not in expected:
        raise SystemExit(f"{returned / SUMS} lists no complete bundle (a failed run?): see {returned / LOGS}")
    for name in (*parts, PCA, METADATA):
        if hashlib.sha256((returned / name).read_bytes()).hexdigest() != expected[name]:
            raise SystemExit(f"{returned / name}: its SHA-256 is not the one the device recorded")
    weights = b"".join((returned / name).read_bytes() for name in parts)
    if hashlib.sha256(weights).hexdigest() != expected[WEIGHTS]:
        raise SystemExit(f"the joined parts {', '.join(parts)} are not the device's {WEIGHTS}")
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / WEIGHTS).write_bytes(weights)
    for name in (PCA, METADATA):
        shutil.copyfile(returned / name, bundle / name)
    logs = bundle.with_name(bundle.name + "-logs")
    with tarfile.open(returned / LOGS) as tar:
        tar.extractall(logs, filter="data")
    loaded = load_bundle(bundle)
    return {"bundle": str(bundle), "version": loaded.version, "metrics": loaded.metadata.get("metrics"),
            "logs": str(logs / "logs")}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))  # the machine has the checkout, not the installed project
    sys.exit(main())
